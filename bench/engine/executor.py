"""Executing a plan: groups of cells, each a decomposition shared by its ratios, budgets and tasks.

:func:`run` is the local executor: it loads the model, plans the run, drops
the cells already in results.json, and runs the remaining groups one after
the other in this process, writing every finished cell at once. A method
that fails is recorded in ``failures`` and the others go on.

:func:`run_group` executes one group on a :class:`Workspace` - what the
groups of one process share: the loaded model, its targets, the calibration
windows, the statistics and the last decomposition - and reports what it
produces to a :class:`Sink`. :func:`execute_group` does the same from a
plan's serialized description, in any process: it is what a remote worker
calls.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm.auto import tqdm

from bench.api.lowrank import Factorization
from bench.api.method import Context, Method
from bench.api.record import DENSE, Record
from bench.api.statistic import CalibrationStats
from bench.api.task import Measurement, Metric, Task
from bench.corpora import calibration_checksum
from bench.engine.budget import budget_bytes, fit_budget, parse_budget
from bench.engine.calibration import calibration_batches, collect_statistics
from bench.engine.compress import Compressed, accounting, build_compressed
from bench.engine.config import RunConfig
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
from bench.errors import UsageError
from bench.model.loaded import LoadedModel
from bench.model.loading import load_model
from bench.model.targets import find_targets, footprint
from bench.storage import cache_root
from bench.threads import describe

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


class Workspace:
    """What the groups of one run share in one process.

    The model is loaded on first use (or given); statistics are collected
    for every method of the plan at once, in one calibration pass, and kept;
    the last decomposition is kept for the next group only when its key is
    the same (never two at a time).
    """

    def __init__(self, config: RunConfig, registry: Registry, loaded: LoadedModel | None = None):
        self.config = config
        self.registry = registry
        self.create = registry.method_factory(config.method_options)
        self.settings = eval_settings(config)
        self.timings: dict[str, float] = {}
        self._loaded = loaded
        self._windows: torch.Tensor | None = None
        self._stats: dict[str, dict] = {}
        self._groups: dict[str, str] = {}
        self._last: tuple[str, dict[str, Factorization]] | None = None

    def timed(self, label: str, start: float) -> float:
        self.timings[label] = round(time.perf_counter() - start, 3)
        return self.timings[label]

    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None:
            start = time.perf_counter()
            self._loaded = load_model(self.config.model, self.config.device, getattr(torch, self.config.dtype))
            self.timed("load_model", start)
        return self._loaded

    @property
    def targets(self):
        if not hasattr(self, "_targets"):
            self._targets = find_targets(self.loaded.model)
        return self._targets

    @property
    def dense_footprint(self) -> dict[str, int]:
        if not hasattr(self, "_footprint"):
            self._footprint = footprint(self.loaded.model)
        return self._footprint

    def windows(self) -> torch.Tensor:
        if self._windows is None:
            self._windows = calibration_batches(self.loaded.tokenizer, self.config.calibration)
        return self._windows

    def statistics(self, needed: tuple[str, ...], collect_with: tuple[str, ...] = ()) -> CalibrationStats | None:
        """The statistics ``needed``; when any is missing, every missing one of ``collect_with`` comes along."""
        missing = [name for name in needed if name not in self._stats]
        if missing:
            missing += [name for name in collect_with if name not in self._stats and name not in missing]
            start = time.perf_counter()
            collected = collect_statistics(self.loaded.model, self.loaded.identity, self.targets, self.windows(),
                                           self.config.calibration,
                                           [self.registry.get("statistic", name) for name in missing],
                                           device=self.config.device)
            self.timed(f"statistics:{','.join(missing)}", start)
            self._groups.update(collected.input_group)  # empty for gradient-only collections
            for name in missing:
                self._stats[name] = collected.values[name]
        if not needed:
            return None
        return CalibrationStats({name: self._stats[name] for name in needed}, self._groups)

    def context(self, method: Method, collect_with: tuple[str, ...] = ()) -> Context:
        """What ``method`` may read: the original model, its statistics and calibration windows."""
        return Context(model=self.loaded.model, tokenizer=self.loaded.tokenizer, targets=self.targets,
                       stats=self.statistics(method.required_statistics(), collect_with),
                       calibration=self.windows() if method.uses_calibration() else None,
                       device=self.config.device, cache_dir=cache_root(), model_identity=self.loaded.identity)

    def decompose(self, method: Method, context: Context) -> dict[str, Factorization]:
        """Every target's ratio-independent factorization (the previous one, when its key is the same)."""
        key = method.decomposition_key(method.config)
        if self._last and self._last[0] == key:
            log.info("%s: reusing the decomposition just computed", method.name)
            return self._last[1]
        self._last = None  # free the previous one before computing the next
        start = time.perf_counter()
        factorizations = {t.name: method.decompose(t, context.weight(t), context, method.config)
                          for t in tqdm(self.targets, desc=f"{method.name}: decompose", leave=False, unit="matrix")}
        self.timed(f"decompose:{method.name}", start)
        self._last = (key, factorizations)
        return factorizations

    def compress(self, name: str, ratio: float) -> tuple[Method, Compressed]:
        """One method at one ratio, refined, not evaluated (``svdbench compress``)."""
        method = self.create(name)
        context = self.context(method)
        factorizations = self.decompose(method, context)
        start = time.perf_counter()
        compressed = build_compressed(method, ratio, factorizations, context, self.dense_footprint)
        self.timed(f"compress:{name}:{ratio}", start)
        return method, compressed


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
    for cell in cells:
        task = workspace.registry.get("task", cell.task)
        start = time.perf_counter()
        measurements = task.evaluate(model, workspace.loaded.tokenizer, workspace.settings)
        label = f"evaluate:{cell.method}:{ratio}:{cell.task}"
        seconds = workspace.timed(label, start)
        sink.add_timing(label, seconds)
        sink.add(_records(workspace, task, cell, measurements, summary, seconds, method, compression, ratio, budget))
        log.info("%s %.2f %s: %s", cell.method, ratio, cell.task,
                 ", ".join(f"{m.metric}={m.value:.4g}" for m in measurements))


def _fail(sink: Sink, method: str, ratio: float | None, stage: str, error: Exception) -> None:
    import traceback

    log.error("%s%s failed during %s: %s: %s", method, f" at ratio {ratio}" if ratio is not None else "",
              stage, type(error).__name__, error)
    sink.add_failure({"method": method, "ratio": ratio, "stage": stage, "error": f"{type(error).__name__}: {error}",
                      "traceback": traceback.format_exc(limit=6)})


def _run_point(workspace: Workspace, sink: Sink, method: Method, factorizations: Mapping[str, Factorization],
               context: Context, ratio: float, budget_spec: str | None, cells: list[Cell]) -> None:
    """Compress ``method`` at ``ratio`` (or the ratio fitting ``budget_spec``) and evaluate ``cells``."""
    where = f"budget {budget_spec}" if budget_spec else "ratio"
    stage = where if budget_spec else "compress"
    try:
        start = time.perf_counter()
        budget = None
        if budget_spec:
            fit = fit_budget(method, factorizations, context, workspace.dense_footprint,
                             budget_bytes(budget_spec, workspace.dense_footprint["bytes"]))
            compressed = fit.compressed
            kind, number = parse_budget(budget_spec)  # the record's budget: a fraction of dense bytes, or bytes
            budget = {"budget": number if kind == "fraction" else int(number), "spec": budget_spec, **fit.summary()}
            log.info("%s fits budget %s (%d bytes) at ratio %.4f: %d bytes", method.name, budget_spec,
                     fit.budget_bytes, compressed.ratio, fit.bytes)
        else:
            compressed = build_compressed(method, ratio, factorizations, context, workspace.dense_footprint)
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


def run_group(workspace: Workspace, plan: Plan, group: CellGroup, sink: Sink) -> None:
    """Execute every cell of ``group``: statistics, one decomposition, every ratio, budget and task."""
    if group.methods == (DENSE,):
        loaded = workspace.loaded
        _evaluate(workspace, sink, loaded.model, list(group.cells), accounting(loaded.model, None,
                                                                                workspace.dense_footprint))
        return
    for name in group.methods:
        method = workspace.create(name)
        try:
            context = workspace.context(method, collect_with=plan.statistics)
            factorizations = workspace.decompose(method, context)
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
    run_group(workspace, plan, plan.groups[index], collected)
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
    }


class _ResultsSink:
    """The local executor's sink: every finished cell goes straight into results.json."""

    def __init__(self, results: Results, workspace: Workspace):
        self.results, self.workspace = results, workspace
        self.add, self.add_compression, self.add_failure = results.add, results.add_compression, results.add_failure

    def add_timing(self, label: str, seconds: float) -> None:
        self.results.manifest["timings"] = self.workspace.timings


def plan_run(config: RunConfig, registry: Registry, workspace: Workspace) -> Plan:
    return make_plan(config, registry, workspace.loaded.identity, workspace.dense_footprint["bytes"])


def run(config: RunConfig, registry: Registry | None = None, loaded: LoadedModel | None = None) -> Results:
    """Run ``config`` into ``config.out`` in this process, resuming what is already there."""
    start = time.perf_counter()
    registry = registry or load_registry(config.plugins_dirs)
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {config.device} but CUDA is not available; use --device cpu")
    validate(config, registry)
    workspace = Workspace(config, registry, loaded)
    plan = plan_run(config, registry, workspace)
    results = Results(config.out)
    results.keep_only(plan.keys())
    results.manifest.update(manifest(config, registry, workspace, plan))
    results.save()
    pending = plan.pending(results.done)
    skipped = len(plan.cells()) - len(pending.cells())
    if skipped:
        log.info("%d of %d cells already in %s; computing the other %d", skipped, len(plan.cells()), results.path,
                 len(pending.cells()))
    sink = _ResultsSink(results, workspace)
    for group in pending.groups:
        run_group(workspace, pending, group, sink)
    workspace.timed("total", start)
    results.manifest["timings"] = workspace.timings
    results.save()
    return results
