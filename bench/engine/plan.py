"""A run planned into cells: one (method, ratio or budget, task) evaluation each.

A run is planned once, before anything is computed. Every cell has a resume
key - a hash of everything that determines its value: the model's identity,
the method and its config, the ratio (or the budget in bytes), the task and
the settings that change its result, the dtype and, for methods that use
calibration data, the calibration settings. A re-run with the same ``--out``
skips the cells whose key is already in results.json.

Cells are grouped by the decomposition they share (a method on one model, or
several methods with one ``decomposition_key``: ``svd`` and ``svdllm_u``):
a group is the unit of work an executor runs - statistics, one
decomposition, then every ratio, budget and task of its methods. A plan and
its groups are plain data (:meth:`Plan.to_dict`), so a group can be executed
in another process from its serialized description.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from bench.api.configs import config_dict
from bench.api.method import Method
from bench.api.record import DENSE
from bench.api.task import EvalSettings
from bench.engine.budget import budget_bytes, parse_budget
from bench.engine.config import RunConfig
from bench.engine.plugins import Registry
from bench.errors import UsageError
from bench.model.loaded import LoadedModel
from bench.storage import json_key

RATIO_DEFINITION = "fraction of each compressed matrix's parameters removed: rank = floor(m*n*(1-ratio)/(m+n))"


def record_key(**fields) -> str:
    """A stable hash of everything that determines a measurement."""
    return json_key(fields)[:24]


@dataclass(frozen=True)
class Cell:
    """One evaluation: ``method`` at ``ratio`` (or at the ratio that fits ``budget``) on ``task``."""

    method: str
    task: str
    key: str
    ratio: float = 0.0
    budget: str | None = None  # as given: "0.75" (a fraction of the dense bytes) or "300MB"


@dataclass(frozen=True)
class CellGroup:
    """Cells that share one decomposition (``decomposition`` is its key; empty for the dense model)."""

    decomposition: str
    methods: tuple[str, ...]
    cells: tuple[Cell, ...]

    @property
    def label(self) -> str:
        return "+".join(self.methods)

    def targets(self, method: str) -> list[tuple[float, str | None]]:
        """The (ratio, budget) points of ``method`` in this group, in plan order."""
        seen: dict[tuple[float, str | None], None] = {}
        for cell in self.cells:
            if cell.method == method:
                seen.setdefault((cell.ratio, cell.budget))
        return list(seen)


@dataclass(frozen=True)
class Plan:
    """Every cell of a run, grouped, with what a worker needs to execute any group."""

    config: RunConfig
    model_identity: str
    dense_bytes: int
    statistics: tuple[str, ...]  # every statistic the run's methods need, collected in one pass
    groups: tuple[CellGroup, ...]

    def cells(self) -> list[Cell]:
        return [cell for group in self.groups for cell in group.cells]

    def keys(self) -> set[str]:
        return {cell.key for cell in self.cells()}

    def pending(self, done: Callable[[str], bool]) -> Plan:
        """The plan without the cells already done; groups left empty are dropped."""
        groups = []
        for group in self.groups:
            cells = tuple(cell for cell in group.cells if not done(cell.key))
            if cells:
                groups.append(dataclasses.replace(group, cells=cells))
        return dataclasses.replace(self, groups=tuple(groups))

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "model_identity": self.model_identity,
                "dense_bytes": self.dense_bytes, "statistics": list(self.statistics),
                "groups": [{"decomposition": g.decomposition, "methods": list(g.methods),
                            "cells": [dataclasses.asdict(c) for c in g.cells]} for g in self.groups]}

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        groups = tuple(CellGroup(g["decomposition"], tuple(g["methods"]), tuple(Cell(**c) for c in g["cells"]))
                       for g in data["groups"])
        return cls(RunConfig.from_dict(data["config"]), data["model_identity"], data["dense_bytes"],
                   tuple(data["statistics"]), groups)


def eval_settings(config: RunConfig) -> EvalSettings:
    return EvalSettings(seqlen=config.seqlen, limit=config.limit, batch_size=config.batch_size, device=config.device)


def left_out(config: RunConfig, registry: Registry) -> dict[str, dict[str, str]]:
    """``--methods all``: the registered methods it leaves out, each with its missing packages' install commands."""
    if list(config.methods) != ["all"]:
        return {}
    missing = {name: registry.get("method", name).missing_packages() for name in registry.methods}
    return {name: packages for name, packages in missing.items() if packages}


def left_out_line(config: RunConfig, registry: Registry) -> str | None:
    """One line naming what ``--methods all`` leaves out and the commands that install it (``None``: nothing)."""
    missing = left_out(config, registry)
    if not missing:
        return None
    commands = list(dict.fromkeys(c for packages in missing.values() for c in packages.values()))
    return (f"--methods all leaves out {', '.join(missing)} (not installed: "
            f"{', '.join(dict.fromkeys(p for packages in missing.values() for p in packages))}); "
            f"to run {'it' if len(missing) == 1 else 'them'} too: {' && '.join(commands)}")


def run_methods(config: RunConfig, registry: Registry) -> list[str]:
    """The run's method names, with ``all`` (every registered method whose packages are installed) and ``none``
    resolved."""
    if list(config.methods) == ["all"]:
        skipped = left_out(config, registry)
        return [name for name in registry.methods if name not in skipped]
    if list(config.methods) == ["none"]:
        return []
    for name in config.methods:
        registry.get("method", name)
    return list(config.methods)


def cell_key(config: RunConfig, registry: Registry, model_identity: str, method: Method | None, task: str,
             ratio: float = 0.0, budget_in_bytes: int | None = None) -> str:
    """The resume key of one cell (``method`` None: the dense model); a budget cell is keyed by its budget."""
    evaluation = registry.get("task", task)
    settings = evaluation.settings_key(eval_settings(config))
    calibrated = method is not None and method.uses_calibration()
    where = {"ratio": ratio} if budget_in_bytes is None else {"budget": budget_in_bytes}
    return record_key(model=model_identity, method=method.name if method else DENSE,
                      config=method.settings() if method else {}, **where, task=task, settings=settings,
                      dtype=config.dtype, calibration=config_dict(config.calibration) if calibrated else None,
                      code={"method": method.code_version() if method else None, "task": evaluation.code_version()})


def validate(config: RunConfig, registry: Registry) -> None:
    """Every name and option of ``config`` exists and parses: checked before any model is loaded."""
    for name in config.tasks:
        registry.get("task", name)
    for budget in config.budgets:
        parse_budget(budget)
    create = registry.method_factory(config.method_options)
    for name in run_methods(config, registry):
        missing = registry.get("method", name).missing_packages()
        if missing:
            raise UsageError(f"{name} needs the {', '.join(missing)} package, which is not installed; install it "
                             f"with {' && '.join(dict.fromkeys(missing.values()))} (or leave {name} out of --methods)")
    skipped = left_out(config, registry)
    for name in [*config.method_options, *run_methods(config, registry)]:  # options of methods not run too
        if name not in skipped:
            create(name)


def make_plan(config: RunConfig, registry: Registry, model_identity: str, dense_bytes: int) -> Plan:
    """Plan every cell of ``config`` for the model with this identity and size."""
    validate(config, registry)
    create = registry.method_factory(config.method_options)
    names = run_methods(config, registry)
    methods = {name: create(name) for name in names}
    statistics: list[str] = []
    for method in methods.values():
        for statistic in method.required_statistics():
            registry.get("statistic", statistic)
            if statistic not in statistics:
                statistics.append(statistic)

    groups = [CellGroup("", (DENSE,), tuple(Cell(DENSE, task, cell_key(config, registry, model_identity, None, task))
                                             for task in config.tasks))]
    by_key: dict[str, list[str]] = {}
    for name, method in methods.items():
        by_key.setdefault(method.decomposition_key(method.config), []).append(name)
    for key, members in by_key.items():
        cells = []
        for name in members:
            method = methods[name]
            ratios = list(config.ratios) if method.uses_ratio else ([0.0] if config.ratios else [])
            kv = method.compresses == "kv_cache"
            if kv and not config.kv_ratios and name in config.methods:  # under 'all': no cells
                raise UsageError(f"{name} compresses the KV cache: give --kv-ratios (fractions of KV-cache bytes "
                                 "removed, e.g. --kv-ratios 0.3,0.5), not --ratios")
            for ratio in (list(config.kv_ratios) if kv else ratios):
                cells += [Cell(name, task, cell_key(config, registry, model_identity, method, task, ratio=ratio),
                               ratio=ratio) for task in config.tasks]
            for spec in ([] if kv else config.budgets):
                size = budget_bytes(spec, dense_bytes)
                cells += [Cell(name, task, cell_key(config, registry, model_identity, method, task,
                                                    budget_in_bytes=size), budget=spec) for task in config.tasks]
        if cells:
            groups.append(CellGroup(key, tuple(members), tuple(cells)))
    return Plan(config, model_identity, dense_bytes, tuple(statistics), tuple(groups))


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

