"""Finding where non-finite numbers come from."""

from __future__ import annotations

import torch
from torch import nn


def first_nonfinite_module(model: nn.Module, input_ids: torch.Tensor) -> str | None:
    """Run one forward pass and name the first module whose output is NaN/inf.

    Modules are reported in execution order, so the answer is the layer that
    produced the first non-finite value, not one that merely passed it on.
    """
    found: list[str] = []
    handles = []

    def hook(name):
        def check(_module, _inputs, output):
            tensor = output[0] if isinstance(output, tuple) else output
            if not found and isinstance(tensor, torch.Tensor) and not torch.isfinite(tensor).all():
                found.append(name)
        return check

    for name, module in model.named_modules():
        if name and not list(module.children()):  # leaves only: the real producers
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None
