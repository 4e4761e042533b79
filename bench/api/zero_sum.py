"""The zero-sum walk: a global truncation that keeps the summed first-order loss change near zero.

ZS-SVD (Abbasi et al., ICML 2026) scores each singular component ``i`` of
each matrix with ``dL_i``, the first-order change of the loss when it is
removed. Only a matrix's smallest kept component is a candidate (ranks stay
prefixes). Candidates sit in two min-heaps by ``|dL|``, one for ``dL >= 0``
and one for ``dL < 0``; each step pops from the positive heap when the
running sum ``s`` is ``<= 0`` and from the negative one otherwise (the
other when that one is empty), adds ``dL`` to ``s``, lowers that matrix's
rank by one and pushes its next component, until the matrices fit the
budget. While both heaps hold candidates, ``|s| <= max |dL|`` (each step
moves ``s`` toward the other sign by at most one ``|dL|``).

This is the removal-order counterpart of :func:`bench.api.allocation.greedy_steps`:
it starts full and lowers ranks, and what a step saves comes from the
shared :class:`~bench.api.allocation.MatrixCost` (a matrix above its largest
worth-factorizing rank stays dense and saves nothing until it crosses it).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence

from bench.api.allocation import Budget, MatrixCost, Rank


def exact_saving(cost: MatrixCost, rank: int, unit: str = "params") -> float:
    """What lowering a matrix from ``rank`` to ``rank - 1`` saves (``rank`` above the largest
    worth-factorizing one counts as dense)."""
    return cost.size(rank, unit) - cost.size(rank - 1, unit)


def zero_sum_walk(deltas: Mapping[str, Sequence[float]], costs: Mapping[str, MatrixCost], budget: Budget,
                  floors: Mapping[str, int] | None = None, *,
                  saving: Callable[[MatrixCost, int, str], float] = exact_saving,
                  trace: list | None = None) -> tuple[dict[str, Rank], dict]:
    """Ranks (``None``: dense) from the zero-sum walk over ``deltas`` until the kept size is within ``budget``.

    ``deltas[name][i]`` is the loss change of removing component ``i``
    (singular values in descending order); every matrix starts at full rank
    ``len(deltas[name])`` and is never lowered below ``floors[name]`` (at
    least 1). ``saving(cost, rank, unit)`` is what a step from ``rank`` is
    credited with (default: exactly what it saves). With ``trace``, each step
    appends ``(name, delta, running sum after it, both heaps held candidates)``.
    Returns the ranks and facts: the running sum, the steps, and ``reached``
    (False when every matrix hit its floor first).
    """
    floors = floors or {}
    ranks = {name: len(values) for name, values in deltas.items()}
    left = {name: max(1, floors.get(name, 1)) for name in deltas}
    spent = sum(costs[name].size(rank, budget.unit) for name, rank in ranks.items())
    positive: list = []
    negative: list = []
    counter = 0

    def push(name: str) -> None:
        nonlocal counter
        if ranks[name] > left[name]:
            delta = float(deltas[name][ranks[name] - 1])
            heapq.heappush(positive if delta >= 0 else negative, (abs(delta), counter, name, delta))
            counter += 1

    for name in deltas:
        push(name)
    running, steps = 0.0, 0
    while spent > budget.limit and (positive or negative):
        both = bool(positive) and bool(negative)
        first, other = (positive, negative) if running <= 0 else (negative, positive)
        _, _, name, delta = heapq.heappop(first if first else other)
        spent -= saving(costs[name], ranks[name], budget.unit)
        ranks[name] -= 1
        running += delta
        steps += 1
        if trace is not None:
            trace.append((name, delta, running, both))
        push(name)
    kept = {name: costs[name].rank(rank) for name, rank in ranks.items()}
    return kept, {"running_sum": running, "steps": steps, "reached": spent <= budget.limit}
