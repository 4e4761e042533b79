"""A saved model's manifest (``svdbench.json``): its names, the model identity, and its checks.

The manifest records the method, its config, the ratio, every compressed
matrix's rank, every quantized linear's layout, the source model's identity,
the svdbench version, the sha256 of **every file** of the directory and the
fingerprint of the compressed model. :func:`validate_manifest` checks it
against its schema (types, dtypes, bit widths, module names, ranks; every
file name a plain name inside the directory), :func:`verify_files` every
file's checksum - both before any tensor is read.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from torch import nn

from bench.model import remap_layout  # noqa: F401 (registers the dobi_remap layout)
from bench.model.hf_format import FORMAT
from bench.model.latent_saving import validate_latent_layout
from bench.model.layouts import FLOAT_DTYPES, QUANTIZED_LAYOUTS, ManifestError, check_entry, is_int
from bench.model.loaded import fingerprint
from bench.model.shared import layout_error
from bench.model.structured import layout_problem
from bench.storage import is_sealed, sha256_file

# --------------------------------------------------------------------------- identity

# --------------------------------------------------------------------------- saving

MANIFEST = "svdbench.json"
WEIGHTS = "model.safetensors"
IDENTITY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                  "tokenizer.model", "chat_template.jinja", "chat_template.json")
_MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def directory_identity(model: nn.Module, directory: Path | str, weights: str | None = None) -> str:
    """A model's identity: its weights' fingerprint and the checksums of its config and tokenizer files.

    Editing ``config.json`` (``rope_theta``) or a tokenizer file changes what
    the model computes without changing a weight: it must change the identity
    every cache and resume key starts from.
    """
    directory = Path(directory)
    files = {name: sha256_file(directory / name) for name in IDENTITY_FILES if (directory / name).is_file()}
    return hashlib.sha256(json.dumps({"weights": weights or fingerprint(model), "files": files}, sort_keys=True).encode()).hexdigest()


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise ManifestError(f"cannot read {path / MANIFEST}: {error}; re-create the directory with svdbench compress") from None
    return validate_manifest(path, manifest)


def validate_manifest(path: Path, manifest) -> dict:
    """Check a manifest against the schema (no file or tensor is read); returns it."""
    where = str(path / MANIFEST)
    check_entry(isinstance(manifest, dict), where, "is not a JSON object")
    if manifest.get("format") == FORMAT:
        check_entry(is_sealed(manifest), where, "is corrupted or was edited (its checksum does not match)")
    missing = [k for k in ("format", "ranks", "quantized", "weights", "files", "fingerprint", "dtype", "checksum")
               if k not in manifest]
    if manifest.get("format") == 1:
        raise ManifestError(f"{path} was saved by an older svdbench (format 1), whose manifest does not cover "
                            "config.json and the tokenizer; re-create it with svdbench compress")
    check_entry(not missing, where, f"lacks '{missing[0] if missing else ''}' (it was not written by svdbench compress)")
    check_entry(manifest["format"] == FORMAT, where, f"has format {manifest['format']!r}, this svdbench reads format {FORMAT}")
    check_entry(manifest["dtype"] in FLOAT_DTYPES, where, f"dtype {manifest['dtype']!r} is not one of {', '.join(FLOAT_DTYPES)}")
    check_entry(isinstance(manifest["fingerprint"], str) and bool(_SHA256.fullmatch(manifest["fingerprint"])), where,
                "fingerprint is not a sha256")
    files = manifest["files"]
    check_entry(isinstance(files, dict) and files, where, "files must map file names to sha256 checksums")
    for name, digest in files.items():
        check_entry(isinstance(name, str) and "/" not in name and "\\" not in name and name not in (".", "..", MANIFEST)
                    and not name.startswith("..") and "\x00" not in name, where,
               f"file name {name!r} is not a plain file name inside {path}")
        check_entry(isinstance(digest, str) and bool(_SHA256.fullmatch(digest)), where, f"checksum of {name!r} is not a sha256")
    check_entry(WEIGHTS in files and "config.json" in files, where, f"files must list {WEIGHTS} and config.json")
    check_entry(manifest["weights"] == {WEIGHTS: files[WEIGHTS]}, where, f"weights must be {{{WEIGHTS!r}: its checksum}}")
    validate_layout(manifest, where)
    if "latent_attention" in manifest:
        validate_latent_layout(manifest["latent_attention"], where)
    return manifest


def validate_layout(layout: dict, where: str) -> None:
    """Check the ``ranks`` and ``quantized`` entries of a manifest (or of a quantization config) against the schema."""
    check_entry(isinstance(layout.get("ranks"), dict), where, "ranks must map module names to ranks")
    for name, rank in layout["ranks"].items():
        check_entry(isinstance(name, str) and bool(_MODULE_PATH.fullmatch(name)) and "__" not in name, where,
                    f"module name {name!r} is not a module path")
        check_entry(is_int(rank, 1), where, f"rank of {name} ({rank!r}) is not a positive integer")
    check_entry(isinstance(layout.get("quantized"), dict), where, "quantized must map module names to layouts")
    for name, entry in layout["quantized"].items():
        check_entry(isinstance(name, str) and bool(_MODULE_PATH.fullmatch(name)) and "__" not in name, where,
                    f"module name {name!r} is not a module path")
        check_entry(isinstance(entry, dict), where, f"{name}: quantized entry {entry!r} is not an object")
        if entry.get("quantizer") not in QUANTIZED_LAYOUTS:
            raise ManifestError(f"{where}: {name}: quantizer {entry.get('quantizer')!r} has no saving layout here "
                                f"(known: {', '.join(QUANTIZED_LAYOUTS)}); install the plugin that registers it, "
                                "or give its file with --plugins-dir")
    if "shared" in layout:
        error = layout_error(layout["shared"], layout["ranks"])
        check_entry(error is None, where, error or "")
    if "structured" in layout:
        error = layout_problem(layout["structured"])
        check_entry(error is None, where, error or "")


def verify_files(path: Path, manifest: dict) -> None:
    for name, digest in manifest["files"].items():
        file = path / name
        if file.is_symlink() or not file.is_file():
            raise ManifestError(f"file {file} named in {MANIFEST} is missing (or not a plain file); "
                                "re-create the model with svdbench compress")
        actual = sha256_file(file)
        if actual != digest:
            raise ManifestError(f"file {file} was edited or truncated (sha256 {actual[:12]}..., manifest says "
                                f"{digest[:12]}...); re-create it with svdbench compress")
