"""Equal-memory budgets: parsing, the bisection on a tiny model, and budget runs through the runner."""

from pathlib import Path

import pytest
import torch

from bench.budget import TOLERANCE, budget_bytes, fit_budget, parse_budget
from bench.calibration import CalibrationConfig
from bench.compress import compress_model
from bench.errors import UsageError
from bench.method import Context
from bench.models import find_targets, footprint
from bench.results import load_results
from bench.runner import RunConfig, Runner
from methods.svd import VanillaSVD
from reports.tables import render_markdown


def test_parse_budget_bytes_and_fractions():
    assert parse_budget("300MB") == ("bytes", 300e6)
    assert parse_budget("250MiB") == ("bytes", 250 * 2**20)
    assert parse_budget("3.1e8") == ("bytes", 3.1e8)
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
    config = method.make_config()
    factorizations = {t.name: method.decompose(t, context.weight(t), context, config) for t in targets}
    return targets, context, config, factorizations


def _bytes_at(method, ratio, targets, context, config, factorizations, refine=False):
    model, _ = compress_model(context.model, targets, factorizations, method.allocate(ratio, factorizations, context, config))
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
    targets, context, config, factorizations = _setup(method, model)
    dense = footprint(model)["bytes"]
    budget = int(fraction * dense)
    fit = fit_budget(method, config, context, targets, factorizations, budget)
    assert fit.bytes <= budget and footprint(fit.model)["bytes"] == fit.bytes
    assert 0 < fit.ratio < 1 and not fit.refine_in_search
    assert _bytes_at(method, fit.ratio - TOLERANCE, targets, context, config, factorizations) > budget
    assert fit.model is not model and footprint(model)["bytes"] == dense  # the original is untouched


def test_budget_above_dense_needs_no_compression_and_too_small_a_budget_fails():
    method = VanillaSVD()
    model = small_model()
    targets, context, config, factorizations = _setup(method, model)
    dense = footprint(model)["bytes"]
    assert fit_budget(method, config, context, targets, factorizations, dense).ratio == 0.0
    with pytest.raises(ValueError, match="below the smallest model"):
        fit_budget(method, config, context, targets, factorizations, dense // 100)


def test_a_refine_that_changes_storage_is_searched_with_refine():
    method = HalfPrecisionRefine()
    model = small_model()
    targets, context, config, factorizations = _setup(method, model)
    dense = footprint(model)["bytes"]
    budget = int(0.4 * dense)
    fit = fit_budget(method, config, context, targets, factorizations, budget)
    assert fit.refine_in_search and fit.bytes <= budget
    assert next(fit.model.parameters()).dtype == torch.float16
    # the half-precision model fits at a much smaller ratio than float32 factors would need
    plain = fit_budget(VanillaSVD(), config, context, targets, factorizations, budget)
    assert fit.ratio < plain.ratio
    assert _bytes_at(method, fit.ratio - TOLERANCE, targets, context, config, factorizations, refine=True) > budget \
        or fit.ratio <= TOLERANCE


def test_runner_budget_records_resume_and_report(tiny, tmp_path):
    # the tiny fixture's bytes are mostly its 49k-token embeddings: budgets just under dense
    dense_bytes = footprint(tiny.model)["bytes"]
    absolute = dense_bytes - 100_000

    def run():
        config = RunConfig(model="tiny", methods=["svd"], ratios=[], budgets=["0.995", f"{absolute}B"], tasks=["wikitext2"],
                           limit=1, seqlen=32, calibration=CalibrationConfig(samples=2, seqlen=32), out=str(tmp_path))
        return Runner(config, loaded=tiny).run()

    run()
    data = load_results(tmp_path)
    budget_records = [r for r in data["records"] if r.get("budget") is not None]
    assert {r["budget"] for r in budget_records} == {0.995, absolute}
    for r in budget_records:
        fit = r["budget_fit"]
        assert r["bytes"] == fit["bytes"] <= fit["budget_bytes"]
        assert fit["budget_bytes"] == (int(0.995 * dense_bytes) if r["budget"] == 0.995 else absolute)
        assert r["ratio"] == fit["ratio"] > 0
    assert not data["failures"]
    keys = {r["key"] for r in data["records"]}
    run()  # resume: the budget records are reused, not recomputed
    again = load_results(tmp_path)
    assert {r["key"] for r in again["records"]} == keys and len(again["records"]) == len(data["records"])
    assert not any("budget" in label for label in again["manifest"]["timings"] if label.startswith("compress"))
    assert "SVD-LLM Table 7" in render_markdown(again)


def test_a_quantizing_method_that_fits_without_removing_parameters_gets_ratio_zero():
    """Half precision alone halves the bytes: a 0.6 budget needs no truncation, so the ratio is 0, not ``tol``."""
    method = HalfPrecisionRefine()
    model = small_model()
    targets, context, config, factorizations = _setup(method, model)
    dense = footprint(model)["bytes"]
    fit = fit_budget(method, config, context, targets, factorizations, int(0.6 * dense))
    assert fit.ratio == 0.0 and fit.bytes <= 0.6 * dense
