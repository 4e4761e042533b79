"""Shared right factors in the engine: joint decompositions in the block pass, their accounting and ties.

:class:`GroupPass` runs a method's ``decompose_group`` during the block-by-block
decomposition pass: a group is factorized once the block holding its last
member has been seen; the statistics of its earlier members are held until
then (and only until then). :func:`shared_plan` is the per-matrix accounting
of a group: one rank for every member, factorized only when the group's
factors hold fewer parameters than its dense matrices, the shared factor
counted once (on the first member, which owns it). :func:`tie_shared` makes
the members' ``n -> r`` linears one module, so the model holds it once.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Mapping

from torch import nn

from bench.api.grouped import group_cost, shared_key
from bench.api.lowrank import Factorization
from bench.api.method import Context, Method
from bench.api.statistic import CalibrationStats
from bench.model.targets import Target


class GroupPass:
    """One method's target groups, decomposed during the block pass (see the module docstring)."""

    def __init__(self, method: Method, targets: list[Target]):
        self.method = method
        self.pending = [list(group) for group in method.groups(targets, method.config)]
        self.members = {t.name for group in self.pending for t in group}
        self.seen: set[str] = set()
        self.held: dict[str, dict] = {}  # statistic -> input group -> tensor
        self.input_group: dict[str, str] = {}
        self.seconds = 0.0

    def covers(self, name: str) -> bool:
        return name in self.members

    def on_block(self, block_targets: list[Target], block_stats: Mapping[str, Mapping], groups: Mapping[str, str],
                 context: Context) -> Iterator[tuple[list[Target], dict[str, Factorization]]]:
        """Hold this block's statistics of group members; yield every group completed by this block."""
        mine = [t for t in block_targets if t.name in self.members]
        for target in mine:
            key = groups.get(target.name, target.name)
            self.input_group[target.name] = key
            for statistic, table in block_stats.items():
                if key in table:
                    self.held.setdefault(statistic, {})[key] = table[key]
            self.seen.add(target.name)
        ready = [g for g in self.pending if all(t.name in self.seen for t in g)]
        self.pending = [g for g in self.pending if g not in ready]
        local = copy.copy(context)
        local.stats = CalibrationStats(self.held, self.input_group)
        for group in ready:
            start = time.perf_counter()
            found = self.method.decompose_group(group, [context.weight(t) for t in group], local, self.method.config)
            self.seconds += time.perf_counter() - start
            yield group, found
        needed = {self.input_group.get(t.name) for g in self.pending for t in g}
        for table in self.held.values():  # statistics no pending group reads
            for key in [k for k in table if k not in needed]:
                del table[key]


def shared_groups(targets: list[Target], factorizations: Mapping[str, Factorization] | None) -> dict[str, list[Target]]:
    """The targets sharing a right factor, by group key (members in the targets' order)."""
    out: dict[str, list[Target]] = {}
    for target in targets:
        key = shared_key(factorizations[target.name]) if factorizations and target.name in factorizations else None
        if key is not None:
            out.setdefault(key, []).append(target)
    return out


def shared_plan(group: list[Target], ranks: Mapping[str, int | None]) -> dict[str, dict]:
    """The accounting of one group (see the module docstring); members after the first name it as ``shared``.
    A rank of None keeps the whole group dense."""
    chosen = {None if ranks[t.name] is None else int(ranks[t.name]) for t in group}
    if chosen == {None}:
        return {t.name: {"rank": None, "dense_params": t.params, "params": t.params} for t in group}
    if len(chosen) != 1 or None in chosen:
        raise ValueError(f"the members of a shared group need one rank, got {sorted(chosen)}: "
                         f"{', '.join(t.name for t in group)}")
    cost = group_cost(group)
    rank = max(1, min(chosen.pop(), sum(t.out_features for t in group), group[0].in_features))
    if cost.rank(rank) is None:
        return {t.name: {"rank": None, "dense_params": t.params, "params": t.params} for t in group}
    owner, n = group[0].name, group[0].in_features
    layers = {}
    for target in group:
        basis = rank * n if target.name == owner else 0
        layers[target.name] = {"rank": rank, "dense_params": target.params,
                               "params": basis + rank * target.out_features + (target.out_features if target.bias else 0)}
        if target.name != owner:
            layers[target.name]["shared"] = owner
    return layers


def tie_shared(layers: Mapping[str, dict], module: Callable[[str], nn.Module]) -> None:
    """Make every member's ``n -> r`` linear its group owner's (``module(name)`` gives a target's LowRankLinear)."""
    for name, layer in layers.items():
        if layer.get("shared") and layer["rank"] is not None:
            member, owner = module(name), module(layer["shared"])
            if member.down.weight.shape != owner.down.weight.shape:
                raise ValueError(f"{name} cannot share {layer['shared']}'s basis: shapes differ")
            member.down = owner.down
