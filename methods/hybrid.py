"""SVD + quantization (``svdllm_quant``) and its baselines, quantization alone (``hqq``, ``gptq``).

``svdllm_quant``: a base SVD method compresses the model at ratio ``rho``
(``base``, any registered method that removes parameters), then both factors
of every compressed matrix (``W_u`` and ``W_v``) are quantized to ``bits``
bits by ``quantizer``; targets the base left dense are quantized as they are.

- ``quantizer=hqq`` (default): HQQ (:class:`bench.QuantizedLinear`:
  calibration-free, bit-packed, one scale and zero point per group of
  ``group_size`` weights, stored in ``meta_dtype``).
- ``quantizer=gptq``: GPTQ through GPTQModel (:class:`bench.GPTQLinear`, the
  ``svdbench[gptq]`` extra; packed int32 weights and zero points, float16
  scales, int32 group index). GPTQ weighs the rounding error by the gram of
  each quantized matrix's input, and no second calibration pass is needed:
  ``W_v`` reads the layer input, whose gram ``G`` the calibration collected;
  ``W_u`` reads ``W_v x``, whose gram is ``W_v G W_v^T``. ``W_v`` is quantized
  first and ``W_u``'s gram is taken with the quantized ``W_v`` - the input
  ``W_u`` really sees, as GPTQ's own sequential mode does. Asymmetric by
  default (``sym=false``), as the GPTQ paper's reference code; GPTQModel's
  activation-group-aware column order (``desc_act=true`` gives GPTQ's
  act-order instead); ``damp`` is the paper's 1% of the mean diagonal.

**The default base is** ``svdllm_w`` (whitening only), where METHODS.md and
the SVD-LLM paper (Table 8: SVD-LLM, update included, with 2-bit QuIP#) use
the full ``svdllm``. Kept on purpose: the quantized rows then differ from the
``svdllm_w`` rows at the same ratio by the quantization alone, and the
update - a LoRA fine-tune on Alpaca, the costliest stage on a CPU and
smoke-sized in the default profile - does not blur the comparison of
quantizers. ``base=svdllm`` is the paper's pairing, one option away. The base
is made from the registry for the run, with the run's options for that method
(``--method-option svdllm.update_steps=8`` sets the update of ``base=svdllm``
too), and its settings are part of this method's resume key.

``hqq`` and ``gptq``: the same quantizers at the same bits applied to every
target linear of the **dense** model - the baseline rows. They remove no
parameters (``uses_ratio = False``), so the runner evaluates each once per run
and records it at ratio 0, whatever ``--ratios`` says.

Every record's bytes are real bytes: packed weights, scales, zero points,
group indices, padding and biases, plus the uncompressed embeddings, head and
norms.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from bench import (
    BITS,
    GPTQ_GROUP_SIZES,
    GPTQ_INSTALL,
    META_DTYPES,
    Allocation,
    Factorization,
    LowRankLinear,
    Method,
    PaperNotes,
    UsageError,
    config_dict,
    gptq_quantize_linears,
    hookimpl,
    quantize_linears,
)

QUANTIZERS = ("hqq", "gptq")


def _need_gptqmodel(owner: str) -> None:
    """Fail before anything runs when GPTQ is asked for and GPTQModel is not installed (the import itself is slow)."""
    if importlib.util.find_spec("gptqmodel") is None:
        raise UsageError(f"{owner} needs the gptqmodel package, which is not installed; install it with "
                         f"{GPTQ_INSTALL} (or leave {owner} out of --methods)")


def _check_quant(owner: str, bits: int, group_size: int, meta_dtype: str, quantizer: str = "hqq",
                 damp: float = 0.01) -> None:
    if quantizer not in QUANTIZERS:
        raise UsageError(f"{owner}.quantizer={quantizer!r} is unknown; use one of {', '.join(QUANTIZERS)}")
    if bits not in BITS:
        raise UsageError(f"{owner}.bits={bits} is not supported; use one of {', '.join(map(str, BITS))}")
    if group_size < 1:
        raise UsageError(f"{owner}.group_size must be >= 1, got {group_size}")
    if quantizer == "gptq" and group_size not in GPTQ_GROUP_SIZES:
        raise UsageError(f"{owner}.group_size={group_size} is not one GPTQ's packed format takes; use one of "
                         f"{', '.join(map(str, GPTQ_GROUP_SIZES))}")
    if meta_dtype not in META_DTYPES:
        raise UsageError(f"{owner}.meta_dtype={meta_dtype!r} is unknown; use one of {', '.join(META_DTYPES)}")
    if not 0 < damp < 1:
        raise UsageError(f"{owner}.damp must be in (0, 1) (a fraction of the mean Hessian diagonal), got {damp}")


@dataclass(frozen=True)
class QuantConfig:
    """HQQ settings of the dense baseline."""

    bits: int = 4
    group_size: int = 64
    meta_dtype: str = "float16"  # dtype of the per-group scales and zero points

    def __post_init__(self):
        _check_quant("hqq", self.bits, self.group_size, self.meta_dtype)


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ settings of the dense baseline."""

    bits: int = 4
    group_size: int = 64
    sym: bool = False  # asymmetric, as the GPTQ paper's code (GPTQModel's default is symmetric)
    desc_act: bool = False  # GPTQ's act-order; off: GPTQModel's activation-group-aware order
    damp: float = 0.01  # added to the Hessian's diagonal, times its mean (the GPTQ paper's percdamp)

    def __post_init__(self):
        _check_quant("gptq", self.bits, self.group_size, "float16", "gptq", self.damp)


@dataclass(frozen=True)
class HybridConfig:
    """The base SVD method (by name), the quantizer and its settings (meta_dtype: HQQ; sym, desc_act, damp: GPTQ)."""

    base: str = "svdllm_w"
    quantizer: str = "hqq"
    bits: int = 4
    group_size: int = 64
    meta_dtype: str = "float16"
    sym: bool = False
    desc_act: bool = False
    damp: float = 0.01

    def __post_init__(self):
        _check_quant("svdllm_quant", self.bits, self.group_size, self.meta_dtype, self.quantizer, self.damp)


def quantized_names(model: nn.Module, target_names: list[str]) -> list[str]:
    """The linears to quantize: both factors of a LowRankLinear (``down`` = ``W_v`` first), or the dense linear."""
    names = []
    for name in target_names:
        module = model.get_submodule(name)
        names += [f"{name}.down", f"{name}.up"] if isinstance(module, LowRankLinear) else [name]
    return names


def quantize_targets(model: nn.Module, target_names: list[str], bits: int, group_size: int, meta_dtype: str) -> dict:
    """Quantize every target with HQQ: both factors of a LowRankLinear, or the dense linear itself."""
    layers = quantize_linears(model, quantized_names(model, target_names), bits, group_size, META_DTYPES[meta_dtype])
    return {"quantizer": "hqq", "bits": bits, "group_size": group_size, "meta_dtype": meta_dtype, **_sizes(layers)}


def gptq_targets(model: nn.Module, target_names: list[str], grams, bits: int, group_size: int, sym: bool = False,
                 desc_act: bool = False, damp: float = 0.01) -> dict:
    """Quantize every target with GPTQ against the grams of the inputs each quantized matrix reads.

    ``grams(name)`` is ``X X^T`` of target ``name``'s input. ``W_v`` gets it as
    it is; ``W_u`` gets ``W_v' G W_v'^T`` with ``W_v'`` the quantized ``W_v``.
    """
    layers: dict[str, dict] = {}
    options = (bits, group_size, sym, desc_act, damp)
    for name in tqdm(target_names, desc="GPTQ", leave=False, unit="matrix"):
        gram = grams(name).to("cpu", torch.float64)  # GPTQ runs on the CPU (bench.GPTQLinear)
        if isinstance(model.get_submodule(name), LowRankLinear):
            layers.update(gptq_quantize_linears(model, {f"{name}.down": gram}, *options))
            w_v = model.get_submodule(f"{name}.down").dequantize().to("cpu", torch.float64)
            layers.update(gptq_quantize_linears(model, {f"{name}.up": w_v @ gram @ w_v.T}, *options))
        else:
            layers.update(gptq_quantize_linears(model, {name: gram}, *options))
    return {"quantizer": "gptq", "bits": bits, "group_size": group_size, "sym": sym, "desc_act": desc_act,
            "damp": damp, **_sizes(layers)}


def _sizes(layers: dict[str, dict]) -> dict:
    return {"linears_quantized": len(layers), "bytes_before": sum(v["bytes_before"] for v in layers.values()),
            "bytes_after": sum(v["bytes"] for v in layers.values())}


def quantize_with(quantizer: str, model: nn.Module, context, config) -> dict:
    """Quantize every target of ``context`` with ``quantizer`` and the settings of ``config``."""
    names = [t.name for t in context.targets]
    if quantizer == "gptq":
        return gptq_targets(model, names, lambda name: context.stats.get("gram", name), config.bits,
                            config.group_size, config.sym, config.desc_act, config.damp)
    return quantize_targets(model, names, config.bits, config.group_size, config.meta_dtype)


HQQ_PAPER = "Badri, Shaji: Half-Quadratic Quantization of Large Machine Learning Models, 2023 (mobiusml.github.io)"
GPTQ_PAPER = ("Frantar, Ashkboos, Hoefler, Alistarh: GPTQ: Accurate Post-Training Quantization for Generative "
              "Pre-trained Transformers, ICLR 2023; run through GPTQModel 7.6 (the maintained successor of auto-gptq)")
GPTQ_DEVIATIONS = (
    "each linear is quantized against the gram of its input in the original model (the calibration pass shared with "
    "the SVD methods), not block by block on the activations of the already-quantized blocks",
    "GPTQModel's activation-group-aware column order by default (desc_act=true: the paper's act-order)",
    "weights zero-padded to multiples of 32 inputs and outputs for GPTQModel's packer; the padding counts in the bytes",
)


HQQ_INSTALL = "pip install 'svdbench[quant]'"


class SVDQuantHybrid(Method):
    name = "svdllm_quant"
    packages = {"hqq": HQQ_INSTALL}
    description = "base SVD method (default svdllm_w) at ratio rho, then both factors quantized with HQQ or GPTQ"
    config_class = HybridConfig
    notes = PaperNotes(
        paper="Wang, Zheng, Wan, Zhang: SVD-LLM: Truncation-aware Singular Value Decomposition for Large Language "
              "Model Compression, ICLR 2025 (Table 8: SVD-LLM with 2-bit QuIP#)",
        paper_defaults="base = SVD-LLM with its update, factors quantized with QuIP# to 2 bits",
        deviations=(
            "default base svdllm_w (whitening only), not svdllm: the quantized rows then differ from svdllm_w's at the "
            "same ratio by quantization alone, and the CPU-sized LoRA update does not blur the comparison; "
            "base=svdllm is the paper's pairing",
            "HQQ (calibration-free) or GPTQ instead of QuIP#, which needs CUDA kernels",
            "GPTQ of the factors: W_v against the layer input's gram G, W_u against W_v' G W_v'^T with W_v' the "
            "quantized W_v (the input W_u sees)",
        ),
    )

    def configured(self, config: HybridConfig, create) -> SVDQuantHybrid:
        if config.base == self.name:
            raise UsageError(f"{self.name}.base cannot be {self.name} itself; give an SVD method, e.g. svdllm_w")
        if config.quantizer == "gptq":
            _need_gptqmodel(f"{self.name}.quantizer=gptq")
        method = super().configured(config, create)
        method.base = create(config.base)
        if not method.base.uses_ratio:
            raise UsageError(f"{self.name}.base={config.base} removes no parameters; give an SVD method, e.g. svdllm_w")
        return method

    def required_statistics(self) -> tuple[str, ...]:
        needed = self.base.required_statistics()
        return needed + ("gram",) if self.config.quantizer == "gptq" and "gram" not in needed else needed

    def uses_calibration(self) -> bool:
        return self.base.uses_calibration() or self.config.quantizer == "gptq"

    def settings(self) -> dict:
        return {**config_dict(self.config), "base_config": self.base.settings()}

    def storage_bits(self) -> int:
        return self.config.bits

    def decompose(self, target, weight, context, config) -> Factorization:
        return self.base.decompose(target, weight, context, self.base.config)

    def decomposition_key(self, config) -> str:
        return self.base.decomposition_key(self.base.config)

    def decomposition_version(self) -> str:
        return self.base.decomposition_version()

    def code_version(self) -> str:
        return f"{super().code_version()}+{self.base.code_version()}"

    def allocate(self, ratio, factorizations, context, config):
        return self.base.allocate(ratio, factorizations, context, self.base.config)

    def refine(self, model, ratio, context, config) -> dict:
        facts = {"base": dict(self.base.refine(model, ratio, context, self.base.config))}
        facts["quantization"] = quantize_with(config.quantizer, model, context, config)
        return facts


class DenseQuantization(Method):
    """A quantizer alone on the dense model: nothing is factorized, every target linear is quantized."""

    uses_ratio = False  # the runner evaluates it once, at ratio 0
    quantizer = ""  # "hqq" or "gptq"

    def storage_bits(self) -> int:
        return self.config.bits

    def allocate(self, ratio, factorizations, context, config) -> Allocation:
        return Allocation(dict.fromkeys((t.name for t in context.targets), None))  # every matrix stays dense

    def refine(self, model, ratio, context, config) -> dict:
        facts = quantize_with(self.quantizer, model, context, config)
        facts["ratio"] = f"ignored: {self.name} quantizes the dense model"
        return facts


class DenseHQQ(DenseQuantization):
    name = "hqq"
    packages = {"hqq": HQQ_INSTALL}
    quantizer = "hqq"
    description = "baseline: HQQ quantization of the dense model's target linears (the ratio is ignored)"
    config_class = QuantConfig
    notes = PaperNotes(
        paper=HQQ_PAPER,
        paper_defaults="calibration-free; 4-bit, group 64 with optimized zero points (its Llama-2 setting); scales "
                       "and zero points optionally quantized too",
        deviations=("scales and zero points kept in float16, not quantized; only the decoder blocks' linears are "
                    "quantized (embeddings and head stay in the run's dtype)",),
    )


class DenseGPTQ(DenseQuantization):
    name = "gptq"
    packages = {"gptqmodel": GPTQ_INSTALL}
    quantizer = "gptq"
    description = "baseline: GPTQ quantization of the dense model's target linears (the ratio is ignored)"
    config_class = GPTQConfig
    requires = ("gram",)
    notes = PaperNotes(
        paper=GPTQ_PAPER,
        paper_defaults="128 x 2048 tokens of C4 calibration, damping 1% of the mean Hessian diagonal, asymmetric "
                       "min-max grid, blocks quantized sequentially on the quantized model's activations",
        deviations=GPTQ_DEVIATIONS + ("calibration: the run's calibration set (default 32 x 512 WikiText-2 "
                                      "tokens), shared with the SVD methods",),
    )

    def configured(self, config: GPTQConfig, create) -> DenseGPTQ:
        _need_gptqmodel(self.name)
        return super().configured(config, create)


@hookimpl
def register_methods(register):
    register(SVDQuantHybrid())
    register(DenseHQQ())
    register(DenseGPTQ())
