"""ASVD's batched sensitivity search against the one-pass-per-candidate search it replaced (tests/asvd_reference.py)."""

from __future__ import annotations

import math

import pytest
import torch
from asvd_reference import reference_sensitivity
from conftest import tiny_model

from bench import CalibrationStats, Context, factorize, onednn_linear_works, onednn_linears
from bench.model.targets import find_targets
from methods import asvd as asvd_module
from methods.asvd import ASVD, measure_sensitivity, sensitivity_ranks, uniform_budget

CANDIDATES = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]


def reference(model, *args):
    """The one-pass-per-candidate search, its linears on the kernels the search uses (oneDNN where it works)."""
    with onednn_linears(model):
        return reference_sensitivity(model, *args)


def search_inputs(family: str, seed: int = 0, windows: int = 2, seqlen: int = 32):
    model = tiny_model(family, vocab_size=128, seed=seed)
    targets = find_targets(model)
    g = torch.Generator().manual_seed(seed)
    scale = {t.name: torch.rand(t.in_features, generator=g, dtype=torch.float64) + 0.1 for t in targets}
    factorizations = {t.name: factorize(model.get_submodule(t.name).weight.detach(), asvd_module.Diagonal(scale[t.name]))
                      for t in targets}
    return model, targets, factorizations, torch.randint(0, 128, (windows, seqlen), generator=g)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "opt"])
def test_batched_search_gives_the_reference_table_bit_for_bit(family):
    model, targets, factorizations, ids = search_inputs(family)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    table = measure_sensitivity(model, targets, factorizations, CANDIDATES, ids)
    assert table == reference(model, targets, factorizations, CANDIDATES, ids)
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())  # the model is untouched
    assert all(type(model.get_submodule(t.name)) is torch.nn.Linear and "forward" not in vars(model.get_submodule(t.name))
               for t in targets)


def test_the_search_runs_on_the_evaluations_kernels():
    model, targets, factorizations, ids = search_inputs("llama", seed=1)
    with torch.no_grad():
        search = asvd_module._Search(model, ids, len(CANDIDATES))
    linear = search.work.get_submodule(targets[0].name)
    assert (asvd_module.linear_function(linear) is not torch.nn.functional.linear) == onednn_linear_works()
    search.kernels.close()
    assert asvd_module.linear_function(linear) is torch.nn.functional.linear


def test_one_pass_per_candidate_when_batching_would_not_be_exact(monkeypatch):
    model, targets, factorizations, ids = search_inputs("llama", seed=2)
    monkeypatch.setattr(asvd_module._Search, "_batching_is_exact", lambda self: False)
    assert measure_sensitivity(model, targets, factorizations, CANDIDATES, ids) == reference(
        model, targets, factorizations, CANDIDATES, ids)


def test_windows_in_parts_give_the_same_perplexities_and_ranks(monkeypatch):
    """With logits too big for one pass the windows go in parts: equal up to float rounding, same allocation."""
    model, targets, factorizations, ids = search_inputs("llama", seed=3, windows=5)
    expected = reference(model, targets, factorizations, CANDIDATES, ids)
    monkeypatch.setattr(asvd_module, "LOGITS_BUDGET", 2 * 32 * 128 * 4)  # two windows' logits per pass
    with torch.no_grad():
        search = asvd_module._Search(model, ids, len(CANDIDATES))
    assert [len(p) for p in search.parts] == [2, 2, 1] and search.group == 1
    table = measure_sensitivity(model, targets, factorizations, CANDIDATES, ids)
    for name, row in expected.items():
        for kept, value in row.items():
            assert table[name][kept] == pytest.approx(value, rel=1e-5)
    for ratio in (0.2, 0.4):
        budget = uniform_budget(targets, ratio)
        assert sensitivity_ranks(targets, table, budget) == sensitivity_ranks(targets, expected, budget)


def test_the_whole_calibration_set_is_one_setting_away(tmp_path):
    """``sensitivity_samples=none`` and ``sensitivity_seqlen=none``: every calibration window, every token."""
    model, targets, _, _ = search_inputs("llama", seed=4)
    g = torch.Generator().manual_seed(4)
    abs_mean = {t.name: torch.rand(t.in_features, generator=g, dtype=torch.float64) + 0.1 for t in targets}
    calibration = torch.randint(0, 128, (3, 24), generator=g)
    context = Context(model=model, tokenizer=None, targets=targets, stats=CalibrationStats({"abs_mean": abs_mean}, {}),
                      calibration=calibration, device="cpu", cache_dir=tmp_path, model_identity="tiny-4")
    method = ASVD()
    config = method.make_config({"sensitivity_samples": "none", "sensitivity_seqlen": "none",
                                 "candidates": "0.8,0.5"})
    assert config.sensitivity_samples is None and config.sensitivity_seqlen is None
    assert torch.equal(asvd_module.sensitivity_windows(context, config), calibration)
    factorizations = {t.name: method.decompose(t, context.weight(t), context, config) for t in targets}
    allocation = method.allocate(0.4, factorizations, context, config)
    assert allocation.facts["sensitivity_tokens"] == [3, 24]
    with pytest.raises(asvd_module.UsageError, match="sensitivity_samples must be >= 1"):
        method.make_config({"sensitivity_samples": "0"})


def test_asvd_declares_its_paper_and_deviations():
    notes = ASVD().describe()["notes"]
    assert "arXiv:2312.05821" in notes["paper"] and "whole calibration set" in notes["paper_defaults"]
    assert any("sensitivity_samples=none" in d for d in notes["deviations"])


@pytest.mark.real_model
@pytest.mark.slow
def test_batched_search_equals_the_reference_on_smollm2(smollm2):
    """The last block's linears of SmolLM2-135M on 2 x 64 calibration tokens: the same table, bit for bit."""
    from bench.engine.calibration import calibration_batches
    from bench.engine.config import CalibrationConfig

    model = smollm2.model
    targets = [t for t in find_targets(model) if t.block == max(t.block for t in find_targets(model))]
    factorizations = {t.name: factorize(model.get_submodule(t.name).weight.detach()) for t in targets}
    ids = calibration_batches(smollm2.tokenizer, CalibrationConfig(samples=2, seqlen=64))
    table = measure_sensitivity(model, targets, factorizations, CANDIDATES, ids)
    assert table == reference(model, targets, factorizations, CANDIDATES, ids)
    assert all(math.isfinite(v) for row in table.values() for v in row.values())


def test_allocation_settings_share_one_decomposition_alpha_does_not():
    method = ASVD()
    base = method.config_class()
    key = method.decomposition_key(base)
    for variant in (dict(allocation="uniform"), dict(sensitivity_samples=None), dict(candidates=(0.9, 0.5))):
        assert method.decomposition_key(method.config_class(**{**base.__dict__, **variant})) == key, variant
    assert method.decomposition_key(method.config_class(alpha=1.0)) != key
    assert method.decomposition_key(method.config_class(eps=1e-3)) != key
