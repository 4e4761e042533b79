"""SVD-LLM V2 (``svdllm_v2``, Wang et al., NAACL 2025): two-round truncation and
heterogeneous per-matrix ranks. No public code exists; this follows the paper
and METHODS.md.

**Two-round truncation.** ``G = X X^T = U_s Lambda U_s^T`` (``eigh``) and
``S = U_s Lambda^(1/2)``; ``SVD(W S)`` is truncated as in every method. Because
``S S^T = G`` like Cholesky's ``L L^T = G``, the truncated ``W'`` is the same
(``W' = U_r U_r^T W`` with ``U_r`` the top eigenvectors of ``W G W^T``). A
singular ``G`` (fewer calibration tokens than channels, dead channels) does
not break it: the eigenvalues are damped, ``Lambda + delta * mean(Lambda)``
(GPTQ-style, :func:`bench.eigen_whitening`), instead of dropped. A
pure pseudo-inverse would zero every input direction the calibration data
never visited and does far worse with few tokens (METHODS.md). The damping
keeps ``S`` invertible, so ``W`` is kept as it is on those directions.
``delta = 1e-6`` (relative to the mean eigenvalue, recorded in the config)
gives the same ``W'`` as Cholesky whitening when ``G`` is well conditioned
(tests: 1e-5 relative) and a finite, invertible ``S`` on a singular one,
where it matches the reference's shifted Cholesky. Measured on SmolLM2-135M
(14 matrices of blocks 3 and 15, ratio 0.2, summed squared relative output
error on 256 held-out tokens; plain SVD 1.636): gram from 128 tokens -
shifted Cholesky 1.0477, delta 0 / 1e-6 1.0477, 1e-4 1.0467, 1e-2 0.9884,
1e-1 0.9005; from 1024 tokens - 0.8268, 0.8268, 0.8266, 0.8083, 0.7382.
Larger damping is a ridge-like regularizer that generalizes better with few
tokens, but it is no longer the paper's whitening, so it is an option
(``svdllm_v2.delta=0.01``), not the default.

**Heterogeneous ranks.** Matrices of the same kind across blocks (all
``q_proj``, all ``down_proj``, ...) form a group ``G`` whose parameter budget is
that of the uniform rank ``r0`` of the target ratio ``R``. Every rule below
keeps each group's budget: ranks are integers, so a group keeps at most its
budget and less than one rank step of any member below it (exactly the budget
when the group's matrices have one shape, as in Llama-family models). A rank
stays in ``[1, largest rank worth factorizing]``.

- ``allocation = "paper"`` (the default), the paper's rule as its pseudo-code
  states it (quoted in the SVD-LLM repository's issue #46): ``L_i`` = the
  theoretical truncation loss of matrix ``i`` at ``r0``, i.e. the **raw** sum
  of its whitened matrix's truncated squared singular values (with
  ``G = X X^T`` summed over the calibration tokens, so ``L_i`` grows with
  their number); ``Lt_i = 1 / log(L_i)``; compression ratio
  ``ratio_i = Len(G) * R * Lt_i / Sum_j Lt_j``. A matrix that loses more at
  ``r0`` gets a smaller ratio (keeps more). The mean ratio over a group of
  equal shapes is ``R``; to keep the integer budget exactly, ``R`` in that
  product is solved for (a bisection on the common factor ``c`` of
  ``ratio_i = c * Lt_i``; it lands within rounding of ``Len(G) * R / Sum Lt``)
  and ratios that would leave a matrix outside ``[1, cap]`` are clipped with
  the others re-solved. **Undefined domain**: where ``L_i <= 1`` the
  logarithm is ``<= 0`` and ``1 / log`` is infinite or negative (a negative
  ``Lt`` would invert the rule: the less a matrix loses, the more it keeps).
  The formula says nothing there, so such a matrix keeps its uniform rank and
  the formula distributes the rest of the group's budget among the others
  (the whole group is uniform when none is defined). This happens only with
  tiny losses - few calibration tokens, tiny layers (the unit tests' models);
  those matrices are recorded in the allocation facts (``undefined``) and
  logged.
- ``allocation = "power"``, a rule of this project's own (not the paper's):
  kept parameters proportional to ``N_i ** t`` with ``N_i`` the normalized loss
  ``sqrt(truncated energy / total energy)`` at ``r0`` and ``t`` chosen per
  group from ``loss_exponents`` by the summed normalized loss it gives (the
  grid holds 0, i.e. uniform, so it is never worse than uniform on that
  criterion). Measured on SmolLM2-135M it starves matrices whose whitened
  energy sits in few directions (block 11's down_proj got rank 10 instead of
  335) and does worse than uniform in perplexity: the summed normalized loss
  is a poor proxy.
- ``allocation = "greedy"``: per group, keep the singular directions with the
  most normalized energy (``sigma^2 / sum sigma^2``) per parameter until the
  group's budget is spent.
- ``allocation = "uniform"``: ``r0`` everywhere (the ablation without
  heterogeneous ranks).

Whatever the rule, the allocation facts record the summed normalized loss
and kept parameters every rule gives at that ratio (they are cheap: spectra
only), so a report can put the rules side by side at equal parameters
(reports' allocation ablation table; ``benchmarks/v2_allocation.py`` adds
their perplexities).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from bench import (
    Allocation,
    Budget,
    Factorization,
    MatrixCost,
    Method,
    PaperNotes,
    Target,
    UsageError,
    bisect_scalar,
    eigen_whitening,
    factorize,
    greedy_steps,
    hookimpl,
    matrix_costs,
    rank_for_ratio,
    round_ranks,
    water_fill,
)

log = logging.getLogger(__name__)

ALLOCATIONS = ("paper", "power", "greedy", "uniform")


@dataclass(frozen=True)
class SVDLLMV2Config:
    delta: float = 1e-6  # eigenvalue damping, relative to mean(Lambda)
    allocation: str = "paper"  # "paper" (published rule), "power" (this project's), "greedy", "uniform"
    loss_exponents: tuple[float, ...] = (0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1)  # power: t grid

    def __post_init__(self):
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"svdllm_v2.allocation={self.allocation!r} is unknown; use one of: {', '.join(ALLOCATIONS)}")
        if self.delta < 0:
            raise UsageError(f"svdllm_v2.delta must be >= 0, got {self.delta}")
        if not self.loss_exponents or any(not math.isfinite(x) or x < 0 for x in self.loss_exponents):
            raise UsageError(f"svdllm_v2.loss_exponents={self.loss_exponents!r} must be comma-separated numbers >= 0, "
                             "e.g. 0,0.5,1")


def loss_curve(factorization: Factorization) -> list[float]:
    """``normalized_loss(r)`` for every rank ``r`` in ``0..k``, computed at once."""
    energy = factorization.s.double() ** 2
    tail = torch.cat([torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0]), energy.new_zeros(1)])
    total = float(energy.sum())
    return (tail.clamp_min(0) / total).sqrt().tolist() if total > 0 else [0.0] * tail.numel()


@dataclass
class Group:
    """One group of same-kind matrices at one ratio: what every rule needs."""

    members: list[Target]
    uniform: list[int]
    costs: dict[str, MatrixCost]  # by member name, in the members' order

    @property
    def budget(self) -> Budget:
        return Budget(sum(r * self.costs[t.name].per_rank for t, r in zip(self.members, self.uniform)))


def groups_at(targets: list[Target], ratio: float) -> dict[str, Group]:
    """The targets grouped by kind, with their uniform ranks and costs at ``ratio``."""
    members: dict[str, list[Target]] = defaultdict(list)
    for target in targets:
        members[target.kind].append(target)
    return {kind: Group(group, [rank_for_ratio(t.out_features, t.in_features, ratio) for t in group],
                        matrix_costs(group))
            for kind, group in members.items()}


def paper_ranks(group: Group, factorizations: Mapping[str, Factorization]) -> tuple[list[int], list[str]]:
    """The paper's ``ratio_i = Len(G) * R * Lt_i / Sum(Lt)``, ``Lt = 1 / log(L_min)``; returns ranks and the
    members outside the formula's domain (``L_min <= 1``), which keep their uniform rank."""
    ranks = list(group.uniform)
    losses = [factorizations[t.name].truncation_loss(r) for t, r in zip(group.members, group.uniform)]
    defined = [i for i, loss in enumerate(losses) if loss > 1.0]
    undefined = [group.members[i].name for i in range(len(losses)) if i not in defined]
    if not defined:
        return ranks, undefined
    lt = {group.members[i].name: 1.0 / math.log(losses[i]) for i in defined}
    costs = {name: group.costs[name] for name in lt}
    budget = Budget(sum(group.uniform[i] * group.costs[group.members[i].name].per_rank for i in defined))

    def continuous(c: float) -> dict[str, float]:
        # rank_i = params_i * (1 - ratio_i) / cost_i with ratio_i = c * Lt_i, clipped to [1, cap_i]
        return {name: min(cost.max_rank, max(1.0, cost.dense * (1 - c * lt[name]) / cost.per_rank))
                for name, cost in costs.items()}

    def over(c: float) -> bool:  # the ratios' common factor c must grow while the ranks hold too much
        return sum(x * costs[name].per_rank for name, x in continuous(c).items()) > budget.limit

    c = bisect_scalar(over, 0.0, 1 / min(lt.values()), steps=200)[1]
    rounded = round_ranks(continuous(c), costs, budget)
    for i in defined:
        ranks[i] = rounded[group.members[i].name]
    return ranks, undefined


def power_ranks(group: Group, curves: Mapping[str, list[float]], exponents: list[float]) -> tuple[list[int], float]:
    """This project's rule: kept parameters ~ ``N_i ** t``, ``t`` from the grid by the summed normalized loss."""
    losses = [curves[t.name][r] for t, r in zip(group.members, group.uniform)]
    best = None
    for t in exponents:
        # kept parameters ~ N_i ** t, i.e. ranks ~ N_i ** t / cost_i
        weights = {m.name: max(loss, 1e-12) ** t / group.costs[m.name].per_rank
                   for m, loss in zip(group.members, losses)}
        filled = water_fill(weights, group.costs, group.budget)
        candidate = [filled[m.name] for m in group.members]
        summed = sum(curves[m.name][r] for m, r in zip(group.members, candidate))
        if best is None or summed < best[0] - 1e-12:
            best = (summed, t, candidate)
    return best[2], best[1]


def greedy_ranks(group: Group, factorizations: Mapping[str, Factorization]) -> list[int]:
    """Within the group, keep the singular directions with the most normalized energy per parameter: the
    shared step walk from rank 1, one rank per step, stopping at the first that does not fit."""
    gains, owners = [], []
    for index, target in enumerate(group.members):
        cost, cap = group.costs[target.name].per_rank, group.costs[target.name].max_rank
        energy = factorizations[target.name].s.double() ** 2
        total = float(energy.sum())
        share = energy[1:cap] / total if total > 0 else torch.zeros(max(cap - 1, 0), dtype=torch.float64)
        gains.append(share / cost)
        owners.append(torch.full((share.numel(),), index, dtype=torch.long))
    gains, owners = torch.cat(gains), torch.cat(owners)
    # each matrix's gains are non-increasing, so a global sort keeps prefixes of every spectrum
    reached = [1] * len(group.members)
    steps = []
    for index in owners[torch.argsort(gains, descending=True, stable=True)].tolist():
        reached[index] += 1
        steps.append((group.members[index].name, reached[index]))
    ranks = greedy_steps(steps, group.costs, group.budget, {t.name: 1 for t in group.members}, fill=False)
    return [ranks[t.name] for t in group.members]


def allocate_rule(rule: str, targets: list[Target], factorizations: Mapping[str, Factorization], ratio: float,
                  exponents: list[float], curves: Mapping[str, list[float]]) -> tuple[dict[str, int], dict]:
    """Ranks of every target under ``rule`` at ``ratio``, and what the rule found (per group)."""
    ranks: dict[str, int] = {}
    found: dict = {}
    for kind, group in groups_at(targets, ratio).items():
        if rule == "paper":
            group_ranks, undefined = paper_ranks(group, factorizations)
            if undefined:
                found.setdefault("undefined", []).extend(undefined)
        elif rule == "power":
            group_ranks, found.setdefault("loss_exponents", {})[kind] = power_ranks(group, curves, exponents)
        elif rule == "greedy":
            group_ranks = greedy_ranks(group, factorizations)
        else:
            group_ranks = list(group.uniform)
        ranks.update({t.name: r for t, r in zip(group.members, group_ranks)})
    return ranks, found


class SVDLLMV2(Method):
    name = "svdllm_v2"
    description = "SVD-LLM V2: eigen-based (two-round) whitening and per-group heterogeneous ranks"
    config_class = SVDLLMV2Config
    requires = ("gram",)
    notes = PaperNotes(
        paper="Wang, Alam, Wan, Shen, Zhang: SVD-LLM V2: Optimizing Singular Value Truncation for Large Language "
              "Model Compression, NAACL 2025 (arXiv:2503.12340); no public code",
        paper_defaults="whitening from eigh(X X^T) then SVD (two rounds), 256 x 2048 WikiText-2 calibration tokens; "
                       "per group of same-type matrices ratio_i = Len(G) * R * Lt_i / Sum(Lt), Lt = 1 / log(L_min)",
        deviations=(
            "eigenvalues damped by delta * mean (1e-6) instead of a pseudo-inverse: a pseudo-inverse zeroes W on "
            "directions the calibration data never visited (perplexity 3008 vs 402 at 20% with 128 tokens)",
            "allocation: where L_min <= 1 the formula is undefined (log <= 0): that matrix keeps the uniform rank and "
            "the formula shares the rest of its group's budget (recorded as `undefined`)",
            "allocation: the common factor of the ratios is solved so each group keeps its integer parameter budget "
            "(clipping a rank to [1, worth factorizing] re-solves the others)",
            "'power' (kept ~ normalized loss ** t) is this project's rule, not the paper's; 'greedy' and 'uniform' "
            "are ablations",
        ),
    )

    def decompose(self, target, weight, context, config) -> Factorization:
        return factorize(weight, eigen_whitening(context.stats.get("gram", target.name), config.delta))

    def allocate(self, ratio, factorizations, context, config) -> Allocation:
        curves = {t.name: loss_curve(factorizations[t.name]) for t in context.targets}
        exponents = list(config.loss_exponents)
        summary: dict[str, dict] = {}
        chosen: tuple[dict[str, int], dict] | None = None
        for rule in ALLOCATIONS:  # every rule, for the ablation: spectra only, no model is built
            ranks, found = allocate_rule(rule, context.targets, factorizations, ratio, exponents, curves)
            summary[rule] = {"summed_normalized_loss": sum(curves[name][r] for name, r in ranks.items()),
                             "params": sum(ranks[t.name] * (t.out_features + t.in_features) for t in context.targets)}
            if rule == config.allocation:
                chosen = (ranks, found)
        ranks, found = chosen
        if found.get("undefined"):
            log.warning("svdllm_v2 at ratio %.2f: L_min <= 1 (1/log undefined) for %d matrices; they keep the uniform "
                        "rank: %s", ratio, len(found["undefined"]), ", ".join(found["undefined"][:5]))
        if "loss_exponents" in found:
            log.info("svdllm_v2 at ratio %.2f: loss exponent per group %s", ratio, found["loss_exponents"])
        return Allocation(ranks, {"rule": config.allocation, "rules": summary, **found})


@hookimpl
def register_methods(register):
    register(SVDLLMV2())
