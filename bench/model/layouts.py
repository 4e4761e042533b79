"""Saved layouts of quantized linears: how each kind is described in a manifest, checked and rebuilt.

One :class:`QuantizedLayout` per quantizer (the manifest entry's
``quantizer``): HQQ and GPTQ are built in; a plugin adds its own through the
``register_layouts`` hook (:mod:`bench.api.hookspecs`), so a third-party
quantizer's models are saved and reloaded like the built-ins' and the loader
knows no quantizer by name. A manifest naming a quantizer no layout is
registered for is refused, naming it.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.errors import UsageError
from bench.model.quantized import BITS, GPTQ_GROUP_SIZES, META_DTYPES, GPTQLinear, QuantizedLinear

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
TENSOR_DTYPES = (*FLOAT_DTYPES, "float64", "uint8", "int8", "int16", "int32", "int64", "bool")


class ManifestError(UsageError):
    """A saved model's manifest (or files) that cannot be trusted."""




def check_entry(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise ManifestError(f"{where}: {message}; re-create the model with svdbench compress")


def is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


class QuantizedLayout:
    """How one kind of quantized linear is saved and rebuilt (one per ``quantizer`` name).

    ``describe`` gives the manifest entry (JSON data) of a module of this kind
    (None for other modules); ``validate`` checks an entry against the schema
    and the dense linear it replaces, before any tensor is read (raise with
    :meth:`check`); ``build`` makes the module with empty tensors of the
    recorded layout, ready for the weights, which are then loaded strictly
    from the safetensors file under the module's own parameter and buffer
    names. A plugin registers one with the ``register_layouts`` hook.
    """

    quantizer: str = ""

    @property
    def name(self) -> str:
        return self.quantizer

    @staticmethod
    def check(condition: bool, where: str, message: str) -> None:
        """Refuse the saved model, in one line naming ``where`` and what is wrong, unless ``condition``."""
        check_entry(condition, where, message)

    def describe(self, module: nn.Module) -> dict | None:
        raise NotImplementedError

    def validate(self, entry: dict, dense: nn.Module, where: str) -> None:
        raise NotImplementedError

    @staticmethod
    def check_linear(entry: dict, dense: nn.Module, where: str) -> None:
        """What every layout checks: the entry replaces a linear of the architecture's shape and bias."""
        check_entry(isinstance(entry["bias"], bool), where, "bias must be true or false")
        check_entry(isinstance(dense, nn.Linear), where, f"replaces a {type(dense).__name__}, not a linear layer")
        for key in ("in_features", "out_features"):
            check_entry(entry[key] == getattr(dense, key), where,
                        f"{key} {entry[key]!r} does not match the architecture ({getattr(dense, key)})")
        check_entry(entry["bias"] == (dense.bias is not None), where, "bias does not match the architecture")

    def build(self, entry: dict) -> nn.Module:
        raise NotImplementedError


def _tensor_spec(t: torch.Tensor) -> dict:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


def _check_tensor_spec(spec, where: str, shape: list[int] | None = None, dtype: str | None = None) -> None:
    check_entry(isinstance(spec, dict) and set(spec) == {"shape", "dtype"}, where, "must be {\"shape\": [...], \"dtype\": ...}")
    check_entry(isinstance(spec["shape"], list) and all(is_int(d) for d in spec["shape"]), where,
                f"shape {spec['shape']!r} is not a list of sizes")
    check_entry(spec["dtype"] in TENSOR_DTYPES, where, f"dtype {spec['dtype']!r} is not one of {', '.join(TENSOR_DTYPES)}")
    if shape is not None:
        check_entry(spec["shape"] == shape, where, f"shape {spec['shape']} does not fit the layout (expected {shape})")
    if dtype is not None:
        check_entry(spec["dtype"] == dtype, where, f"dtype {spec['dtype']} does not fit the layout (expected {dtype})")


class HQQLayout(QuantizedLayout):
    """:class:`QuantizedLinear`: HQQ bit-packed weights, per-group scales and zero points."""

    quantizer = "hqq"
    KEYS = {"quantizer", "nbits", "group_size", "packing", "meta_dtype", "in_features", "out_features", "bias",
            "compute_dtype", "tensors"}

    def describe(self, module: nn.Module) -> dict | None:
        if not isinstance(module, QuantizedLinear):
            return None
        return {**module.quantization(), "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None, "compute_dtype": str(module.compute_dtype).removeprefix("torch."),
                "tensors": {key: _tensor_spec(getattr(module, key)) for key in ("packed", "scale", "zero")}}

    @staticmethod
    def expected(nbits: int, group_size: int, in_features: int, out_features: int, meta_dtype: str) -> dict:
        """The tensor layout ``QuantizedLinear.quantize`` produces for these settings."""
        import math

        from hqq.core.quantize import Quantizer

        groups = 4 * math.ceil(in_features * out_features / (4 * group_size))
        packed = Quantizer.pack[Quantizer.bit_to_packing[nbits]](torch.zeros(groups, 1, dtype=torch.uint8))
        meta = {"shape": [groups, 1], "dtype": meta_dtype}
        return {"packed": {"shape": [packed.shape[0], group_size], "dtype": str(packed.dtype).removeprefix("torch.")},
                "scale": meta, "zero": dict(meta)}

    def validate(self, entry: dict, dense: nn.Module, where: str) -> None:
        from hqq.core.quantize import Quantizer

        check_entry(set(entry) == self.KEYS, where, f"has keys {sorted(entry)}, expected {sorted(self.KEYS)}")
        check_entry(entry["nbits"] in BITS and is_int(entry["nbits"]), where,
                    f"nbits {entry['nbits']!r} is not one of {', '.join(map(str, BITS))}")
        check_entry(is_int(entry["group_size"], 1), where, f"group_size {entry['group_size']!r} is not a positive integer")
        check_entry(entry["packing"] == Quantizer.bit_to_packing[entry["nbits"]], where,
                    f"packing {entry['packing']!r} does not match nbits {entry['nbits']}")
        check_entry(entry["meta_dtype"] in META_DTYPES, where, f"meta_dtype {entry['meta_dtype']!r} is unknown")
        check_entry(entry["compute_dtype"] in FLOAT_DTYPES, where, f"compute_dtype {entry['compute_dtype']!r} is unknown")
        self.check_linear(entry, dense, where)
        tensors = entry["tensors"]
        check_entry(isinstance(tensors, dict) and set(tensors) == {"packed", "scale", "zero"}, where,
                    "tensors must be packed, scale and zero")
        for key, spec in self.expected(entry["nbits"], entry["group_size"], entry["in_features"],
                                       entry["out_features"], entry["meta_dtype"]).items():
            _check_tensor_spec(tensors[key], f"{where}.tensors.{key}", spec["shape"], spec["dtype"])

    def build(self, entry: dict) -> nn.Module:
        t = entry["tensors"]
        empty = {key: torch.empty(t[key]["shape"], dtype=getattr(torch, t[key]["dtype"])) for key in t}
        bias = torch.empty(entry["out_features"], dtype=getattr(torch, entry["compute_dtype"])) if entry["bias"] else None
        return QuantizedLinear(entry["in_features"], entry["out_features"], entry["nbits"], entry["group_size"],
                               empty["packed"], empty["scale"], empty["zero"], bias,
                               compute_dtype=getattr(torch, entry["compute_dtype"]))


class GPTQLayout(QuantizedLayout):
    """:class:`GPTQLinear`: GPTQModel's packed int32 weights and zero points, float16 scales, the group index."""

    quantizer = "gptq"
    KEYS = {"quantizer", "nbits", "group_size", "sym", "desc_act", "packing", "in_features", "out_features", "bias",
            "compute_dtype", "tensors"}
    TENSORS = ("qweight", "qzeros", "scales", "g_idx")

    def describe(self, module: nn.Module) -> dict | None:
        if not isinstance(module, GPTQLinear):
            return None
        return {**module.quantization(), "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None, "compute_dtype": str(module.compute_dtype).removeprefix("torch."),
                "tensors": {key: _tensor_spec(getattr(module, key)) for key in self.TENSORS}}

    @staticmethod
    def expected(nbits: int, group_size: int, in_features: int, out_features: int) -> dict:
        """The tensor layout ``GPTQLinear.quantize`` produces (sizes padded to multiples of 32)."""
        rows, columns = -(-out_features // 32) * 32, -(-in_features // 32) * 32
        groups = -(-columns // group_size)
        return {"qweight": {"shape": [columns * nbits // 32, rows], "dtype": "int32"},
                "qzeros": {"shape": [groups, rows * nbits // 32], "dtype": "int32"},
                "scales": {"shape": [groups, rows], "dtype": "float16"},
                "g_idx": {"shape": [columns], "dtype": "int32"}}

    def validate(self, entry: dict, dense: nn.Module, where: str) -> None:
        check_entry(set(entry) == self.KEYS, where, f"has keys {sorted(entry)}, expected {sorted(self.KEYS)}")
        check_entry(entry["nbits"] in BITS and is_int(entry["nbits"]), where,
                    f"nbits {entry['nbits']!r} is not one of {', '.join(map(str, BITS))}")
        check_entry(entry["group_size"] in GPTQ_GROUP_SIZES and is_int(entry["group_size"]), where,
                    f"group_size {entry['group_size']!r} is not one of {', '.join(map(str, GPTQ_GROUP_SIZES))}")
        check_entry(isinstance(entry["sym"], bool) and isinstance(entry["desc_act"], bool), where,
                    "sym and desc_act must be true or false")
        check_entry(entry["packing"] == "gptq int32", where, f"packing {entry['packing']!r} is not 'gptq int32'")
        check_entry(entry["compute_dtype"] in FLOAT_DTYPES, where, f"compute_dtype {entry['compute_dtype']!r} is unknown")
        self.check_linear(entry, dense, where)
        tensors = entry["tensors"]
        check_entry(isinstance(tensors, dict) and set(tensors) == set(self.TENSORS), where,
                    f"tensors must be {', '.join(self.TENSORS)}")
        for key, spec in self.expected(entry["nbits"], entry["group_size"], entry["in_features"],
                                       entry["out_features"]).items():
            _check_tensor_spec(tensors[key], f"{where}.tensors.{key}", spec["shape"], spec["dtype"])

    def build(self, entry: dict) -> nn.Module:
        t = entry["tensors"]
        empty = {key: torch.empty(t[key]["shape"], dtype=getattr(torch, t[key]["dtype"])) for key in t}
        compute_dtype = getattr(torch, entry["compute_dtype"])
        bias = torch.empty(entry["out_features"], dtype=compute_dtype) if entry["bias"] else None
        return GPTQLinear(entry["in_features"], entry["out_features"], entry["nbits"], entry["group_size"],
                          empty["qweight"], empty["qzeros"], empty["scales"], empty["g_idx"], bias,
                          sym=entry["sym"], desc_act=entry["desc_act"], compute_dtype=compute_dtype)


QUANTIZED_LAYOUTS: dict[str, QuantizedLayout] = {}


def register_layout(layout: QuantizedLayout) -> None:
    """Teach saving and loading a quantized layer kind (keyed by ``layout.quantizer``; process-wide, since
    plain transformers' loader finds it here too). Registering the same kind again is a no-op."""
    if not layout.quantizer:
        raise UsageError(f"{type(layout).__name__} has no quantizer name; set its `quantizer`")
    known = QUANTIZED_LAYOUTS.get(layout.quantizer)
    if known is not None and type(known) is not type(layout):
        raise UsageError(f"quantizer '{layout.quantizer}' already has a saving layout ({type(known).__name__}); "
                         f"give {type(layout).__name__} another quantizer name")
    QUANTIZED_LAYOUTS[layout.quantizer] = layout


register_layout(HQQLayout())
register_layout(GPTQLayout())
