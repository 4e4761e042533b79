"""SVD + quantization (``svdllm_quant``) and its baseline, quantization alone (``hqq``).

``svdllm_quant``: a base SVD method compresses the model at ratio ``rho``
(``base``, any registered method that removes parameters; default
``svdllm_w``, whitening only - ``base=svdllm`` adds the update and is what the
SVD-LLM paper pairs with 2-bit QuIP# in its Table 8), then both factors of
every compressed matrix (``W_u`` and ``W_v``) are quantized to ``bits`` bits
with HQQ (:class:`bench.QuantizedLinear`: calibration-free, bit-packed, one
float16 scale and zero point per group of 64 weights). Targets the base left
dense are quantized as they are. The base is made from the registry for the
run, with the run's options for that method (``--method-option
svdllm.update_steps=8`` sets the update of ``base=svdllm`` too), and its
settings are part of this method's resume key. The record's bytes are real
bytes: packed weights, scales, zero points, biases, plus the uncompressed
embeddings, head and norms.

``hqq``: the same quantizer at the same bits applied to every target linear
of the **dense** model - the baseline row. It removes no parameters
(``uses_ratio = False``), so the runner evaluates it once per run and records
it at ratio 0, whatever ``--ratios`` says. Its ``params_removed`` is 0 and its
bytes show what quantization alone saves.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from bench import (
    BITS,
    META_DTYPES,
    Factorization,
    LowRankLinear,
    Method,
    UsageError,
    config_dict,
    hookimpl,
    quantize_linears,
)


def _check_quant(owner: str, bits: int, group_size: int, meta_dtype: str) -> None:
    if bits not in BITS:
        raise UsageError(f"{owner}.bits={bits} is not supported; use one of {', '.join(map(str, BITS))}")
    if group_size < 1:
        raise UsageError(f"{owner}.group_size must be >= 1, got {group_size}")
    if meta_dtype not in META_DTYPES:
        raise UsageError(f"{owner}.meta_dtype={meta_dtype!r} is unknown; use one of {', '.join(META_DTYPES)}")


@dataclass(frozen=True)
class QuantConfig:
    """Quantizer settings of the dense baseline."""

    bits: int = 4
    group_size: int = 64
    meta_dtype: str = "float16"  # dtype of the per-group scales and zero points

    def __post_init__(self):
        _check_quant("hqq", self.bits, self.group_size, self.meta_dtype)


@dataclass(frozen=True)
class HybridConfig:
    """The base SVD method (by name) and the quantizer settings."""

    base: str = "svdllm_w"
    bits: int = 4
    group_size: int = 64
    meta_dtype: str = "float16"

    def __post_init__(self):
        _check_quant("svdllm_quant", self.bits, self.group_size, self.meta_dtype)


def quantize_targets(model: nn.Module, target_names: list[str], bits: int, group_size: int, meta_dtype: str) -> dict:
    """Quantize every target: both factors of a LowRankLinear, or the dense linear itself."""
    names = []
    for name in target_names:
        module = model.get_submodule(name)
        names += [f"{name}.up", f"{name}.down"] if isinstance(module, LowRankLinear) else [name]
    layers = quantize_linears(model, names, bits, group_size, META_DTYPES[meta_dtype])
    return {"quantizer": "hqq", "bits": bits, "group_size": group_size, "meta_dtype": meta_dtype,
            "linears_quantized": len(layers), "bytes_before": sum(v["bytes_before"] for v in layers.values()),
            "bytes_after": sum(v["bytes"] for v in layers.values())}


class SVDQuantHybrid(Method):
    name = "svdllm_quant"
    description = "base SVD method (default svdllm_w) at ratio rho, then both factors quantized with HQQ"
    config_class = HybridConfig

    def configured(self, config: HybridConfig, create) -> SVDQuantHybrid:
        if config.base == self.name:
            raise UsageError(f"{self.name}.base cannot be {self.name} itself; give an SVD method, e.g. svdllm_w")
        method = super().configured(config, create)
        method.base = create(config.base)
        if not method.base.uses_ratio:
            raise UsageError(f"{self.name}.base={config.base} removes no parameters; give an SVD method, e.g. svdllm_w")
        return method

    def required_statistics(self) -> tuple[str, ...]:
        return self.base.required_statistics()

    def uses_calibration(self) -> bool:
        return self.base.uses_calibration()

    def settings(self) -> dict:
        return {**config_dict(self.config), "base_config": self.base.settings()}

    def storage_bits(self) -> int:
        return self.config.bits

    def decompose(self, target, weight, context, config) -> Factorization:
        return self.base.decompose(target, weight, context, self.base.config)

    def decomposition_key(self, config) -> str:
        return self.base.decomposition_key(self.base.config)

    def allocate(self, ratio, factorizations, context, config):
        return self.base.allocate(ratio, factorizations, context, self.base.config)

    def refine(self, model, ratio, context, config) -> dict:
        facts = {"base": dict(self.base.refine(model, ratio, context, self.base.config))}
        facts["quantization"] = quantize_targets(model, [t.name for t in context.targets], config.bits,
                                                 config.group_size, config.meta_dtype)
        return facts


class DenseHQQ(Method):
    name = "hqq"
    uses_ratio = False  # the runner evaluates it once, at ratio 0
    description = "baseline: HQQ quantization of the dense model's target linears (the ratio is ignored)"
    config_class = QuantConfig

    def storage_bits(self) -> int:
        return self.config.bits

    def decompose(self, target, weight, context, config) -> Factorization:
        # Nothing to factorize: an empty factorization, never truncated because
        # allocate asks for full rank (compress_model then keeps every layer dense).
        m, n = weight.shape
        return Factorization(u=weight.new_zeros(m, 0), s=weight.new_zeros(0), vt=weight.new_zeros(0, n))

    def allocate(self, ratio, factorizations, context, config) -> dict[str, int]:
        return {t.name: min(t.out_features, t.in_features) for t in context.targets}

    def refine(self, model, ratio, context, config) -> dict:
        facts = quantize_targets(model, [t.name for t in context.targets], config.bits, config.group_size,
                                 config.meta_dtype)
        facts["ratio"] = "ignored: hqq quantizes the dense model"
        return facts


@hookimpl
def register_methods(register):
    register(SVDQuantHybrid())
    register(DenseHQQ())
