"""Mixture-of-experts layers as one linear per expert matrix, so every expert is a target like any other.

transformers 5 stores a MoE block's experts *fused*: 3-D parameters
``gate_up_proj`` (experts x 2*intermediate x hidden, the gate rows first) and
``down_proj`` (experts x hidden x intermediate), transposed in some families.
They are not ``nn.Linear`` modules, so nothing would find, calibrate,
factorize or quantize them. :func:`split_experts` replaces each such module by
:class:`SplitExperts` - the same computation with a ``gate_proj``, ``up_proj``
and ``down_proj`` ``nn.Linear`` per expert - right after loading, before
anything else looks at the model; the router stays as it is (a plain
parameter, never a target). A layout this module does not know (interleaved
gate/up, a custom gate function, a post-expert norm) is left fused and
reported, so it is listed as dense rather than silently skipped.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, or ``down(act(up(x)))`` without a gate."""

    def __init__(self, gate_proj: nn.Linear | None, up_proj: nn.Linear, down_proj: nn.Linear, act_fn: nn.Module):
        super().__init__()
        if gate_proj is not None:
            self.gate_proj = gate_proj
        self.up_proj, self.down_proj, self.act_fn = up_proj, down_proj, act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_proj"):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act_fn(self.up_proj(x)))


class SplitExperts(nn.ModuleList):
    """A fused experts module's computation, one :class:`ExpertMLP` per expert (same call signature); its
    linears are named as in per-expert checkpoints (``mlp.experts.3.gate_proj``)."""

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)
        self.num_experts = len(experts)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for expert in torch.unique(top_k_index).tolist():
            if expert >= self.num_experts:  # expert-parallel sentinels
                continue
            token, slot = torch.where(top_k_index == expert)
            y = self[expert](hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def _fused_layout_problem(module: nn.Module) -> str | None:
    """Why ``module`` (a fused experts module) cannot be split here (None: it can)."""
    if getattr(module, "has_post_expert_norm", False):
        return "a norm after each expert"
    if not getattr(module, "is_concatenated", True):
        return "interleaved gate/up rows"
    from transformers.integrations.moe import _default_apply_gate

    gate = getattr(type(module), "_apply_gate", _default_apply_gate)
    if getattr(module, "has_gate", True) and gate is not _default_apply_gate:
        return f"its own gate function ({type(module).__name__}._apply_gate)"
    if not hasattr(module, "act_fn"):
        return "no act_fn"
    return None


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers-5 fused experts module: 3-D ``down_proj`` plus ``gate_up_proj`` or ``up_proj`` parameters."""
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj", getattr(module, "up_proj", None))
    return (isinstance(down, nn.Parameter) and down.dim() == 3 and isinstance(up, nn.Parameter) and up.dim() == 3)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding (a copy of) ``weight`` (out x in); on the meta device when ``weight`` is."""
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    if not weight.is_meta:
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
    return layer


def split(module: nn.Module) -> SplitExperts:
    """``module``'s experts as separate linears (weights copied; meta parameters stay meta)."""
    transposed = getattr(module, "is_transposed", False)
    gated = getattr(module, "has_gate", True) and hasattr(module, "gate_up_proj")
    biased = getattr(module, "has_bias", False)

    def weight(param: nn.Parameter, e: int) -> torch.Tensor:
        return param[e].t() if transposed else param[e]

    experts = []
    for e in range(module.down_proj.shape[0]):
        down_bias = module.down_proj_bias[e] if biased else None
        down = _linear(weight(module.down_proj, e), down_bias)
        if gated:
            both = weight(module.gate_up_proj, e)
            half = both.shape[0] // 2
            bias = module.gate_up_proj_bias[e] if biased else None
            gate = _linear(both[:half], None if bias is None else bias[:half])
            up = _linear(both[half:], None if bias is None else bias[half:])
        else:
            gate, up = None, _linear(weight(module.up_proj, e), module.up_proj_bias[e] if biased else None)
        experts.append(ExpertMLP(gate, up, down, module.act_fn))
    return SplitExperts(experts)


def _agrees(fused: nn.Module, split_module: SplitExperts) -> bool:
    """Whether the split module computes what the fused one does, on random tokens routed to every expert."""
    param = fused.down_proj
    if param.is_meta:
        return True  # nothing to compare yet: the weights are loaded into the split linears afterwards
    generator = torch.Generator().manual_seed(0)
    experts, hidden = param.shape[0], split_module[0].up_proj.in_features
    tokens = 4 * experts
    x = torch.randn(tokens, hidden, generator=generator).to(param.device, param.dtype)
    index = torch.stack([torch.arange(tokens) % experts, (torch.arange(tokens) + 1) % experts], dim=1).to(param.device)
    weights = torch.rand(tokens, 2, generator=generator).to(param.device, param.dtype)
    with torch.no_grad():
        want, got = fused(x, index, weights), split_module(x, index, weights)
    scale = want.abs().max().clamp_min(torch.finfo(want.dtype).tiny)
    return bool(((want - got).abs().max() / scale) < (1e-4 if param.dtype == torch.float32 else 3e-2))


def split_experts(model: nn.Module) -> dict:
    """Replace every fused experts module of ``model`` by :class:`SplitExperts`, in place.

    Returns what was found: ``{"modules": split modules, "expert_matrices": linears made, "left_fused": {name:
    reason}}`` (empty when the model has no experts).
    """
    found = {name: m for name, m in model.named_modules() if is_fused_experts(m)}
    if not found:
        return {}
    facts: dict = {"modules": 0, "expert_matrices": 0, "left_fused": {}}
    for name, module in found.items():
        problem = _fused_layout_problem(module)
        replacement = None if problem else split(module)
        if replacement is not None and not _agrees(module, replacement):
            problem, replacement = "the split computation does not reproduce it", None
        if replacement is None:
            facts["left_fused"][name] = problem
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
        facts["modules"] += 1
        facts["expert_matrices"] += sum(isinstance(m, nn.Linear) for m in replacement.modules())
    if facts["left_fused"]:
        first, reason = next(iter(facts["left_fused"].items()))
        log.warning("%d fused experts module(s) left dense, e.g. %s (%s): they are not compressed",
                    len(facts["left_fused"]), first, reason)
    return facts
