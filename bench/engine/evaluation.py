"""Evaluation: every cell's task on a (compressed or dense) model, and the records it gives.

A per-architecture task (throughput) waits in :class:`bench.engine.shared.SharedMeasurements`
until the workspace measures every distinct architecture together; a NaN/inf
measurement fails its cell instead of becoming a record.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import TYPE_CHECKING

from bench.api.method import Method
from bench.api.record import Record
from bench.api.task import Measurement, Metric, Task
from bench.engine.failures import record_failure
from bench.engine.plan import Cell
from bench.engine.shared import hold_limit
from bench.engine.sinks import Sink
from bench.errors import NonFinite
from bench.memory import release_free_memory

if TYPE_CHECKING:
    from bench.engine.workspace import Workspace

OTHER = Metric("other", None)

log = logging.getLogger(__name__)


def cell_records(workspace: Workspace, task: Task, cell: Cell, measurements: list[Measurement], summary: dict,
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


def evaluate(workspace: Workspace, sink: Sink, model, cells: list[Cell], summary: dict, method: Method | None = None,
             compression: str | None = None, ratio: float = 0.0, budget: dict | None = None) -> None:
    """Every cell's task on ``model``; a per-architecture task's cells wait for :meth:`Workspace.flush_shared`."""
    for cell in cells:
        task = workspace.registry.get("task", cell.task)
        emit = functools.partial(emit_cell, workspace, sink, task, cell, summary, method, compression, ratio, budget)
        if task.per_architecture:
            label = cell.method + (f" @ {budget['spec']}" if budget else f" {ratio:g}" if method else "")
            workspace.shared.add(task, model, method.storage_bits() if method else None, label, emit,
                                 functools.partial(record_failure, sink, cell.method, ratio if method else None,
                                                   f"evaluate {cell.task}"), dense=method is None)
            if workspace.shared.over_limit():
                log.info("the models held for %s pass %.0f MiB: measuring them now", cell.task, hold_limit() / 2**20)
                workspace.flush_shared()
            continue
        start = time.perf_counter()
        measurements = task.evaluate(model, workspace.loaded.tokenizer, workspace.settings)
        emit(measurements, time.perf_counter() - start)


def emit_cell(workspace: Workspace, sink: Sink, task: Task, cell: Cell, summary: dict, method: Method | None,
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
        record_failure(sink, cell.method, ratio if method else None, f"evaluate {cell.task}", error)
        return
    sink.add(cell_records(workspace, task, cell, measurements, summary, workspace.timings[label], method, compression,
                      ratio, budget))
    release_free_memory()
    log.info("%s %.2f %s: %s", cell.method, ratio, cell.task,
             ", ".join(f"{m.metric}={m.value:.4g}" for m in measurements))


