"""One group of cells: its methods' decompositions, then every ratio, budget and task of each.

:func:`run_group` executes a group on a :class:`~bench.engine.workspace.Workspace`
and reports what it produces to a :class:`~bench.engine.sinks.Sink`;
:func:`execute_group` does the same from a plan's serialized description, in
any process: it is what a remote worker calls.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping

import torch

from bench.api.lowrank import Factorization
from bench.api.method import Context, Method
from bench.api.record import DENSE
from bench.engine.budget import budget_bytes, fit_budget, parse_budget
from bench.engine.compress import accounting, build_compressed
from bench.engine.decomposition import prepare
from bench.engine.evaluation import evaluate
from bench.engine.failures import check_model_finite, record_failure
from bench.engine.plan import Cell, CellGroup, Plan, record_key
from bench.engine.plugins import load_registry
from bench.engine.sinks import Collected, Sink
from bench.engine.workspace import Workspace
from bench.errors import UsageError
from bench.model.loaded import LoadedModel

log = logging.getLogger(__name__)


def run_point(workspace: Workspace, sink: Sink, method: Method, factorizations: Mapping[str, Factorization],
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
        evaluate(workspace, sink, compressed.model, cells, compressed.summary, method, compression_id,
                  compressed.ratio, budget)
    except UsageError:
        raise
    except Exception as error:  # one failing ratio or budget must not take the run down
        record_failure(sink, method.name, None if budget_spec else ratio, stage, error)


def prepare_all(workspace: Workspace, methods: list[Method], statistics: tuple[str, ...], sink: Sink) -> None:
    """Make the methods' decompositions (one pass); a method whose decomposition fails is recorded, not raised."""
    try:
        prepare(workspace, methods, statistics)
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
        evaluate(workspace, sink, model, list(group.cells), accounting(model, None, workspace.dense_footprint))
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
            record_failure(sink, name, None, "decompose", error)
            continue
        for ratio, budget in group.targets(name):
            cells = [c for c in group.cells if c.method == name and c.ratio == ratio and c.budget == budget]
            run_point(workspace, sink, method, factorizations, context, ratio, budget, cells)


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
        prepare_all(workspace, [workspace.create(name) for name in group.methods], plan.statistics, collected)
    run_group(workspace, plan, group, collected)
    workspace.flush_shared()  # this group's models, interleaved (a worker sees one group at a time)
    return {"records": collected.records, "compressions": collected.compressions, "failures": collected.failures,
            "timings": {**workspace.timings, **collected.timings}}


