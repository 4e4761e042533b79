"""SVD-LLM's sequential low-rank update (methods/update.py, methods/svdllm_update.py)."""

from __future__ import annotations

import pytest
import torch

from bench import LowRankLinear, factorize, uniform_ranks
from bench.engine.compress import compress_model
from bench.errors import UsageError
from bench.model.targets import find_targets
from methods.update import UpdateConfig, _train_phase, alpaca_token_ids, factor_names, sequential_update


def factorized(loaded, ratio: float = 0.5):
    targets = find_targets(loaded.model)
    facts = {t.name: factorize(loaded.model.get_submodule(t.name).weight) for t in targets}
    model, _ = compress_model(loaded.model, targets, facts, uniform_ranks(targets, ratio))
    return model


def weights(model, child: str) -> dict[str, torch.Tensor]:
    return {n: m.get_submodule(child).weight.detach().clone() for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


SMALL = dict(update_steps=3, batch_size=2, eval_examples=4, cutoff=64)


def test_refine_runs_the_update_and_its_facts_land_in_results_json(tiny, tmp_path):
    from bench.engine.config import CalibrationConfig, RunConfig
    from bench.engine.executor import run

    config = RunConfig(model="tiny", methods=("svdllm_u",), ratios=(0.5,), tasks=("wikitext2",), seqlen=32, limit=1,
                       calibration=CalibrationConfig(samples=2, seqlen=32), out=str(tmp_path),
                       method_options={"svdllm_u": {"update_steps": 2, "batch_size": 2, "eval_examples": 2,
                                                    "cutoff": 32}})
    results = run(config, loaded=tiny)
    assert not results.data["failures"], results.data["failures"]
    [record] = [r for r in results.records if r["method"] == "svdllm_u"]
    assert record["config"]["update_steps"] == 2
    update = results.data["compressions"][record["compression"]]["facts"]["refine"]["update"]
    assert update["steps"] == 4 and [p["factor"] for p in update["phases"]] == ["W_u", "W_v"]


def test_merged_model_keeps_structure_and_parameter_count(tiny):
    model = factorized(tiny)
    structure = [(n, type(m).__name__, tuple(p.shape) if (p := getattr(m, "weight", None)) is not None else None)
                 for n, m in model.named_modules()]
    params = sum(p.numel() for p in model.parameters())
    up, down = weights(model, "up"), weights(model, "down")
    facts = sequential_update(model, tiny.tokenizer, UpdateConfig(**SMALL, lr=1e-3))
    after = [(n, type(m).__name__, tuple(p.shape) if (p := getattr(m, "weight", None)) is not None else None)
             for n, m in model.named_modules()]
    assert after == structure
    assert sum(p.numel() for p in model.parameters()) == params
    assert not any("lora" in n for n, _ in model.named_modules())
    # both factors were updated (merged) and the parameters are trainable again
    assert any(not torch.equal(up[n], w) for n, w in weights(model, "up").items())
    assert any(not torch.equal(down[n], w) for n, w in weights(model, "down").items())
    assert all(p.requires_grad for p in model.parameters())
    assert facts["steps"] == 6 and len(facts["phases"]) == 2


def test_training_loss_goes_down(tiny):
    model = factorized(tiny)
    facts = sequential_update(model, tiny.tokenizer, UpdateConfig(update_steps=8, batch_size=2, eval_examples=4,
                                                                  cutoff=64, lr=5e-3, lora_dropout=0.0))
    loss = facts["held_out_loss"]
    assert loss["after_u"] < loss["before"]
    assert loss["after"] < loss["after_u"]


def test_u_phase_trains_only_w_u(tiny):
    model = factorized(tiny)
    up, down = weights(model, "up"), weights(model, "down")
    train = alpaca_token_ids(tiny.tokenizer, 64)[:16]
    _train_phase(model, factor_names(model, "u"), train, torch.arange(16), UpdateConfig(**SMALL, lr=1e-3),
                 tiny.tokenizer.eos_token_id, "cpu")
    assert all(torch.equal(down[n], w) for n, w in weights(model, "down").items())
    assert any(not torch.equal(up[n], w) for n, w in weights(model, "up").items())


def test_order_u_then_v_by_default_and_v_then_u_as_option(tiny):
    assert UpdateConfig().order == "uv"
    first = sequential_update(factorized(tiny), tiny.tokenizer, UpdateConfig(**SMALL))
    second = sequential_update(factorized(tiny), tiny.tokenizer, UpdateConfig(**SMALL, order="vu"))
    assert [p["factor"] for p in first["phases"]] == ["W_u", "W_v"]
    assert [p["factor"] for p in second["phases"]] == ["W_v", "W_u"]
    with pytest.raises(UsageError, match="order"):
        UpdateConfig(order="uu")


def test_update_is_seeded(tiny):
    a, b = factorized(tiny), factorized(tiny)
    sequential_update(a, tiny.tokenizer, UpdateConfig(**SMALL, lr=1e-3))
    sequential_update(b, tiny.tokenizer, UpdateConfig(**SMALL, lr=1e-3))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_update_needs_a_factorized_model(tiny):
    with pytest.raises(UsageError, match="LowRankLinear"):
        sequential_update(tiny.model, tiny.tokenizer, UpdateConfig(**SMALL))


def test_methods_compose_base_and_update(registry):
    from methods.svd import VanillaSVD
    from methods.svdllm import SVDLLMWhitening

    full, ablation = registry.get("method", "svdllm"), registry.get("method", "svdllm_u")
    assert isinstance(full, SVDLLMWhitening) and full.required_statistics() == ("gram",)
    assert isinstance(ablation, VanillaSVD) and ablation.required_statistics() == ()
    config = full.make_config({"update_steps": "5", "order": "vu"})
    assert config == UpdateConfig(update_steps=5, order="vu")
    # the ablation table's components (SVD-LLM Table 4)
    assert full.components == {"transform": "whitening", "update": "yes"}
    assert ablation.components == {"transform": "none", "update": "yes"}
    # the update only refines: each shares its base's decomposition, whatever the update settings
    for method, base in ((full, "svdllm_w"), (ablation, "svd")):
        configured = registry.method_factory({method.name: {"update_steps": "5"}})(method.name)
        assert configured.decomposition_key(configured.config) == registry.get("method", base).decomposition_key(
            registry.get("method", base).config)
    assert ablation.uses_calibration() is False
