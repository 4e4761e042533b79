"""Loading a saved compressed model back - verified before use, refused in one line when anything is wrong.

The checks, in this order, before any tensor is read: the manifest against
its schema (types, dtypes, bit widths, module names, ranks; every file name a
plain name inside the directory), every file's checksum, the recorded layout
against the architecture of ``config.json`` (ranks within the matrix,
quantized shapes consistent with their bit width and group size) and against
the safetensors header (every tensor's shape and dtype). Then the tensors are
loaded (strictly) and the fingerprint compared. A saved model the user gave
is never "repaired". The directory's layout: :mod:`bench.model.saving`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bench.model.latent_saving import rebuild_latent
from bench.model.layers import LowRankLinear
from bench.model.layouts import QUANTIZED_LAYOUTS, ManifestError, check_entry
from bench.model.loaded import LoadedModel, fingerprint
from bench.model.manifest import (
    MANIFEST,
    WEIGHTS,
    directory_identity,
    read_manifest,
    verify_files,
)
from bench.model.prepare import prepare_model
from bench.model.shared import tie_modules
from bench.model.structured import apply_structured_layout
from bench.model.targets import set_module


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

    if "structured" in manifest:
        try:
            apply_structured_layout(model, manifest["structured"], dtype)
        except (AttributeError, ValueError) as error:
            raise ManifestError(f"{where}: structured layers do not fit the architecture ({error}); "
                                "re-create the model with svdbench compress") from None
    shared = manifest.get("shared", {})
    sharing = {name.rpartition(".")[0] for pair in shared.items() for name in pair}  # a group's rank may pass m
    for name, rank in manifest["ranks"].items():
        dense = dense_at(name, "compressed matrix")
        check_entry(isinstance(dense, nn.Linear), where, f"{name} is a {type(dense).__name__}, not a linear layer")
        check_entry(rank <= (dense.in_features if name in sharing else min(dense.in_features, dense.out_features)), where,
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
    manifest = read_manifest(path)
    verify_files(path, manifest)
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
