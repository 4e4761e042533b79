"""Weight-only quantization of linears with HQQ, stored bit-packed.

:class:`QuantizedLinear` holds what a deployment would hold: the bit-packed
integer weights from HQQ (calibration-free, half-quadratic optimized
zero points and scales), one scale and one zero point per group of
``group_size`` consecutive weights (stored in ``meta_dtype``, float16 by
default, as HQQ does on GPUs), and the bias. Its ``storage_bytes()`` counts
exactly those tensors, so :func:`bench.model.targets.footprint` reports real bytes.
The forward pass dequantizes the weight and calls ``F.linear`` (simple and
exact to the stored values; no fused low-bit kernel on CPU).

Grouping: the weight is flattened row by row and cut into groups of
``group_size`` values (HQQ's ``axis=1``); when ``in_features`` is a multiple
of ``group_size`` every group lies inside one row. The flat weight is
zero-padded to a multiple of ``4 * group_size`` values (HQQ's packers need
whole rows; factors of arbitrary rank ``r`` need the padding), and the
padding is counted in the bytes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import UsageError
from bench.model.targets import set_module

BITS = (2, 3, 4, 8)
META_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _packing(nbits: int) -> str:
    from hqq.core.quantize import Quantizer

    return Quantizer.bit_to_packing[nbits]


class QuantizedLinear(nn.Module):
    """``y = dequant(W_q) x + b`` with HQQ bit-packed weights."""

    def __init__(self, in_features: int, out_features: int, nbits: int, group_size: int,
                 packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.nbits, self.group_size, self.compute_dtype = nbits, group_size, compute_dtype
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def quantize(cls, linear: nn.Linear, nbits: int, group_size: int = 64,
                 meta_dtype: torch.dtype = torch.float16) -> QuantizedLinear:
        """Quantize ``linear``'s weight with HQQ (no calibration data)."""
        from hqq.core.quantize import Quantizer

        if nbits not in BITS:
            raise UsageError(f"cannot quantize to {nbits} bits; use one of {', '.join(map(str, BITS))}")
        if group_size < 1:
            raise UsageError(f"quantization group size must be >= 1, got {group_size}")
        weight = linear.weight.detach()
        flat = weight.float().reshape(-1)
        # HQQ packs 4 (2-bit) or 2 (4-bit) groups per row: pad the group count to a multiple of 4.
        groups = 4 * math.ceil(flat.numel() / (4 * group_size))
        flat = F.pad(flat, (0, groups * group_size - flat.numel()))
        packed, meta = Quantizer.quantize(flat.reshape(groups, group_size), nbits=nbits, group_size=group_size,
                                          axis=1, optimize=True, bitpack=True, device=str(weight.device))
        scale, zero = meta["scale"].to(meta_dtype), meta["zero"].to(meta_dtype)
        for label, t in (("scale", scale), ("zero point", zero)):
            if not torch.isfinite(t).all():
                raise FloatingPointError(f"HQQ produced a non-finite {label} quantizing a {tuple(weight.shape)} weight to {nbits} bits")
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(linear.in_features, linear.out_features, nbits, group_size, packed.contiguous(),
                   scale.contiguous(), zero.contiguous(), bias, compute_dtype=weight.dtype)

    def dequantize(self) -> torch.Tensor:
        """The weight the layer computes with (``out x in``)."""
        from hqq.core.quantize import Quantizer

        levels = Quantizer.unpack[_packing(self.nbits)](self.packed, dtype=torch.float32)[:self.scale.shape[0]]
        weight = (levels - self.zero.float()) * self.scale.float()
        return weight.reshape(-1)[:self.in_features * self.out_features].reshape(
            self.out_features, self.in_features).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def storage_bytes(self) -> int:
        """Bytes of the packed weight, scales, zero points and bias."""
        tensors = [self.packed, self.scale, self.zero] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def storage_params(self) -> int:
        """Logical parameters: the weights represented plus the bias."""
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def quantization(self) -> dict:
        """How this layer was quantized, for manifests."""
        return {"quantizer": "hqq", "nbits": self.nbits, "group_size": self.group_size,
                "packing": _packing(self.nbits), "meta_dtype": str(self.scale.dtype).removeprefix("torch.")}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nbits={self.nbits}, group_size={self.group_size}"


def quantize_linears(model: nn.Module, names: list[str], nbits: int, group_size: int = 64,
                     meta_dtype: torch.dtype = torch.float16) -> dict[str, dict]:
    """Replace each named ``nn.Linear`` of ``model`` by a :class:`QuantizedLinear`, in place.

    Returns per-layer bytes before and after, for the record.
    """
    layers = {}
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise UsageError(f"cannot quantize {name}: it is a {type(linear).__name__}, not an nn.Linear")
        before = sum(p.numel() * p.element_size() for p in linear.parameters())
        quantized = QuantizedLinear.quantize(linear, nbits, group_size, meta_dtype)
        set_module(model, name, quantized)
        layers[name] = {"bytes_before": before, "bytes": quantized.storage_bytes()}
    return layers
