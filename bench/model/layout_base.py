"""What every quantized layer layout shares (the base of :mod:`bench.model.saving`'s layouts) and the registry.

A layout module (HQQ and GPTQ in :mod:`bench.model.saving`, Dobi-SVD's remapped
factors in :mod:`bench.model.remap_layout`) subclasses :class:`QuantizedLayout`
and calls :func:`register_layout`; the loader knows no quantizer by name.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.errors import UsageError

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
TENSOR_DTYPES = (*FLOAT_DTYPES, "float64", "uint8", "int8", "int16", "int32", "int64", "bool")


class ManifestError(UsageError):
    """A saved model's manifest (or files) that cannot be trusted."""


def _check(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise ManifestError(f"{where}: {message}; re-create the model with svdbench compress")


def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


class QuantizedLayout:
    """How one kind of quantized linear is saved and rebuilt (one per ``quantizer`` name).

    ``describe`` gives the manifest entry of a module of this kind (None for
    other modules); ``validate`` checks an entry against the schema and the
    dense linear it replaces (before any tensor is read); ``build`` makes the
    module with empty tensors of the recorded layout, ready for the weights.
    """

    quantizer: str = ""

    def describe(self, module: nn.Module) -> dict | None:
        raise NotImplementedError

    def validate(self, entry: dict, dense: nn.Module, where: str) -> None:
        raise NotImplementedError

    @staticmethod
    def check_linear(entry: dict, dense: nn.Module, where: str) -> None:
        """What every layout checks: the entry replaces a linear of the architecture's shape and bias."""
        _check(isinstance(entry["bias"], bool), where, "bias must be true or false")
        _check(isinstance(dense, nn.Linear), where, f"replaces a {type(dense).__name__}, not a linear layer")
        for key in ("in_features", "out_features"):
            _check(entry[key] == getattr(dense, key), where,
                   f"{key} {entry[key]!r} does not match the architecture ({getattr(dense, key)})")
        _check(entry["bias"] == (dense.bias is not None), where, "bias does not match the architecture")

    def build(self, entry: dict) -> nn.Module:
        raise NotImplementedError


def _tensor_spec(t: torch.Tensor) -> dict:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


def _check_tensor_spec(spec, where: str, shape: list[int] | None = None, dtype: str | None = None) -> None:
    _check(isinstance(spec, dict) and set(spec) == {"shape", "dtype"}, where, "must be {\"shape\": [...], \"dtype\": ...}")
    _check(isinstance(spec["shape"], list) and all(_is_int(d) for d in spec["shape"]), where,
           f"shape {spec['shape']!r} is not a list of sizes")
    _check(spec["dtype"] in TENSOR_DTYPES, where, f"dtype {spec['dtype']!r} is not one of {', '.join(TENSOR_DTYPES)}")
    if shape is not None:
        _check(spec["shape"] == shape, where, f"shape {spec['shape']} does not fit the layout (expected {shape})")
    if dtype is not None:
        _check(spec["dtype"] == dtype, where, f"dtype {spec['dtype']} does not fit the layout (expected {dtype})")


QUANTIZED_LAYOUTS: dict[str, QuantizedLayout] = {}


def register_layout(layout: QuantizedLayout) -> None:
    """Teach saving and loading a quantized layer kind (keyed by ``layout.quantizer``)."""
    QUANTIZED_LAYOUTS[layout.quantizer] = layout
