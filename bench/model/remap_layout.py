"""Saving and loading :class:`bench.model.remapped.RemappedLinear` (the ``dobi_remap`` quantized layout).

Registered with :func:`bench.model.layouts.register_layout` when
:mod:`bench.model.manifest` imports this module, so a saved Dobi-SVD model loads
without the method's plugin.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.model.layouts import (
    FLOAT_DTYPES,
    QuantizedLayout,
    _check_tensor_spec,
    _tensor_spec,
    check_entry,
    is_int,
    register_layout,
)
from bench.model.remapped import RemappedLinear

TENSORS = ("us_q", "us_absmax", "vt_q", "vt_absmax", "rest")


class RemapLayout(QuantizedLayout):
    quantizer = "dobi_remap"
    KEYS = {"quantizer", "rank", "packing", "in_features", "out_features", "bias", "compute_dtype", "tensors"}

    def describe(self, module: nn.Module) -> dict | None:
        if not isinstance(module, RemappedLinear):
            return None
        return {**module.quantization(), "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None, "compute_dtype": str(module.compute_dtype).removeprefix("torch."),
                "tensors": {key: _tensor_spec(getattr(module, key)) for key in TENSORS if getattr(module, key) is not None}}

    def validate(self, entry: dict, dense: nn.Module, where: str) -> None:
        check_entry(set(entry) == self.KEYS, where, f"has keys {sorted(entry)}, expected {sorted(self.KEYS)}")
        self.check_linear(entry, dense, where)
        lo = min(entry["in_features"], entry["out_features"])
        check_entry(is_int(entry["rank"], 1) and entry["rank"] <= lo, where,
               f"rank {entry['rank']!r} is not in 1..{lo}")
        check_entry(entry["compute_dtype"] in FLOAT_DTYPES, where, f"compute_dtype {entry['compute_dtype']!r} is unknown")
        tensors = entry["tensors"]
        expected = RemappedLinear.shapes(entry["in_features"], entry["out_features"], entry["rank"])
        check_entry(isinstance(tensors, dict) and set(tensors) == set(expected), where, f"tensors must be {', '.join(expected)}")
        for key, (shape, dtype) in expected.items():
            _check_tensor_spec(tensors[key], f"{where}.tensors.{key}", shape, dtype)

    def build(self, entry: dict) -> nn.Module:
        t = entry["tensors"]
        empty = {key: torch.empty(t[key]["shape"], dtype=getattr(torch, t[key]["dtype"])) if key in t else None
                 for key in TENSORS}
        compute_dtype = getattr(torch, entry["compute_dtype"])
        bias = torch.empty(entry["out_features"], dtype=compute_dtype) if entry["bias"] else None
        return RemappedLinear(entry["in_features"], entry["out_features"], entry["rank"], *(empty[k] for k in TENSORS),
                              bias, compute_dtype=compute_dtype)


register_layout(RemapLayout())
