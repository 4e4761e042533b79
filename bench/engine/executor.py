"""Executing a plan: groups of cells, each a decomposition shared by its ratios, budgets and tasks.

:func:`run` is the driver: it locks ``--out`` (one writer per output
directory), opens its record journal, loads the model, plans the run, drops
the cells already journaled, and has the remaining groups executed - one
after the other in this process (the local executor), or as Ray tasks in
parallel (``--executor ray``, :mod:`bench.engine.distributed`). Either way
the driver alone writes the journal and results.json, every finished cell
at once (:mod:`bench.engine.results`). A method or group that fails - an
exception, NaN/inf in its statistics, factors, weights or outputs, a Ray
worker that keeps dying - is recorded in ``failures`` (with its stage and
layer) while the others go on; a full disk ends the run with one line
(finished cells are kept).

:func:`run_group` executes one group on a :class:`Workspace` - what the
groups of one process share: the loaded model, its targets, the calibration
windows, the statistics and the last decomposition - and reports what it
produces to a :class:`Sink`. :func:`execute_group` does the same from a
plan's serialized description, in any process: it is what a remote worker
calls.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import sys
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from bench.api.configs import config_dict
from bench.api.lowrank import Factorization
from bench.api.method import Context, Method
from bench.api.record import DENSE, Record
from bench.api.statistic import CalibrationStats
from bench.api.task import Measurement, Metric, Task
from bench.corpora import calibration_checksum
from bench.engine.blockpass import stream_blocks
from bench.engine.budget import budget_bytes, check_budget_floor, fit_budget, parse_budget
from bench.engine.calibration import calibration_batches, collect_statistics, stored_statistics
from bench.engine.compress import Compressed, accounting, assemble_from_checkpoint, build_compressed
from bench.engine.config import ExecutorConfig, RunConfig
from bench.engine.distributed import RayTasks, import_ray, this_node
from bench.engine.grouped import GroupPass
from bench.engine.plan import (
    RATIO_DEFINITION,
    Cell,
    CellGroup,
    Plan,
    eval_settings,
    make_plan,
    record_key,
    run_methods,
    validate,
)
from bench.engine.plugins import Registry, load_registry
from bench.engine.provenance import git_revision, package_versions
from bench.engine.results import Results
from bench.engine.shared import SharedMeasurements, hold_limit
from bench.engine.stores import EntryWriter, factor_tensors, open_entry, store_root, stored_factorizations
from bench.errors import NonFinite, UsageError
from bench.memory import allocator_settings, release_free_memory
from bench.model.checkpoint import Checkpoint
from bench.model.devices import check_device
from bench.model.loaded import LoadedModel
from bench.model.loading import load_model, reload_weights
from bench.model.targets import find_targets, footprint
from bench.storage import Lock, cache_root, disk_error, is_disk_error, json_key
from bench.threads import describe, ordered_in_threads

log = logging.getLogger(__name__)

OTHER = Metric("other", None)


class Sink(Protocol):
    """Where a group's results go: straight into results.json, or back to a driver."""

    def add(self, records: list[Record]) -> None: ...

    def add_compression(self, compression_id: str, info: dict) -> None: ...

    def add_failure(self, failure: dict) -> None: ...

    def add_timing(self, label: str, seconds: float) -> None: ...


@dataclass
class Collected:
    """A sink that keeps everything, for a group run in another process (plain data, returned whole)."""

    records: list[dict] = field(default_factory=list)
    compressions: dict[str, dict] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def add(self, records: list[Record]) -> None:
        self.records += [r.to_dict() for r in records]

    def add_compression(self, compression_id: str, info: dict) -> None:
        self.compressions[compression_id] = info

    def add_failure(self, failure: dict) -> None:
        self.failures.append(failure)

    def add_timing(self, label: str, seconds: float) -> None:
        self.timings[label] = seconds


def decomposition_workers(device: str, methods: list[Method]) -> int:
    """Threads for a block's decompositions: one per torch thread on the CPU, each running torch with one
    (see :func:`bench.threads.ordered_in_threads`); one on an accelerator, or when a method's ``decompose``
    is not safe to run beside another (``Method.concurrent_decompose``)."""
    if not device.startswith("cpu") or not all(m.concurrent_decompose for m in methods):
        return 1
    return torch.get_num_threads()


class Workspace:
    """What the groups of one run share in one process.

    The dense model is loaded on first use (or given). :meth:`prepare` makes
    every decomposition a set of methods needs in one calibration pass, block
    by block, straight into the factor store (statistics for every method of
    the plan come along, so the pass is not repeated); afterwards the
    factorizations are read from the store - their spectra in memory, their
    factors on use. When the model came from a checkpoint, :meth:`release_model`
    drops the dense model before compressed models are built from the
    checkpoint and the store, so the two are never both in memory; a method
    that asks for the dense model later gets it read back.
    """

    def __init__(self, config: RunConfig, registry: Registry, loaded: LoadedModel | None = None):
        self.config = config
        self.registry = registry
        self.create = registry.method_factory(config.method_options)
        self.settings = eval_settings(config)
        self.dtype = getattr(torch, config.dtype)
        self.timings: dict[str, float] = {}
        self._loaded = loaded
        self._windows: torch.Tensor | None = None
        self._stats: dict[str, Mapping] = {}
        self._groups: dict[str, str] = {}
        self._failed: dict[str, Exception] = {}  # factor store key -> why its decomposition failed
        self._decomposing_seconds = 0.0  # wall time inside the block passes' decompositions
        self.shared = SharedMeasurements()  # per-architecture cells (throughput), measured together at the end

    def flush_shared(self) -> None:
        """Measure the per-architecture cells held so far (one model per distinct architecture, interleaved)."""
        self.shared.flush(self.loaded.tokenizer, self.settings)

    def timed(self, label: str, start: float) -> float:
        self.timings[label] = round(time.perf_counter() - start, 3)
        return self.timings[label]

    # ------------------------------------------------------------------ the dense model
    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None:
            start = time.perf_counter()
            self._loaded = load_model(self.config.model, self.config.device, self.dtype)
            self.timed("load_model", start)
        return self._loaded

    @property
    def model(self) -> torch.nn.Module:
        """The dense model, read back from its checkpoint if it was released."""
        loaded = self.loaded
        if loaded.model is None:
            start = time.perf_counter()
            loaded.model = reload_weights(loaded.checkpoint, self.config.device, self.dtype)
            self.timed("reload_model", start)
        return loaded.model

    def release_model(self) -> None:
        """Drop the dense model from memory when it can be read back from its checkpoint."""
        if self._loaded is not None and self._loaded.checkpoint is not None and self._loaded.model is not None \
                and not self.shared.holds(self._loaded.model):  # held for throughput: dropping it frees nothing
            self._loaded.model = None
            release_free_memory()

    @property
    def targets(self):
        if not hasattr(self, "_targets"):
            self._targets = find_targets(self.model)
        return self._targets

    @property
    def dense_footprint(self) -> dict[str, int]:
        if not hasattr(self, "_footprint"):
            self._footprint = footprint(self.model)
        return self._footprint

    def weight(self, target) -> torch.Tensor:
        """One dense matrix, from the model in memory or else from the checkpoint."""
        loaded = self.loaded
        if loaded.model is not None or loaded.checkpoint is None:
            return self.model.get_submodule(target.name).weight.detach()
        return self.checkpoint().read([f"{target.name}.weight"], self.dtype)[f"{target.name}.weight"]

    def checkpoint(self) -> Checkpoint:
        if not hasattr(self, "_checkpoint"):
            self._checkpoint = Checkpoint(self.loaded.checkpoint)
        return self._checkpoint

    def windows(self) -> torch.Tensor:
        if self._windows is None:
            self._windows = calibration_batches(self.loaded.tokenizer, self.config.calibration)
        return self._windows

    # ------------------------------------------------------------------ statistics and decompositions
    def _collect(self, names: list[str], on_block=None) -> None:
        """Statistics ``names`` from the store, computed where missing; ``on_block`` sees each block."""
        computed: list[str] = []
        start, decomposing_before = time.perf_counter(), self._decomposing_seconds
        collected = collect_statistics(self.model, self.loaded.identity, self.targets, self.windows(),
                                       self.config.calibration, [self.registry.get("statistic", n) for n in names],
                                       device=self.config.device, on_block=on_block, computed=computed)
        seconds = time.perf_counter() - start - (self._decomposing_seconds - decomposing_before)
        if computed:
            self.timings[f"statistics:{','.join(computed)}"] = round(seconds, 3)
        self._groups.update(collected.input_group)
        self._stats.update(collected.values)

    def statistics(self, needed: tuple[str, ...], collect_with: tuple[str, ...] = ()) -> CalibrationStats | None:
        """The statistics ``needed``; when any is not at hand, every one of ``collect_with`` comes along."""
        missing = [name for name in needed if name not in self._stats]
        stored = stored_statistics(self.loaded.identity, self.targets, self.config.calibration,
                                   [self.registry.get("statistic", name) for name in missing]) if missing else None
        if stored is not None:  # all on disk already: the dense model is not needed
            self._groups.update(stored.input_group)
            self._stats.update(stored.values)
        elif missing:
            self._collect(list(dict.fromkeys([*missing, *(n for n in collect_with if n not in self._stats)])))
        if not needed:
            return None
        return CalibrationStats({name: self._stats[name] for name in needed}, self._groups)

    def factor_fields(self, method: Method) -> dict:
        """What a decomposition depends on: the store key of ``method``'s factorizations."""
        calibrated = method.uses_calibration()
        return {"model": self.loaded.identity, "decomposition": method.decomposition_key(method.config),
                "code": method.decomposition_version(),
                "statistics": {name: self.registry.get("statistic", name).version
                               for name in method.decomposition_statistics()},
                "calibration": config_dict(self.config.calibration) if calibrated else None,
                "data_sha256": calibration_checksum(self.config.calibration.dataset) if calibrated else None,
                "targets": [t.name for t in self.targets], "dtype": self.config.dtype}

    def prepare(self, methods: list[Method], collect_with: tuple[str, ...] = ()) -> None:
        """Put every decomposition ``methods`` need into the factor store, in one pass over the blocks."""
        root = store_root("factors")
        pending: dict[str, tuple[Method, dict]] = {}
        for method in methods:
            fields = self.factor_fields(method)
            key = json_key(fields)
            if key not in pending and open_entry(root, fields, f"{method.name} factorizations") is None:
                pending[key] = (method, fields)
        if not pending:
            return
        chosen = [m for m, _ in pending.values()]
        needed = list(dict.fromkeys([n for m in chosen for n in m.required_statistics()] + list(collect_with)))
        writers = {key: EntryWriter(root, fields) for key, (_, fields) in pending.items()}
        shapes: dict[str, dict] = {key: {} for key in pending}
        facts: dict[str, dict] = {key: {} for key in pending}
        for method in chosen:
            self.timings[f"decompose:{method.name}"] = 0.0
        model = self.model
        grouped = {key: GroupPass(method, self.targets) for key, (method, _) in pending.items()
                   if method.groups(self.targets, method.config)}

        def record(key, target, factorization):
            writers[key].write_part(factor_tensors(target.name, factorization))
            shapes[key][target.name] = list(factorization.shape)
            if factorization.facts:
                facts[key][target.name] = factorization.facts

        def fail(key, index, error):  # this method fails when it asks for its factorizations; the others go on
            log.warning("%s: decomposition failed in block %d (%s: %s)", pending[key][0].name, index,
                        type(error).__name__, error)
            self._failed[key] = error
            writers.pop(key).abandon()
            del pending[key]

        def decompose_block(index, block_targets, block_stats, groups):
            """Every pending method on every target of the block, in worker threads (see
            :func:`decomposition_workers`); results are written in target order. A statistic of an input group
            is dropped once the group's last target is done, so the block's largest gram (the MLP down
            projection's, decomposed last) is not held beside the others' during its SVD."""
            stats = CalibrationStats(block_stats, groups)
            methods = {key: method for key, (method, _) in pending.items()}
            contexts = {key: Context(model=model, tokenizer=self.loaded.tokenizer, targets=self.targets, stats=stats,
                                     calibration=self.windows() if method.uses_calibration() else None,
                                     device=self.config.device, cache_dir=cache_root(),
                                     model_identity=self.loaded.identity)
                        for key, method in methods.items()}
            for key, joint in grouped.items():  # groups sharing a factor, once their last member's block is here
                try:
                    for group, found in joint.on_block(block_targets, block_stats, groups, contexts[key]):
                        for target in group:
                            check_finite(found[target.name].s, target.name, "decompose", "singular values")
                            record(key, target, found[target.name])
                except UsageError:
                    raise
                except Exception as error:
                    fail(key, index, error)
            last_of_group = {groups.get(t.name, t.name): t.name for t in block_targets}
            jobs = [(target, key) for target in block_targets for key in methods
                    if key in pending and not (key in grouped and grouped[key].covers(target.name))]
            last_job = {target.name: (target, key) for target, key in jobs}

            def decompose(job):
                target, key = job
                if key not in pending:  # it failed on an earlier target
                    return None, 0.0
                start = time.perf_counter()
                with at_layer(target.name):
                    factorization = methods[key].decompose(target, contexts[key].weight(target), contexts[key],
                                                           methods[key].config)
                    check_finite(factorization.s, target.name, "decompose", "singular values")
                return factorization, time.perf_counter() - start

            start, busy = time.perf_counter(), dict.fromkeys(methods, 0.0)
            workers = decomposition_workers(self.config.device, list(methods.values()))
            for (target, key), outcome, error in ordered_in_threads(decompose, jobs, workers):
                if key in pending and error is None:
                    factorization, busy_seconds = outcome
                    busy[key] += busy_seconds
                    record(key, target, factorization)
                    del factorization, outcome
                elif key in pending:
                    if isinstance(error, UsageError):
                        raise error
                    fail(key, index, error)
                group = groups.get(target.name, target.name)
                if last_job[target.name] == (target, key) and last_of_group.get(group) == target.name:
                    for table in block_stats.values():  # no later target of the block reads them
                        table.pop(group, None)
            # the block's wall time, shared among the methods in proportion to their threads' busy time
            wall = time.perf_counter() - start
            self._decomposing_seconds += wall
            for key, seconds in busy.items():
                label = f"decompose:{methods[key].name}"
                self.timings[label] = round(self.timings[label] + wall * seconds / (sum(busy.values()) or 1.0), 3)
            release_free_memory()

        log.info("decomposing for %s, block by block", ", ".join(m.name for m in chosen))
        try:
            self._collect(needed, decompose_block)
            for key, (method, _) in pending.items():
                writers[key].finish({"method": method.name, "shapes": shapes[key], "facts": facts[key]})
                if key in grouped:
                    self.timings[f"decompose:{method.name}"] += round(grouped[key].seconds, 3)
        except BaseException:
            for writer in writers.values():
                writer.abandon()
            raise

    def factorizations(self, method: Method, collect_with: tuple[str, ...] = ()) -> dict[str, Factorization]:
        """Every target's factorization, from the factor store (made first when missing)."""
        fields = self.factor_fields(method)
        key, root = json_key(fields), store_root("factors")
        entry = open_entry(root, fields, f"{method.name} factorizations")
        if entry is None:
            if key not in self._failed:
                self.prepare([method], collect_with)
                entry = open_entry(root, fields, f"{method.name} factorizations")
            if key in self._failed:
                raise self._failed[key]
            if entry is None:
                raise RuntimeError(f"the {method.name} factorizations were written but cannot be read back from {root}")
        start = time.perf_counter()
        found = stored_factorizations(entry)
        self.timed(f"factors:{method.name}", start)
        return found

    # ------------------------------------------------------------------ compressing
    def context(self, method: Method, collect_with: tuple[str, ...] = ()) -> Context:
        """What ``method`` may read: the original model (read back on use), its statistics and calibration windows."""
        return Context(model=lambda: self.model, tokenizer=self.loaded.tokenizer, targets=self.targets,
                       stats=self.statistics(method.required_statistics(), collect_with),
                       calibration=self.windows() if method.uses_calibration() else None,
                       device=self.config.device, cache_dir=cache_root(), model_identity=self.loaded.identity,
                       weights=self.weight, blocks=stream_blocks)

    def assembler(self, factorizations: Mapping[str, Factorization]):
        """How compressed models are put together: from the checkpoint when there is one, else from a copy."""
        if self.loaded.checkpoint is None:
            return None
        return lambda ranks: assemble_from_checkpoint(self.checkpoint(), self.dtype, self.config.device, self.targets,
                                                      factorizations, ranks)

    def compress(self, name: str, ratio: float) -> tuple[Method, Compressed]:
        """One method at one ratio, refined, not evaluated (``svdbench compress``)."""
        method = self.create(name)
        factorizations = self.factorizations(method)
        self.dense_footprint  # noqa: B018 (measured before the dense model is released)
        self.release_model()
        context = self.context(method)
        start = time.perf_counter()
        compressed = build_compressed(method, ratio, factorizations, context, self.dense_footprint,
                                      assemble=self.assembler(factorizations))
        self.timed(f"compress:{name}:{ratio}", start)
        return method, compressed


# --------------------------------------------------------------------------- bad numbers and failures

def check_finite(tensor: torch.Tensor, layer: str | None, stage: str, what: str) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise NonFinite(layer, stage, what)


class at_layer:
    """Tags an error raised inside with the layer it happened in (for the failure record)."""

    def __init__(self, layer: str):
        self.layer = layer

    def __enter__(self):
        return self

    def __exit__(self, kind, error, _tb):
        if isinstance(error, Exception) and getattr(error, "layer", None) is None:
            try:
                error.layer = self.layer
            except AttributeError:  # exceptions with __slots__
                pass
        return False


def check_model_finite(model, stage: str) -> None:
    """Every floating-point parameter and buffer of a compressed model is finite; else which layer is not."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        check_finite(tensor.detach(), name.rpartition(".")[0], stage, f"weights ({name.rpartition('.')[2]})")


# --------------------------------------------------------------------------- one group

def _records(workspace: Workspace, task: Task, cell: Cell, measurements: list[Measurement], summary: dict,
             seconds: float, method: Method | None = None, compression: str | None = None, ratio: float = 0.0,
             budget: dict | None = None) -> list[Record]:
    return [Record(key=cell.key, model=workspace.loaded.name, method=cell.method, ratio=ratio, task=task.name,
                   metric=m.metric, value=m.value, kind=task.metrics.get(m.metric, OTHER).kind,
                   higher_is_better=task.metrics.get(m.metric, OTHER).higher_is_better,
                   params=summary["params"], bytes=summary["bytes"],
                   bits=method.storage_bits() if method else None,
                   budget=budget["budget"] if budget else None, point=m.point, extra=m.extra,
                   config=method.settings() if method else {}, compression=compression,
                   accounting=summary, budget_fit=budget, seconds=seconds)
            for m in measurements]


def _evaluate(workspace: Workspace, sink: Sink, model, cells: list[Cell], summary: dict, method: Method | None = None,
              compression: str | None = None, ratio: float = 0.0, budget: dict | None = None) -> None:
    """Every cell's task on ``model``; a per-architecture task's cells wait for :meth:`Workspace.flush_shared`."""
    for cell in cells:
        task = workspace.registry.get("task", cell.task)
        emit = functools.partial(_emit, workspace, sink, task, cell, summary, method, compression, ratio, budget)
        if task.per_architecture:
            label = cell.method + (f" @ {budget['spec']}" if budget else f" {ratio:g}" if method else "")
            workspace.shared.add(task, model, method.storage_bits() if method else None, label, emit,
                                 functools.partial(_fail, sink, cell.method, ratio if method else None,
                                                   f"evaluate {cell.task}"), dense=method is None)
            if workspace.shared.over_limit():
                log.info("the models held for %s pass %.0f MiB: measuring them now", cell.task, hold_limit() / 2**20)
                workspace.flush_shared()
            continue
        start = time.perf_counter()
        measurements = task.evaluate(model, workspace.loaded.tokenizer, workspace.settings)
        emit(measurements, time.perf_counter() - start)


def _emit(workspace: Workspace, sink: Sink, task: Task, cell: Cell, summary: dict, method: Method | None,
          compression: str | None, ratio: float, budget: dict | None, measurements: list[Measurement],
          seconds: float) -> None:
    """One evaluated cell's records into the sink (a NaN/inf measurement fails the cell instead)."""
    label = f"evaluate:{cell.method}:{ratio}:{cell.task}"
    workspace.timings[label] = round(seconds, 3)
    sink.add_timing(label, workspace.timings[label])
    bad = [m for m in measurements if not (isinstance(m.value, (int, float)) and math.isfinite(m.value))]
    if bad:  # a NaN/inf never becomes a record: the cell fails (and is tried again by the next run)
        error = NonFinite(bad[0].extra.get("nonfinite_source"), f"evaluate {cell.task}",
                          f"{cell.task} {bad[0].metric} ({bad[0].value})")
        _fail(sink, cell.method, ratio if method else None, f"evaluate {cell.task}", error)
        return
    sink.add(_records(workspace, task, cell, measurements, summary, workspace.timings[label], method, compression,
                      ratio, budget))
    release_free_memory()
    log.info("%s %.2f %s: %s", cell.method, ratio, cell.task,
             ", ".join(f"{m.metric}={m.value:.4g}" for m in measurements))


def _fail(sink: Sink, method: str, ratio: float | None, stage: str, error: Exception) -> None:
    """Record a failed stage in ``failures`` (with the layer, where known); a full disk ends the run instead."""
    import traceback

    if is_disk_error(error):  # not the method's fault: the run stops (finished cells are kept)
        raise disk_error(error, getattr(error, "filename", None) or cache_root()) from None
    stage = getattr(error, "stage", None) or stage
    layer = getattr(error, "layer", None)
    log.error("%s%s failed during %s%s: %s: %s", method, f" at ratio {ratio}" if ratio is not None else "",
              stage, f" at {layer}" if layer else "", type(error).__name__, error)
    sink.add_failure({"method": method, "ratio": ratio, "stage": stage, "layer": layer,
                      "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=6)})


def _run_point(workspace: Workspace, sink: Sink, method: Method, factorizations: Mapping[str, Factorization],
               context: Context, ratio: float, budget_spec: str | None, cells: list[Cell]) -> None:
    """Compress ``method`` at ``ratio`` (or the ratio fitting ``budget_spec``) and evaluate ``cells``."""
    where = f"budget {budget_spec}" if budget_spec else "ratio"
    stage = where if budget_spec else "compress"
    try:
        start = time.perf_counter()
        budget = None
        assemble = workspace.assembler(factorizations)
        if budget_spec:
            fit = fit_budget(method, factorizations, context, workspace.dense_footprint,
                             budget_bytes(budget_spec, workspace.dense_footprint["bytes"]),
                             element_size=torch.empty(0, dtype=workspace.dtype).element_size(), assemble=assemble)
            compressed = fit.compressed
            kind, number = parse_budget(budget_spec)  # the record's budget: a fraction of dense bytes, or bytes
            budget = {"budget": number if kind == "fraction" else int(number), "spec": budget_spec, **fit.summary()}
            log.info("%s fits budget %s (%d bytes) at ratio %.4f: %d bytes", method.name, budget_spec,
                     fit.budget_bytes, compressed.ratio, fit.bytes)
        else:
            compressed = build_compressed(method, ratio, factorizations, context, workspace.dense_footprint,
                                          assemble=assemble)
        check_model_finite(compressed.model, "compress")
        label = f"compress:{method.name}:" + (f"budget={budget_spec}" if budget_spec else f"{ratio}")
        sink.add_timing(label, workspace.timed(label, start))
        compression_id = record_key(model=workspace.loaded.identity, method=method.name,
                                    config=method.settings(), ratio=compressed.ratio)
        info = compressed.info(method)
        if budget:
            info["budget"] = budget
        sink.add_compression(compression_id, info)
        stage = f"evaluate ({where} {budget_spec or ratio})"
        _evaluate(workspace, sink, compressed.model, cells, compressed.summary, method, compression_id,
                  compressed.ratio, budget)
    except UsageError:
        raise
    except Exception as error:  # one failing ratio or budget must not take the run down
        _fail(sink, method.name, None if budget_spec else ratio, stage, error)


def _prepare(workspace: Workspace, methods: list[Method], statistics: tuple[str, ...], sink: Sink) -> None:
    """Make the methods' decompositions (one pass); a method whose decomposition fails is recorded, not raised."""
    try:
        workspace.prepare(methods, statistics)
    except UsageError:
        raise
    except Exception as error:  # each method then fails on its own when it reads its factorizations
        log.error("the joint decomposition pass failed (%s: %s); decomposing method by method",
                  type(error).__name__, error)
    for label, seconds in workspace.timings.items():
        sink.add_timing(label, seconds)


def run_group(workspace: Workspace, plan: Plan, group: CellGroup, sink: Sink) -> None:
    """Execute every cell of ``group``: statistics, one decomposition, every ratio, budget and task."""
    if group.methods == (DENSE,):
        model = workspace.model
        _evaluate(workspace, sink, model, list(group.cells), accounting(model, None, workspace.dense_footprint))
        return
    for name in group.methods:
        method = workspace.create(name)
        try:
            factorizations = workspace.factorizations(method, collect_with=plan.statistics)
            workspace.release_model()
            context = workspace.context(method, collect_with=plan.statistics)
        except UsageError:
            raise
        except Exception as error:
            _fail(sink, name, None, "decompose", error)
            continue
        for ratio, budget in group.targets(name):
            cells = [c for c in group.cells if c.method == name and c.ratio == ratio and c.budget == budget]
            _run_point(workspace, sink, method, factorizations, context, ratio, budget, cells)


def execute_group(plan_data: dict, index: int, loaded: LoadedModel | None = None) -> dict:
    """Run group ``index`` of a serialized plan in this process; return what it produced as plain data.

    The model is loaded from the plan's spec and must have the identity the
    plan was made for (else the cells' resume keys would not describe it).
    """
    plan = Plan.from_dict(plan_data)
    registry = load_registry(plan.config.plugins_dirs)
    workspace = Workspace(plan.config, registry, loaded)
    if workspace.loaded.identity != plan.model_identity:
        raise UsageError(f"model {plan.config.model} here is not the model the plan was made for "
                         f"(identity {workspace.loaded.identity[:12]} vs {plan.model_identity[:12]}); "
                         "give every worker the same model files")
    collected = Collected()
    group = plan.groups[index]
    # only the statistics this group's methods need: the plan's others are other groups' work, done by other
    # workers, maybe at the same time (the local executor collects them all in one pass instead)
    plan = dataclasses.replace(plan, statistics=tuple(dict.fromkeys(
        s for name in group.methods if name != DENSE for s in workspace.create(name).required_statistics())))
    if group.methods != (DENSE,):
        workspace.dense_footprint  # noqa: B018 (measured while the dense model is in memory)
        _prepare(workspace, [workspace.create(name) for name in group.methods], plan.statistics, collected)
    run_group(workspace, plan, group, collected)
    workspace.flush_shared()  # this group's models, interleaved (a worker sees one group at a time)
    return {"records": collected.records, "compressions": collected.compressions, "failures": collected.failures,
            "timings": {**workspace.timings, **collected.timings}}


# --------------------------------------------------------------------------- the local executor

def manifest(config: RunConfig, registry: Registry, workspace: Workspace, plan: Plan) -> dict:
    """The run's provenance and what reports need to know of its methods and tasks."""
    loaded = workspace.loaded
    task_checksums: dict[str, str] = {}
    for name in config.tasks:
        task_checksums.update(registry.get("task", name).data_checksums())
    described = {name: workspace.create(name).describe() for name in run_methods(config, registry)}
    return {
        "svdbench_command": " ".join(sys.argv),
        "config": config.to_dict(),
        "model": {"name": loaded.name, "source": loaded.source, "identity": loaded.identity, **loaded.info,
                  **workspace.dense_footprint},
        "versions": package_versions(),
        "git_revision": git_revision(),
        "seeds": {"calibration": config.calibration.seed, "torch": torch.initial_seed()},
        "data_checksums": {"tasks": task_checksums,
                           "calibration": {config.calibration.dataset: calibration_checksum(config.calibration.dataset)}},
        "ratio_definition": RATIO_DEFINITION,
        "methods": described,
        "method_configs": {name: info["config"] for name, info in described.items()},
        "tasks": {name: registry.get("task", name).describe() for name in config.tasks},
        "timings": workspace.timings,
        "threads": describe(),
        "allocator": dict(allocator_settings) or {"allocator": "unchanged (svdbench's settings not applied)"},
    }


class _ResultsSink:
    """The local executor's sink: every finished cell goes straight into results.json."""

    def __init__(self, results: Results, workspace: Workspace, progress):
        self.results, self.workspace, self.progress = results, workspace, progress
        self.add_compression, self.add_failure = results.add_compression, results.add_failure

    def add(self, records: list[Record]) -> None:
        self.results.add(records)
        self.progress.update(1)  # one call per evaluated cell

    def add_timing(self, label: str, seconds: float) -> None:
        self.results.manifest["timings"] = self.workspace.timings


def plan_run(config: RunConfig, registry: Registry, workspace: Workspace) -> Plan:
    return make_plan(config, registry, workspace.loaded.identity, workspace.dense_footprint["bytes"])


LOCK_FILE = ".svdbench.lock"


def output_lock(out: str | Path) -> Lock:
    """The lock of an output directory: one writer per ``--out`` (a second run fails at once, naming the first)."""
    return Lock(Path(out) / LOCK_FILE, f"--out {out}")


def check_model_fits(config: RunConfig, loaded: LoadedModel, registry: Registry, evaluate: bool = True) -> None:
    """What can only be checked once the model is loaded: window lengths (of the tasks that read ``--seqlen``
    and of calibration), and no compressing a compressed model."""
    limit = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None)
    settings = eval_settings(config)
    windows = evaluate and any("seqlen" in registry.get("task", name).settings_key(settings) for name in config.tasks)
    create = registry.method_factory(config.method_options)
    calibrated = any(create(name).uses_calibration() for name in run_methods(config, registry))
    if isinstance(limit, int):
        for flag, value in (("--seqlen", config.seqlen if windows else 0),
                            ("--calib-seqlen", config.calibration.seqlen if calibrated else 0)):
            if value > limit:
                raise UsageError(f"{flag} {value} is longer than {loaded.name}'s max_position_embeddings {limit}; "
                                 f"use {flag} {limit} or less")
    compressed = loaded.info.get("compressed")
    if compressed and run_methods(config, registry):
        raise UsageError(f"{loaded.name} is already compressed ({compressed.get('method')}); evaluate it with "
                         "--methods none, or compress the original model")


def _progress(total: int):
    """The driver's one progress bar over the cells still to compute (shown on a terminal only)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="cells", unit="cell", disable=None, dynamic_ncols=True)


def _run_local(workspace: Workspace, plan: Plan, results: Results, progress) -> None:
    """Every pending group in this process, one after the other."""
    sink = _ResultsSink(results, workspace, progress)
    done = progress.n
    methods = [workspace.create(name) for g in plan.groups for name in g.methods if name != DENSE]
    if methods:
        # every pending decomposition in one pass over the blocks, first: the dense model is in memory, and no
        # evaluation has left its allocations behind under the pass's peak
        _prepare(workspace, methods, plan.statistics, sink)
    for group in plan.groups:
        start = time.perf_counter()
        run_group(workspace, plan, group, sink)
        done += len(group.cells)
        progress.update(done - progress.n)  # cells that failed count as done too
        results.add_group(group.label, {"node": this_node(), "cells": len(group.cells),
                                        "seconds": round(time.perf_counter() - start, 3)})
    start, counted = time.perf_counter(), progress.n
    workspace.flush_shared()  # every distinct architecture of the run, interleaved
    workspace.timed("shared_measurements", start)
    progress.update(counted - progress.n)  # the held cells were counted with their groups


_WORKER_MODEL: dict[tuple, LoadedModel] = {}  # the model a worker process loaded for an earlier group


def worker_execute_group(plan_data: dict, index: int) -> dict:
    """:func:`execute_group` in a long-lived worker: a model loaded for an earlier group of this run is reused."""
    config = RunConfig.from_dict(plan_data["config"])
    spec = (config.model, config.device, config.dtype)
    loaded = _WORKER_MODEL.get(spec)
    seconds = 0.0
    if loaded is None or loaded.identity != plan_data["model_identity"]:
        _WORKER_MODEL.clear()
        start = time.perf_counter()
        loaded = _WORKER_MODEL[spec] = load_model(config.model, config.device, getattr(torch, config.dtype))
        seconds = round(time.perf_counter() - start, 3)
    produced = execute_group(plan_data, index, loaded)
    produced["timings"]["load_model"] = seconds
    return produced


def _group_failures(group: CellGroup, error: BaseException) -> list[dict]:
    """A group whose task never returned: every method of it failed (the others go on)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return [{"method": name, "ratio": None, "stage": "ray task", "layer": None,
             "error": f"{type(error).__name__}: {first}"} for name in group.methods]


def _run_ray(tasks: RayTasks, plan: Plan, results: Results, progress) -> None:
    """Every pending group as a Ray task; each group's records are journaled as soon as its task returns."""
    data = tasks.put(plan.to_dict())
    for index, group in enumerate(plan.groups):
        tasks.submit(worker_execute_group, (data, index), tag=group, name=f"svdbench:{group.label}")
    for outcome in tasks.completed():
        group = outcome.tag
        if outcome.error is not None:
            if isinstance(outcome.cause, UsageError):  # bad input: every group would meet it
                raise outcome.cause
            log.error("group %s failed: %s", group.label, outcome.cause)
            for failure in _group_failures(group, outcome.cause):
                results.add_failure(failure)
            results.add_group(group.label, {"node": None, "cells": len(group.cells),
                                            "error": str(outcome.cause)[:500]})
        else:
            produced = outcome.value
            for compression_id, info in produced["compressions"].items():
                results.add_compression(compression_id, info)
            for failure in produced["failures"]:
                results.add_failure(failure)
            results.manifest["timings"].update(  # method-specific labels; the rest stay with the group
                {label: seconds for label, seconds in produced["timings"].items() if ":" in label})
            results.add([Record.from_dict(r) for r in produced["records"]])  # journaled: the group's cells are safe
            results.add_group(group.label, {"node": outcome.node, "cells": len(group.cells),
                                            "seconds": outcome.seconds, "timings": produced["timings"]})
        progress.update(len(group.cells))


def run(config: RunConfig, registry: Registry | None = None, loaded: LoadedModel | None = None,
        executor: ExecutorConfig | None = None) -> Results:
    """Run ``config`` into ``config.out``, resuming what is already there.

    The groups run in this process (``executor.kind`` local, the default) or
    as Ray tasks; either way only this process writes the journal and
    results.json, and the output directory is locked for the whole run.
    """
    start = time.perf_counter()
    executor = executor or ExecutorConfig()
    registry = registry or load_registry(config.plugins_dirs)
    distributed = executor.kind == "ray"
    if distributed:
        import_ray()  # fail before loading anything when Ray is missing
    else:
        check_device(config.device)  # the Ray workers' devices are theirs to check
    validate(config, registry)
    with output_lock(config.out).acquire(wait=False), \
            (RayTasks(executor, config.device) if distributed else nullcontext()) as tasks:
        results = Results(config.out)  # before the model loads: a bad --out fails in a second, not minutes
        # the Ray driver only plans: it reads the model on the CPU and leaves the devices to the workers
        workspace = Workspace(dataclasses.replace(config, device="cpu") if distributed else config, registry, loaded)
        check_model_fits(config, workspace.loaded, registry)
        if config.budgets:  # a budget below the never-compressed parts fails here, not after the decompositions
            element = torch.empty(0, dtype=workspace.dtype).element_size()
            check_budget_floor(config.budgets, workspace.dense_footprint["bytes"],
                               sum(t.out_features * t.in_features for t in workspace.targets) * element)
        plan = plan_run(config, registry, workspace)
        described = manifest(config, registry, workspace, plan)
        described["executor"] = {"kind": executor.kind, **(tasks.describe() if distributed else {}),
                                 "groups": dict.fromkeys(group.label for group in plan.groups)}
        results.begin(described, plan.keys())
        pending = plan.pending(results.done)
        skipped = len(plan.cells()) - len(pending.cells())
        if skipped:
            log.info("%d of %d cells already in %s; computing the other %d", skipped, len(plan.cells()),
                     results.path, len(pending.cells()))
        with _progress(len(pending.cells())) as progress:
            if distributed:
                workspace.release_model()
                _run_ray(tasks, pending, results, progress)
            else:
                _run_local(workspace, pending, results, progress)
        workspace.timed("total", start)
        results.finish({**results.manifest.get("timings", {}), **workspace.timings})
    return results
