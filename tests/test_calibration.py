"""Calibration statistics: correctness, the block-by-block pass against a whole-model pass, the verified store."""

import logging

import pytest
import torch
from conftest import tiny_model
from families import whole_model_statistics

from bench.engine.calibration import StatisticsStore, calibration_batches, collect_statistics
from bench.engine.config import CalibrationConfig
from bench.model.loaded import fingerprint
from bench.model.targets import find_targets
from methods.statistics import AbsMean, Fisher, GradNorm, Gram

CONFIG = CalibrationConfig(samples=3, seqlen=16)


def collect(model, batches, statistics, cache_dir):
    return collect_statistics(model, fingerprint(model), find_targets(model), batches, CONFIG, statistics,
                              cache=StatisticsStore(cache_dir))


def inputs_of(model, name, batches):
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        for row in batches:
            model(row[None])
    handle.remove()
    return torch.cat(seen).double()


def test_calibration_windows_are_seeded(tokenizer):
    a = calibration_batches(tokenizer, CONFIG)
    assert a.shape == (3, 16)
    assert torch.equal(a, calibration_batches(tokenizer, CONFIG))
    assert not torch.equal(a, calibration_batches(tokenizer, CalibrationConfig(samples=3, seqlen=16, seed=4)))


def test_gram_and_abs_mean_equal_direct_computation(tmp_path):
    model = tiny_model("llama")
    batches = torch.randint(0, 256, (3, 16))
    stats = collect(model, batches, [Gram(), AbsMean()], tmp_path)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        x = inputs_of(model, name, batches)
        assert stats.get("gram", name).dtype == torch.float64
        assert torch.allclose(stats.get("gram", name), x.T @ x, rtol=1e-10, atol=1e-8)
        assert torch.allclose(stats.get("abs_mean", name), x.abs().mean(0), rtol=1e-10)
    # q, k and v read the same input: one gram, shared
    assert stats.input_group["model.layers.0.self_attn.k_proj"] == "model.layers.0.self_attn.q_proj"
    assert stats.input_group["model.layers.0.mlp.up_proj"] == "model.layers.0.mlp.gate_proj"
    assert stats.input_group["model.layers.0.self_attn.o_proj"] == "model.layers.0.self_attn.o_proj"
    assert len(stats.values["gram"]) == 2 * 4


def test_gradient_statistics_match_autograd(tmp_path):
    model = tiny_model("llama")
    batches = torch.randint(0, 256, (2, 16))
    stats = collect(model, batches, [Fisher(), GradNorm()], tmp_path)
    assert all(p.grad is None for p in model.parameters())  # the model is left as it was
    assert all(p.requires_grad for p in model.parameters())
    name = "model.layers.1.mlp.up_proj"
    grads = []
    for row in batches:
        model.zero_grad()
        model(row[None], labels=row[None]).loss.backward()
        grads.append(model.get_submodule(name).weight.grad.double().clone())
    expected = sum(g.pow(2).sum(0) for g in grads) / 2
    assert torch.allclose(stats.get("fisher", name), expected, rtol=1e-6)
    assert torch.allclose(stats.get("grad_norm", name), sum(g.norm() for g in grads).reshape(1) / 2, rtol=1e-6)


def test_cache_is_reused_then_rebuilt_when_corrupted(tmp_path, caplog, monkeypatch):
    model = tiny_model("llama")
    batches = torch.randint(0, 256, (2, 16))
    first = collect(model, batches, [Gram()], tmp_path)
    passes = []
    import bench.engine.calibration as calibration
    real = calibration.forward_statistics
    monkeypatch.setattr(calibration, "forward_statistics", lambda *a, **k: passes.append(1) or real(*a, **k))
    second = collect(model, batches, [Gram()], tmp_path)
    assert passes == []  # served from the cache
    assert second.input_group == first.input_group
    for key, value in first.values["gram"].items():
        assert torch.equal(value, second.values["gram"][key])
    [data_file] = tmp_path.glob("*/block-0001.safetensors")
    data_file.write_bytes(data_file.read_bytes()[:-10] + b"0123456789")
    with caplog.at_level(logging.WARNING):
        third = collect(model, batches, [Gram()], tmp_path)
    assert passes == [1] and "does not match its checksum" in caplog.text
    assert torch.equal(third.get("gram", "model.layers.0.self_attn.q_proj"), first.get("gram", "model.layers.0.self_attn.q_proj"))


def test_two_models_never_share_an_entry(tmp_path):
    batches = torch.randint(0, 256, (2, 16))
    a = collect(tiny_model("llama", seed=0), batches, [Gram()], tmp_path)
    b = collect(tiny_model("llama", seed=1), batches, [Gram()], tmp_path)
    assert len([p for p in tmp_path.iterdir() if (p / "manifest.json").exists()]) == 2
    name = "model.layers.0.self_attn.q_proj"
    assert not torch.allclose(a.get("gram", name), b.get("gram", name))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "opt"])
def test_block_by_block_pass_is_bit_identical_to_a_whole_model_pass(family, tmp_path):
    model = tiny_model(family)
    batches = torch.randint(0, 256, (3, 16))
    expected, groups = whole_model_statistics(model, batches, [Gram(), AbsMean()])
    got = collect(model, batches, [Gram(), AbsMean()], tmp_path)
    assert got.input_group == groups
    for name, table in expected.items():
        assert set(got.values[name]) == set(table)
        for key, value in table.items():
            assert torch.equal(got.values[name][key], value), (name, key)


def test_each_block_is_delivered_once_with_its_statistics(tmp_path):
    """on_block sees block 0, 1, ... with exactly that block's statistics, from the pass and then from the store."""
    model = tiny_model("llama")
    batches = torch.randint(0, 256, (2, 16))
    for attempt in ("computed", "from the store"):
        seen = []

        def on_block(index, targets, stats, groups, seen=seen):
            seen.append((index, sorted({t.block for t in targets}), sorted(stats["gram"])))

        collect_statistics(model, fingerprint(model), find_targets(model), batches, CONFIG, [Gram()],
                           cache=StatisticsStore(tmp_path), on_block=on_block)
        assert [s[0] for s in seen] == [0, 1], attempt
        assert seen[1][1] == [1] and all(key.startswith("model.layers.1.") for key in seen[1][2]), attempt


@pytest.mark.real_model
def test_smollm2_block_by_block_statistics_equal_the_whole_model_pass(smollm2, tmp_path):
    model = smollm2.model
    batches = calibration_batches(smollm2.tokenizer, CalibrationConfig(samples=2, seqlen=64))
    expected, groups = whole_model_statistics(model, batches, [Gram(), AbsMean()])
    got = collect_statistics(model, smollm2.identity, find_targets(model), batches,
                             CalibrationConfig(samples=2, seqlen=64), [Gram(), AbsMean()], cache=StatisticsStore(tmp_path))
    assert got.input_group == groups
    for name, table in expected.items():
        assert all(torch.equal(got.values[name][key], value) for key, value in table.items()), name
