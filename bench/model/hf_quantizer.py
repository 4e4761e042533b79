"""Saved svdbench models in plain transformers: the quantization method ``svdbench``.

A saved directory's ``config.json`` carries ``quantization_config = {"quant_method": "svdbench", ...}``
with the compressed layout: the rank of every low-rank matrix and the layout of every quantized linear
(the manifest's ``ranks`` and ``quantized``). Transformers' supported extension point for checkpoints whose
modules differ from the architecture's (``register_quantization_config`` / ``register_quantizer``, how HQQ,
GPTQ and compressed-tensors checkpoints load) lets :class:`SvdbenchQuantizer` put svdbench's layers in place
of those linears before any weight is read; the weights then load by name. Importing this module registers
it - the one line a process needs, before ``from_pretrained``; never ``trust_remote_code``::

    import bench.interop.hf  # noqa: F401  (registers the svdbench quantization method: register() below)
    model = AutoModelForCausalLM.from_pretrained("models/w40")

Strict: before loading, every tensor of the checkpoint must be a tensor of the rebuilt model with its shape
(and, for integer tensors, its dtype) and every tensor of the model must be in the checkpoint (tied weights
aside); after loading, the model's fingerprint must equal the one svdbench wrote into the safetensors
header (when loaded in the saved dtype). Anything else is refused - a checkpoint is never completed at random.

Refusal without svdbench: transformers skips a quantization method it does not know with a warning and would
fill the missing weights at random. So the ``config.json`` svdbench writes also sets ``transformers_weights``
(the file transformers reads the weights from) to :data:`GUARD`, a sentence naming svdbench and its install
command that is no file name: without the quantizer ``from_pretrained`` stops with that sentence in its error,
before building the model; the quantizer clears it before the checkpoint is looked up. Transformers' own
``save_pretrained`` drops that key from ``config.json``, so through it the quantizer saves one more tensor,
:func:`sentinel`: under the dense weight name of the first compressed linear, a byte string of the same
sentence. Without the quantizer its shape does not match, and transformers stops (unless told
``ignore_mismatched_sizes``); with it, the tensor is expected and skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from bench.errors import UsageError
from bench.model.hf_format import FINGERPRINT, FORMAT, GUARD, QUANT_METHOD, hf_quantization_config
from bench.model.loaded import fingerprint
from bench.model.manifest import validate_layout
from bench.model.reload import rebuild
from bench.model.saving import compressed_layout
from bench.model.shared import alias_weights, shared_modules


class SvdbenchConfig(QuantizationConfigMixin):
    """``config.json``'s ``quantization_config``: the compressed layout of the saved weights."""

    def __init__(self, ranks: dict | None = None, quantized: dict | None = None, saved_dtype: str = "float32",
                 format: int = FORMAT, svdbench_version: str | None = None, shared: dict | None = None, **_ignored):
        self.quant_method = QUANT_METHOD
        self.format, self.saved_dtype, self.svdbench_version = format, saved_dtype, svdbench_version
        self.ranks, self.quantized = dict(ranks or {}), dict(quantized or {})
        if shared:  # factors used by several layers (bench.model.shared); absent otherwise, as before
            self.shared = dict(shared)

    def layout(self) -> dict:
        """What :func:`bench.model.reload.rebuild` reads."""
        return {"dtype": self.saved_dtype, "ranks": self.ranks, "quantized": self.quantized,
                **({"shared": self.shared} if getattr(self, "shared", None) else {})}


def quantization_config(model: nn.Module) -> dict:
    """The ``quantization_config`` of ``config.json`` for a compressed ``model``."""
    ranks, quantized = compressed_layout(model)
    return hf_quantization_config(ranks, quantized, str(next(model.parameters()).dtype).removeprefix("torch."),
                                  shared_modules(model))


def mark_compressed(model: nn.Module) -> nn.Module:
    """Make an in-memory compressed model save (``save_pretrained``) as a checkpoint this quantizer loads."""
    register()
    config = SvdbenchConfig.from_dict(quantization_config(model))
    model.config.quantization_config = config
    model.hf_quantizer = SvdbenchQuantizer(config, pre_quantized=True)
    model.is_quantized, model.quantization_method = True, QUANT_METHOD
    return model


def _refuse(message: str):
    raise UsageError(f"{message}; re-create the model with svdbench compress")


class SvdbenchQuantizer(HfQuantizer):
    """Loads checkpoints svdbench compressed (it never compresses: ``requires_calibration``)."""

    requires_calibration = True

    def __init__(self, quantization_config: SvdbenchConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._dtype: torch.dtype | None = None
        self._fingerprint: str | None = None

    def validate_environment(self, *args, **kwargs) -> None:
        config = self.quantization_config
        if config.format != FORMAT:
            _refuse(f"config.json's svdbench quantization_config has format {config.format!r}, this svdbench reads "
                    f"format {FORMAT}")
        validate_layout(config.layout(), "config.json quantization_config")

    def update_attn_implementation(self, config):
        """The one hook that sees the model config before the checkpoint is looked up: the guard comes off here."""
        if getattr(config, "transformers_weights", None) == GUARD:
            config.transformers_weights = None
        return config

    def preprocess_model(self, model, dtype=None, **kwargs):
        self._dtype = dtype
        return super().preprocess_model(model, dtype=dtype, **kwargs)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        where = "config.json quantization_config"
        layout = self.quantization_config.layout()
        floating = self._dtype if isinstance(self._dtype, torch.dtype) else None
        rebuild(model, layout, where, dtype=floating)
        # a factor used by several layers is in the file once: transformers must treat the others as tied to it
        # (not missing: it would initialize them, i.e. the shared module, at random after loading)
        model.all_tied_weights_keys = {**(getattr(model, "all_tied_weights_keys", None) or {}),
                                       **alias_weights(layout.get("shared", {}))}
        for name in [*layout["ranks"], *layout["quantized"]]:  # a parent's own init (GPT-2 scales each block's
            model.get_submodule(name.rpartition(".")[0])._is_hf_initialized = True  # c_proj) expects a dense weight
        skip = sentinel(self.quantization_config)[0]
        model._keys_to_ignore_on_load_unexpected = {*(model._keys_to_ignore_on_load_unexpected or ()), re.escape(skip)}
        if checkpoint_files:
            self._fingerprint = _check_checkpoint(model, [Path(f) for f in checkpoint_files], skip)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if any(t.is_meta for t in model.state_dict().values()):
            _refuse("some weights of the compressed model were not loaded")
        saved = getattr(torch, self.quantization_config.saved_dtype)
        floats = {t.dtype for t in model.parameters() if t.is_floating_point()}
        if self._fingerprint is not None and floats == {saved} and fingerprint(model) != self._fingerprint:
            _refuse("the weights loaded differ from the ones svdbench saved (fingerprint mismatch)")
        return model

    def get_state_dict_and_metadata(self, model):
        """What ``save_pretrained`` writes: the weights, the sentinel, the fingerprint."""
        key, value = sentinel(self.quantization_config)
        aliases = alias_weights(shared_modules(model))  # a shared factor is written once, under its owner's name
        tensors = {k: v for k, v in model.state_dict().items() if k not in aliases}
        return {**tensors, key: value}, {FINGERPRINT: fingerprint(model)}

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _tied(model: nn.Module) -> set[str]:
    tied = {**(getattr(model, "all_tied_weights_keys", None) or {}), **alias_weights(shared_modules(model))}
    return set(tied) | set(tied.values())


def _check_checkpoint(model: nn.Module, files: list[Path], skip: str) -> str | None:
    """Every checkpoint tensor fits the rebuilt model and every model tensor is there; the recorded fingerprint."""
    from safetensors import safe_open

    from bench.model.reload import _st_dtype

    expected = model.state_dict()
    seen: set[str] = set()
    recorded = None
    for file in files:
        if file.suffix != ".safetensors":
            _refuse(f"{file} is not a safetensors file")
        with safe_open(str(file), framework="pt") as handle:
            recorded = (handle.metadata() or {}).get(FINGERPRINT, recorded)
            for key in handle.keys():
                if key == skip:
                    continue
                if key not in expected:
                    _refuse(f"{file} holds tensor {key!r}, which the recorded layout does not have")
                shape, dtype = list(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype()
                want = expected[key]
                if shape != list(want.shape) or (not want.is_floating_point() and dtype != _st_dtype(want.dtype)):
                    _refuse(f"{file}: tensor {key} is {dtype} {shape}, the recorded layout needs "
                            f"{_st_dtype(want.dtype)} {list(want.shape)}")
                seen.add(key)
    tied = _tied(model)
    missing = [k for k in expected if k not in seen and not (k in tied and tied & seen)]
    if missing:
        _refuse(f"{files[0]} lacks tensor {missing[0]} of the recorded layout")
    return recorded


def sentinel(config: SvdbenchConfig | None) -> tuple[str, torch.Tensor]:
    """The tensor that makes a ``save_pretrained`` checkpoint fail to load without svdbench (see the docstring)."""
    names = sorted({*config.ranks, *config.quantized}) if config is not None else []
    key = f"{names[0]}.weight" if names else "svdbench.guard"
    return key, torch.frombuffer(bytearray(GUARD.encode()), dtype=torch.uint8).clone()


def register() -> None:
    """Register the ``svdbench`` quantization method with transformers (once per process)."""
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantization_config(QUANT_METHOD)(SvdbenchConfig)
        register_quantizer(QUANT_METHOD)(SvdbenchQuantizer)
