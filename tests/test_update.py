"""SVD-LLM's sequential low-rank update (bench/lora_update.py, methods/svdllm_update.py)."""

from __future__ import annotations

import pytest
import torch

from bench.compress import compress_model
from bench.errors import UsageError
from bench.lora_update import UpdateConfig, _train_phase, alpaca_token_ids, factor_names, sequential_update
from bench.lowrank import LowRankLinear, factorize
from bench.method import uniform_ranks
from bench.models import find_targets


def factorized(loaded, ratio: float = 0.5):
    targets = find_targets(loaded.model)
    facts = {t.name: factorize(loaded.model.get_submodule(t.name).weight) for t in targets}
    model, _ = compress_model(loaded.model, targets, facts, uniform_ranks(targets, ratio))
    return model


def weights(model, child: str) -> dict[str, torch.Tensor]:
    return {n: m.get_submodule(child).weight.detach().clone() for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


SMALL = dict(update_steps=3, batch_size=2, eval_examples=4, cutoff=64)


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
    assert isinstance(full, SVDLLMWhitening) and full.requires == ("gram",)
    assert isinstance(ablation, VanillaSVD) and ablation.requires == ()
    config = full.make_config(update_steps="5", order="vu")
    assert config == UpdateConfig(update_steps=5, order="vu")
