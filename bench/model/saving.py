"""Saving a compressed model and loading it back, with safetensors only - verified before use.

A saved model is a directory::

    model.safetensors   every tensor (factors, packed quantized weights, scales,
                        zero points, the uncompressed embeddings, head, norms)
    config.json         the base architecture (Hugging Face config), with svdbench's
                        ``quantization_config`` (the compressed layout) in place of any
                        the source had: plain transformers loads it through
                        :mod:`bench.interop.hf`, and refuses it without svdbench
    tokenizer files     as written by ``tokenizer.save_pretrained``
    README.md           the model card, rendered from the manifest (:mod:`bench.model.card`)
    svdbench.json       the manifest (below), written last

The manifest records the method, its config, the ratio, every compressed
matrix's rank, every quantized linear's layout, the source model's identity,
the svdbench version, the sha256 of **every file** of the directory (config
and tokenizer included) and the fingerprint of the compressed model.

Loading checks every file and the layout before any tensor is read
(:mod:`bench.model.reload`).

Quantized layers are described by their layouts (:mod:`bench.model.layouts`;
plugins add their own), so the loader knows no quantizer by name. Nothing is
pickled: whole-module ``torch.save`` is what the reference SVD-LLM code does
and what breaks for its users across versions.

``save_compressed`` writes into a temporary sibling directory, verifies it
and renames it into place, so a killed ``compress`` never leaves half a
model behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from bench.disk import guarded, make_dir
from bench.errors import UsageError
from bench.locks import entry_lock
from bench.model.hf_format import FINGERPRINT, FORMAT, write_config
from bench.model.latent_saving import latent_layout
from bench.model.layers import LowRankLinear
from bench.model.layouts import QUANTIZED_LAYOUTS
from bench.model.loaded import fingerprint
from bench.model.manifest import MANIFEST, WEIGHTS, validate_manifest, verify_files
from bench.model.shared import shared_modules
from bench.model.structured import structured_layout
from bench.storage import atomic_write_text, replace_directory, seal, sha256_file, temporary_sibling

# --------------------------------------------------------------------------- identity

# --------------------------------------------------------------------------- saving

def compressed_layout(model: nn.Module) -> tuple[dict[str, int], dict[str, dict]]:
    """Ranks of every LowRankLinear and the manifest entry of every quantized linear."""
    ranks = {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    quantized = {}
    for name, module in model.named_modules():
        for layout in QUANTIZED_LAYOUTS.values():
            entry = layout.describe(module)
            if entry is not None:
                quantized[name] = entry
                break
    return ranks, quantized


def check_output_directory(out: Path | str, force: bool, source: Path | None = None) -> Path:
    """Where ``compress`` may write: not an existing non-empty directory (unless ``force``), never the source model's.

    Called before anything is loaded or computed, so a wrong ``--out`` fails at once.
    """
    out = Path(out)
    resolved = out.resolve()
    if source is not None:
        src = Path(source).resolve()
        if resolved == src or src in resolved.parents or resolved in src.parents:
            raise UsageError(f"--out {out} is (or contains, or lies inside) the source model's directory {src}; "
                             "give a separate directory")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UsageError(f"--out {out} exists and is not empty; give a new directory, or add --force to replace it")
        if not (out / MANIFEST).is_file():  # --force replaces a saved model, never an arbitrary directory
            raise UsageError(f"--out {out} holds files that are not a model saved by svdbench; --force replaces only "
                             "those - give a new directory")
    make_dir(out.parent if out.parent != Path("") else Path("."))
    if not os.access(out.parent if not out.exists() else out, os.W_OK):
        raise UsageError(f"--out {out} is not writable; give a writable directory")
    return out


def _unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each storage once, under its first name (tied embeddings: the input embedding's, which
    transformers ties the head to on load), contiguous."""
    seen: set[tuple] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.device.type, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.contiguous()
    return out


def save_compressed(model: nn.Module, tokenizer, out_dir: str | Path, manifest: dict, force: bool = True) -> Path:
    """Write ``model`` (safetensors), its config, tokenizer and ``svdbench.json`` to ``out_dir``, atomically.

    ``manifest`` carries what the caller knows (method, config, ratio, source
    model identity, ...); the layout, checksums and versions are added here.
    Everything is written into a temporary sibling, verified, then renamed
    into place (a directory already there is replaced only when ``force``).
    """
    from importlib.metadata import version

    from safetensors.torch import save_file

    from bench.model.card import CARD, render_card

    out = Path(out_dir)
    if not hasattr(model, "config"):
        raise UsageError("save_compressed needs a Hugging Face model (with .config) to record its architecture")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} exists and is not empty; give a new directory, or add --force to replace it")
    make_dir(out.parent)
    need = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with entry_lock(out):
        tmp = temporary_sibling(out, ".partial")
        try:
            with guarded(tmp, need):
                tmp.mkdir()
                ranks, quantized = compressed_layout(model)
                shared = shared_modules(model)  # saved once (below: each storage once), tied again on load
                dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
                write_config(model.config, tmp, ranks, quantized, dtype, shared)  # svdbench's quantization_config
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
                weights = fingerprint(model)
                save_file(_unique_tensors(model), str(tmp / WEIGHTS), metadata={"format": "pt", FINGERPRINT: weights})
            structured = structured_layout(model)  # MoDeGPT's smaller layers: per-layer shapes
            latent = latent_layout(model)  # latent-KV attention (palu), rebuilt before loading
            full = {**manifest, "format": FORMAT, "svdbench_version": version("svdbench"), "dtype": dtype,
                    "ranks": ranks, "quantized": quantized, "fingerprint": weights, **({"shared": shared} if shared else {}),
                    **({"structured": structured} if structured else {}),
                    **({"latent_attention": latent} if latent else {})}
            atomic_write_text(tmp / CARD, render_card(json.loads(json.dumps(full, default=str))))
            files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            full.update({"weights": {WEIGHTS: files[WEIGHTS]}, "files": files})
            full = seal(json.loads(json.dumps(full, default=str)))  # a checksum of the manifest itself
            atomic_write_text(tmp / MANIFEST, json.dumps(full, indent=1, sort_keys=True))  # written last
            verify_files(tmp, validate_manifest(tmp, json.loads((tmp / MANIFEST).read_text())))
            replace_directory(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
