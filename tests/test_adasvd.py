"""AdaSVD: adaComp's least squares, the compressed-model pass, adaCR's budget and the block-importance statistic."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from bench import Budget, Context, cholesky_whitening, factorize, load_results, matrix_costs
from bench.cli import main
from bench.engine.blocks import stream_blocks
from bench.engine.calibration import StatisticsStore, collect_statistics
from bench.engine.compress import build_compressed
from bench.engine.config import CalibrationConfig
from bench.engine.plugins import load_registry
from bench.model.layers import LowRankLinear
from bench.model.targets import decoder_blocks, find_targets, footprint
from methods.adasvd import AdaSVD, adacomp, adacr_kept, update_u, update_v, weighted_loss
from methods.svdllm import SVDLLMWhitening


def problem(m: int, n: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight and two different correlated input sets (the original and a shifted one), float64."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    x = mix @ torch.randn(n, tokens, generator=g, dtype=torch.float64)
    shifted = x + 0.5 * torch.randn(n, n, generator=g, dtype=torch.float64) @ torch.randn(n, tokens, generator=g,
                                                                                         dtype=torch.float64)
    return w, x, shifted


def svdllm_factors(w: torch.Tensor, x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    return factorize(w, cholesky_whitening(x @ x.T)[0]).factors(rank, dtype=torch.float64)


# --------------------------------------------------------------------------- adaComp's math

def test_gram_form_of_the_updates_equals_the_explicit_x_form():
    w, x, _ = problem(12, 9, 40, seed=0)
    _, vt = svdllm_factors(w, x, 4)
    # paper Eq. 10: U = (A^+ B)^T, A = X^T V, B = (W X)^T
    u_x = (torch.linalg.pinv(x.T @ vt.T) @ (w @ x).T).T
    u_gram = update_u(w, vt, x @ x.T)
    assert torch.allclose(u_gram, u_x, atol=1e-9, rtol=1e-9)
    # the V step: argmin ||W X - U V^T X|| = U^+ (W X) X^+, which is U^+ W for X of full row rank
    vt_x = torch.linalg.pinv(u_gram) @ (w @ x) @ torch.linalg.pinv(x)
    assert torch.allclose(update_v(w, u_gram), vt_x, atol=1e-9, rtol=1e-9)
    assert weighted_loss(w, u_gram, vt, x @ x.T) == pytest.approx(float(((w - u_gram @ vt) @ x).pow(2).sum()), rel=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_each_half_step_does_not_increase_the_loss_on_its_statistic(seed):
    w, x, shifted = problem(16, 12, 60, seed)
    gram = shifted @ shifted.T  # not the gram svdllm whitened with: the steps have work to do
    u, vt = svdllm_factors(w, x, 5)
    start = weighted_loss(w, u, vt, gram)
    u1 = update_u(w, vt, gram)
    after_u = weighted_loss(w, u1, vt, gram)
    after_v = weighted_loss(w, u1, update_v(w, u1), gram)
    assert after_u <= start * (1 + 1e-12) and after_v <= after_u * (1 + 1e-12)
    assert after_v < start * (1 - 1e-3)  # it does improve on a different statistic
    # and the optimum of the new statistic (svdllm on it) is not beaten
    best = weighted_loss(w, *svdllm_factors(w, shifted, 5), gram)
    assert best <= after_v * (1 + 1e-9)
    _, _, facts = adacomp(w, u, vt, gram, tau=3)
    assert best * (1 - 1e-9) <= facts["loss_after"] <= after_v * (1 + 1e-12) and facts["skipped_steps"] == 0


def test_svdllm_factors_are_a_fixed_point_on_their_own_gram():
    w, x, _ = problem(14, 10, 50, seed=5)
    u, vt = svdllm_factors(w, x, 4)
    new_u, new_vt, facts = adacomp(w, u, vt, x @ x.T, tau=2)
    assert torch.allclose(new_u, u, atol=1e-8, rtol=1e-8) and torch.allclose(new_vt, vt, atol=1e-8, rtol=1e-8)
    assert facts["loss_after"] == pytest.approx(facts["loss_before"], rel=1e-9)


# --------------------------------------------------------------------------- the block-importance statistic

def reference_importance(model, windows) -> list[float]:
    """Mean over tokens of 1 - cos(block input, block output), from hooks on a whole-model forward."""
    _, blocks = decoder_blocks(model)
    sums, counts = [0.0] * len(blocks), [0] * len(blocks)

    def hook(i):
        def observe(_module, args, kwargs, output):
            x = (args[0] if args else kwargs["hidden_states"]).double().reshape(-1, 64)
            y = (output[0] if isinstance(output, tuple) else output).double().reshape(-1, 64)
            sums[i] += float((1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).sum())
            counts[i] += x.shape[0]
        return observe

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    with torch.no_grad():
        for window in windows:
            model(window[None], use_cache=False)
    for h in handles:
        h.remove()
    return [s / c for s, c in zip(sums, counts)]


def tiny_stats(model, tmp_path, names=("gram", "block_importance"), samples=4, seqlen=32):
    targets = find_targets(model)
    windows = torch.randint(0, 256, (samples, seqlen), generator=torch.Generator().manual_seed(0))
    registry = load_registry()
    stats = collect_statistics(model, "tiny-adasvd", targets, windows, CalibrationConfig(samples=samples, seqlen=seqlen),
                               [registry.get("statistic", n) for n in names], cache=StatisticsStore(tmp_path / "stats"))
    return targets, windows, stats


def test_block_importance_is_the_mean_one_minus_cosine_of_each_block(tmp_path):
    model = tiny_model("llama", layers=3)
    targets, windows, stats = tiny_stats(model, tmp_path)
    expected = reference_importance(model, windows)
    got = [float(stats.get("block_importance", f"model.layers.{i}")) for i in range(3)]
    assert stats.values["block_importance"]["model.layers.0"].dtype == torch.float64
    assert got == pytest.approx(expected, rel=1e-6)
    assert all(0 < v < 2 for v in got)


# --------------------------------------------------------------------------- adaCR

def test_adacr_kept_ratios_average_the_target_and_follow_importance():
    importance = {0: 0.9, 1: 0.2, 2: 0.3, 3: 0.6}
    kept = adacr_kept(importance, 0.6, 0.1)
    assert sum(kept.values()) / 4 == pytest.approx(0.6)
    assert kept[0] > kept[3] > kept[2] > kept[1] and kept[1] >= 0.5
    assert max(adacr_kept({0: 10.0, 1: 0.1, 2: 0.1}, 0.9, 0.1).values()) == 1.0  # clipped (unclipped: 1.09)


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_adacr_meets_the_parameter_budget_exactly(ratio, tmp_path):
    model = tiny_model("llama", layers=4)
    targets, windows, stats = tiny_stats(model, tmp_path)
    context = Context(model=model, tokenizer=None, targets=targets, stats=stats, calibration=windows, device="cpu",
                      cache_dir=Path("."), model_identity="tiny-adasvd")
    method = AdaSVD()
    allocation = method.allocate(ratio, {}, context, method.make_config())
    costs = matrix_costs(targets)
    budget = Budget.uniform(costs, ratio)
    spent = budget.spent(allocation.ranks, costs)
    assert spent <= budget.limit and budget.limit - spent < min(c.per_rank for c in costs.values())
    assert allocation.facts["params"] == spent
    per_block = {t.block: allocation.ranks[t.name] for t in targets if t.kind == "self_attn.q_proj"}
    importance = allocation.facts["importance"]
    assert len(set(per_block.values())) > 1
    most, least = max(importance, key=importance.get), min(importance, key=importance.get)
    assert per_block[most] > per_block[least]


# --------------------------------------------------------------------------- the pass over the compressed model

def test_block_pass_gives_each_block_the_inputs_of_the_model_as_it_is():
    model = tiny_model("llama", layers=3)
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    _, blocks = decoder_blocks(model)
    seen: dict[int, list] = {i: [] for i in range(3)}
    recording = [True]

    def record(i):
        def hook(_module, args, kwargs):
            if recording[0]:
                seen[i].append((args[0] if args else kwargs["hidden_states"]).clone())
        return hook

    handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
    with torch.no_grad():
        for window in windows:
            model(window[None], use_cache=False)
    expected = {i: list(v) for i, v in seen.items()}
    for v in seen.values():
        v.clear()
    recording[0] = False
    for step in stream_blocks(model, windows, "cpu"):
        recording[0] = True
        step.run()
        recording[0] = False
        if step.index == 1:  # what the caller does to a block is what the later blocks see
            step.block.mlp.down_proj.weight.data.mul_(0.5)
    for h in handles:
        h.remove()
    for i in range(2):
        assert len(seen[i]) == 2
        for j in range(2):
            assert torch.allclose(seen[i][j], expected[i][j], atol=1e-6)
    assert not any(torch.allclose(seen[2][j], expected[2][j], atol=1e-3) for j in range(2))


def compressed(method, ratio, model, targets, stats, windows):
    context = Context(model=model, tokenizer=None, targets=targets, stats=stats, calibration=windows, device="cpu",
                      cache_dir=Path("."), model_identity="tiny-adasvd", blocks=stream_blocks)
    factorizations = {t.name: SVDLLMWhitening().decompose(t, context.weight(t), context, None) for t in targets}
    return build_compressed(method, ratio, factorizations, context, footprint(model))


def test_tau_zero_with_uniform_ratios_equals_svdllm_w(tmp_path):
    model = tiny_model("llama", layers=2)
    targets, windows, stats = tiny_stats(model, tmp_path, names=("gram",))
    ada = AdaSVD().configured(AdaSVD().make_config({"tau": "0", "allocation": "uniform"}), None)
    assert ada.required_statistics() == ("gram",)
    base = SVDLLMWhitening()
    assert ada.decomposition_key(ada.config) == base.decomposition_key(base.config)
    assert ada.decomposition_statistics() == base.decomposition_statistics() == ("gram",)
    assert AdaSVD().required_statistics() == ("gram", "block_importance")
    mine, theirs = (compressed(m, 0.4, model, targets, stats, windows) for m in (ada, SVDLLMWhitening()))
    assert mine.layers == theirs.layers
    a, b = mine.model.state_dict(), theirs.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adacomp_refine_lowers_every_layers_loss_on_compressed_inputs(tmp_path):
    model = tiny_model("llama", layers=3)
    targets, windows, stats = tiny_stats(model, tmp_path, samples=6, seqlen=48)
    ada = AdaSVD().configured(AdaSVD().make_config({"allocation": "uniform"}), None)
    result = compressed(ada, 0.6, model, targets, stats, windows)
    facts = result.facts["refine"]["adacomp"]
    assert facts["layers"] == len(targets) and facts["skipped_steps"] == 0
    losses = facts["relative_loss"]
    assert all(after <= before + 1e-6 for before, after in losses.values())
    assert facts["mean_relative_loss"]["after"] < facts["mean_relative_loss"]["before"]
    # the first block's attention inputs equal the original model's: there adaComp is svdllm's fixed point
    first = losses["model.layers.0.self_attn.q_proj"]
    assert first[1] == pytest.approx(first[0], rel=1e-4, abs=1e-7)
    assert any(isinstance(m, LowRankLinear) for m in result.model.modules())


def test_stack_of_batch_runs_and_changes_the_statistic(tmp_path):
    model = tiny_model("llama", layers=2)
    targets, windows, stats = tiny_stats(model, tmp_path, samples=6, seqlen=32)
    results = {}
    for buckets in (0, 2):
        ada = AdaSVD().configured(AdaSVD().make_config({"allocation": "uniform", "stack_of_batch": str(buckets)}), None)
        results[buckets] = compressed(ada, 0.5, model, targets, stats, windows).facts["refine"]["adacomp"]
    assert results[2]["stack_of_batch"] == 2 and results[2]["skipped_steps"] == 0
    assert results[2]["relative_loss"] != results[0]["relative_loss"]


@pytest.mark.slow
def test_cli_run_of_adasvd_beside_svdllm_w(checkpoint_dir, tmp_path):
    args = []
    if "adasvd" not in load_registry().methods:
        plugins = tmp_path / "plugins"
        plugins.mkdir()
        (plugins / "adasvd_plugin.py").write_text("from methods.adasvd import register_methods  # noqa: F401\n")
        args = ["--plugins-dir", str(plugins)]
    out = tmp_path / "out"
    assert main([*args, "run", "--model", str(checkpoint_dir), "--methods", "svdllm_w,adasvd", "--ratios", "0.4",
                 "--tasks", "wikitext2", "--limit", "1", "--seqlen", "32", "--calib-samples", "4",
                 "--calib-seqlen", "64", "--out", str(out)]) == 0
    data = load_results(out)
    assert not data["failures"], data["failures"]
    rows = {(r["method"], r["metric"]): r["value"] for r in data["records"] if r["task"] == "wikitext2"}
    assert {"svdllm_w", "adasvd"} <= {method for method, _ in rows}
    assert all(math.isfinite(v) for v in rows.values())
    timings = data["manifest"]["timings"]
    assert "decompose:svdllm_w" in timings and "decompose:adasvd" not in timings  # one factor entry, shared
    compression = next(c for c in data["compressions"].values() if c["method"] == "adasvd")
    assert compression["facts"]["refine"]["adacomp"]["layers"] > 0
    assert "kept_per_block" in compression["facts"]["allocation"]
    assert compression["summary"]["target_params"] <= next(
        c for c in data["compressions"].values() if c["method"] == "svdllm_w")["summary"]["target_params"]
