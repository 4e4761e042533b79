"""The calibration engine: token windows, and statistics collected once and shared by methods.

Statistics are taken on the **original** model with forward hooks (and one
backward pass per batch for gradient statistics), accumulated in float64 per
layer - activations are never stored. Linears that read the same input (q/k/v,
gate/up) share one input statistic: the engine detects them on the first batch.

Each statistic is cached on disk under a key made of the model identity (a
hash of its weights), the calibration data checksum and every calibration
setting; an entry is verified (sha256 of its file) before use and rebuilt
with a log line when it is corrupted or does not match.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from bench.api.statistic import CalibrationStats, Statistic
from bench.corpora import calibration_checksum, calibration_text
from bench.engine.config import CalibrationConfig
from bench.errors import UsageError
from bench.model.targets import Target, decoder_blocks
from bench.storage import atomic_write_text, cache_root, json_key, sha256_file, temporary_sibling

log = logging.getLogger(__name__)


def calibration_batches(tokenizer, config: CalibrationConfig) -> torch.Tensor:
    """``samples x seqlen`` token windows at seeded random offsets."""
    ids = tokenizer(calibration_text(config.dataset), add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() <= config.seqlen:
        raise UsageError(f"calibration text has {ids.numel()} tokens, fewer than --calib-seqlen {config.seqlen}")
    generator = torch.Generator().manual_seed(config.seed)
    starts = torch.randint(0, ids.numel() - config.seqlen, (config.samples,), generator=generator)
    return torch.stack([ids[s:s + config.seqlen] for s in starts.tolist()])


def _forward_pass(model: nn.Module, targets: list[Target], batches: torch.Tensor,
                  statistics: list[Statistic], device) -> dict[str, str]:
    """One no-grad pass feeding every forward statistic; returns the input groups."""
    per_block = [s for s in statistics if s.scope == "block"]
    statistics = [s for s in statistics if s.scope != "block"]
    groups: dict[str, str] = {}
    last: dict = {"tensor": None, "target": None}
    first_batch = True

    def hook(target: Target):
        def observe(_module, inputs, _output):
            x = inputs[0]  # the very object: q/k/v (gate/up) receive the same one
            if first_batch:
                same = last["tensor"] is x
                groups[target.name] = groups[last["target"]] if same else target.name
                last["tensor"], last["target"] = x, target.name
            if groups[target.name] != target.name:
                return
            flat = x.detach().reshape(-1, x.shape[-1])
            for statistic in statistics:
                statistic.observe(target.name, flat)
        return observe

    def block_hook(name: str):
        def observe(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            flat = hidden.detach().reshape(-1, hidden.shape[-1])
            for statistic in per_block:
                statistic.observe(name, flat)
        return observe

    handles = [model.get_submodule(t.name).register_forward_hook(hook(t)) for t in targets] if statistics else []
    if per_block:
        prefix, blocks = decoder_blocks(model)
        handles += [block.register_forward_pre_hook(block_hook(f"{prefix}.{i}"), with_kwargs=True)
                    for i, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="calibration (forward)", leave=False, unit="sample"):
                model(batch[None].to(device), use_cache=False)
                first_batch = False
                last["tensor"] = None
    finally:
        for handle in handles:
            handle.remove()
    return groups


def _backward_pass(model: nn.Module, targets: list[Target], batches: torch.Tensor,
                   statistics: list[Statistic], device) -> None:
    """Forward + backward per sample, feeding every gradient statistic."""
    modules = {t.name: model.get_submodule(t.name) for t in targets}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for module in modules.values():
        module.weight.requires_grad_(True)
    try:
        for batch in tqdm(batches, desc="calibration (gradients)", leave=False, unit="sample"):
            ids = batch[None].to(device)
            loss = model(ids, labels=ids, use_cache=False).loss  # HF shifts the labels itself
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite calibration loss ({float(loss)}) on the original model")
            loss.backward()
            for name, module in modules.items():
                for statistic in statistics:
                    statistic.observe(name, module.weight.grad)
                module.weight.grad = None
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
            p.grad = None


class StatisticsCache:
    """Verified on-disk cache of statistics: ``<key>.safetensors`` + ``<key>.json``."""

    def __init__(self, root: Path | None = None):
        default = os.environ.get("SVDBENCH_STATS_CACHE") or cache_root() / "stats"
        self.root = Path(root) if root else Path(default)

    key = staticmethod(json_key)

    def load(self, fields: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        key = self.key(fields)
        data, meta = self.root / f"{key}.safetensors", self.root / f"{key}.json"
        if not meta.exists() and not data.exists():
            return None
        try:
            info = json.loads(meta.read_text())
            if info["fields"] != fields:
                raise ValueError("its settings do not match")
            digest = sha256_file(data)
            if digest != info["sha256"]:
                raise ValueError("its checksum does not match")
            return load_file(data), info["groups"]
        except (OSError, ValueError, KeyError) as error:
            log.warning("statistics cache entry %s (%s) is unusable: %s; rebuilding it", key, fields.get("statistic"), error)
            return None

    def save(self, fields: dict, values: dict[str, torch.Tensor], groups: dict[str, str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        key = self.key(fields)
        data, meta = self.root / f"{key}.safetensors", self.root / f"{key}.json"
        tmp = temporary_sibling(data)
        save_file({k: v.contiguous().cpu() for k, v in values.items()}, tmp)
        digest = sha256_file(tmp)
        os.replace(tmp, data)
        atomic_write_text(meta, json.dumps({"fields": fields, "sha256": digest, "groups": groups}, indent=1))


def collect_statistics(model: nn.Module, model_identity: str, targets: list[Target], batches: torch.Tensor,
                       config: CalibrationConfig, statistics: list[Statistic], device="cpu",
                       cache: StatisticsCache | None = None) -> CalibrationStats:
    """Statistics for ``targets``, from the cache where possible, collected otherwise."""
    cache = cache or StatisticsCache()
    values: dict[str, dict[str, torch.Tensor]] = {}
    groups: dict[str, str] = {}
    fields_of = {s.name: {"statistic": s.name, "version": s.version, "model": model_identity,
                          "calibration": asdict(config), "data_sha256": calibration_checksum(config.dataset),
                          "targets": [t.name for t in targets]} for s in statistics}
    missing = []
    for statistic in statistics:
        hit = cache.load(fields_of[statistic.name])
        if hit is None:
            missing.append(statistic)
        else:
            values[statistic.name], found_groups = hit
            groups.update(found_groups)
    forward = [s for s in missing if not s.needs_backward]
    backward = [s for s in missing if s.needs_backward]
    for statistic in missing:
        statistic.start()
    was_training = model.training
    model.eval()
    if forward:
        log.info("collecting %s on %d x %d calibration tokens", ", ".join(s.name for s in forward), *batches.shape)
        groups.update(_forward_pass(model, targets, batches, forward, device))
    if backward:
        log.info("collecting %s (gradients) on %d x %d calibration tokens", ", ".join(s.name for s in backward), *batches.shape)
        _backward_pass(model, targets, batches, backward, device)
    model.train(was_training)
    for statistic in missing:
        result = statistic.result()
        for key, tensor in result.items():
            if not torch.isfinite(tensor).all():
                raise FloatingPointError(f"statistic '{statistic.name}' is non-finite for {key}")
        values[statistic.name] = result
        cache.save(fields_of[statistic.name], result, groups if not statistic.needs_backward else {})
    return CalibrationStats(values=values, input_group=groups)
