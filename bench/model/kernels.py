"""Faster kernels for a model's float32 linears on the CPU, for inference.

On CPUs whose BLAS does not use AVX-512 (MKL on AMD, as here) oneDNN's linear
(``torch.ops.mkldnn._linear_pointwise``) is about twice as fast as torch's
default at a model's shapes (``benchmarks/gflops.py`` measures both), and it
agrees with it to float32 rounding. The perplexity task and ASVD's
sensitivity search (the inner loops of a run) use it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F


@functools.cache
def onednn_linear_works() -> bool:
    """Whether oneDNN's linear is available here and agrees with ``F.linear`` (checked once per process)."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=generator) for shape in ((2, 5, 64), (48, 64), (48,)))
    try:
        return torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), rtol=1e-4, atol=1e-5)
    except RuntimeError:
        return False


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` through oneDNN (float32, CPU; check :func:`onednn_linear_works` first)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return onednn_linear(x, module.weight, module.bias)


def linear_function(module: nn.Linear) -> Callable[..., torch.Tensor]:
    """The kernel ``module`` computes with now: ``(x, weight, bias) -> y`` (oneDNN inside
    :func:`onednn_linears`, else ``F.linear``)."""
    forward = vars(module).get("forward")
    return onednn_linear if isinstance(forward, functools.partial) and forward.func is _onednn_forward else F.linear


@contextlib.contextmanager
def onednn_linears(model: nn.Module, enabled: bool = True):
    """Inside the block, the float32 CPU ``nn.Linear`` modules of ``model`` (inference only) use oneDNN.

    Yields how many were switched; each gets its own ``forward`` back on exit.
    """
    swapped = []
    if enabled and onednn_linear_works():
        for module in model.modules():
            if (type(module) is nn.Linear and "forward" not in vars(module) and module.weight.device.type == "cpu"
                    and module.weight.dtype == torch.float32 and module.weight.layout == torch.strided
                    and module.weight.is_contiguous()):
                module.forward = functools.partial(_onednn_forward, module)
                swapped.append(module)
    try:
        yield len(swapped)
    finally:
        for module in swapped:
            vars(module).pop("forward", None)
