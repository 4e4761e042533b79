"""AdaSVD (``adasvd``, Li et al., arXiv 2502.01403): adaComp and adaCR on top of SVD-LLM's whitening.

**Start.** SVD-LLM's truncation-aware whitening (:class:`methods.svdllm.SVDLLMWhitening`,
the same factor-store entry as ``svdllm_w``): ``W_u = U_k Sig^1/2``,
``W_v = Sig^1/2 V_k^T S^-1``.

**adaComp** (``refine``, ``tau`` rounds). The loss of a layer on a gram
``G = X X^T`` is ``L(U, V) = ||(W - U V^T) X||_F^2 = tr(E G E^T)``,
``E = W - U V^T``. Alternating least squares, U first:

- ``U <- W G V (V^T G V)^+``: the paper's Eq. 10 ``(A^+ B)^T`` with
  ``A = X^T V``, ``B = (W X)^T``, since ``A^+ = (A^T A)^+ A^T`` - no X kept;
- ``V^T <- U^+ W``: the normal equations ``U^T U V^T G = U^T W G`` give it
  for every full-rank ``G`` (the paper's Eq. 13, ``((U)^+)^T W``, does not
  type-check).

Each half-step is the exact minimizer in its factor, so ``L`` never
increases (tested; a step that would raise it numerically is not taken). On
the gram svdllm whitened with, svdllm's factors are a fixed point, so
adaComp uses another statistic: the inputs through the *already compressed*
layers. The compressed model is streamed block by block
(:meth:`bench.Context.block_pass`): block ``i``'s inputs come from blocks
``0..i-1`` as adaComp left them; inside the block, one pass through the
block's own (not yet updated) compressed layers gives each linear's gram;
then every linear of the block is updated, and the updated block produces
the next block's inputs. ``stack_of_batch = M > 0`` (paper Eq. 14-15, off by
default) replaces the windows by the means of ``M`` shuffled buckets of
``ceil(N / M)`` windows before taking the gram.

**adaCR** (``allocate``). Block importance ``I`` = the ``block_importance``
statistic (mean over calibration tokens of ``1 - cos`` of the block's input
and output), ``I_n = I / mean(I)``, kept ratio ``CR = mrr + I_n (trr - mrr)``
for every matrix of the block, ``trr = 1 - ratio``, ``mrr = trr - 0.1``,
clipped to ``[0, 1]``. The ranks (each matrix ``CR * m n / (m + n)``) are
then scaled by one common factor and rounded by the API's
:func:`bench.water_fill`, so the targets hold exactly the parameters of the
uniform allocation (within one rank step, never more) - blocks are equal
sized, so the unclipped CRs already average ``trr``.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from bench import (
    Allocation,
    Budget,
    LowRankLinear,
    NoConfig,
    PaperNotes,
    UsageError,
    as_allocation,
    hookimpl,
    matrix_costs,
    uniform_ranks,
    water_fill,
)
from methods.svdllm import CALIBRATION_DEVIATION, SVDLLMWhitening

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdaSVDConfig:
    tau: int = 1  # adaComp rounds (one round = a U step then a V step); 0: none
    allocation: str = "adacr"  # "adacr" (block importance) or "uniform"
    mrr_gap: float = 0.1  # trr - mrr
    stack_of_batch: int = 0  # M buckets of shuffled windows averaged before the gram; 0: off
    seed: int = 0  # the stack-of-batch shuffle

    def __post_init__(self):
        if self.tau < 0 or self.stack_of_batch < 0 or self.mrr_gap < 0:
            raise UsageError("adasvd needs tau >= 0, stack_of_batch >= 0 and mrr_gap >= 0")
        if self.allocation not in ("adacr", "uniform"):
            raise UsageError(f"adasvd.allocation={self.allocation!r} is unknown; use adacr or uniform")


# --------------------------------------------------------------------------- adaComp: the math

def weighted_loss(w: torch.Tensor, u: torch.Tensor, vt: torch.Tensor, gram: torch.Tensor) -> float:
    """``tr((W - U V^T) G (W - U V^T)^T)`` = ``||(W - U V^T) X||_F^2`` (float64)."""
    e = w.double() - u.double() @ vt.double()
    return float(((e @ gram.double()) * e).sum())


def update_u(w: torch.Tensor, vt: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``U = W G V (V^T G V)^+``: the least-squares ``U`` for fixed ``V`` on gram ``G``."""
    gv = gram.double() @ vt.double().T
    return (w.double() @ gv) @ torch.linalg.pinv(vt.double() @ gv, hermitian=True)


def update_v(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``V^T = U^+ W``: the least-squares ``V^T`` for fixed ``U`` on any full-rank gram."""
    return torch.linalg.pinv(u.double()) @ w.double()


def adacomp(w: torch.Tensor, u: torch.Tensor, vt: torch.Tensor, gram: torch.Tensor,
            tau: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``tau`` rounds of U then V steps; a half-step that would raise the loss (numerically) is skipped."""
    u, vt = u.double(), vt.double()
    loss = before = weighted_loss(w, u, vt, gram)
    skipped = 0
    for _ in range(tau):
        for which in "uv":
            new_u, new_vt = (update_u(w, vt, gram), vt) if which == "u" else (u, update_v(w, u))
            new = weighted_loss(w, new_u, new_vt, gram)
            if math.isfinite(new) and new <= loss:
                u, vt, loss = new_u, new_vt, new
            else:
                skipped += 1
    return u, vt, {"loss_before": before, "loss_after": loss, "skipped_steps": skipped}


# --------------------------------------------------------------------------- adaComp: the pass

class _Grams:
    """Hooks gathering each low-rank layer's input gram over one block's pass (shared inputs counted once)."""

    def __init__(self, layers: dict[str, LowRankLinear], windows: int, buckets: int, seed: int):
        self.sums: dict[str, torch.Tensor] = {}
        self.leader: dict[str, str] = {}
        self.calls: dict[str, int] = defaultdict(int)
        size = math.ceil(windows / buckets) if buckets else 0
        order = torch.randperm(windows, generator=torch.Generator().manual_seed(seed)) if buckets else None
        self.bucket = {int(j): i // size for i, j in enumerate(order)} if buckets else {}
        self.last: dict = {"x": None, "name": None}
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in layers.items()]

    def _hook(self, name: str):
        def observe(_module, inputs, _output):
            x = inputs[0]
            if x is self.last["x"]:
                self.leader.setdefault(name, self.leader[self.last["name"]])
                return
            self.last["x"], self.last["name"] = x, name
            self.leader.setdefault(name, name)
            flat = x.detach().reshape(-1, x.shape[-1]).double()
            window = self.calls[name]
            self.calls[name] += 1
            if self.bucket:  # stack-of-batch: sum the windows of each bucket, gram of the means at the end
                key = (name, self.bucket[window])
                self.sums[key] = self.sums[key] + flat if key in self.sums else flat.clone()
                self.calls[key] += 1
            elif name in self.sums:
                self.sums[name].addmm_(flat.T, flat)
            else:
                self.sums[name] = flat.T @ flat
        return observe

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.last = {"x": None, "name": None}

    def gram(self, name: str) -> torch.Tensor:
        leader = self.leader[name]
        if not self.bucket:
            return self.sums[leader]
        means = [total / self.calls[key] for key, total in self.sums.items() if key[0] == leader]
        return sum(m.T @ m for m in means)


def adacomp_pass(model, context, config: AdaSVDConfig) -> dict:
    """adaComp on every LowRankLinear of the compressed ``model``, block by block (see the module)."""
    layers = {t.name: model.get_submodule(t.name) for t in context.targets}
    layers = {name: module for name, module in layers.items() if isinstance(module, LowRankLinear)}
    by_block: dict[int, list] = defaultdict(list)
    for target in context.targets:
        if target.name in layers:
            by_block[target.block].append(target)
    buckets = min(config.stack_of_batch, len(context.calibration))
    relative, skipped = {}, 0
    for step in context.block_pass(model):
        members = by_block.get(step.index, [])
        if not members:
            continue
        grams = _Grams({t.name: layers[t.name] for t in members}, len(context.calibration), buckets, config.seed)
        try:
            step.run()
        finally:
            grams.remove()
        for target in members:
            module, gram = layers[target.name], grams.gram(target.name)
            w = context.weight(target).to(gram.device, torch.float64)
            u, vt, found = adacomp(w, module.up.weight.detach(), module.down.weight.detach(), gram, config.tau)
            with torch.no_grad():
                module.up.weight.copy_(u.to(module.up.weight.dtype))
                module.down.weight.copy_(vt.to(module.down.weight.dtype))
            scale = float(((w @ gram) * w).sum()) or 1.0
            relative[target.name] = [found["loss_before"] / scale, found["loss_after"] / scale]
            skipped += found["skipped_steps"]
        del grams
    before = sum(v[0] for v in relative.values()) / max(len(relative), 1)
    after = sum(v[1] for v in relative.values()) / max(len(relative), 1)
    log.info("adaComp (tau %d): mean relative loss on compressed-model inputs %.4g -> %.4g", config.tau, before, after)
    return {"adacomp": {"tau": config.tau, "layers": len(relative), "skipped_steps": skipped,
                        "stack_of_batch": buckets, "mean_relative_loss": {"before": before, "after": after},
                        "relative_loss": {name: [round(a, 6), round(b, 6)] for name, (a, b) in relative.items()}}}


# --------------------------------------------------------------------------- adaCR

def adacr_kept(importance: dict[int, float], trr: float, gap: float) -> dict[int, float]:
    """``CR = mrr + I_n (trr - mrr)`` per block, ``I_n = I / mean(I)``, ``mrr = trr - gap``, clipped to [0, 1]."""
    mean = sum(importance.values()) / len(importance)
    mrr = trr - gap
    return {b: min(1.0, max(0.0, mrr + (i / mean if mean > 0 else 1.0) * (trr - mrr))) for b, i in importance.items()}


class AdaSVD(SVDLLMWhitening):
    name = "adasvd"
    description = "AdaSVD: SVD-LLM whitening, adaComp (alternating U/V least squares on compressed-model inputs), adaCR"
    config_class = AdaSVDConfig
    requires = ("gram", "block_importance")
    needs_calibration_data = True
    components: dict[str, str] = {}
    notes = PaperNotes(
        paper="Li, Xia, Zhang, Hui, Kong, Zhang, Yang: AdaSVD: Adaptive Singular Value Decomposition for Large "
              "Language Models, arXiv:2502.01403 (2025); no public code",
        paper_defaults="SVD-LLM whitening, then adaComp with tau = 1 at 40-60% (Table 3c), adaCR with mrr = trr - 0.1 "
                       "(Table 3d); 256 WikiText-2 calibration samples (seqlen unstated; SVD-LLM's 2048)",
        deviations=(
            CALIBRATION_DEVIATION,
            "importance I = 1 - cos(block input, block output) (ShortGPT): the paper's text says cosine, but its Fig. 4 "
            "(first block most important) fits 1 - cos",
            "the V step is V^T = U^+ W, the exact minimizer of ||(W - U V^T) X||_F for any full-rank G; the paper's "
            "Eq. 13 ((U)^+)^T W is dimensionally wrong",
            "adaComp's gram: inputs through the already compressed model (earlier blocks updated, the block's own layers "
            "compressed but not yet updated, one pass per block) - the paper does not say; on svdllm's own gram adaComp "
            "is a no-op",
            "adaCR's clipped CRs are renormalized by one common scale of the ranks (bench.water_fill) so the targets "
            "hold exactly the uniform allocation's parameters",
            "stack-of-batch (Eq. 14-15) is an option (stack_of_batch = M), off by default",
        ),
    )

    def required_statistics(self) -> tuple[str, ...]:
        return ("gram",) if self.config.allocation == "uniform" else self.requires

    def decomposition_statistics(self) -> tuple[str, ...]:
        return ("gram",)  # decompose is svdllm_w's: the factors are shared with it

    def decomposition_key(self, config) -> str:
        # the factors are svdllm_w's, which has no settings: share its factor-store entry
        return super().decomposition_key(NoConfig())

    def allocate(self, ratio, factorizations, context, config):
        if config.allocation == "uniform":
            return Allocation(uniform_ranks(context.targets, ratio))
        costs = matrix_costs(context.targets)
        budget = Budget.uniform(costs, ratio)
        blocks = {t.block: t.block_path for t in context.targets}
        importance = {b: float(context.stats.get("block_importance", path).sum()) for b, path in blocks.items()}
        kept = adacr_kept(importance, 1 - ratio, config.mrr_gap)
        weights = {t.name: kept[t.block] * costs[t.name].dense / costs[t.name].per_rank for t in context.targets}
        ranks = water_fill(weights, costs, budget)
        log.info("adasvd at ratio %.2f: kept ratio per block %s", ratio, {b: round(k, 3) for b, k in kept.items()})
        return as_allocation(ranks, costs, {"budget": budget.limit, "importance": importance, "kept_per_block": kept})

    def refine(self, model, ratio, context, config) -> dict:
        if config.tau == 0:
            return {"adacomp": "skipped (tau=0)"}
        return adacomp_pass(model, context, config)


@hookimpl
def register_methods(register):
    register(AdaSVD())
