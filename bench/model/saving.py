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

Loading checks, in this order, before any tensor is read: the manifest
against its schema (types, dtypes, bit widths, module names, ranks; every
file name a plain name inside the directory), every file's checksum, the
recorded layout against the architecture of ``config.json`` (ranks within
the matrix, quantized shapes consistent with their bit width and group size)
and against the safetensors header (every tensor's shape and dtype). Then
the tensors are loaded (strictly) and the fingerprint compared. Anything
wrong is refused with one line naming the file and what is wrong - a saved
model the user gave is never "repaired".

Quantized layers are described by a :class:`QuantizedLayout` per quantizer
(the manifest entry's ``quantizer``); :func:`register_layout` adds one (GPTQ
plugs in there), so the loader knows no quantizer by name. Nothing is
pickled: whole-module ``torch.save`` is what the reference SVD-LLM code does
and what breaks for its users across versions.

``save_compressed`` writes into a temporary sibling directory, verifies it
and renames it into place, so a killed ``compress`` never leaves half a
model behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from bench.errors import UsageError
from bench.model.hf_format import FINGERPRINT, FORMAT, write_config
from bench.model.latent_saving import latent_layout, rebuild_latent, validate_latent_layout
from bench.model.layers import LowRankLinear
from bench.model.loaded import LoadedModel, fingerprint
from bench.model.prepare import prepare_model
from bench.model.quantized import BITS, GPTQ_GROUP_SIZES, META_DTYPES, GPTQLinear, QuantizedLinear
from bench.model.shared import layout_error, shared_modules, tie_modules
from bench.model.targets import set_module
from bench.storage import (
    atomic_write_text,
    entry_lock,
    guarded,
    is_sealed,
    make_dir,
    replace_directory,
    seal,
    sha256_file,
    temporary_sibling,
)

MANIFEST = "svdbench.json"
WEIGHTS = "model.safetensors"
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
TENSOR_DTYPES = (*FLOAT_DTYPES, "float64", "uint8", "int8", "int16", "int32", "int64", "bool")
IDENTITY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                  "tokenizer.model", "chat_template.jinja", "chat_template.json")
_MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(UsageError):
    """A saved model's manifest (or files) that cannot be trusted."""


# --------------------------------------------------------------------------- identity

def directory_identity(model: nn.Module, directory: Path | str, weights: str | None = None) -> str:
    """A model's identity: its weights' fingerprint and the checksums of its config and tokenizer files.

    Editing ``config.json`` (``rope_theta``) or a tokenizer file changes what
    the model computes without changing a weight: it must change the identity
    every cache and resume key starts from.
    """
    directory = Path(directory)
    files = {name: sha256_file(directory / name) for name in IDENTITY_FILES if (directory / name).is_file()}
    return hashlib.sha256(json.dumps({"weights": weights or fingerprint(model), "files": files}, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- quantized layouts

def _check(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise ManifestError(f"{where}: {message}; re-create the model with svdbench compress")


def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


class QuantizedLayout:
    """How one kind of quantized linear is saved and rebuilt (one per ``quantizer`` name).

    ``describe`` gives the manifest entry of a module of this kind (None for
    other modules); ``validate`` checks an entry against the schema and the
    dense linear it replaces (before any tensor is read); ``build`` makes the
    module with empty tensors of the recorded layout, ready for the weights.
    """

    quantizer: str = ""

    def describe(self, module: nn.Module) -> dict | None:
        raise NotImplementedError

    def validate(self, entry: dict, dense: nn.Module, where: str) -> None:
        raise NotImplementedError

    @staticmethod
    def check_linear(entry: dict, dense: nn.Module, where: str) -> None:
        """What every layout checks: the entry replaces a linear of the architecture's shape and bias."""
        _check(isinstance(entry["bias"], bool), where, "bias must be true or false")
        _check(isinstance(dense, nn.Linear), where, f"replaces a {type(dense).__name__}, not a linear layer")
        for key in ("in_features", "out_features"):
            _check(entry[key] == getattr(dense, key), where,
                   f"{key} {entry[key]!r} does not match the architecture ({getattr(dense, key)})")
        _check(entry["bias"] == (dense.bias is not None), where, "bias does not match the architecture")

    def build(self, entry: dict) -> nn.Module:
        raise NotImplementedError


def _tensor_spec(t: torch.Tensor) -> dict:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


def _check_tensor_spec(spec, where: str, shape: list[int] | None = None, dtype: str | None = None) -> None:
    _check(isinstance(spec, dict) and set(spec) == {"shape", "dtype"}, where, "must be {\"shape\": [...], \"dtype\": ...}")
    _check(isinstance(spec["shape"], list) and all(_is_int(d) for d in spec["shape"]), where,
           f"shape {spec['shape']!r} is not a list of sizes")
    _check(spec["dtype"] in TENSOR_DTYPES, where, f"dtype {spec['dtype']!r} is not one of {', '.join(TENSOR_DTYPES)}")
    if shape is not None:
        _check(spec["shape"] == shape, where, f"shape {spec['shape']} does not fit the layout (expected {shape})")
    if dtype is not None:
        _check(spec["dtype"] == dtype, where, f"dtype {spec['dtype']} does not fit the layout (expected {dtype})")


class HQQLayout(QuantizedLayout):
    """:class:`QuantizedLinear`: HQQ bit-packed weights, per-group scales and zero points."""

    quantizer = "hqq"
    KEYS = {"quantizer", "nbits", "group_size", "packing", "meta_dtype", "in_features", "out_features", "bias",
            "compute_dtype", "tensors"}

    def describe(self, module: nn.Module) -> dict | None:
        if not isinstance(module, QuantizedLinear):
            return None
        return {**module.quantization(), "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None, "compute_dtype": str(module.compute_dtype).removeprefix("torch."),
                "tensors": {key: _tensor_spec(getattr(module, key)) for key in ("packed", "scale", "zero")}}

    @staticmethod
    def expected(nbits: int, group_size: int, in_features: int, out_features: int, meta_dtype: str) -> dict:
        """The tensor layout ``QuantizedLinear.quantize`` produces for these settings."""
        import math

        from hqq.core.quantize import Quantizer

        groups = 4 * math.ceil(in_features * out_features / (4 * group_size))
        packed = Quantizer.pack[Quantizer.bit_to_packing[nbits]](torch.zeros(groups, 1, dtype=torch.uint8))
        meta = {"shape": [groups, 1], "dtype": meta_dtype}
        return {"packed": {"shape": [packed.shape[0], group_size], "dtype": str(packed.dtype).removeprefix("torch.")},
                "scale": meta, "zero": dict(meta)}

    def validate(self, entry: dict, dense: nn.Module, where: str) -> None:
        from hqq.core.quantize import Quantizer

        _check(set(entry) == self.KEYS, where, f"has keys {sorted(entry)}, expected {sorted(self.KEYS)}")
        _check(entry["nbits"] in BITS and _is_int(entry["nbits"]), where,
               f"nbits {entry['nbits']!r} is not one of {', '.join(map(str, BITS))}")
        _check(_is_int(entry["group_size"], 1), where, f"group_size {entry['group_size']!r} is not a positive integer")
        _check(entry["packing"] == Quantizer.bit_to_packing[entry["nbits"]], where,
               f"packing {entry['packing']!r} does not match nbits {entry['nbits']}")
        _check(entry["meta_dtype"] in META_DTYPES, where, f"meta_dtype {entry['meta_dtype']!r} is unknown")
        _check(entry["compute_dtype"] in FLOAT_DTYPES, where, f"compute_dtype {entry['compute_dtype']!r} is unknown")
        self.check_linear(entry, dense, where)
        tensors = entry["tensors"]
        _check(isinstance(tensors, dict) and set(tensors) == {"packed", "scale", "zero"}, where,
               "tensors must be packed, scale and zero")
        for key, spec in self.expected(entry["nbits"], entry["group_size"], entry["in_features"],
                                       entry["out_features"], entry["meta_dtype"]).items():
            _check_tensor_spec(tensors[key], f"{where}.tensors.{key}", spec["shape"], spec["dtype"])

    def build(self, entry: dict) -> nn.Module:
        t = entry["tensors"]
        empty = {key: torch.empty(t[key]["shape"], dtype=getattr(torch, t[key]["dtype"])) for key in t}
        bias = torch.empty(entry["out_features"], dtype=getattr(torch, entry["compute_dtype"])) if entry["bias"] else None
        return QuantizedLinear(entry["in_features"], entry["out_features"], entry["nbits"], entry["group_size"],
                               empty["packed"], empty["scale"], empty["zero"], bias,
                               compute_dtype=getattr(torch, entry["compute_dtype"]))


class GPTQLayout(QuantizedLayout):
    """:class:`GPTQLinear`: GPTQModel's packed int32 weights and zero points, float16 scales, the group index."""

    quantizer = "gptq"
    KEYS = {"quantizer", "nbits", "group_size", "sym", "desc_act", "packing", "in_features", "out_features", "bias",
            "compute_dtype", "tensors"}
    TENSORS = ("qweight", "qzeros", "scales", "g_idx")

    def describe(self, module: nn.Module) -> dict | None:
        if not isinstance(module, GPTQLinear):
            return None
        return {**module.quantization(), "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None, "compute_dtype": str(module.compute_dtype).removeprefix("torch."),
                "tensors": {key: _tensor_spec(getattr(module, key)) for key in self.TENSORS}}

    @staticmethod
    def expected(nbits: int, group_size: int, in_features: int, out_features: int) -> dict:
        """The tensor layout ``GPTQLinear.quantize`` produces (sizes padded to multiples of 32)."""
        rows, columns = -(-out_features // 32) * 32, -(-in_features // 32) * 32
        groups = -(-columns // group_size)
        return {"qweight": {"shape": [columns * nbits // 32, rows], "dtype": "int32"},
                "qzeros": {"shape": [groups, rows * nbits // 32], "dtype": "int32"},
                "scales": {"shape": [groups, rows], "dtype": "float16"},
                "g_idx": {"shape": [columns], "dtype": "int32"}}

    def validate(self, entry: dict, dense: nn.Module, where: str) -> None:
        _check(set(entry) == self.KEYS, where, f"has keys {sorted(entry)}, expected {sorted(self.KEYS)}")
        _check(entry["nbits"] in BITS and _is_int(entry["nbits"]), where,
               f"nbits {entry['nbits']!r} is not one of {', '.join(map(str, BITS))}")
        _check(entry["group_size"] in GPTQ_GROUP_SIZES and _is_int(entry["group_size"]), where,
               f"group_size {entry['group_size']!r} is not one of {', '.join(map(str, GPTQ_GROUP_SIZES))}")
        _check(isinstance(entry["sym"], bool) and isinstance(entry["desc_act"], bool), where,
               "sym and desc_act must be true or false")
        _check(entry["packing"] == "gptq int32", where, f"packing {entry['packing']!r} is not 'gptq int32'")
        _check(entry["compute_dtype"] in FLOAT_DTYPES, where, f"compute_dtype {entry['compute_dtype']!r} is unknown")
        self.check_linear(entry, dense, where)
        tensors = entry["tensors"]
        _check(isinstance(tensors, dict) and set(tensors) == set(self.TENSORS), where,
               f"tensors must be {', '.join(self.TENSORS)}")
        for key, spec in self.expected(entry["nbits"], entry["group_size"], entry["in_features"],
                                       entry["out_features"]).items():
            _check_tensor_spec(tensors[key], f"{where}.tensors.{key}", spec["shape"], spec["dtype"])

    def build(self, entry: dict) -> nn.Module:
        t = entry["tensors"]
        empty = {key: torch.empty(t[key]["shape"], dtype=getattr(torch, t[key]["dtype"])) for key in t}
        compute_dtype = getattr(torch, entry["compute_dtype"])
        bias = torch.empty(entry["out_features"], dtype=compute_dtype) if entry["bias"] else None
        return GPTQLinear(entry["in_features"], entry["out_features"], entry["nbits"], entry["group_size"],
                          empty["qweight"], empty["qzeros"], empty["scales"], empty["g_idx"], bias,
                          sym=entry["sym"], desc_act=entry["desc_act"], compute_dtype=compute_dtype)


QUANTIZED_LAYOUTS: dict[str, QuantizedLayout] = {}


def register_layout(layout: QuantizedLayout) -> None:
    """Teach saving and loading a quantized layer kind (keyed by ``layout.quantizer``)."""
    QUANTIZED_LAYOUTS[layout.quantizer] = layout


register_layout(HQQLayout())
register_layout(GPTQLayout())


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
                latent = latent_layout(model)  # latent-KV attention (palu), rebuilt before loading
                dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
                write_config(model.config, tmp, ranks, quantized, dtype, shared)  # svdbench's quantization_config
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
                weights = fingerprint(model)
                save_file(_unique_tensors(model), str(tmp / WEIGHTS), metadata={"format": "pt", FINGERPRINT: weights})
            full = {**manifest, "format": FORMAT, "svdbench_version": version("svdbench"), "dtype": dtype,
                    "ranks": ranks, "quantized": quantized, "fingerprint": weights, **({"shared": shared} if shared else {}),
                    **({"latent_attention": latent} if latent else {})}
            atomic_write_text(tmp / CARD, render_card(json.loads(json.dumps(full, default=str))))
            files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            full.update({"weights": {WEIGHTS: files[WEIGHTS]}, "files": files})
            full = seal(json.loads(json.dumps(full, default=str)))  # a checksum of the manifest itself
            atomic_write_text(tmp / MANIFEST, json.dumps(full, indent=1, sort_keys=True))  # written last
            _verify_files(tmp, validate_manifest(tmp, json.loads((tmp / MANIFEST).read_text())))
            replace_directory(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- loading

def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise ManifestError(f"cannot read {path / MANIFEST}: {error}; re-create the directory with svdbench compress") from None
    return validate_manifest(path, manifest)


def validate_manifest(path: Path, manifest) -> dict:
    """Check a manifest against the schema (no file or tensor is read); returns it."""
    where = str(path / MANIFEST)
    _check(isinstance(manifest, dict), where, "is not a JSON object")
    if manifest.get("format") == FORMAT:
        _check(is_sealed(manifest), where, "is corrupted or was edited (its checksum does not match)")
    missing = [k for k in ("format", "ranks", "quantized", "weights", "files", "fingerprint", "dtype", "checksum")
               if k not in manifest]
    if manifest.get("format") == 1:
        raise ManifestError(f"{path} was saved by an older svdbench (format 1), whose manifest does not cover "
                            "config.json and the tokenizer; re-create it with svdbench compress")
    _check(not missing, where, f"lacks '{missing[0] if missing else ''}' (it was not written by svdbench compress)")
    _check(manifest["format"] == FORMAT, where, f"has format {manifest['format']!r}, this svdbench reads format {FORMAT}")
    _check(manifest["dtype"] in FLOAT_DTYPES, where, f"dtype {manifest['dtype']!r} is not one of {', '.join(FLOAT_DTYPES)}")
    _check(isinstance(manifest["fingerprint"], str) and bool(_SHA256.fullmatch(manifest["fingerprint"])), where,
           "fingerprint is not a sha256")
    files = manifest["files"]
    _check(isinstance(files, dict) and files, where, "files must map file names to sha256 checksums")
    for name, digest in files.items():
        _check(isinstance(name, str) and "/" not in name and "\\" not in name and name not in (".", "..", MANIFEST)
               and not name.startswith("..") and "\x00" not in name, where,
               f"file name {name!r} is not a plain file name inside {path}")
        _check(isinstance(digest, str) and bool(_SHA256.fullmatch(digest)), where, f"checksum of {name!r} is not a sha256")
    _check(WEIGHTS in files and "config.json" in files, where, f"files must list {WEIGHTS} and config.json")
    _check(manifest["weights"] == {WEIGHTS: files[WEIGHTS]}, where, f"weights must be {{{WEIGHTS!r}: its checksum}}")
    validate_layout(manifest, where)
    if "latent_attention" in manifest:
        validate_latent_layout(manifest["latent_attention"], where)
    return manifest


def validate_layout(layout: dict, where: str) -> None:
    """Check the ``ranks`` and ``quantized`` entries of a manifest (or of a quantization config) against the schema."""
    _check(isinstance(layout.get("ranks"), dict), where, "ranks must map module names to ranks")
    for name, rank in layout["ranks"].items():
        _check(isinstance(name, str) and bool(_MODULE_PATH.fullmatch(name)) and "__" not in name, where,
               f"module name {name!r} is not a module path")
        _check(_is_int(rank, 1), where, f"rank of {name} ({rank!r}) is not a positive integer")
    _check(isinstance(layout.get("quantized"), dict), where, "quantized must map module names to layouts")
    for name, entry in layout["quantized"].items():
        _check(isinstance(name, str) and bool(_MODULE_PATH.fullmatch(name)) and "__" not in name, where,
               f"module name {name!r} is not a module path")
        _check(isinstance(entry, dict) and entry.get("quantizer") in QUANTIZED_LAYOUTS, where,
               f"{name}: quantizer {entry.get('quantizer') if isinstance(entry, dict) else entry!r} is not one of "
               f"{', '.join(QUANTIZED_LAYOUTS)}")
    if "shared" in layout:
        error = layout_error(layout["shared"], layout["ranks"])
        _check(error is None, where, error or "")


def _verify_files(path: Path, manifest: dict) -> None:
    for name, digest in manifest["files"].items():
        file = path / name
        if file.is_symlink() or not file.is_file():
            raise ManifestError(f"file {file} named in {MANIFEST} is missing (or not a plain file); "
                                "re-create the model with svdbench compress")
        actual = sha256_file(file)
        if actual != digest:
            raise ManifestError(f"file {file} was edited or truncated (sha256 {actual[:12]}..., manifest says "
                                f"{digest[:12]}...); re-create it with svdbench compress")


def rebuild(model: nn.Module, manifest: dict, where: str, dtype: torch.dtype | None = None) -> None:
    """Give ``model`` the compressed structure recorded in the manifest (empty weights), checking it fits.

    ``dtype`` is that of the low-rank factors (default: the saved one); quantized layers keep their recorded
    tensor dtypes.
    """
    dtype = dtype or getattr(torch, manifest["dtype"])
    prepare_model(model)  # the architecture as the engine held it when saving: every matrix an nn.Linear

    def dense_at(name: str, what: str) -> nn.Module:
        try:
            return model.get_submodule(name)
        except AttributeError:
            raise ManifestError(f"{where}: {what} {name} is not a module of the saved architecture; "
                                "re-create the model with svdbench compress") from None

    shared = manifest.get("shared", {})
    sharing = {name.rpartition(".")[0] for pair in shared.items() for name in pair}  # a group's rank may pass m
    for name, rank in manifest["ranks"].items():
        dense = dense_at(name, "compressed matrix")
        _check(isinstance(dense, nn.Linear), where, f"{name} is a {type(dense).__name__}, not a linear layer")
        _check(rank <= (dense.in_features if name in sharing else min(dense.in_features, dense.out_features)), where,
               f"rank {rank} of {name} exceeds its {dense.out_features} x {dense.in_features} matrix")
        set_module(model, name, LowRankLinear(dense.in_features, dense.out_features, rank, dense.bias is not None,
                                              dtype=dtype))
    rebuild_latent(model, manifest.get("latent_attention", {}), where, dtype)
    try:
        tie_modules(model, shared)
    except ValueError as error:
        raise ManifestError(f"{where}: {error}; re-create the model with svdbench compress") from None
    for name, entry in manifest["quantized"].items():
        layout = QUANTIZED_LAYOUTS[entry["quantizer"]]
        layout.validate(entry, dense_at(name, "quantized layer"), f"{where} {name}")
        set_module(model, name, layout.build(entry))


def _check_header(file: Path, model: nn.Module) -> None:
    """Every tensor in the safetensors header has the shape and dtype the rebuilt model expects (nothing read)."""
    from safetensors import safe_open

    expected = model.state_dict()
    try:
        with safe_open(str(file), framework="pt") as handle:
            header = {key: handle.get_slice(key) for key in handle.keys()}
            for key, sliced in header.items():
                if key not in expected:
                    raise ManifestError(f"{file} holds tensor {key!r}, which the manifest's structure does not have; "
                                        "re-create the model with svdbench compress")
                shape, dtype = list(sliced.get_shape()), sliced.get_dtype()
                want = expected[key]
                if shape != list(want.shape) or _st_dtype(want.dtype) != dtype:
                    raise ManifestError(f"{file}: tensor {key} is {dtype} {shape}, the manifest's structure needs "
                                        f"{_st_dtype(want.dtype)} {list(want.shape)}; re-create the model with "
                                        "svdbench compress")
    except ManifestError:
        raise
    except Exception as error:  # safetensors raises plain errors for bad headers
        raise ManifestError(f"cannot read {file}: {error}; re-create the model with svdbench compress") from None
    missing = [k for k in expected if k not in header and not _is_tied(model, k)]
    if missing:
        raise ManifestError(f"{file} lacks tensor {missing[0]}; re-create the model with svdbench compress")


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
              torch.bool: "BOOL"}


def _st_dtype(dtype: torch.dtype) -> str:
    return _ST_DTYPES.get(dtype, str(dtype))


def load_compressed(path: str | Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a directory written by :func:`save_compressed`, verifying it first (see the module docstring).

    Raises ``UsageError`` (one line) for anything that does not match.
    """
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    manifest = _read_manifest(path)
    _verify_files(path, manifest)
    try:
        config = AutoConfig.from_pretrained(path)
        for key in ("quantization_config", "transformers_weights"):  # for transformers' loader, not this one:
            if hasattr(config, key):  # lm-eval's HFLM would look the method up, and svdbench need not register it
                delattr(config, key)
        saved_dtype = getattr(torch, manifest["dtype"])
        model = AutoModelForCausalLM.from_config(config, dtype=saved_dtype)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ManifestError(f"cannot build the architecture of {path / 'config.json'}: {error}") from None
    rebuild(model, manifest, str(path / MANIFEST))
    _check_header(path / WEIGHTS, model)
    try:
        missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False)
    except Exception as error:  # safetensors raises plain errors for shape mismatches and bad headers
        raise ManifestError(f"cannot load {path / WEIGHTS} into the recorded structure: {error}") from None
    # keys safetensors dropped as duplicates of tied weights are reported missing; they are tied again here
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise ManifestError(f"{path / WEIGHTS} does not match the manifest: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if fingerprint(model) != manifest["fingerprint"]:
        raise ManifestError(f"the model loaded from {path} differs from the one saved (fingerprint mismatch); "
                            "re-create it with svdbench compress")
    weights = manifest["fingerprint"]
    if dtype != saved_dtype:
        model.to(dtype)
        weights = None  # recomputed for the converted weights
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as error:  # a tokenizer file that passed its checksum but does not load
        raise ManifestError(f"cannot load the tokenizer in {path}: {type(error).__name__}: {error}") from None
    info = {"compressed": {k: manifest.get(k) for k in ("method", "ratio", "config", "calibration", "source_model", "facts")},
            "compressed_dtype": manifest.get("dtype")}
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, name=path.name, source=f"compressed:{path.resolve()}",
                       identity=directory_identity(model, path, weights), info=info)


def _is_tied(model: nn.Module, key: str) -> bool:
    """Whether parameter ``key`` shares storage with another parameter (tied embeddings)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if key not in params:
        return False
    return any(other != key and p.data_ptr() == params[key].data_ptr() for other, p in params.items())
