"""SVD + quantization (``svdllm_quant``) and its baseline, quantization alone (``hqq``).

``svdllm_quant``: a base SVD method compresses the model at ratio ``rho``
(default ``svdllm_w``, whitening only - ``base=svdllm`` adds the update and is
what the SVD-LLM paper pairs with 2-bit QuIP# in its Table 8), then both
factors of every compressed matrix (``W_u`` and ``W_v``) are quantized to
``bits`` bits with HQQ (:mod:`bench.quantize`: calibration-free, bit-packed,
one float16 scale and zero point per group of 64 weights). Targets the base
left dense are quantized as they are. The record's bytes are real bytes:
packed weights, scales, zero points, biases, plus the uncompressed
embeddings, head and norms.

``hqq``: the same quantizer at the same bits applied to every target linear
of the **dense** model - the baseline row. It removes no parameters
(``uses_ratio = False``), so the runner evaluates it once per run and records
it at ratio 0, whatever ``--ratios`` says. Its ``params_removed`` is 0 and its bytes show
what quantization alone saves.

GPTQ through llm-compressor is not offered: llmcompressor 0.14 requires
``transformers<=5.17`` and would downgrade the pinned transformers 5.23.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from bench import Factorization, Method, hookimpl
from bench.errors import UsageError
from bench.lora_update import UpdateConfig
from bench.lowrank import LowRankLinear
from bench.quantize import BITS, META_DTYPES, quantize_linears
from methods.svd import VanillaSVD
from methods.svdllm import SVDLLMWhitening
from methods.svdllm_update import SVDLLM, SVDLLMUpdateOnly

BASES = {"svd": VanillaSVD(), "svdllm_w": SVDLLMWhitening(), "svdllm_u": SVDLLMUpdateOnly(), "svdllm": SVDLLM()}


def _check_quant(owner: str, bits: int, group_size: int, meta_dtype: str) -> None:
    if bits not in BITS:
        raise UsageError(f"{owner}.bits={bits} is not supported; use one of {', '.join(map(str, BITS))}")
    if group_size < 1:
        raise UsageError(f"{owner}.group_size must be >= 1, got {group_size}")
    if meta_dtype not in META_DTYPES:
        raise UsageError(f"{owner}.meta_dtype={meta_dtype!r} is unknown; use one of {', '.join(META_DTYPES)}")


@dataclass(frozen=True)
class QuantConfig:
    """Quantizer settings shared by both methods."""

    bits: int = 4
    group_size: int = 64
    meta_dtype: str = "float16"  # dtype of the per-group scales and zero points

    def __post_init__(self):
        _check_quant("hqq", self.bits, self.group_size, self.meta_dtype)


@dataclass(frozen=True)
class HybridConfig:
    """Base SVD method, quantizer settings and (for update bases) the update budget."""

    base: str = "svdllm_w"
    bits: int = 4
    group_size: int = 64
    meta_dtype: str = "float16"
    update_steps: int = UpdateConfig.update_steps  # only for base svdllm / svdllm_u
    update_batch_size: int = UpdateConfig.batch_size

    def __post_init__(self):
        if self.base not in BASES:
            raise UsageError(f"svdllm_quant.base={self.base!r} is unknown; use one of {', '.join(BASES)}")
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
    requires = ("gram",)  # what the default base needs; collected even for base=svd

    def base_and_config(self, config: HybridConfig) -> tuple[Method, object]:
        base = BASES[config.base]
        if base.config_class is UpdateConfig:
            return base, UpdateConfig(update_steps=config.update_steps, batch_size=config.update_batch_size)
        return base, base.config_class()

    def decompose(self, target, weight, context, config) -> Factorization:
        base, base_config = self.base_and_config(config)
        return base.decompose(target, weight, context, base_config)

    def decomposition_key(self, config) -> str:
        base, base_config = self.base_and_config(config)
        return base.decomposition_key(base_config)

    def allocate(self, ratio, factorizations, context, config) -> dict[str, int]:
        base, base_config = self.base_and_config(config)
        return base.allocate(ratio, factorizations, context, base_config)

    def refine(self, model, ratio, context, config) -> dict:
        base, base_config = self.base_and_config(config)
        facts = {"base": dict(base.refine(model, ratio, context, base_config))}
        facts["quantization"] = quantize_targets(model, [t.name for t in context.targets], config.bits,
                                                 config.group_size, config.meta_dtype)
        return facts


class DenseHQQ(Method):
    name = "hqq"
    uses_ratio = False  # the runner evaluates it once, at ratio 0
    description = "baseline: HQQ quantization of the dense model's target linears (the ratio is ignored)"
    config_class = QuantConfig

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
