"""What to compress in a model, and how big a model is.

The layers to compress are found from the model's structure - every
``nn.Linear`` inside the decoder blocks (the longest ``nn.ModuleList`` of
identical blocks) - so Llama, Qwen2, OPT, Gemma and other families work
without a list of layer names.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from bench.errors import UsageError


@dataclass(frozen=True)
class Target:
    """One compressible linear: its module path, block index and type.

    ``kind`` is the path inside its block (``self_attn.q_proj``); matrices of
    the same kind across blocks form the groups SVD-LLM V2 allocates within.
    """

    name: str
    block: int
    kind: str
    out_features: int
    in_features: int
    bias: bool

    @property
    def params(self) -> int:
        return self.out_features * self.in_features + (self.out_features if self.bias else 0)

    @property
    def block_path(self) -> str:
        """The module path of the decoder block holding this linear (``model.layers.3``): block statistics' key."""
        return self.name.removesuffix("." + self.kind)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder blocks: the longest ModuleList of same-type modules holding linears, not counting lists
    inside such a list's elements (a MoE block's experts), searched in the language model's decoder where the
    model names one (a multimodal model's vision tower has blocks too)."""
    best: tuple[str, nn.ModuleList] | None = None
    outer: list[str] = []
    within = _decoder_path(model)
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if within and not name.startswith(f"{within}."):
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        if any(name.startswith(f"{other}.") for other in outer):
            continue
        outer.append(name)
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise UsageError(f"cannot find decoder blocks in {type(model).__name__}; "
                         "svdbench compresses models whose blocks sit in an nn.ModuleList")
    return best


def _decoder_path(model: nn.Module) -> str:
    """The module path of the model's text decoder (transformers' ``get_decoder``), or "" when it names none."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        return ""
    return next((name for name, module in model.named_modules() if module is decoder and name), "")


def find_targets(model: nn.Module) -> list[Target]:
    """Every ``nn.Linear`` inside the decoder blocks, in module order."""
    prefix, blocks = decoder_blocks(model)
    targets = []
    for index, block in enumerate(blocks):
        for kind, module in block.named_modules():
            if isinstance(module, nn.Linear):
                targets.append(Target(name=f"{prefix}.{index}.{kind}", block=index, kind=kind,
                                      out_features=module.out_features, in_features=module.in_features,
                                      bias=module.bias is not None))
    return targets


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _storage_key(module: nn.Module, name: str, p: nn.Parameter) -> int:
    """What identifies a weight's storage, so tied weights count once: its data pointer; for a module offloaded by
    accelerate (weights on ``meta``, where every pointer is 0) the pointer of the CPU copy its hook onloads."""
    if not p.is_meta:
        return p.data_ptr()
    weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
    try:
        return weights[name].data_ptr()
    except (KeyError, TypeError):  # no hook, or not one of its weights
        return id(p)


def footprint(model: nn.Module) -> dict[str, int]:
    """Whole-model parameter count and bytes (tied weights counted once).

    Modules may add bytes that are not parameters (packed quantized weights)
    by exposing ``storage_bytes()``; those are counted instead of their
    parameters and buffers.
    """
    seen: set[int] = set()
    params = 0
    nbytes = 0

    def visit(module: nn.Module) -> None:
        nonlocal params, nbytes
        if hasattr(module, "storage_bytes"):
            nbytes += int(module.storage_bytes())
            params += int(module.storage_params())
            return
        for name, p in module.named_parameters(recurse=False):
            key = _storage_key(module, name, p)
            if key in seen:
                continue
            seen.add(key)
            params += p.numel()
            nbytes += p.numel() * p.element_size()
        for child in module.children():
            visit(child)

    visit(model)
    return {"params": params, "bytes": nbytes}


def execution_device(model: nn.Module):
    """Where ``model`` computes: the execution device of its offload hooks, else the device of its first parameter."""
    import torch

    for module in model.modules():
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device)
    return next(model.parameters()).device
