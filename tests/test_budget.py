"""Equal-memory budgets: parsing, the bisection on a tiny model, and budget runs through the runner."""

from pathlib import Path

import pytest
import torch

from bench import Context, load_results
from bench.engine.budget import TOLERANCE, budget_bytes, fit_budget, parse_budget
from bench.engine.compress import compress_model
from bench.engine.config import CalibrationConfig, RunConfig
from bench.engine.executor import run
from bench.errors import UsageError
from bench.model.targets import find_targets, footprint
from methods.svd import VanillaSVD
from reports.report import render_markdown


def test_parse_budget_bytes_and_fractions():
    assert parse_budget("300MB") == ("bytes", 300e6)
    assert parse_budget("250MiB") == ("bytes", 250 * 2**20)
    assert parse_budget("3.1e8B") == ("bytes", 3.1e8)
    assert parse_budget("0.75") == ("fraction", 0.75)
    assert budget_bytes("0.5", 1000) == 500 and budget_bytes("2kB", 10**9) == 2000
    for bad in ("abc", "0", "-3MB", "12 parsecs"):
        with pytest.raises(UsageError):
            parse_budget(bad)


class HalfPrecisionRefine(VanillaSVD):
    """A refine that changes the storage (as quantizing the factors does): everything to float16."""

    name = "svd_fp16"

    def refine(self, model, ratio, context, config):
        model.half()
        return {"dtype": "float16"}


def _setup(method, model):
    targets = find_targets(model)
    context = Context(model=model, tokenizer=None, targets=targets, stats=None, calibration=None, device="cpu",
                      cache_dir=Path("."), model_identity="tiny")
    config = method.config  # a method made for one run holds its config
    factorizations = {t.name: method.decompose(t, context.weight(t), context, config) for t in targets}
    return targets, context, config, factorizations, footprint(model)


def _bytes_at(method, ratio, targets, context, config, factorizations, refine=False):
    model, _ = compress_model(context.model, targets, factorizations, method.allocate(ratio, factorizations, context, config).ranks)
    if refine:
        method.refine(model, ratio, context, config)
    return footprint(model)["bytes"]


def small_model():
    """A tiny random Llama with a 64-token vocabulary: most of its bytes are compressible matrices."""
    from conftest import tiny_model

    return tiny_model("llama", vocab_size=64)


@pytest.mark.parametrize("fraction", [0.9, 0.7, 0.55])
def test_found_ratio_fits_and_a_slightly_smaller_one_does_not(fraction):
    method = VanillaSVD()
    model = small_model()
    targets, context, config, factorizations, dense_footprint = _setup(method, model)
    dense = dense_footprint["bytes"]
    budget = int(fraction * dense)
    fit = fit_budget(method, factorizations, context, dense_footprint, budget)
    assert fit.bytes <= budget and footprint(fit.compressed.model)["bytes"] == fit.bytes
    # without refine the search reads bytes off the ranks: the one model built is the one found
    assert fit.compressed.summary["bytes"] == fit.bytes and fit.budget_bytes == budget and fit.builds == 1
    assert 0 < fit.compressed.ratio < 1 and not fit.refine_in_search
    assert fit.summary()["ratio"] == fit.compressed.ratio and fit.summary()["tolerance"] == TOLERANCE
    assert _bytes_at(method, fit.compressed.ratio - TOLERANCE, targets, context, config, factorizations) > budget
    assert fit.compressed.model is not model and footprint(model)["bytes"] == dense  # the original is untouched


def test_budget_above_dense_needs_no_compression_and_too_small_a_budget_fails():
    method = VanillaSVD()
    model = small_model()
    targets, context, config, factorizations, dense_footprint = _setup(method, model)
    dense = dense_footprint["bytes"]
    assert fit_budget(method, factorizations, context, dense_footprint, dense).compressed.ratio == 0.0
    with pytest.raises(ValueError, match="below the smallest model"):
        fit_budget(method, factorizations, context, dense_footprint, dense // 100)


def test_a_refine_that_changes_storage_is_searched_with_refine():
    method = HalfPrecisionRefine()
    model = small_model()
    targets, context, config, factorizations, dense_footprint = _setup(method, model)
    dense = dense_footprint["bytes"]
    budget = int(0.4 * dense)
    fit = fit_budget(method, factorizations, context, dense_footprint, budget)
    assert fit.refine_in_search and fit.bytes <= budget
    assert next(fit.compressed.model.parameters()).dtype == torch.float16
    assert fit.compressed.facts["refine"] == {"dtype": "float16"}
    # the half-precision model fits at a much smaller ratio than float32 factors would need
    plain = fit_budget(VanillaSVD(), factorizations, context, dense_footprint, budget)
    assert fit.compressed.ratio < plain.compressed.ratio
    assert _bytes_at(method, fit.compressed.ratio - TOLERANCE, targets, context, config, factorizations,
                     refine=True) > budget or fit.compressed.ratio <= TOLERANCE


def test_runner_budget_records_resume_and_report(tiny, tmp_path):
    # about half of the tiny fixture's bytes are its (512-token) embeddings and lm_head, never compressed
    dense_bytes = footprint(tiny.model)["bytes"]
    compressible = sum(t.params for t in find_targets(tiny.model)) * 4
    assert 0.3 < compressible / dense_bytes < 0.7
    absolute = dense_bytes - compressible // 4  # a quarter of the compressible bytes must go

    def run_budgets():
        config = RunConfig(model="tiny", methods=("svd",), ratios=(), budgets=("0.9", f"{absolute}B"),
                           tasks=("wikitext2",), limit=1, seqlen=32, calibration=CalibrationConfig(samples=2, seqlen=32),
                           out=str(tmp_path))
        return run(config, loaded=tiny)

    run_budgets()
    data = load_results(tmp_path)
    budget_records = [r for r in data["records"] if r.get("budget") is not None]
    assert {r["budget"] for r in budget_records} == {0.9, absolute}
    assert {r["variant"] for r in budget_records} == {"budget=90% of dense", f"budget={absolute / 2**20:.1f} MiB"}
    for r in budget_records:
        fit = r["budget_fit"]
        assert r["bytes"] == fit["bytes"] <= fit["budget_bytes"]
        assert fit["budget_bytes"] == (int(0.9 * dense_bytes) if r["budget"] == 0.9 else absolute)
        assert r["ratio"] == fit["ratio"] > 0
        assert data["compressions"][r["compression"]]["budget"]["spec"] in ("0.9", f"{absolute}B")
    assert not data["failures"]
    keys = {r["key"] for r in data["records"]}
    run_budgets()  # resume: the budget records are reused, not recomputed
    again = load_results(tmp_path)
    assert {r["key"] for r in again["records"]} == keys and len(again["records"]) == len(data["records"])
    assert not any("budget" in label for label in again["manifest"]["timings"] if label.startswith("compress"))
    assert "SVD-LLM Table 7" in render_markdown(again)


def test_a_quantizing_method_that_fits_without_removing_parameters_gets_ratio_zero():
    """Half precision alone halves the bytes: a 0.6 budget needs no truncation, so the ratio is 0, not ``tol``."""
    method = HalfPrecisionRefine()
    model = small_model()
    targets, context, config, factorizations, dense_footprint = _setup(method, model)
    dense = dense_footprint["bytes"]
    fit = fit_budget(method, factorizations, context, dense_footprint, int(0.6 * dense))
    assert fit.compressed.ratio == 0.0 and fit.bytes <= 0.6 * dense
