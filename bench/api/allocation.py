"""Ranks under a budget: one cost model and one solver for every heterogeneous allocator.

A matrix's :class:`MatrixCost` is what it holds at a rank: ``rank * per_rank``
parameters while that is below ``dense``, else ``dense`` - a rank not worth
factorizing keeps the matrix dense (METHODS.md's rule), written ``None``
here. A :class:`Budget` caps the targets' summed size in parameters or bytes.

:func:`solve_budget` is the solver: from per-matrix loss curves (a loss per rank, or
per candidate rank) it picks the ranks that lose least within the budget,
spending it as closely as the ranks' granularity allows and never more.
Underneath is :func:`greedy_steps`, the walk over ordered steps that every
allocator shares: ``solve_budget`` orders the steps by loss removed per parameter,
ASVD by its measured perplexities, SVD-LLM V2's greedy rule by energy per
parameter. :func:`bisect_scalar` (a monotone scalar search: V2's paper rule,
DipSVD's shift), :func:`water_fill` and :func:`round_ranks` (V2's rules)
serve allocators that solve for a continuous parameter first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from bench.api.lowrank import Factorization, rank_for_ratio, rank_for_size
from bench.errors import UsageError
from bench.model.targets import Target

Rank = int | None  # None: the matrix stays dense
UNITS = ("params", "bytes")


@dataclass
class Allocation:
    """Ranks per target for one ratio (None: keep that matrix dense), and what the allocator found (recorded
    with the compression)."""

    ranks: dict[str, int | None]  # None: the matrix stays dense
    facts: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MatrixCost:
    """What one matrix (or one group sharing a factor) holds at each rank.

    ``per_rank``: parameters one rank adds (``m + n``); ``dense``: parameters
    of the dense matrix (``m * n``); ``bytes_per_param``: for byte budgets.
    """

    per_rank: int
    dense: int
    bytes_per_param: float = 1.0

    @classmethod
    def of(cls, target: Target, bytes_per_param: float = 1.0) -> MatrixCost:
        return cls(target.out_features + target.in_features, target.out_features * target.in_features,
                   bytes_per_param)

    @property
    def max_rank(self) -> int:
        """The largest rank whose factors hold fewer parameters than the dense matrix (at least 1)."""
        return max(1, -(-self.dense // self.per_rank) - 1)

    def rank(self, rank: Rank) -> Rank:
        """``rank`` as kept: ``None`` (dense) where its factors would not hold fewer parameters."""
        return rank if rank is not None and rank * self.per_rank < self.dense else None

    def params(self, rank: Rank) -> int:
        return rank * self.per_rank if self.rank(rank) is not None else self.dense

    def size(self, rank: Rank, unit: str = "params") -> float:
        """Parameters, or bytes, at ``rank``."""
        return self.params(rank) * (self.bytes_per_param if unit == "bytes" else 1)

    def uniform_rank(self, ratio: float) -> int:
        """METHODS.md's rank for ``ratio``: ``floor(dense * (1 - ratio) / per_rank)``, at least 1."""
        return rank_for_size(self.dense, self.per_rank, ratio)

    def rank_size(self, unit: str = "params") -> float:
        """What one rank of the factors holds, in parameters or bytes."""
        return self.per_rank * (self.bytes_per_param if unit == "bytes" else 1)


def matrix_costs(targets: Iterable[Target], bytes_per_param: float = 1.0) -> dict[str, MatrixCost]:
    """The cost of every target, by name (in the targets' order)."""
    return {t.name: MatrixCost.of(t, bytes_per_param) for t in targets}


@dataclass(frozen=True)
class Budget:
    """A cap on the targets' summed size: ``limit`` parameters, or bytes (``unit = "bytes"``)."""

    limit: float
    unit: str = "params"

    def __post_init__(self):
        if self.unit not in UNITS:
            raise UsageError(f"budget unit {self.unit!r} is unknown; use one of: {', '.join(UNITS)}")

    @classmethod
    def uniform(cls, costs: Mapping[str, MatrixCost], ratio: float) -> Budget:
        """The parameters the matrices hold at the uniform rank of ``ratio`` (what methods are compared at)."""
        return cls(sum(c.params(c.uniform_rank(ratio)) for c in costs.values()))

    def spent(self, ranks: Mapping[str, Rank], costs: Mapping[str, MatrixCost]) -> float:
        """The summed size of ``ranks`` in this budget's unit."""
        return sum(costs[name].size(rank, self.unit) for name, rank in ranks.items())

    def unreachable(self, smallest: float, how: str) -> UsageError:
        return UsageError(f"a budget of {self.limit:,.0f} {self.unit} is unreachable: the smallest allocation holds "
                          f"{smallest:,.0f} {self.unit} ({how}); give a budget of at least that")


def uniform_ranks(targets: list[Target], ratio: float) -> dict[str, int]:
    """The rank formula of METHODS.md applied to every matrix alike."""
    return {t.name: rank_for_ratio(t.out_features, t.in_features, ratio) for t in targets}


def as_allocation(ranks: Mapping[str, Rank], costs: Mapping[str, MatrixCost], facts: dict | None = None) -> Allocation:
    """``ranks`` as ``allocate`` returns them (None where a matrix stays dense); the facts record the
    parameters kept and how many matrices stay dense."""
    kept = {name: costs[name].rank(rank) for name, rank in ranks.items()}
    summary = {"params": sum(costs[name].params(rank) for name, rank in kept.items()),
               "dense_matrices": sum(rank is None for rank in kept.values())}
    return Allocation(kept, {**summary, **(facts or {})})


def truncation_curve(factorization: Factorization, relative: bool = False) -> list[float]:
    """The energy ``sum s[r:]^2`` a truncation to rank ``r`` drops, for ``r = 0..k`` (float64); with
    ``relative``, as a share of the whole spectrum's. Convex in ``r``: a loss curve for :func:`solve_budget`."""
    energy = factorization.s.double() ** 2
    tail = torch.cat([torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0]), energy.new_zeros(1)]).clamp_min(0)
    total = float(energy.sum())
    if relative:
        tail = tail / total if total > 0 else torch.zeros_like(tail)
    return tail.tolist()


def _above(rank: Rank, other: Rank) -> bool:
    """Whether ``rank`` keeps more than ``other`` (dense keeps most)."""
    return other is not None and (rank is None or rank > other)


def greedy_steps(steps: Iterable[tuple[str, Rank]], costs: Mapping[str, MatrixCost], budget: Budget,
                 start: Mapping[str, Rank], *, fill: bool = True, partial: bool = True) -> dict[str, Rank]:
    """Raise ranks from ``start`` along ``steps``, in their order, while ``budget`` allows.

    A step ``(name, rank)`` raises that matrix to ``rank`` (``None``: dense);
    one that would lower it changes nothing. A step that does not fit whole
    is taken as far as whole ranks fit (``partial``); then the walk stops,
    or with ``fill`` it leaves that matrix where it is (its later steps are
    skipped, so every matrix's steps stay in order) and goes on with the
    others. Raises a one-line ``UsageError`` when ``start`` itself is over.
    """
    ranks = {name: costs[name].rank(rank) for name, rank in start.items()}
    spent = budget.spent(ranks, costs)
    if spent > budget.limit:
        raise budget.unreachable(spent, "every matrix at its smallest candidate rank")
    closed: set[str] = set()
    for name, rank in steps:
        cost, current = costs[name], ranks[name]
        rank = cost.rank(rank)
        if name in closed or not _above(rank, current):
            continue
        extra = cost.size(rank, budget.unit) - cost.size(current, budget.unit)
        if extra <= budget.limit - spent:
            ranks[name], spent = rank, spent + extra
            continue
        if partial:  # whole ranks toward ``rank``, never past it (nor past the largest worth factorizing)
            step = cost.size(current + 1, budget.unit) - cost.size(current, budget.unit)
            reached = min(cost.max_rank if rank is None else rank, current + int((budget.limit - spent) // step))
            while reached > current and cost.size(reached, budget.unit) - cost.size(current, budget.unit) > \
                    budget.limit - spent:  # float bytes: never over
                reached -= 1
            spent += cost.size(reached, budget.unit) - cost.size(current, budget.unit)
            ranks[name] = reached
        if not fill:
            break
        closed.add(name)
    return ranks


def _options(curve: Sequence[float] | Mapping[Rank, float], cost: MatrixCost) -> dict[Rank, float]:
    """A matrix's candidate ranks and their losses: a sequence is indexed by rank (index 0 unused), and
    keeping the matrix dense loses its last value; a mapping names its candidates (``None``: dense)."""
    if isinstance(curve, Mapping):
        items = list(curve.items())
    else:
        values = list(curve)
        items = [(r, values[r]) for r in range(1, min(len(values) - 1, cost.max_rank) + 1)] + [(None, values[-1])]
    options: dict[Rank, float] = {}
    for rank, loss in items:
        if rank is not None and rank < 1:
            raise UsageError(f"candidate rank {rank} given to solve_budget: ranks are at least 1 (None: dense)")
        rank = cost.rank(rank)
        if not math.isfinite(loss):
            raise UsageError(f"a loss of {loss} at rank {rank}: losses given to solve_budget must be finite")
        options[rank] = min(float(loss), options.get(rank, math.inf))
    return options


def _hull(options: dict[Rank, float], cost: MatrixCost, unit: str) -> list[tuple[float, float, Rank]]:
    """The options on the lower convex hull of (size, loss), cheapest first: the ones worth stepping through."""
    points = sorted(((cost.size(rank, unit), loss, rank) for rank, loss in options.items()), key=lambda p: p[:2])
    hull: list[tuple[float, float, Rank]] = []
    for point in points:
        if hull and point[1] >= hull[-1][1]:
            continue  # costs at least as much and loses no less
        while len(hull) >= 2 and ((hull[-2][1] - hull[-1][1]) * (point[0] - hull[-1][0])
                                  < (hull[-1][1] - point[1]) * (hull[-1][0] - hull[-2][0])):
            hull.pop()  # the middle point lies above the line from its neighbours
        hull.append(point)
    return hull


def solve_budget(curves: Mapping[str, Sequence[float] | Mapping[Rank, float]], costs: Mapping[str, MatrixCost],
                 budget: Budget) -> dict[str, Rank]:
    """The rank of every matrix (``None``: dense) with the least summed loss that fits ``budget``.

    ``curves[name]`` gives a matrix's loss at every rank (a sequence indexed
    by rank, e.g. :func:`truncation_curve`) or at its candidate ranks (a
    mapping). Every matrix starts at its cheapest candidate; steps along each
    curve's lower convex hull are taken in the order of loss removed per
    parameter (or byte), skipping those that no longer fit; the leftover then
    goes to the single moves that lower the loss most while they fit. So the
    result never exceeds the budget and no move to a candidate that loses
    less still fits. For curves convex in the size kept it loses no more than
    the optimum of a budget one step smaller (exactly the optimum when every
    step costs the same); the matrices outside ``curves`` are not counted.
    Raises a one-line ``UsageError`` when the cheapest candidates exceed the
    budget.
    """
    options = {name: _options(curve, costs[name]) for name, curve in curves.items()}
    hulls = {name: _hull(opts, costs[name], budget.unit) for name, opts in options.items()}
    order = {name: i for i, name in enumerate(hulls)}
    steps = [((a[1] - b[1]) / (b[0] - a[0]), order[name], i, name, b[2])
             for name, hull in hulls.items() for i, (a, b) in enumerate(zip(hull, hull[1:]))]
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))
    ranks = greedy_steps(((name, rank) for *_, name, rank in steps), costs, budget,
                         {name: hull[0][2] for name, hull in hulls.items()}, fill=True, partial=False)
    spare = budget.limit - budget.spent(ranks, costs)
    while True:  # the leftover: the single move that lowers the loss most and still fits
        best = None
        for name, opts in options.items():
            now_size, now_loss = costs[name].size(ranks[name], budget.unit), opts[ranks[name]]
            for rank, loss in opts.items():
                extra = costs[name].size(rank, budget.unit) - now_size
                if 0 < extra <= spare and loss < now_loss and (best is None or now_loss - loss > best[0]):
                    best = (now_loss - loss, name, rank, extra)
        if best is None:
            return ranks
        _, name, ranks[name], extra = best
        spare -= extra


def bisect_scalar(go_up: Callable[[float], bool], low: float, high: float, steps: int = 100) -> tuple[float, float]:
    """Halve ``[low, high]`` ``steps`` times around the point where the monotone ``go_up(x)`` turns False.

    Returns the last bracket: ``go_up`` held at ``low`` (or ``low`` is the
    initial one) and failed at ``high`` (or it is the initial one).
    """
    for _ in range(steps):
        mid = (low + high) / 2
        if go_up(mid):
            low = mid
        else:
            high = mid
    return low, high


def round_ranks(x: Mapping[str, float], costs: Mapping[str, MatrixCost], budget: Budget) -> dict[str, int]:
    """Integer ranks in ``[1, max_rank]`` from continuous ones: floors, then +1 by largest remainder while
    the budget allows (each rank counted at ``per_rank``)."""
    names = list(x)
    step = [costs[n].rank_size(budget.unit) for n in names]
    caps = [costs[n].max_rank for n in names]
    values = [x[n] for n in names]
    ranks = [max(1, min(cap, math.floor(v))) for v, cap in zip(values, caps)]
    spare = budget.limit - sum(r * c for r, c in zip(ranks, step))
    for i in sorted(range(len(values)), key=lambda i: values[i] - math.floor(values[i]), reverse=True):
        if ranks[i] < caps[i] and step[i] <= spare:
            ranks[i] += 1
            spare -= step[i]
    return dict(zip(names, ranks))


def water_fill(weights: Mapping[str, float], costs: Mapping[str, MatrixCost], budget: Budget) -> dict[str, int]:
    """Integer ranks ``r_i ~ lambda * w_i`` in ``[1, max_rank]`` whose summed size is just within ``budget``.

    Continuous ranks are water-filled (matrices hitting a bound are fixed and
    the rest rescaled), then rounded by :func:`round_ranks`.
    """
    names = list(weights)
    w = [weights[n] for n in names]
    step = [costs[n].rank_size(budget.unit) for n in names]
    caps = [costs[n].max_rank for n in names]
    x = [0.0] * len(names)
    free = list(range(len(names)))  # ascending, as every sum below runs
    left = float(budget.limit)
    while free:
        total = sum(w[i] * step[i] for i in free)
        if total <= 0:  # no preference left: equal parameters for the rest
            for i in free:
                x[i] = min(caps[i], max(1.0, left / (step[i] * len(free))))
            break
        scale = left / total
        high = [i for i in free if w[i] * scale > caps[i]]
        low = [] if high else [i for i in free if w[i] * scale < 1]
        if not high and not low:
            for i in free:
                x[i] = w[i] * scale
            break
        for i in high or low:
            x[i] = float(caps[i]) if high else 1.0
            left -= x[i] * step[i]
        fixed = set(high or low)
        free = [i for i in free if i not in fixed]
    return round_ranks(dict(zip(names, x)), costs, budget)
