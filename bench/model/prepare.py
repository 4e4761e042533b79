"""A loaded model's layers put in the form svdbench finds and compresses: every matrix an ``nn.Linear``.

Applied right after every load (a checkpoint, a converted GGUF, the empty
model a compressed one is assembled into, a saved compressed model), so the
statistics, the factorizations, the quantizers and the saved files all see
the same module names and shapes:

- fused MoE experts become one linear per expert matrix (:mod:`bench.model.experts`);
- GPT-2-style ``Conv1D`` projections (``y = x @ W + b``, ``W`` stored in x out)
  become ``nn.Linear`` with ``W`` transposed: the same function.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.model.experts import split_experts


def _linear_of_conv1d(conv: nn.Module) -> nn.Linear:
    in_features, out_features = conv.weight.shape
    weight = conv.weight
    layer = nn.Linear(in_features, out_features, bias=conv.bias is not None, device=weight.device, dtype=weight.dtype)
    if not weight.is_meta:
        with torch.no_grad():
            layer.weight.copy_(weight.t())
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
    return layer


def linearize_conv1d(model: nn.Module) -> int:
    """Replace every transformers ``Conv1D`` of ``model`` by the equivalent ``nn.Linear``; returns how many."""
    from transformers.pytorch_utils import Conv1D

    found = [name for name, module in model.named_modules() if isinstance(module, Conv1D)]
    for name in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _linear_of_conv1d(getattr(parent, child)))
    return len(found)


def prepare_model(model: nn.Module) -> dict:
    """``model`` changed in place as the module docstring says; returns what changed (empty: nothing)."""
    facts: dict = {}
    experts = split_experts(model)
    if experts:
        facts["experts"] = experts
    conv1d = linearize_conv1d(model)
    if conv1d:
        facts["conv1d_as_linear"] = conv1d
    return facts
