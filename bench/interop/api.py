"""Compress a transformers model held in memory with one call, in the spirit of torchao's ``quantize_``::

    from bench.interop.api import compress

    small, facts = compress(model, "svdllm_w", ratio=0.4, tokenizer=tokenizer, calibration=texts)
    facts["bytes"], facts["ranks"]["model.layers.0.self_attn.q_proj"]
    small.save_pretrained("w40")   # loads back with `import bench.interop.hf` + from_pretrained("w40")

It is the path ``svdbench compress`` takes (the same statistics, decompositions, allocation and refinement,
cached the same way under the model's identity), on a model you already have. ``model`` itself is left as it
was; the compressed copy is returned with what is known of it: its ranks, whole-model bytes and parameters,
and the method's facts. :func:`save` writes it as ``svdbench compress`` does (manifest, checksums, model card).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.errors import UsageError


def _windows(calibration, tokenizer, seqlen: int) -> torch.Tensor | None:
    """Calibration token windows from texts (cut into non-overlapping ``seqlen`` windows) or given windows."""
    if calibration is None:
        return None
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.is_floating_point():
            raise UsageError(f"calibration windows must be a 2-d tensor of token ids (samples x seqlen), got "
                             f"{calibration.dtype} {tuple(calibration.shape)}")
        return calibration.long()
    if isinstance(calibration, str) or not isinstance(calibration, Sequence):
        raise UsageError("calibration must be a list of texts or a tensor of token windows (samples x seqlen)")
    if tokenizer is None:
        raise UsageError("calibration texts need the model's tokenizer: pass tokenizer=...")
    ids = torch.cat([tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0] for text in calibration])
    count = ids.numel() // seqlen
    if count == 0:
        raise UsageError(f"the calibration texts hold {ids.numel()} tokens, fewer than one window of {seqlen}; "
                         "give more text or a smaller calibration_seqlen")
    return ids[:count * seqlen].reshape(count, seqlen)


def compress(model: nn.Module, method: str, *, ratio: float | None = None, budget: str | float | None = None,
             tokenizer=None, calibration: Sequence[str] | torch.Tensor | None = None, calibration_seqlen: int = 512,
             config: Any = None, device: str = "cpu") -> tuple[nn.Module, dict]:
    """A compressed copy of ``model`` and its facts.

    ``method``: a registered method name (``svdbench plugins`` lists them). ``config``: that method's config
    object (e.g. ``methods.hybrid.HybridConfig(quantizer="gptq")``) or a mapping of its options
    (``{"quantizer": "gptq"}``); default: the method's defaults. Exactly one of ``ratio`` (the fraction of each
    compressed matrix's parameters removed) and ``budget`` (bytes such as ``"300MB"``, or a fraction of the dense
    bytes) must be given. ``calibration``: texts (cut into windows of ``calibration_seqlen`` tokens) or a
    ``samples x seqlen`` tensor of token ids; default: svdbench's own (32 x 512 tokens of WikiText-2
    validation). Returns ``(compressed, facts)``; ``facts`` holds ``ranks``, ``bytes``, ``params``,
    ``dense_bytes``, ``dense_params``, ``ratio``, ``layers`` and the method's own facts.
    """
    from bench.api.configs import config_dict
    from bench.engine.budget import budget_bytes, fit_budget
    from bench.engine.config import RunConfig
    from bench.engine.plugins import load_registry
    from bench.engine.workspace import Workspace
    from bench.model.hf_quantizer import mark_compressed
    from bench.model.loaded import LoadedModel, fingerprint

    if (ratio is None) == (budget is None):
        raise UsageError("give exactly one of ratio=... (e.g. 0.4) and budget=... (e.g. '300MB' or 0.75)")
    if not hasattr(model, "config"):
        raise UsageError("compress needs a transformers model (a PreTrainedModel with .config)")
    if isinstance(budget, int) and not isinstance(budget, bool) and budget > 1:
        budget = f"{budget}B"  # a whole number above 1 is bytes (a plain float above 1 is refused as ambiguous)
    registry = load_registry()
    registry.get("method", method)  # an unknown name is one line naming the known ones
    options = dict(config) if isinstance(config, Mapping) else config_dict(config) if config is not None else {}
    run = RunConfig.from_dict({"methods": [method], "ratios": [ratio] if ratio is not None else [],
                               "budgets": [str(budget)] if budget is not None else [],
                               "method_options": {method: options}, "device": device,
                               "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")})
    windows = _windows(calibration, tokenizer, calibration_seqlen)
    identity = fingerprint(model)
    if windows is not None:  # the stores are keyed by the identity: custom windows make their own entries
        identity = hashlib.sha256(f"{identity}:{hashlib.sha256(windows.numpy().tobytes()).hexdigest()}".encode()).hexdigest()
    loaded = LoadedModel(model=model.eval(), tokenizer=tokenizer, name=getattr(model.config, "_name_or_path", "") or
                         type(model).__name__, source="memory", identity=identity)
    workspace = Workspace(run, registry, loaded)
    if windows is not None:
        workspace._windows = windows
    elif tokenizer is None and workspace.create(method).uses_calibration():
        raise UsageError(f"{method} reads calibration data: pass tokenizer=... (or calibration windows)")
    if budget is None:
        configured, compressed = workspace.compress(method, float(ratio))
    else:
        configured = workspace.create(method)
        factorizations = workspace.factorizations(configured)
        fit = fit_budget(configured, factorizations, workspace.context(configured), workspace.dense_footprint,
                         budget_bytes(str(budget), workspace.dense_footprint["bytes"]))
        compressed = fit.compressed
    result = mark_compressed(compressed.model)
    summary = compressed.summary
    facts = {"method": method, "config": configured.settings(), "ratio": compressed.ratio,
             "ranks": {name: layer["rank"] for name, layer in compressed.layers.items() if layer["rank"] is not None},
             "bytes": summary["bytes"], "params": summary["params"], "dense_bytes": summary["dense_bytes"],
             "dense_params": summary["dense_params"], "summary": summary, "layers": compressed.layers,
             "facts": compressed.facts, "calibration": "given" if windows is not None else
             (config_dict(run.calibration) if configured.uses_calibration() else None)}
    return result, facts


def save(model: nn.Module, tokenizer, directory: str | Path, facts: dict, force: bool = False) -> Path:
    """Write a model :func:`compress` returned as ``svdbench compress`` does: safetensors, config with svdbench's
    quantization config and the guard, tokenizer, model card and the verified manifest."""
    from bench.model.saving import save_compressed

    manifest = {"method": facts["method"], "ratio": facts["ratio"], "config": facts["config"],
                "calibration": facts["calibration"], "accounting": facts["summary"], "layers": facts["layers"],
                "facts": facts["facts"], "source_model": {"spec": "memory", "name": getattr(model.config, "_name_or_path", "")}}
    return save_compressed(model, tokenizer, directory, manifest, force=force)
