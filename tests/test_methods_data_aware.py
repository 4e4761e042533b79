"""FWSVD, ASVD and SVD-LLM whitening: the math on small random data, ASVD's
sensitivity search and its cache, and end-to-end runs on a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from bench import Allocation, CalibrationStats, Context, Target, cholesky_whitening, factorize, load_results
from bench.engine.compress import decomposition_facts
from bench.engine.config import CalibrationConfig, RunConfig
from bench.engine.executor import run
from bench.model.targets import find_targets
from methods import asvd as asvd_module
from methods.asvd import ASVD, kept_rank, sensitivity_ranks, stored_params, uniform_budget
from methods.fwsvd import FisherWeightedSVD
from methods.svdllm import SVDLLMWhitening


def context_for(targets: list[Target], stats: dict | None = None, model=None, calibration=None,
                cache_dir: Path = Path(".")) -> Context:
    return Context(model=model, tokenizer=None, targets=targets, stats=CalibrationStats(stats or {}, {}),
                   calibration=calibration, device="cpu", cache_dir=cache_dir, model_identity="test")


def decompose(method, weight: torch.Tensor, stats: dict[str, torch.Tensor], **options):
    target = Target("layer", 0, "mlp.up_proj", weight.shape[0], weight.shape[1], False)
    context = context_for([target], {name: {"layer": value} for name, value in stats.items()})
    return method.decompose(target, weight, context, method.make_config(options)), context


def product(f, rank: int) -> torch.Tensor:
    w_u, w_v = f.factors(rank, dtype=torch.float64)
    return w_u @ w_v


def scaled_inputs(n: int, tokens: int, seed: int, spread: float) -> torch.Tensor:
    """``n x tokens`` inputs whose channel scales differ by ``exp(+-spread)`` (log-normal)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(spread * torch.randn(n, generator=g, dtype=torch.float64))
    return scales[:, None] * torch.randn(n, tokens, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------- SVD-LLM whitening

def test_svdllm_theorem_output_error_equals_truncated_spectrum():
    torch.manual_seed(0)
    w = torch.randn(40, 56, dtype=torch.float64)
    x = scaled_inputs(56, 400, seed=1, spread=1.0)
    f, _ = decompose(SVDLLMWhitening(), w, {"gram": x @ x.T})
    for rank in (1, 8, 20, 39):
        error = float(((w - product(f, rank)) @ x).pow(2).sum())
        truncated = float(f.s[rank:].pow(2).sum())
        assert abs(error - truncated) / truncated < 1e-6, rank


def test_svdllm_whitening_beats_vanilla_svd_on_output_error():
    torch.manual_seed(0)
    w = torch.randn(40, 56, dtype=torch.float64)
    x = scaled_inputs(56, 400, seed=1, spread=1.0)
    f, _ = decompose(SVDLLMWhitening(), w, {"gram": x @ x.T})
    plain = factorize(w)
    for rank in (8, 20):
        assert ((w - product(f, rank)) @ x).norm() < ((w - product(plain, rank)) @ x).norm()


def test_svdllm_non_positive_definite_gram_falls_back_with_a_logged_shift(caplog):
    torch.manual_seed(0)
    w = torch.randn(24, 48, dtype=torch.float64)
    x = scaled_inputs(48, 16, seed=2, spread=0.5)  # 16 tokens < 48 channels: singular gram
    x[3] = 0  # a dead channel
    gram = x @ x.T
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(gram)
    _, shift = cholesky_whitening(gram)
    assert shift > 0
    method = SVDLLMWhitening()
    with caplog.at_level("WARNING"):
        f, context = decompose(method, w, {"gram": gram})
    assert "layer" in caplog.text and "not positive definite" in caplog.text
    # the shift is a fact of the factorization; the harness records it with the compression
    assert f.facts["cholesky_shift"] == pytest.approx(shift)
    assert decomposition_facts({"layer": f})["cholesky_shift"]["layer"] == pytest.approx(shift)
    assert not hasattr(method, "shifts")  # the method itself keeps no state
    for rank in (4, 16, 24):
        w_u, w_v = f.factors(rank, dtype=torch.float64)
        assert torch.isfinite(w_u).all() and torch.isfinite(w_v).all()
        assert w_u.shape == (24, rank) and w_v.shape == (rank, 48)
    # at full rank the factors still reconstruct W
    assert torch.allclose(product(f, 24), w, atol=1e-6)


# --------------------------------------------------------------------------- ASVD / FWSVD scaling

def fisher_of(x: torch.Tensor, m: int, samples: int, seed: int) -> torch.Tensor:
    """Per-input-channel Fisher of random output gradients: mean over samples of sum_i (D X^T)_ij^2."""
    g = torch.Generator().manual_seed(seed)
    chunks = x.chunk(samples, dim=1)
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for chunk in chunks:
        delta = torch.randn(m, chunk.shape[1], generator=g, dtype=torch.float64)
        total += (delta @ chunk.T).pow(2).sum(0)
    return total / len(chunks)


@pytest.mark.parametrize("method_name", ["asvd", "fwsvd"])
def test_channel_scaling_lowers_output_error_versus_vanilla_svd(method_name):
    torch.manual_seed(0)
    m, n = 48, 64
    w = torch.randn(m, n, dtype=torch.float64)
    x = scaled_inputs(n, 512, seed=3, spread=1.5)  # channel scales spread over ~exp(+-3)
    if method_name == "asvd":
        f, _ = decompose(ASVD(), w, {"abs_mean": x.abs().mean(1)}, allocation="uniform")
    else:
        f, _ = decompose(FisherWeightedSVD(), w, {"fisher": fisher_of(x, m, samples=8, seed=4)})
    plain = factorize(w)
    for rank in (4, 12, 24, 36):
        scaled_error = float(((w - product(f, rank)) @ x).norm())
        plain_error = float(((w - product(plain, rank)) @ x).norm())
        assert scaled_error < 0.9 * plain_error, (rank, scaled_error, plain_error)
    assert torch.allclose(product(f, min(m, n)), w, atol=1e-8)  # S^-1 is applied: full rank gives W back


# --------------------------------------------------------------------------- ASVD allocation

def test_sensitivity_ranks_compress_the_insensitive_matrix_more():
    targets = [Target(f"b.{i}", 0, "x", 64, 64, False) for i in range(2)]
    candidates = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    table = {"b.0": {str(p): 10 + (1 - p) for p in candidates},  # barely hurt by truncation
             "b.1": {str(p): 10 + 100 * (1 - p) for p in candidates}}  # badly hurt
    budget = uniform_budget(targets, 0.3)
    ranks = sensitivity_ranks(targets, table, budget)
    assert ranks["b.0"] is not None and (ranks["b.1"] is None or ranks["b.1"] > ranks["b.0"])
    kept = sum(stored_params(t, ranks[t.name]) for t in targets)
    assert budget - 128 < kept <= budget


def tiny_context(tmp_path: Path, seed: int = 0) -> tuple[Context, dict]:
    model = tiny_model("llama", vocab_size=128, seed=seed)
    targets = find_targets(model)
    g = torch.Generator().manual_seed(seed)
    abs_mean = {t.name: torch.rand(t.in_features, generator=g, dtype=torch.float64) + 0.1 for t in targets}
    context = Context(model=model, tokenizer=None, targets=targets, stats=CalibrationStats({"abs_mean": abs_mean}, {}),
                      calibration=torch.randint(0, 128, (3, 48), generator=g), device="cpu",
                      cache_dir=tmp_path, model_identity=f"tiny-{seed}")
    return context, abs_mean


@pytest.fixture
def counted(monkeypatch):
    calls = []
    original = asvd_module.measure_sensitivity

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(asvd_module, "measure_sensitivity", counting)
    return calls


def test_asvd_allocation_meets_the_budget_and_reuses_its_cache(tmp_path, counted):
    context, _ = tiny_context(tmp_path)
    method = ASVD()
    config = method.make_config({"sensitivity_samples": "2", "sensitivity_seqlen": "32", "candidates": "0.8,0.6,0.4"})
    factorizations = {t.name: method.decompose(t, context.weight(t), context, config) for t in context.targets}
    step = max(t.out_features + t.in_features for t in context.targets)
    for ratio in (0.2, 0.4, 0.6):
        allocation = method.allocate(ratio, factorizations, context, config)
        assert isinstance(allocation, Allocation)
        ranks = allocation.ranks
        kept = sum(stored_params(t, ranks[t.name]) for t in context.targets)
        budget = uniform_budget(context.targets, ratio)
        assert budget - step < kept <= budget, (ratio, kept, budget)
        assert allocation.facts["sensitivity_tokens"] == [2, 32]
        assert allocation.facts["sensitivity_cached"] is (ratio != 0.2)  # measured once, then read back
    assert len(counted) == 1  # one search served all three ratios
    ASVD().allocate(0.4, factorizations, context, config)  # a fresh instance reads the disk cache
    assert len(counted) == 1
    files = list((tmp_path / "asvd_sensitivity").glob("*.json"))
    assert len(files) == 1
    entry = json.loads(files[0].read_text())
    name = next(iter(entry["payload"]))
    entry["payload"][name]["0.8"] = 1.0  # tamper with one value: the checksum must catch it
    files[0].write_text(json.dumps(entry))
    ASVD().allocate(0.4, factorizations, context, config)
    assert len(counted) == 2
    other = method.make_config({"sensitivity_samples": "2", "sensitivity_seqlen": "32", "candidates": "0.8,0.6,0.4",
                                "alpha": "1.0"})
    ASVD().allocate(0.4, factorizations, context, other)  # a different alpha is a different entry
    assert len(counted) == 3


def test_asvd_sensitivity_equals_full_forward_perplexity(tmp_path):
    context, _ = tiny_context(tmp_path, seed=1)
    method = ASVD()
    config = method.make_config({"sensitivity_samples": "2", "sensitivity_seqlen": "32"})
    factorizations = {t.name: method.decompose(t, context.weight(t), context, config) for t in context.targets}
    ids = context.calibration[:2, :32]
    table = asvd_module.measure_sensitivity(context.model, context.targets, factorizations, [0.7, 0.4], ids)
    assert set(table) == {t.name for t in context.targets}
    for target in (context.targets[-1], context.targets[len(context.targets) // 2 + 1]):  # a late and a block-1 linear
        assert target.block > 0
        module = context.model.get_submodule(target.name)
        original = module.weight.data.clone()
        f = factorizations[target.name]
        rank = kept_rank(target, 0.4)
        module.weight.data = ((f.u[:, :rank] * f.s[:rank]) @ f.vt[:rank]).float()
        with torch.no_grad():
            expected = math.exp(float(context.model(ids, labels=ids).loss))
        module.weight.data = original
        assert table[target.name]["0.4"] == pytest.approx(expected, rel=1e-5)
    # the original model was left untouched
    assert all(type(context.model.get_submodule(t.name)) is torch.nn.Linear for t in context.targets)


def test_asvd_needs_calibration_windows_for_its_search(tmp_path):
    from bench.errors import UsageError

    context, _ = tiny_context(tmp_path)
    context.calibration = None
    method = ASVD()
    config = method.make_config()
    factorizations = {t.name: method.decompose(t, context.weight(t), context, config) for t in context.targets}
    with pytest.raises(UsageError, match="calibration"):
        method.allocate(0.4, factorizations, context, config)
    assert method.allocate(0.4, factorizations, context, method.make_config({"allocation": "uniform"}))


# --------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("method_name", ["fwsvd", "asvd", "svdllm_w"])
def test_method_runs_end_to_end_with_finite_perplexity(tiny, tmp_path, method_name):
    config = RunConfig(model="tiny", methods=(method_name,), ratios=(0.2, 0.6), tasks=("wikitext2",), limit=1,
                       seqlen=64, calibration=CalibrationConfig(samples=4, seqlen=64), out=str(tmp_path / "run"))
    run(config, loaded=tiny)
    results = load_results(tmp_path / "run")
    assert not results["failures"]
    rows = [r for r in results["records"] if r["method"] == method_name]
    assert sorted(r["ratio"] for r in rows) == [0.2, 0.6]
    for row in rows:
        assert math.isfinite(row["value"]) and row["value"] > 1
        assert row["accounting"]["target_ratio_achieved"] >= row["ratio"] - 1e-9


def test_allocation_and_decomposition_facts_land_in_results_json(tiny, tmp_path):
    """ASVD's search facts and SVD-LLM's Cholesky shifts (32 calibration tokens: singular grams) are recorded."""
    config = RunConfig(model="tiny", methods=("asvd", "svdllm_w"), ratios=(0.4,), tasks=("wikitext2",), limit=1,
                       seqlen=32, calibration=CalibrationConfig(samples=1, seqlen=32),
                       method_options={"asvd": {"candidates": "0.8,0.6,0.4", "sensitivity_seqlen": 32}},
                       out=str(tmp_path / "run"))
    results = run(config, loaded=tiny)
    assert not results.data["failures"], results.data["failures"]
    facts = {info["method"]: info["facts"] for info in results.data["compressions"].values()}
    assert facts["asvd"]["allocation"]["sensitivity_tokens"] == [1, 32] and "decomposition" not in facts["asvd"]
    shifts = facts["svdllm_w"]["decomposition"]["cholesky_shift"]
    assert shifts and all(shift > 0 for shift in shifts.values())
    assert set(shifts) <= {t.name for t in find_targets(tiny.model)}
