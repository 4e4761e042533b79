"""ZS-SVD: its scores against autograd, the zero-sum walk's invariants, the budget, and a CLI run."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from bench import Budget, Context, MatrixCost, load_results, zero_sum_walk
from bench.cli import main
from bench.engine.calibration import collect_statistics
from bench.engine.config import CalibrationConfig
from bench.engine.plugins import load_registry
from bench.model.targets import find_targets
from methods.statistics import Gram
from methods.weight_grad import WeightGrad, WeightGradAll
from methods.zs_svd import ZSSVD, ZSSVDConfig, authors_saving, component_gradients, corrected

SHIM = '''from methods.weight_grad import register_statistics  # noqa: F401
from methods.zs_svd import register_methods  # noqa: F401
'''


def tiny_stats(windows: torch.Tensor, statistics, seed: int = 0):
    model = tiny_model("llama", seed=seed)
    targets = find_targets(model)
    config = CalibrationConfig(samples=windows.shape[0], seqlen=windows.shape[1])
    return model, targets, collect_statistics(model, f"tiny-zs-{seed}", targets, windows, config, statistics)


def windows_of(count: int, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 512, (count, length), generator=torch.Generator().manual_seed(7))


def test_component_gradients_equal_autograd_of_scaling_each_component():
    windows = windows_of(1)
    model, targets, stats = tiny_stats(windows, [Gram(), WeightGrad()])
    context = Context(model, None, targets, stats, windows, "cpu", Path("."), "test")
    method = ZSSVD()
    for target in (targets[0], targets[6]):  # q_proj (shared input group) and down_proj
        weight = model.get_submodule(target.name).weight.detach()
        f = method.decompose(target, weight, context, method.config)
        g = component_gradients(f, stats.get("weight_grad", target.name))
        # W(a) = U diag(s + a) V^T S^-1: d loss / d a_i at a = 0 is the derivative with respect to sigma_i
        a = torch.zeros(f.s.numel(), dtype=torch.float64, requires_grad=True)
        moved = (f.u.double() * a[None, :]) @ f.vt.double()
        params = {target.name + ".weight": weight + moved.float()}
        loss = torch.func.functional_call(model, params, (windows,), {"labels": windows}).loss
        (expected,) = torch.autograd.grad(loss, a)
        assert g.abs().max() > 0
        assert torch.allclose(g, expected.double(), rtol=1e-3, atol=1e-6 * float(expected.abs().max()))
        assert torch.allclose(f.scores, -f.s.double() * g)


def test_weight_grad_observes_the_first_window_only():
    windows = windows_of(3)
    _, targets, first = tiny_stats(windows, [WeightGrad()])
    _, _, alone = tiny_stats(windows[:1], [WeightGradAll()])
    _, _, every = tiny_stats(windows, [WeightGradAll()])
    name = targets[3].name
    assert torch.allclose(first.get("weight_grad", name), alone.get("weight_grad_all", name), rtol=1e-10, atol=0)
    assert not torch.allclose(first.get("weight_grad", name), every.get("weight_grad_all", name))


def random_walk_inputs(seed: int):
    rng = random.Random(seed)
    shapes = [(rng.choice([8, 12, 16, 24]), rng.choice([8, 12, 16, 24])) for _ in range(40)]
    costs = {f"m{i}": MatrixCost(m + n, m * n) for i, (m, n) in enumerate(shapes)}
    deltas = {name: [rng.gauss(0, 1) * rng.choice([1e-3, 1, 10]) for _ in range(min(m, n))]
              for name, (m, n) in zip(costs, shapes)}
    return costs, deltas


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_zero_sum_walk_balances_and_meets_the_budget(seed, ratio):
    costs, deltas = random_walk_inputs(seed)
    total = sum(c.dense for c in costs.values())
    budget = Budget(total - int(ratio * total))
    trace: list = []
    ranks, facts = zero_sum_walk(deltas, costs, budget, {"m0": 3}, trace=trace)
    biggest = max(abs(d) for values in deltas.values() for d in values)
    previous, balanced = 0.0, 0
    for _name, delta, running, both in trace:
        if not both:  # from here on one heap has run dry (it may refill): the bound holds no more
            break
        assert (delta >= 0) == (previous <= 0)  # a positive candidate when the sum is <= 0, else a negative one
        assert abs(running) <= biggest + 1e-12
        previous, balanced = running, balanced + 1
    assert balanced >= 10
    assert facts["reached"] and facts["steps"] == len(trace)
    kept = sum(costs[n].params(r) for n, r in ranks.items())
    assert kept <= budget.limit
    last = trace[-1][0]  # one step less would not have fitted: the walk stops as soon as the budget is met
    assert ranks[last] is not None  # a step that saved nothing cannot have been the one that met the budget
    before = {**ranks, last: ranks[last] + 1}
    assert sum(costs[n].params(r) for n, r in before.items()) > budget.limit
    for name, rank in ranks.items():  # dense above r*, never below the floor
        assert rank is None or 1 <= rank <= costs[name].max_rank
    assert ranks["m0"] is None or ranks["m0"] >= 3


def test_authors_count_credits_one_rank_late_and_removes_more():
    costs, deltas = random_walk_inputs(11)
    total = sum(c.dense for c in costs.values())
    budget = Budget(total - int(0.4 * total))
    exact, _ = zero_sum_walk(deltas, costs, budget)
    late, _ = zero_sum_walk(deltas, costs, budget, saving=authors_saving)
    size = {key: sum(costs[n].params(r) for n, r in ranks.items()) for key, ranks in (("e", exact), ("a", late))}
    assert size["a"] <= size["e"] <= budget.limit
    cost = MatrixCost(8 + 12, 96)  # r* = 4
    assert [authors_saving(cost, r) for r in (5, 4, 3)] == [0.0, 96 - 80, 20]


@pytest.mark.parametrize("ratio", [0.2, 0.6])
def test_allocation_meets_the_budget_and_keeps_dense_above_r_star(ratio):
    windows = windows_of(2)
    model, targets, stats = tiny_stats(windows, [Gram(), WeightGrad()])
    context = Context(model, None, targets, stats, windows, "cpu", Path("."), "test")
    method = ZSSVD()
    factorizations = {t.name: method.decompose(t, model.get_submodule(t.name).weight.detach(), context,
                                               method.config) for t in targets}
    allocation = method.allocate(ratio, factorizations, context, ZSSVDConfig())
    total = sum(t.out_features * t.in_features for t in targets)
    assert allocation.facts["params"] <= total - int(ratio * total)
    assert allocation.facts["keep_rank_ratio"] == (0.3 if ratio >= 0.6 else 0.0)
    for t in targets:
        cost = MatrixCost.of(t)
        rank = allocation.ranks[t.name]
        if rank is None:  # kept dense
            continue
        assert rank <= cost.max_rank and rank >= max(1, math.ceil(allocation.facts["keep_rank_ratio"] * cost.max_rank))


def test_cli_runs_zs_svd_on_a_tiny_model(checkpoint_dir, tmp_path):
    plugins = []
    if "zs_svd" not in load_registry().methods:  # installed entry points that predate the method
        (tmp_path / "plugins").mkdir()
        (tmp_path / "plugins" / "zs_svd_plugin.py").write_text(SHIM)
        plugins = ["--plugins-dir", str(tmp_path / "plugins")]
    out = tmp_path / "out"
    argv = [*plugins, "run", "--model", str(checkpoint_dir), "--methods", "zs_svd", "--ratios", "0.2,0.4",
            "--tasks", "wikitext2", "--limit", "1", "--seqlen", "32", "--calib-samples", "2", "--calib-seqlen", "32",
            "--out", str(out)]
    assert main(argv) == 0
    data = load_results(out)
    assert not data["failures"], data["failures"]
    rows = {(r["method"], r["ratio"]): r for r in data["records"]}
    assert {("zs_svd", 0.2), ("zs_svd", 0.4)} <= set(rows)
    assert all(math.isfinite(rows[("zs_svd", r)]["value"]) for r in (0.2, 0.4))
    fixed = tmp_path / "corrected"
    assert main([*argv[:-1], str(fixed), "--ratios", "0.4", "--method-option", "zs_svd.correction=true"]) == 0
    [row] = [r for r in load_results(fixed)["records"] if r["method"] == "zs_svd"]
    assert math.isfinite(row["value"]) and row["value"] != rows[("zs_svd", 0.4)]["value"]


def test_correction_leaves_no_error_along_the_gradient():
    g = torch.Generator().manual_seed(3)
    weight, truncated, gradient = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(3))
    fixed, step = corrected(weight, truncated, gradient * 10)
    assert abs(float((gradient * (weight - fixed)).sum())) < 1e-6 and step != 0
    assert torch.allclose(fixed - truncated, step * gradient * 10)
