"""Calibration: the token windows, and the statistics collected on them and stored on disk.

Statistics are taken on the **original** model (:mod:`bench.engine.passes`),
accumulated in float64 per layer; activations are never kept beyond one
decoder block. Every statistic is stored as it is made, one file per block
(:mod:`bench.engine.stores`), under a key of the model identity, the
calibration data checksum and every calibration setting.
``collect_statistics`` calls ``on_block`` with each block's statistics as
they become available - from the pass, or read back from the store - so a
caller can decompose the block's matrices right away and never hold more
than one block's statistics.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch
from torch import nn

from bench.api.statistic import CalibrationStats, Statistic
from bench.corpora import calibration_checksum, calibration_text
from bench.engine.config import CalibrationConfig
from bench.engine.passes import BlockCallback, forward_statistics, gradient_statistics, targets_by_block
from bench.engine.stores import Entry, EntryWriter, LazyTensors, block_file, open_entry, store_root
from bench.errors import UsageError
from bench.model.targets import Target, decoder_blocks

log = logging.getLogger(__name__)


def calibration_batches(tokenizer, config: CalibrationConfig) -> torch.Tensor:
    """``samples x seqlen`` token windows at seeded random offsets."""
    ids = tokenizer(calibration_text(config.dataset), add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() <= config.seqlen:
        raise UsageError(f"calibration text has {ids.numel()} tokens, fewer than --calib-seqlen {config.seqlen}")
    generator = torch.Generator().manual_seed(config.seed)
    starts = torch.randint(0, ids.numel() - config.seqlen, (config.samples,), generator=generator)
    return torch.stack([ids[s:s + config.seqlen] for s in starts.tolist()])


# --------------------------------------------------------------------------- collection with the store

class StatisticsStore:
    """Where statistics entries live (``SVDBENCH_STATS_CACHE``, else ``<cache>/stats``)."""

    def __init__(self, root=None):
        from pathlib import Path

        self.root = Path(root) if root else store_root("stats")

    def fields(self, statistic: Statistic, model_identity: str, config: CalibrationConfig,
               targets: list[Target]) -> dict:
        fields = {"statistic": statistic.name, "version": statistic.version, "scope": statistic.scope,
                  "model": model_identity, "calibration": asdict(config),
                  "data_sha256": calibration_checksum(config.dataset), "targets": [t.name for t in targets]}
        if statistic.windows is not None:  # only then: the keys of every other statistic stay as they were
            fields["windows"] = statistic.windows
        return fields


def stored_statistics(model_identity: str, targets: list[Target], config: CalibrationConfig,
                      statistics: list[Statistic], cache: StatisticsStore | None = None) -> CalibrationStats | None:
    """The statistics from the store alone (no model needed), or None when any of them is missing."""
    store = cache or StatisticsStore()
    entries = {}
    for statistic in statistics:
        entry = open_entry(store.root, store.fields(statistic, model_identity, config, targets), statistic.name)
        if entry is None:
            return None
        entries[statistic.name] = entry
    return CalibrationStats(values={name: LazyTensors(entry) for name, entry in entries.items()},
                            input_group=_stored_groups(entries))


def collect_statistics(model: nn.Module, model_identity: str, targets: list[Target], batches: torch.Tensor,
                       config: CalibrationConfig, statistics: list[Statistic], device="cpu",
                       cache: StatisticsStore | None = None, on_block: BlockCallback | None = None,
                       computed: list[str] | None = None) -> CalibrationStats:
    """Statistics for ``targets``: read from the store where present, computed (and stored) otherwise.

    With ``on_block``, it is called once per decoder block with that block's
    statistics, whether they were just computed or read back from the store.
    The names of the statistics computed (not read) are appended to
    ``computed``. The result reads every value from the store on use.
    """
    store = cache or StatisticsStore()
    fields = {s.name: store.fields(s, model_identity, config, targets) for s in statistics}
    entries: dict[str, Entry] = {}
    for statistic in statistics:
        entry = open_entry(store.root, fields[statistic.name], f"statistic '{statistic.name}'")
        if entry is not None:
            entries[statistic.name] = entry
    missing = [s for s in statistics if s.name not in entries]
    if computed is not None:
        computed += [s.name for s in missing]
    forward = [s for s in missing if not s.needs_backward]
    backward = [s for s in missing if s.needs_backward]
    by_block = targets_by_block(targets)
    prefix, blocks = decoder_blocks(model)
    block_of = {t.name: t.block for t in targets} | {f"{prefix}.{i}": i for i in range(len(blocks))}
    was_training = model.training
    model.eval()
    try:
        if backward:
            log.info("collecting %s (gradients) on %d x %d calibration tokens", ", ".join(s.name for s in backward),
                     *batches.shape)
            results = gradient_statistics(model, targets, batches, backward, device)
            for statistic in backward:
                writer = EntryWriter(store.root, fields[statistic.name])
                table = results[statistic.name]
                for index in sorted({block_of[key] for key in table}):
                    writer.write_block(index, {k: v for k, v in table.items() if block_of[k] == index})
                writer.finish()
                entries[statistic.name] = open_entry(store.root, fields[statistic.name], statistic.name)
        groups = _stored_groups(entries)

        def deliver(index: int, fresh: dict[str, dict[str, torch.Tensor]]) -> None:
            if on_block is None:
                return
            values = dict(fresh)
            for name, entry in entries.items():
                if name not in values:
                    file = block_file(index)
                    values[name] = entry.read_file(file) if file in entry.manifest["files"] else {}
            on_block(index, by_block.get(index, []), values, groups)

        if forward:
            log.info("collecting %s on %d x %d calibration tokens, block by block", ", ".join(s.name for s in forward),
                     *batches.shape)
            writers = {s.name: EntryWriter(store.root, fields[s.name]) for s in forward}
            try:
                def visit(index, results, found_groups):
                    groups.update(found_groups)
                    for name, writer in writers.items():
                        writer.write_block(index, results[name])
                    deliver(index, results)

                forward_statistics(model, targets, batches, forward, device, visit)
                for writer in writers.values():
                    writer.finish({"groups": groups})
            except BaseException:
                for writer in writers.values():
                    writer.abandon()
                raise
        elif on_block is not None:
            for index in range(len(blocks)):
                deliver(index, {})
    finally:
        model.train(was_training)
    for statistic in statistics:  # reopen what was just written: the result reads verified entries only
        entry = open_entry(store.root, fields[statistic.name], f"statistic '{statistic.name}'")
        if entry is None:
            raise RuntimeError(f"statistic '{statistic.name}' was written but cannot be read back from {store.root}")
        entries[statistic.name] = entry
    return CalibrationStats(values={name: LazyTensors(entry) for name, entry in entries.items()},
                            input_group=_stored_groups(entries))


def _stored_groups(entries: dict[str, Entry]) -> dict[str, str]:
    groups: dict[str, str] = {}
    for entry in entries.values():
        groups.update(entry.meta.get("groups", {}))
    return groups
