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

The stages, in the order a run goes through them: the plan
(:mod:`bench.engine.plan`), the calibration statistics
(:mod:`bench.engine.calibration`), the decomposition pass
(:mod:`bench.engine.decomposition`), compression (:mod:`bench.engine.compress`),
evaluation (:mod:`bench.engine.evaluation`) and the records
(:mod:`bench.engine.sinks`, :mod:`bench.engine.results`); one group of cells
goes through them in :mod:`bench.engine.groups`, on the
:class:`~bench.engine.workspace.Workspace` its process shares.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from bench.api.record import DENSE, Record
from bench.corpora import calibration_checksum
from bench.engine.budget import check_budget_floor
from bench.engine.config import ExecutorConfig, RunConfig
from bench.engine.distributed import RayTasks, import_ray, this_node
from bench.engine.failures import group_failures
from bench.engine.groups import execute_group, prepare_all, run_group
from bench.engine.plan import RATIO_DEFINITION, Plan, check_model_fits, make_plan, run_methods, validate
from bench.engine.plugins import Registry, load_registry
from bench.engine.provenance import git_revision, package_versions
from bench.engine.results import Results
from bench.engine.sinks import ResultsSink
from bench.engine.workspace import Workspace
from bench.errors import UsageError
from bench.locks import Lock
from bench.memory import allocator_settings
from bench.model.devices import check_device
from bench.model.loaded import LoadedModel
from bench.model.loading import load_model
from bench.threads import describe

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

log = logging.getLogger(__name__)


def plan_run(config: RunConfig, registry: Registry, workspace: Workspace) -> Plan:
    return make_plan(config, registry, workspace.loaded.identity, workspace.dense_footprint["bytes"])


LOCK_FILE = ".svdbench.lock"


def output_lock(out: str | Path) -> Lock:
    """The lock of an output directory: one writer per ``--out`` (a second run fails at once, naming the first)."""
    return Lock(Path(out) / LOCK_FILE, f"--out {out}")



def _progress(total: int):
    """The driver's one progress bar over the cells still to compute (shown on a terminal only)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="cells", unit="cell", disable=None, dynamic_ncols=True)


def _run_local(workspace: Workspace, plan: Plan, results: Results, progress) -> None:
    """Every pending group in this process, one after the other."""
    sink = ResultsSink(results, workspace.timings, progress)
    done = progress.n
    methods = [workspace.create(name) for g in plan.groups for name in g.methods if name != DENSE]
    if methods:
        # every pending decomposition in one pass over the blocks, first: the dense model is in memory, and no
        # evaluation has left its allocations behind under the pass's peak
        prepare_all(workspace, methods, plan.statistics, sink)
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
            for failure in group_failures(group, outcome.cause):
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
