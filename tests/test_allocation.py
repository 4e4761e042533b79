"""The shared budget solver (bench/api/allocation.py) and the README's method built on it."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pytest
from conftest import tiny_model

from bench import (
    Budget,
    MatrixCost,
    Target,
    UsageError,
    as_allocation,
    bisect_scalar,
    greedy_steps,
    load_results,
    matrix_costs,
    solve_budget,
    uniform_ranks,
    water_fill,
)
from bench.cli import main
from bench.engine.compress import layer_plan
from bench.model.targets import find_targets

README = Path(__file__).parent.parent / "README.md"


def options(curve: list[float], cost: MatrixCost) -> dict:
    """The candidates a rank-indexed curve offers, as documented: ranks 1..max_rank, dense at its last value."""
    out = {r: curve[r] for r in range(1, min(len(curve) - 1, cost.max_rank) + 1)}
    out[None] = curve[-1]
    return out


def loss_of(ranks: dict, curves: dict, costs: dict) -> float:
    return sum(options(curves[name], costs[name])[rank] for name, rank in ranks.items())


def brute_force(curves: dict, costs: dict, limit: float) -> float:
    """The least summed loss over every combination of candidates that fits ``limit``."""
    names = list(curves)
    choices = [list(options(curves[name], costs[name]).items()) for name in names]
    best = math.inf
    for combo in itertools.product(*choices):
        if sum(costs[name].params(rank) for name, (rank, _) in zip(names, combo)) <= limit:
            best = min(best, sum(loss for _, loss in combo))
    return best


def random_curves(rng: random.Random, costs: dict, convex: bool) -> dict:
    """Decreasing loss curves over ranks ``0..max_rank + 1``, the last value being the dense matrix's loss
    (convex: the loss removed per rank never grows)."""
    curves = {}
    for name, cost in costs.items():
        drops = [rng.random() for _ in range(cost.max_rank + 1)]
        if convex:
            drops.sort(reverse=True)
        curves[name] = [sum(drops[r:]) for r in range(len(drops) + 1)]
    return curves


def random_costs(rng: random.Random, count: int) -> dict:
    shapes = [(rng.randint(3, 12), rng.randint(3, 12)) for _ in range(count)]
    return {f"m{i}": MatrixCost(m + n, m * n) for i, (m, n) in enumerate(shapes)}


@pytest.mark.parametrize("convex", [True, False])
def test_the_budget_is_never_exceeded_and_no_better_step_still_fits(convex):
    rng = random.Random(1 if convex else 2)
    for _ in range(200):
        costs = random_costs(rng, rng.randint(1, 8))
        curves = random_curves(rng, costs, convex)
        smallest = sum(c.per_rank for c in costs.values())
        budget = Budget(rng.randint(smallest, sum(c.dense for c in costs.values()) + 10))
        ranks = solve_budget(curves, costs, budget)
        spare = budget.limit - budget.spent(ranks, costs)
        assert spare >= 0
        for name, rank in ranks.items():
            cost = costs[name]
            assert rank is None or 1 <= rank <= cost.max_rank and rank * cost.per_rank < cost.dense
            candidates = options(curves[name], cost)
            for other, loss in candidates.items():  # as close as the granularity allows
                if loss < candidates[rank]:
                    assert cost.params(other) - cost.params(rank) > spare, (name, rank, other, spare)


def test_a_byte_budget_counts_each_matrix_at_its_bytes_per_parameter():
    rng = random.Random(3)
    for _ in range(100):
        costs = {name: MatrixCost(c.per_rank, c.dense, rng.choice([0.5, 1.0, 2.0, 4.0]))
                 for name, c in random_costs(rng, rng.randint(1, 6)).items()}
        curves = random_curves(rng, costs, convex=True)
        smallest = sum(c.per_rank * c.bytes_per_param for c in costs.values())
        budget = Budget(rng.uniform(smallest, sum(c.dense * c.bytes_per_param for c in costs.values())), "bytes")
        ranks = solve_budget(curves, costs, budget)
        used = sum(costs[name].params(rank) * costs[name].bytes_per_param for name, rank in ranks.items())
        assert used <= budget.limit
        for name, rank in ranks.items():
            if rank is not None and rank < costs[name].max_rank:
                nxt = costs[name].per_rank * costs[name].bytes_per_param
                assert used + nxt > budget.limit  # one more rank would not have fit


def test_the_budget_is_met_exactly_where_the_granularity_allows():
    rng = random.Random(4)
    costs = {f"m{i}": MatrixCost(16, 64) for i in range(5)}  # 8 x 8: every step is 16 parameters
    for _ in range(50):
        curves = random_curves(rng, costs, convex=rng.random() < 0.5)
        reachable = sum(costs[name].params(rng.choice([1, 2, 3, None])) for name in costs)
        ranks = solve_budget(curves, costs, Budget(reachable))
        assert Budget(reachable).spent(ranks, costs) == reachable


def test_optimal_against_brute_force_for_convex_curves():
    rng = random.Random(5)
    costs = {f"m{i}": MatrixCost(16, 64) for i in range(4)}  # equal steps: the greedy is exactly optimal
    for _ in range(100):
        curves = random_curves(rng, costs, convex=True)
        limit = rng.randint(64, 256)
        ranks = solve_budget(curves, costs, Budget(limit))
        assert loss_of(ranks, curves, costs) == pytest.approx(brute_force(curves, costs, limit), abs=1e-12)


def test_within_one_step_of_the_optimum_for_mixed_shapes():
    """Losses convex in the parameters kept: optimal for what it spends, so no worse than the optimum of a
    budget one (largest) rank step smaller, and never better than the optimum of its own budget."""
    rng = random.Random(6)
    for _ in range(100):
        costs = random_costs(rng, 4)
        decay = {name: rng.uniform(5, 60) for name in costs}
        curves = {name: [math.exp(-c.params(r) / decay[name]) for r in range(0, 13)] for name, c in costs.items()}
        curves = {name: curve[:costs[name].max_rank + 1] + [math.exp(-costs[name].dense / decay[name])]
                  for name, curve in curves.items()}
        step = max(c.per_rank for c in costs.values())
        smallest = sum(c.per_rank for c in costs.values())
        limit = rng.randint(smallest + step, sum(c.dense for c in costs.values()))
        loss = loss_of(solve_budget(curves, costs, Budget(limit)), curves, costs)
        assert brute_force(curves, costs, limit) - 1e-12 <= loss <= brute_force(curves, costs, limit - step) + 1e-12


def test_dense_is_chosen_where_it_is_cheaper():
    costs = {"a": MatrixCost(16, 64), "b": MatrixCost(24, 80)}  # 8 x 8 and 4 x 20
    full = {"a": [8.0 - r for r in range(9)], "b": [4.0 - r for r in range(5)]}  # curves up to full rank
    # rank 4 of either holds at least its dense parameters: the matrix is kept dense instead
    assert solve_budget(full, costs, Budget(144)) == {"a": None, "b": None}
    assert solve_budget({"a": {1: 3.0, 5: 0.0}}, {"a": costs["a"]}, Budget(64)) == {"a": None}
    assert solve_budget(full, costs, Budget(64 + 72)) == {"a": None, "b": 3}
    allocation = as_allocation({"a": None, "b": 2}, costs)
    assert allocation.facts == {"params": 64 + 48, "dense_matrices": 1}
    targets = [Target("a", 0, "x", 8, 8, False), Target("b", 0, "y", 4, 20, False)]
    plan = layer_plan(targets, allocation.ranks)  # the harness keeps the dense one dense
    assert plan["a"]["rank"] is None and plan["b"]["rank"] == 2


def test_an_unreachable_budget_is_one_line_naming_the_smallest_size():
    costs = {"a": MatrixCost(1152, 576 * 576), "b": MatrixCost(768, 576 * 192)}
    curves = {"a": [1.0, 0.5, 0.2], "b": [1.0, 0.4, 0.1]}
    with pytest.raises(UsageError) as raised:
        solve_budget(curves, costs, Budget(1919))
    message = str(raised.value)
    assert "\n" not in message and "1,920 params" in message and "1,919" in message
    assert solve_budget(curves, costs, Budget(1920)) == {"a": 1, "b": 1}


def test_the_step_walk_takes_a_misfit_step_in_part_then_stops_or_goes_on():
    costs = {"a": MatrixCost(16, 64), "b": MatrixCost(8, 16)}  # b: rank 1 is its largest worth factorizing
    steps = [("a", 3), ("b", None)]
    assert greedy_steps(steps, costs, Budget(50), {"a": 1, "b": 1}, fill=False) == {"a": 2, "b": 1}
    assert greedy_steps(steps, costs, Budget(50), {"a": 1, "b": 1}, fill=True) == {"a": 2, "b": None}
    assert greedy_steps(steps, costs, Budget(50), {"a": 1, "b": 1}, partial=False) == {"a": 1, "b": None}
    assert greedy_steps([("a", 1)], costs, Budget(100), {"a": 3, "b": 1}) == {"a": 3, "b": 1}  # never lowers


def test_bisect_scalar_and_water_fill():
    low, high = bisect_scalar(lambda x: x * x < 2, 0.0, 2.0, steps=60)
    assert low <= math.sqrt(2) <= high and high - low < 1e-15
    costs = {f"m{i}": MatrixCost(128, 64 * 64) for i in range(4)}
    ranks = water_fill({"m0": 1.0, "m1": 2.0, "m2": 4.0, "m3": 100.0}, costs, Budget(128 * 60))
    assert sum(ranks.values()) == 60 and ranks["m0"] <= ranks["m1"] <= ranks["m2"] <= ranks["m3"] == 31  # capped


def test_asvds_walk_gives_the_ranks_of_its_former_binary_search():
    """ASVD's allocation on the shared walk equals the prefix binary search it replaced, ties included."""
    from asvd_reference import reference_sensitivity_ranks

    from methods.asvd import sensitivity_ranks, uniform_budget

    rng = random.Random(7)
    shapes = [(64, 64), (16, 64), (172, 64), (64, 172), (64, 64), (16, 64)]
    targets = [Target(f"model.layers.{i // 3}.m{i}", i // 3, f"m{i % 3}", m, n, False)
               for i, (m, n) in enumerate(shapes * 2)]
    candidates = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
    for _ in range(300):
        table = {t.name: {str(p): round(10 + rng.expovariate(1) * (1 - p), rng.choice([0, 1, 3])) for p in candidates}
                 for t in targets}
        budget = uniform_budget(targets, rng.uniform(0.02, 0.62))
        try:
            expected = reference_sensitivity_ranks(targets, table, budget)
        except ValueError:
            with pytest.raises(UsageError, match="unreachable"):
                sensitivity_ranks(targets, table, budget)
            continue
        assert sensitivity_ranks(targets, table, budget) == expected


# --------------------------------------------------------------------------- the README's method

def readme_plugin() -> str:
    """The method of the README's plugin section, as the reader sees it."""
    text = README.read_text(encoding="utf-8")
    block = text.split("<!-- plugin-example: global_asvd -->", 1)[1].split("<!-- /plugin-example -->", 1)[0]
    return block.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_method_needs_a_statistic_allocates_through_the_solver_and_meets_the_budget(tokenizer, tmp_path):
    code = readme_plugin()
    assert len(code.splitlines()) <= 30
    assert 'requires = ("abs_mean",)' in code and "solve_budget(" in code
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "global_asvd.py").write_text(code, encoding="utf-8")
    model_dir = tmp_path / "tiny-model"
    model = tiny_model("llama", vocab_size=len(tokenizer), layers=3)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    assert main(["--plugins-dir", str(plugins), "run", "--model", str(model_dir), "--methods", "svd,global_asvd",
                 "--ratios", "0.2,0.5", "--tasks", "wikitext2", "--limit", "1", "--seqlen", "32",
                 "--calib-samples", "4", "--calib-seqlen", "64", "--out", str(out)]) == 0
    data = load_results(out)
    targets = find_targets(model)
    costs = matrix_costs(targets)
    step = max(c.per_rank for c in costs.values())
    seen = set()
    for compression in data["compressions"].values():
        if compression["method"] != "global_asvd":
            continue
        seen.add(compression["ratio"])
        budget = Budget.uniform(costs, compression["ratio"]).limit
        kept = compression["summary"]["target_params"]
        assert budget - step < kept <= budget, (compression["ratio"], kept, budget)
        assert compression["facts"]["allocation"]["params"] == kept
        ranks = {name: layer["rank"] for name, layer in compression["layers"].items()}
        assert ranks != uniform_ranks(targets, compression["ratio"])  # its own allocation, not the uniform one
    assert seen == {0.2, 0.5}
    records = [r for r in data["records"] if r["method"] == "global_asvd"]
    assert len(records) == 2 and all(math.isfinite(r["value"]) for r in records)
