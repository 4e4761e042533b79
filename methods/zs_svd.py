"""ZS-SVD (``zs_svd``, Abbasi et al., ICML 2026): global selection of singular components, zero-sum.

**Scores.** Whitening as ``svdllm_w`` (``S = chol(X X^T)``, its shift when
not positive definite; :class:`methods.svdllm.SVDLLMWhitening` does it):
``A = W S = U Sig V^T``. With ``G = dL/dW`` (the ``weight_grad`` statistic:
the calibration cross-entropy's gradient) and ``H = G S^-T``, component
``i`` has ``g_i = u_i^T H v_i`` - the derivative of the loss with respect to
``sigma_i`` - and removing it changes the loss by ``dL_i = -sigma_i g_i`` to
first order (authors' ``importance.py:compute_importance_for_layer_fast``).
``decompose`` computes ``dL`` for every component and keeps it as the
factorization's ``scores`` (the store cuts ``u``/``vt`` at the useful rank,
the walk needs every component).

**Selection** (``planning.py:stage_plan``, ``selection_mode = zero_sum``):
:func:`bench.zero_sum_walk`: two min-heaps by ``|dL|`` split by sign, pop
``Q+`` while the running sum ``s <= 0`` else ``Q-`` (the other when empty),
``s += dL``, push that matrix's next smallest kept component; stop once the
removed parameters reach ``int(ratio * sum m n)``. Removing components above
``r* = floor((mn - 1)/(m + n))`` saves nothing; a matrix left above ``r*``
stays dense. Rank floor ``max(1, ceil(kappa r*))``, ``kappa`` =
``keep_rank_ratio`` (authors' scripts: 0 at 20/40%, 0.3 at 60%; ``None``
applies that rule: 0.3 from ratio 0.6 on).

**Counting** (``count``): ``exact`` credits each step with what it saves
(``MatrixCost``); ``authors`` credits as the authors' code
(``ModulePruneState.effective_dense_delta_if_drop``): the dense-to-rank-``r*``
saving only on the step from ``r*`` to ``r* - 1``, so each low-rank matrix is
credited one ``(m + n)`` too few and a matrix ending at ``r*`` nothing - the
walk then removes a little more than the ratio.

Measured fidelity against the authors' code: see ``FIDELITY`` below and
``benchmarks/zs_svd_reference.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bench import Budget, PaperNotes, UsageError, as_allocation, exact_saving, hookimpl, matrix_costs, zero_sum_walk
from bench.api.configs import config_dict
from methods.svdllm import SVDLLMWhitening

COUNTS = ("exact", "authors")


@dataclass(frozen=True)
class ZSSVDConfig:
    gradient: str = "weight_grad"  # the statistic giving dL/dW (weight_grad: first window; weight_grad_all)
    keep_rank_ratio: float | None = None  # kappa; None: 0.3 from ratio 0.6 on, else 0 (the authors' scripts)
    count: str = "exact"  # "exact" or "authors" (see the module docstring)

    def __post_init__(self):
        if self.count not in COUNTS:
            raise UsageError(f"zs_svd.count={self.count!r} is unknown; use one of: {', '.join(COUNTS)}")
        if self.keep_rank_ratio is not None and not 0 <= self.keep_rank_ratio <= 1:
            raise UsageError("zs_svd.keep_rank_ratio must be in [0, 1] (or none)")


def component_gradients(factorization, gradient: torch.Tensor) -> torch.Tensor:
    """``g_i = u_i^T G S^-T v_i`` for every component: ``vt`` already holds ``V^T S^-1``, whose rows are
    ``(S^-T v_i)^T``."""
    u, vt = factorization.u.double(), factorization.vt.double()
    return ((u.T @ gradient.double()) * vt).sum(1)


def authors_saving(cost, rank: int, unit: str = "params") -> float:
    """The authors' credit for lowering a dense-born matrix from ``rank``: 0 above ``r*``, the dense-to-``r*``
    saving at ``r*``, ``m + n`` below."""
    r_star = cost.max_rank
    if rank > r_star:
        return 0.0
    if rank == r_star:
        return cost.size(None, unit) - cost.size(r_star, unit)
    return cost.rank_size(unit)


def keep_ratio(config: ZSSVDConfig, ratio: float) -> float:
    if config.keep_rank_ratio is not None:
        return config.keep_rank_ratio
    return 0.3 if ratio >= 0.6 - 1e-9 else 0.0


FIDELITY = "not measured yet"


class ZSSVD(SVDLLMWhitening):
    name = "zs_svd"
    description = "ZS-SVD: whitened SVD, components removed globally by first-order loss, zero-sum"
    config_class = ZSSVDConfig
    components = {"transform": "whitening", "update": "no"}
    notes = PaperNotes(
        paper="Abbasi, Thrash, Qin, Sharma, Seifi, Kolouri: Zero Sum SVD: Balancing Loss Sensitivity for Low Rank LLM "
              "Compression, ICML 2026 (arXiv 2602.02848; code mint-vu/Zero-Sum-SVD)",
        paper_defaults="whitening from 256 x 2048 tokens of WikiText-2 train (seed 3), cov = G/T + 1e-4 I; "
                       "gradient of the CE loss on 1 sequence x 2048 tokens; zero-sum selection in one stage; "
                       "keep_rank_ratio 0 at 20/40%, 0.3 at 60%; optional 6-stage variant with a projection "
                       "correction between stages",
        deviations=(
            "calibration from WikiText-2 validation, 32 x 512 tokens by default; the gradient from the first "
            "window (its length is --calib-seqlen: 512 by default, the authors' 2048)",
            "whitening as svdllm_w: chol(X X^T), shifted only when not positive definite, instead of the "
            "authors' G/T + 1e-4 I ridge on every gram (one whitening for the whole harness)",
            "savings counted exactly (count=exact); the authors' code credits each low-rank matrix one (m + n) "
            "too few and so removes slightly more than the ratio (count=authors reproduces it)",
            "float64 SVD and gradients (the authors': float16 model, float32 SVD, autocast on CUDA)",
            "one stage only; the multi-stage variant and its between-stage correction are not implemented",
        ),
    )

    def required_statistics(self):
        return ("gram", self.config.gradient)

    def decompose(self, target, weight, context, config):
        factorization = super().decompose(target, weight, context, config)
        gradient = context.stats.get(config.gradient, target.name)
        factorization.scores = -factorization.s.double() * component_gradients(factorization, gradient)
        return factorization

    def decomposition_key(self, config):
        return f"{type(self).__module__}.{type(self).__qualname__} {config_dict(config)['gradient']}"

    def allocate(self, ratio, factorizations, context, config):
        costs = matrix_costs(context.targets)
        deltas = {}
        for target in context.targets:
            scores = factorizations[target.name].scores
            if scores is None:
                raise UsageError(f"zs_svd: the factorization of {target.name} has no scores (dL per component)")
            deltas[target.name] = scores.double().tolist()
        total = sum(cost.dense for cost in costs.values())
        kappa = keep_ratio(config, ratio)
        floors = {name: max(1, math.ceil(kappa * cost.max_rank)) for name, cost in costs.items()}
        saving = exact_saving if config.count == "exact" else authors_saving
        ranks, facts = zero_sum_walk(deltas, costs, Budget(total - int(ratio * total)), floors, saving=saving)
        return as_allocation(ranks, costs, {**facts, "keep_rank_ratio": kappa, "count": config.count})


@hookimpl
def register_methods(register):
    register(ZSSVD())
