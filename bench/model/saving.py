"""Saving a compressed model and loading it back, with safetensors only.

A saved model is a directory::

    model.safetensors   every tensor (factors, packed quantized weights, scales,
                        zero points, the uncompressed embeddings, head, norms)
    config.json         the base architecture (Hugging Face config)
    tokenizer files     as written by ``tokenizer.save_pretrained``
    svdbench.json       the manifest (below)

The manifest records the method, its config, the ratio, every compressed
matrix's rank, every quantized linear's layout, the source model's identity
and checksum, the svdbench version, the sha256 of every weight file and the
fingerprint of the compressed model. Loading rebuilds the architecture from
``config.json``, replaces the recorded targets with :class:`LowRankLinear` /
:class:`QuantizedLinear` / :class:`GPTQLinear` modules of the recorded shapes, loads the tensors
(strictly: no key missing or extra) and verifies both the file checksums and
the fingerprint. Nothing is pickled: whole-module ``torch.save`` is what the
reference SVD-LLM code does and what breaks for its users across versions.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from bench.errors import UsageError
from bench.model.layers import LowRankLinear
from bench.model.loaded import LoadedModel, fingerprint
from bench.model.quantized import QUANTIZED_LAYERS, empty_quantized, quantized_layout
from bench.model.targets import set_module
from bench.storage import sha256_file

MANIFEST = "svdbench.json"
WEIGHTS = "model.safetensors"
FORMAT = 1


def _layout(model: nn.Module) -> tuple[dict[str, int], dict[str, dict]]:
    """Ranks of every LowRankLinear and the tensor layout of every quantized layer (HQQ or GPTQ)."""
    ranks = {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    quantized = {name: quantized_layout(m) for name, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)}
    return ranks, quantized


def save_compressed(model: nn.Module, tokenizer, out_dir: str | Path, manifest: dict) -> Path:
    """Write ``model`` (safetensors), its config, tokenizer and ``svdbench.json`` to ``out_dir``.

    ``manifest`` carries what the caller knows (method, config, ratio, source
    model identity, ...); the layout, checksums and versions are added here.
    """
    from importlib.metadata import version

    from safetensors.torch import save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not hasattr(model, "config"):
        raise UsageError("save_compressed needs a Hugging Face model (with .config) to record its architecture")
    model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    save_model(model, str(out / WEIGHTS), metadata={"format": "svdbench"})  # shared (tied) tensors stored once
    ranks, quantized = _layout(model)
    full = {**manifest, "format": FORMAT, "svdbench_version": version("svdbench"),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "ranks": ranks, "quantized": quantized, "fingerprint": fingerprint(model),
            "weights": {WEIGHTS: sha256_file(out / WEIGHTS)}}
    (out / MANIFEST).write_text(json.dumps(full, indent=1, sort_keys=True, default=str))
    return out


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read {path / MANIFEST}: {error}; re-create the directory with svdbench compress") from None
    missing = [k for k in ("format", "ranks", "quantized", "weights", "fingerprint") if k not in manifest]
    if missing:
        raise UsageError(f"{path / MANIFEST} lacks '{missing[0]}'; it was not written by svdbench compress")
    if manifest["format"] != FORMAT:
        raise UsageError(f"{path} has svdbench format {manifest['format']}, this svdbench reads format {FORMAT}")
    return manifest


def _verify_files(path: Path, manifest: dict) -> None:
    for name, digest in manifest["weights"].items():
        file = path / name
        if not file.is_file():
            raise UsageError(f"weight file {file} named in {MANIFEST} is missing")
        actual = sha256_file(file)
        if actual != digest:
            raise UsageError(f"weight file {file} was edited or truncated (sha256 {actual[:12]}..., manifest says "
                             f"{digest[:12]}...); re-create it with svdbench compress")


def _rebuild(model: nn.Module, manifest: dict) -> None:
    """Give ``model`` the compressed structure recorded in the manifest (empty weights)."""
    dtype = getattr(torch, manifest.get("dtype", "float32"))
    try:
        for name, rank in manifest["ranks"].items():
            dense = model.get_submodule(name)
            set_module(model, name, LowRankLinear(dense.in_features, dense.out_features, int(rank),
                                                  dense.bias is not None, dtype=dtype))
        for name, q in manifest["quantized"].items():
            set_module(model, name, empty_quantized(q, dtype))
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise UsageError(f"the manifest does not fit the saved architecture ({type(error).__name__}: {error})") from None


def load_compressed(path: str | Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a directory written by :func:`save_compressed`, verifying it first.

    Raises ``UsageError`` when the manifest is unreadable, a weight file does
    not match its checksum, the tensors do not fit the recorded structure, or
    the loaded model's fingerprint differs from the saved one.
    """
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    manifest = _read_manifest(path)
    _verify_files(path, manifest)
    config = AutoConfig.from_pretrained(path)
    saved_dtype = getattr(torch, manifest.get("dtype", "float32"))
    model = AutoModelForCausalLM.from_config(config, dtype=saved_dtype)
    _rebuild(model, manifest)
    try:
        missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False)
    except Exception as error:  # safetensors raises plain errors for shape mismatches and bad headers
        raise UsageError(f"cannot load {path / WEIGHTS} into the recorded structure: {error}") from None
    # keys safetensors dropped as duplicates of tied weights are reported missing; they are tied again here
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise UsageError(f"{path / WEIGHTS} does not match the manifest: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if fingerprint(model) != manifest["fingerprint"]:
        raise UsageError(f"the model loaded from {path} differs from the one saved (fingerprint mismatch); "
                         "re-create it with svdbench compress")
    identity = manifest["fingerprint"]
    if dtype != saved_dtype:
        model.to(dtype)
        identity = ""  # recomputed by LoadedModel for the converted weights
    tokenizer = AutoTokenizer.from_pretrained(path)
    info = {"compressed": {k: manifest.get(k) for k in ("method", "ratio", "config", "calibration", "source_model", "facts")},
            "compressed_dtype": manifest.get("dtype")}
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, name=path.name, source=f"compressed:{path.resolve()}",
                       identity=identity, info=info)


def _is_tied(model: nn.Module, key: str) -> bool:
    """Whether parameter ``key`` shares storage with another parameter (tied embeddings)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if key not in params:
        return False
    return any(other != key and p.data_ptr() == params[key].data_ptr() for other, p in params.items())
