"""SVD-LLM V2 and DipSVD: whitening, allocation and end-to-end runs, on small random data."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from bench import (
    Allocation,
    CalibrationStats,
    Context,
    Factorization,
    Target,
    cholesky_whitening,
    factorize,
    load_results,
    rank_for_ratio,
)
from bench.engine.calibration import StatisticsStore, collect_statistics
from bench.engine.config import CalibrationConfig, RunConfig
from bench.engine.executor import run
from bench.engine.plugins import load_registry
from bench.model.targets import find_targets
from methods.dipsvd import DipSVD, DipSVDConfig, effective_rank, layer_kept_fractions, protection
from methods.svdllm_v2 import SVDLLMV2, SVDLLMV2Config


def context_for(targets: list[Target], stats: dict[str, dict[str, torch.Tensor]] | None = None, model=None) -> Context:
    return Context(model=model, tokenizer=None, targets=targets,
                   stats=CalibrationStats(stats or {}, {}), calibration=None, device="cpu",
                   cache_dir=Path("."), model_identity="test")


def ranks_of(result) -> dict[str, int]:
    """The ranks of what ``allocate`` returned: a dictionary, or an :class:`Allocation` with facts."""
    return result.ranks if isinstance(result, Allocation) else result


def reconstruction(f, rank: int) -> torch.Tensor:
    w_u, w_v = f.factors(rank, dtype=torch.float64)
    return w_u @ w_v


def channel_data(n: int, tokens: int, seed: int, spread: float = 1.0) -> torch.Tensor:
    """``n x tokens`` correlated inputs whose channel scales differ by ``exp(+-spread)``."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    scales = torch.exp(spread * torch.randn(n, generator=g, dtype=torch.float64))
    return scales[:, None] * (mix @ torch.randn(n, tokens, generator=g, dtype=torch.float64))


# --------------------------------------------------------------------------- SVD-LLM V2: two-round truncation

def v2_factorization(weight: torch.Tensor, gram: torch.Tensor, **options):
    target = Target("layer", 0, "mlp.up_proj", weight.shape[0], weight.shape[1], False)
    method = SVDLLMV2()
    return method.decompose(target, weight, context_for([target], {"gram": {"layer": gram}}), method.make_config(options))


@pytest.mark.parametrize("delta, tolerance", [("0", 1e-9), ("1e-6", 1e-5)])
def test_v2_equals_cholesky_whitening_on_a_positive_definite_gram(delta, tolerance):
    torch.manual_seed(0)
    w = torch.randn(48, 64, dtype=torch.float64)
    x = channel_data(64, 512, seed=1, spread=0.5)
    gram = x @ x.T
    assert float(torch.linalg.eigvalsh(gram).min()) > 0
    cholesky = factorize(w, cholesky_whitening(gram)[0])
    v2 = v2_factorization(w, gram, delta=delta)
    for rank in (4, 16, 40):
        expected, got = reconstruction(cholesky, rank), reconstruction(v2, rank)
        assert float((got - expected).norm() / expected.norm()) < tolerance
        # and the theorem's output error is the same
        assert abs(float(((w - got) @ x).norm()) / float(((w - expected) @ x).norm()) - 1) < tolerance


@pytest.mark.parametrize("delta", ["0", "1e-6", "0.01"])
def test_v2_singular_gram_gives_finite_factors_of_the_right_rank(delta):
    torch.manual_seed(0)
    w = torch.randn(48, 64, dtype=torch.float64)
    x = channel_data(64, 20, seed=2)  # 20 tokens < 64 channels: rank-20 gram
    x[5] = 0  # and a dead channel
    gram = x @ x.T
    assert int(torch.linalg.matrix_rank(gram)) <= 20
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(gram)
    f = v2_factorization(w, gram, delta=delta)
    for rank in (5, 12, 30):
        w_u, w_v = f.factors(rank, dtype=torch.float64)
        assert w_u.shape == (48, rank) and w_v.shape == (rank, 64)
        assert torch.isfinite(w_u).all() and torch.isfinite(w_v).all()
        assert int(torch.linalg.matrix_rank(w_u @ w_v)) == rank
    # directions the data never visited are kept, not zeroed: full rank gives back W
    assert float((reconstruction(f, 48) - w).norm() / w.norm()) < 1e-6
    # and below the data's rank it is data-aware: less output error than vanilla SVD
    vanilla = factorize(w)
    assert float(((w - reconstruction(f, 10)) @ x).norm()) < float(((w - reconstruction(vanilla, 10)) @ x).norm())


# --------------------------------------------------------------------------- SVD-LLM V2: allocation

def spectrum_matrix(m: int, n: int, decay: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    k = min(m, n)
    s = torch.exp(-decay * torch.arange(k, dtype=torch.float64) / k)
    return u[:, :k] @ torch.diag(s) @ v[:, :k].T


def heterogeneous_group(scale: float = 1.0):
    """Two kinds over six blocks whose spectra decay at very different speeds (``scale`` multiplies the weights)."""
    targets, factorizations = [], {}
    decays = [0.5, 8.0, 2.0, 12.0, 1.0, 4.0]
    for block, decay in enumerate(decays):
        for kind, (m, n) in (("self_attn.q_proj", (48, 48)), ("mlp.down_proj", (48, 96))):
            t = Target(f"model.layers.{block}.{kind}", block, kind, m, n, False)
            targets.append(t)
            weight = scale * spectrum_matrix(m, n, decay * (1.5 if "mlp" in kind else 1), seed=block)
            factorizations[t.name] = factorize(weight)
    return targets, factorizations


def group_budgets(targets: list[Target], ranks: dict[str, int], ratio: float) -> dict[str, tuple[int, int, int]]:
    """Per kind: (uniform budget, parameters the ranks keep, one rank step)."""
    out = {}
    for kind in {t.kind for t in targets}:
        group = [t for t in targets if t.kind == kind]
        step = group[0].out_features + group[0].in_features
        budget = sum(rank_for_ratio(t.out_features, t.in_features, ratio) * step for t in group)
        out[kind] = (budget, sum(ranks[t.name] * step for t in group), step)
    return out


@pytest.mark.parametrize("rule", ["paper", "power", "greedy", "uniform"])
@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_every_v2_rule_keeps_each_group_budget_exactly(rule, ratio):
    targets, factorizations = heterogeneous_group(scale=1e4)  # raw losses > 1: the paper's formula is defined
    method = SVDLLMV2()
    allocation = method.allocate(ratio, factorizations, context_for(targets), method.make_config({"allocation": rule}))
    for kind, (budget, used, step) in group_budgets(targets, allocation.ranks, ratio).items():
        assert used == budget, (kind, budget, used, step)  # one shape per group: the budget is met exactly
    # the facts put every rule side by side at equal parameters
    rules = allocation.facts["rules"]
    assert allocation.facts["rule"] == rule and set(rules) == {"paper", "power", "greedy", "uniform"}
    assert len({summary["params"] for summary in rules.values()}) == 1
    assert rules["uniform"]["summed_normalized_loss"] == pytest.approx(
        sum(factorizations[t.name].normalized_loss(rank_for_ratio(t.out_features, t.in_features, ratio))
            for t in targets))


def hand_made(losses: list[float], n: int = 64, ratio: float = 0.4) -> tuple[list[Target], dict]:
    """Square ``n x n`` matrices whose raw truncation loss at the uniform rank is exactly ``losses[i]``."""
    r0 = rank_for_ratio(n, n, ratio)
    targets, factorizations = [], {}
    for block, loss in enumerate(losses):
        tail = torch.full((n - r0,), math.sqrt(loss / (n - r0)), dtype=torch.float64)
        head = torch.linspace(2, 1, r0, dtype=torch.float64) * max(float(tail[0]), 1.0) * 10
        t = Target(f"model.layers.{block}.mlp.up_proj", block, "mlp.up_proj", n, n, False)
        targets.append(t)
        eye = torch.eye(n, dtype=torch.float64)
        factorizations[t.name] = Factorization(u=eye, s=torch.cat([head, tail]), vt=eye)
    return targets, factorizations


def test_v2_paper_rule_gives_the_formulas_ratios():
    """ratio_i = Len(G) * R * Lt_i / Sum(Lt), Lt = 1 / log(L_min), on spectra with known raw losses."""
    ratio, n = 0.4, 64
    losses = [math.e ** 2, math.e ** 4, math.e ** 8, math.e ** 16]
    targets, factorizations = hand_made(losses, n, ratio)
    assert [factorizations[t.name].truncation_loss(rank_for_ratio(n, n, ratio)) for t in targets] == \
        pytest.approx(losses)
    method = SVDLLMV2()
    ranks = method.allocate(ratio, factorizations, context_for(targets), method.make_config()).ranks
    lt = [1 / math.log(loss) for loss in losses]  # 1/2, 1/4, 1/8, 1/16
    # R: the ratio the uniform integer rank really removes (the budget kept is that of the uniform ranks)
    removed = 1 - rank_for_ratio(n, n, ratio) * 2 * n / (n * n)
    formula = [len(lt) * removed * w / sum(lt) for w in lt]
    achieved = [1 - ranks[t.name] * 2 * n / (n * n) for t in targets]
    step = 2 * n / (n * n)  # one rank, as a fraction of the matrix
    assert all(abs(a - f) <= step for a, f in zip(achieved, formula)), (achieved, formula)
    # monotone the right way: a matrix that loses more at the uniform rank keeps more
    assert [ranks[t.name] for t in targets] == sorted(ranks[t.name] for t in targets)
    assert ranks[targets[0].name] < ranks[targets[-1].name]


def test_v2_paper_rule_outside_its_domain_keeps_the_uniform_rank():
    """L_min <= 1 makes 1/log(L_min) infinite or negative: those matrices keep r0, the others share the rest."""
    ratio, n = 0.4, 64
    r0 = rank_for_ratio(n, n, ratio)
    targets, factorizations = hand_made([0.5, 1.0, math.e ** 3, math.e ** 9], n, ratio)
    method = SVDLLMV2()
    allocation = method.allocate(ratio, factorizations, context_for(targets), method.make_config())
    ranks = allocation.ranks
    assert allocation.facts["undefined"] == [targets[0].name, targets[1].name]
    assert ranks[targets[0].name] == ranks[targets[1].name] == r0
    assert ranks[targets[2].name] < r0 < ranks[targets[3].name]  # the formula among the defined two
    assert sum(ranks.values()) == 4 * r0
    # none defined: uniform
    targets, factorizations = hand_made([0.1, 0.2, 0.3], n, ratio)
    allocation = method.allocate(ratio, factorizations, context_for(targets), method.make_config())
    assert set(allocation.ranks.values()) == {r0} and len(allocation.facts["undefined"]) == 3


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_v2_power_rule_is_monotone_and_never_worse_than_uniform_on_its_criterion(ratio):
    targets, factorizations = heterogeneous_group()
    method = SVDLLMV2()
    allocation = method.allocate(ratio, factorizations, context_for(targets),
                                 method.make_config({"allocation": "power"}))
    ranks = allocation.ranks
    assert set(allocation.facts["loss_exponents"]) == {t.kind for t in targets}  # recorded with the compression
    total, uniform_total = 0.0, 0.0
    for kind in {t.kind for t in targets}:
        group = [t for t in targets if t.kind == kind]
        uniform = {t.name: rank_for_ratio(t.out_features, t.in_features, ratio) for t in group}
        loss = sum(factorizations[t.name].normalized_loss(ranks[t.name]) for t in group)
        uniform_loss = sum(factorizations[t.name].normalized_loss(uniform[t.name]) for t in group)
        assert loss <= uniform_loss + 1e-12  # never worse than uniform within a group
        total, uniform_total = total + loss, uniform_total + uniform_loss
        # monotone: a matrix that loses less at the uniform rank never keeps more rank
        at_uniform = {t.name: factorizations[t.name].normalized_loss(uniform[t.name]) for t in group}
        for a in group:
            for b in group:
                if at_uniform[a.name] < at_uniform[b.name]:
                    assert ranks[a.name] <= ranks[b.name]
    assert total < 0.995 * uniform_total  # and strictly better over the model
    assert len(set(ranks.values())) > len({t.kind for t in targets})  # heterogeneous


def test_v2_greedy_and_uniform_options():
    targets, factorizations = heterogeneous_group()
    method = SVDLLMV2()
    context = context_for(targets)
    ratio = 0.4
    uniform = {t.name: rank_for_ratio(t.out_features, t.in_features, ratio) for t in targets}
    # the linear form of the power rule (t = 1) alone still keeps every group's budget
    linear = method.allocate(ratio, factorizations, context,
                             method.make_config({"allocation": "power", "loss_exponents": "1"})).ranks
    assert all(budget == used for budget, used, _ in group_budgets(targets, linear, ratio).values())
    # greedy keeps every group's budget and removes less normalized energy than uniform
    greedy = method.allocate(ratio, factorizations, context, method.make_config({"allocation": "greedy"})).ranks
    assert all(budget == used for budget, used, _ in group_budgets(targets, greedy, ratio).values())
    energy = lambda r: sum(factorizations[n].normalized_loss(r[n]) ** 2 for n in r)  # noqa: E731
    assert energy(greedy) < energy(uniform) * 0.99
    assert method.allocate(ratio, factorizations, context, method.make_config({"allocation": "uniform"})).ranks == uniform


# --------------------------------------------------------------------------- DipSVD: channel protection

def test_dipsvd_protection_lowers_the_protected_channels_error():
    torch.manual_seed(0)
    m, n, rank = 32, 100, 8
    w = torch.randn(m, n, dtype=torch.float64)
    x = channel_data(n, 600, seed=3, spread=1.0)
    gram = x @ x.T
    target = Target("layer", 0, "mlp.up_proj", m, n, False)
    method = DipSVD()
    config = method.make_config()
    dip = method.decompose(target, w.float(), context_for([target], {"gram": {"layer": gram}}), config)
    plain = factorize(w.float(), cholesky_whitening(gram)[0])
    d = protection(gram, config.protect_fraction, config.protect_scale)
    protected = torch.nonzero(d > 1).flatten()
    assert protected.numel() == math.ceil(0.03 * n)
    # the protected channels are the ones with the largest gram columns
    assert set(protected.tolist()) == set(torch.topk(gram.norm(dim=0), protected.numel()).indices.tolist())
    w32 = w.float().double()
    err_dip, err_plain = w32 - reconstruction(dip, rank), w32 - reconstruction(plain, rank)
    # the error on protected inputs: what channel j contributes to the output error, for j in P
    on_protected = lambda e: float((e[:, protected] @ x[protected]).norm())  # noqa: E731
    assert on_protected(err_dip) < 0.5 * on_protected(err_plain)
    # the error on the protection-weighted inputs D X is what DipSVD minimizes
    assert float((err_dip @ (d[:, None] * x)).norm()) < 0.9 * float((err_plain @ (d[:, None] * x)).norm())
    # plain whitening stays optimal for the unweighted error (the price of protection)
    assert float((err_plain @ x).norm()) <= float((err_dip @ x).norm()) * (1 + 1e-9)
    # the factors reconstruct the original W (not W D^-1) at full rank
    assert float((reconstruction(dip, m) - w32).norm() / w32.norm()) < 1e-8


def test_folding_d_back_would_be_plain_whitening():
    """Why dipsvd whitens W with chol(D G D) itself: chol(D G D) = D chol(G)."""
    x = channel_data(40, 200, seed=4)
    gram = x @ x.T
    d = protection(gram, 0.1, 30.0)
    assert torch.allclose(torch.linalg.cholesky(d[:, None] * gram * d[None, :]), d[:, None] * torch.linalg.cholesky(gram))


# --------------------------------------------------------------------------- DipSVD: layer-wise ratios

def test_layer_kept_fractions_clip_budget_and_order():
    scores = {0: 1.0, 1: 5.0, 2: 2.0, 3: 9.0, 4: 3.0}
    params = {block: 1000 for block in scores}
    for target in (0.4, 0.6, 0.8, 0.95):
        kept = layer_kept_fractions(scores, params, target, spread=0.25, low=0.3, high=0.98)
        assert all(0.3 - 1e-12 <= f <= 0.98 + 1e-12 for f in kept.values())
        assert sum(kept.values()) / len(kept) == pytest.approx(target, abs=1e-9)
        order = sorted(scores, key=scores.get)
        assert [kept[b] for b in order] == sorted(kept[b] for b in order)  # higher score keeps more
    # spread around the target when nothing is clipped: +-0.25
    kept = layer_kept_fractions(scores, params, 0.6, spread=0.25, low=0.3, high=0.98)
    assert max(kept.values()) - min(kept.values()) == pytest.approx(0.5)
    # a target outside the clip range widens it: every block gets the target
    kept = layer_kept_fractions(scores, params, 0.2, spread=0.25, low=0.3, high=0.98)
    assert all(f == pytest.approx(0.2) for f in kept.values())


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_dipsvd_allocation_meets_the_budget_within_the_clip(ratio):
    model = tiny_model("llama", layers=4)
    targets = find_targets(model)
    registry = load_registry()
    batches = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    stats = collect_statistics(model, "tiny-dipsvd", targets, batches, CalibrationConfig(samples=4, seqlen=32),
                               [registry.get("statistic", name) for name in DipSVD.requires])
    context = Context(model=model, tokenizer=None, targets=targets, stats=stats, calibration=None, device="cpu",
                      cache_dir=Path("."), model_identity="tiny-dipsvd")
    method = DipSVD()
    config = method.make_config()
    ranks = ranks_of(method.allocate(ratio, {}, context, config))
    step = sum(t.out_features + t.in_features for t in targets)
    budget = sum(t.out_features * t.in_features * (1 - ratio) for t in targets)
    used = sum(ranks[t.name] * (t.out_features + t.in_features) for t in targets)
    assert 0 <= budget - used < step
    for t in targets:
        kept = ranks[t.name] * (t.out_features + t.in_features) / (t.out_features * t.in_features)
        one_step = (t.out_features + t.in_features) / (t.out_features * t.in_features)
        assert config.min_kept - one_step <= kept <= config.max_kept
    per_block = {t.block: ranks[t.name] for t in targets if t.kind == "self_attn.q_proj"}
    assert len(set(per_block.values())) > 1  # layer-wise, not uniform
    assert all(s > 0 and math.isfinite(s) for s in method.layer_scores(context, config).values())


def test_dipsvd_compressibility_is_the_effective_rank_of_the_hidden_states_entering_each_block(tmp_path):
    """The paper's U_l: effective rank of block l's input hidden states (not of the attention input after the norm)."""
    model = tiny_model("llama", layers=3)
    targets = find_targets(model)
    batches = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(1))
    registry = load_registry()
    stats = collect_statistics(model, "tiny-hidden", targets, batches, CalibrationConfig(samples=3, seqlen=40),
                               [registry.get("statistic", name) for name in DipSVD.requires],
                               cache=StatisticsStore(tmp_path))
    # the block statistic, gathered here by hand from the blocks' inputs
    seen: dict[int, torch.Tensor] = {}
    hooks = [block.register_forward_pre_hook(
        lambda _m, args, kwargs, i=i: seen.__setitem__(i, seen.get(i, 0) + torch.einsum(
            "btn,btm->nm", *(2 * [(args[0] if args else kwargs["hidden_states"]).double()]))), with_kwargs=True)
        for i, block in enumerate(model.model.layers)]
    with torch.no_grad():
        for batch in batches:
            model(batch[None], use_cache=False)
    for hook in hooks:
        hook.remove()
    assert set(stats.values["hidden_gram"]) == {f"model.layers.{i}" for i in range(3)}
    for i in range(3):
        assert torch.allclose(stats.get("hidden_gram", f"model.layers.{i}"), seen[i], rtol=1e-10)
    context = Context(model=model, tokenizer=None, targets=targets, stats=stats, calibration=None, device="cpu",
                      cache_dir=Path("."), model_identity="tiny-hidden")
    config = DipSVD().make_config()
    scores = DipSVD().layer_scores(context, config)
    for i in range(3):
        importance = sum(float(stats.get("grad_norm", t.name).sum()) / float(context.weight(t).double().norm())
                         for t in targets if t.block == i)
        rank = effective_rank(seen[i], config.energy)
        assert scores[i] == pytest.approx(importance ** 0.3 * rank ** 0.7)


# --------------------------------------------------------------------------- end to end

def test_both_run_end_to_end_in_one_run_with_finite_perplexity(tiny, tmp_path):
    """One run, V2 first: dipsvd then needs only grad_norm, yet must still see gram's shared q/k/v inputs."""
    names = ["svdllm_v2", "dipsvd"]
    config = RunConfig(model="tiny", methods=tuple(names), ratios=(0.4,), tasks=("wikitext2",), limit=1, seqlen=64,
                       calibration=CalibrationConfig(samples=4, seqlen=64), out=str(tmp_path))
    run(config, loaded=tiny)
    data = load_results(tmp_path)
    assert not data["failures"], data["failures"]
    rows = {(r["method"], r["ratio"]): r for r in data["records"]}
    assert set(rows) == {("dense", 0.0)} | {(name, 0.4) for name in names}
    for name in names:
        row = rows[(name, 0.4)]
        assert math.isfinite(row["value"])
        assert row["params"] < rows[("dense", 0.0)]["params"]
        assert data["manifest"]["method_configs"][name] == row["config"]
        summary = data["compressions"][row["compression"]]["summary"]
        assert summary["target_ratio_achieved"] == pytest.approx(0.4, abs=0.03)


def test_configs_reject_bad_options():
    from bench.errors import UsageError

    with pytest.raises(UsageError):
        SVDLLMV2().make_config({"allocation": "best"})
    with pytest.raises(UsageError):
        SVDLLMV2().make_config({"loss_exponents": "a,b"})
    with pytest.raises(UsageError):
        DipSVD().make_config({"min_kept": "0.99"})
    assert SVDLLMV2().make_config({"delta": "0.01"}) == SVDLLMV2Config(delta=0.01)
    assert DipSVD().make_config({"protect_scale": "10"}) == DipSVDConfig(protect_scale=10.0)
