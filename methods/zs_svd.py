"""ZS-SVD (``zs_svd``, Abbasi et al., ICML 2026): global selection of singular components, zero-sum.

**Scores.** Whitening as the authors' (``S = chol(G + ridge T I)``,
``ridge = 1e-4``, ``T`` calibration tokens, through svdllm's
``cholesky_whitening``; ``ridge = 0`` is exactly ``svdllm_w``'s):
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

from bench import (
    Budget,
    LowRankLinear,
    PaperNotes,
    UsageError,
    as_allocation,
    cholesky_whitening,
    config_dict,
    exact_saving,
    factorize,
    hookimpl,
    matrix_costs,
    zero_sum_walk,
)
from methods.svdllm import SVDLLMWhitening

COUNTS = ("exact", "authors")


@dataclass(frozen=True)
class ZSSVDConfig:
    gradient: str = "weight_grad"  # the statistic giving dL/dW (weight_grad: first window; weight_grad_all)
    keep_rank_ratio: float | None = None  # kappa; None: 0.3 from ratio 0.6 on, else 0 (the authors' scripts)
    count: str = "exact"  # "exact" or "authors" (see the module docstring)
    ridge: float = 1e-4  # whiten chol(G + ridge * T * I), T = calibration tokens: the authors' chol(G/T + 1e-4 I)
    correction: bool = False  # the projection correction after truncation, then re-truncation (see refine)
    correction_seqlen: int = 1024  # tokens of the first calibration window its gradient uses (authors': 1024)

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


def corrected(weight: torch.Tensor, truncated: torch.Tensor, gradient: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``W_r + <g, W - W_r>/<g, g> g``: the truncation error's component along the gradient put back
    (authors' ``corrections.py:run_pull_subspace_between_stages`` with one gradient, its ``eps = 1e-6``)."""
    g = gradient.double()
    c = float((g * (weight.double() - truncated.double())).sum() / ((g * g).sum() + 1e-6))
    return truncated.double() + c * g, c


def truncated_gradients(model, layers: dict, window: torch.Tensor) -> dict[str, torch.Tensor]:
    """``dL/dW_r`` of every low-rank layer at its truncated weight ``W_r = W_u W_v`` (sum over tokens of
    ``dy x^T``, float64), from one window's LM loss."""
    inputs, grads, handles = {}, {}, []
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)

    def hook(name):
        def forward(_module, args, output):
            inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            output.register_hook(lambda g: grads.__setitem__(name, g.reshape(-1, g.shape[-1]).double()))
        return forward

    try:
        for name, layer in layers.items():
            layer.up.weight.requires_grad_(True)  # so that the outputs carry a graph
            handles.append(layer.register_forward_hook(hook(name)))
        with torch.enable_grad():
            model(window[None], labels=window[None], use_cache=False).loss.backward()
    finally:
        for h in handles:
            h.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
            p.grad = None
    return {name: grads[name].T @ inputs[name] for name in layers if name in grads}


# Measured 2026-12-03 on SmolLM2-135M, WikiText-2 perplexity (svdbench, --limit 8 --seqlen 2048; dense 19.13):
#   svdbench:  svdbench --plugins-dir DIR run --model smollm2-135m --methods zs_svd --ratios 0.2,0.4
#              --tasks wikitext2 --limit 8 --seqlen 2048 --calib-samples 32 --calib-seqlen 512
#              [--method-option zs_svd.ridge=0 | zs_svd.count=authors]
#   authors:   python benchmarks/zs_svd_reference.py --ratios 0.2,0.4 --out REF, then
#              svdbench run --model REF/r20 (REF/r40) --methods none --tasks wikitext2 --limit 8 --seqlen 2048
#   ratio  authors' code  ridge=1e-4 (default)  ridge=0 (svdllm_w whitening)  ridge=0, count=authors
#   20%    35.25          35.05 (-0.57%)        149.52 (+324%)                138.4
#   40%    479.0          488.5 (+1.98%)          458.14 (-4.4%)                463.1
# Without the ridge the ranks already agree closely (20%: 173 of 210 matrices the same rank, 201 agree on dense;
# 40%: 164 and 206): the gap was the whitening. chol(G) with 32 x 512 tokens nearly drops W on input directions
# the calibration barely visits; the authors' 1e-4 ridge on G/T keeps them, hence the default ridge = 1e-4.
# At 40% the remaining +1.98% is the counting: with ridge = 1e-4 and count=authors svdbench gives 479.0, equal
# to the authors' code (their walk removes 0.4025 of the target parameters; count=exact removes 0.40). The
# default stays count=exact: it meets the ratio as every other method does, at a stated 2% cost here.
FIDELITY = ("SmolLM2-135M, wikitext2 --limit 8 --seqlen 2048, vs the authors' code: 35.05 vs 35.25 at 20% "
            "(-0.57%), 488.5 vs 479.0 at 40% (+1.98%; 479.0 with count=authors) with the authors' ridge (default); without it "
            "149.52 / 458.14")


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
            "whitening: the authors' ridge as chol(G + 1e-4 T I) (= chol(G/T + 1e-4 I) up to a scale no dL sees); "
            "ridge=0 gives svdllm_w's chol(G) (shifted only when not positive definite), 4x worse at 20% here",
            "savings counted exactly (count=exact); the authors' code credits each low-rank matrix one (m + n) "
            "too few and so removes slightly more than the ratio (count=authors reproduces it)",
            "float64 SVD and gradients (the authors': float16 model, float32 SVD, autocast on CUDA)",
            "fidelity: " + FIDELITY,
            "one stage only (the authors' 6-stage variant recomputes scores per stage); its between-stage "
            "projection correction is offered once, after truncation (correction=true, off by default as in the "
            "one-shot script), with the first calibration window instead of a random one",
        ),
    )

    def required_statistics(self):
        return ("gram", self.config.gradient)

    def decompose(self, target, weight, context, config):
        if config.ridge > 0:  # the authors' chol(G/T + ridge I), scaled by T (S's scale changes no dL)
            gram = context.stats.get("gram", target.name).double().clone()
            gram.diagonal().add_(config.ridge * context.calibration.numel())
            factorization = factorize(weight, cholesky_whitening(gram)[0])
        else:
            factorization = super().decompose(target, weight, context, config)
        gradient = context.stats.get(config.gradient, target.name)
        factorization.scores = -factorization.s.double() * component_gradients(factorization, gradient)
        return factorization

    def decomposition_key(self, config):
        found = config_dict(config)
        return f"{type(self).__module__}.{type(self).__qualname__} {found['gradient']} {found['ridge']}"

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

    def refine(self, model, ratio, context, config):
        """With ``correction``: ``W <- W_r + <g, W - W_r>/<g,g> g`` with ``g = dL/dW`` at the truncated model
        (first calibration window, ``correction_seqlen`` tokens), then re-truncated to the same rank by the
        same whitened SVD. The authors run it between the stages of their 6-stage variant; here once."""
        if not config.correction:
            return {}
        layers = {t.name: model.get_submodule(t.name) for t in context.targets
                  if isinstance(model.get_submodule(t.name), LowRankLinear)}
        window = context.calibration[0, :config.correction_seqlen]
        grads = truncated_gradients(model, layers, window)
        steps = []
        for target in context.targets:
            if target.name not in grads:
                continue
            layer = layers[target.name]
            w_r = layer.up.weight.detach().double() @ layer.down.weight.detach().double()
            fixed, c = corrected(context.weight(target), w_r, grads[target.name])
            transform, _ = cholesky_whitening(context.stats.get("gram", target.name))
            w_u, w_v = factorize(fixed, transform).factors(layer.rank, layer.up.weight.dtype)
            with torch.no_grad():
                layer.up.weight.copy_(w_u)
                layer.down.weight.copy_(w_v)
            steps.append(abs(c))
        return {"corrected": len(steps), "mean_abs_step": sum(steps) / max(1, len(steps))}


@hookimpl
def register_methods(register):
    register(ZSSVD())
