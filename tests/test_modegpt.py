"""MoDeGPT: the three module decompositions, the global allocation, the smaller layers, saving and reloading."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from bench import Context, StructuredAttention, cholesky_whitening, factorize, load_results
from bench.cli import main
from bench.engine.calibration import StatisticsStore, collect_statistics
from bench.engine.compress import build_compressed
from bench.engine.config import CalibrationConfig
from bench.engine.plugins import load_registry
from bench.model.manifest import MANIFEST
from bench.model.reload import load_compressed
from bench.model.saving import save_compressed
from bench.model.targets import find_targets, footprint
from methods.modegpt import MoDeGPT, block_dims, cr_qk, global_sparsity, nystrom_mlp, svd_vo
from tasks.throughput import kv_cache_bytes

IDS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))


def stats_of(model, tmp_path, samples=8, seqlen=64):
    targets = find_targets(model)
    windows = torch.randint(0, 256, (samples, seqlen), generator=torch.Generator().manual_seed(0))
    registry = load_registry()
    stats = collect_statistics(model, "tiny-modegpt", targets, windows, CalibrationConfig(samples=samples, seqlen=seqlen),
                               [registry.get("statistic", n) for n in ("gram", "block_importance")],
                               cache=StatisticsStore(tmp_path / "stats"))
    context = Context(model=model, tokenizer=None, targets=targets, stats=stats, calibration=windows, device="cpu",
                      cache_dir=Path("."), model_identity="tiny-modegpt")
    return targets, context


def compress(model, context, ratio, **options):
    method = MoDeGPT()
    method = method.configured(method.make_config(options), lambda name: None)
    return build_compressed(method, ratio, {}, context, footprint(model))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def correlated(n, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, n, generator=g, dtype=torch.float64) @ torch.randn(n, tokens, generator=g,
                                                                                dtype=torch.float64))


# --------------------------------------------------------------------------- the module decompositions

def test_mlp_error_is_the_nystrom_closed_form():
    g = torch.Generator().manual_seed(0)
    inter, hidden, tokens, keep = 24, 10, 200, 9
    z = correlated(inter, tokens, 1)
    c = z @ z.T
    w_g, w_u = torch.randn(inter, hidden, generator=g, dtype=torch.float64), torch.randn(inter, hidden, generator=g,
                                                                                           dtype=torch.float64)
    w_d = torch.randn(hidden, inter, generator=g, dtype=torch.float64)
    found = nystrom_mlp(w_g, w_u, w_d, c, keep, ridge=1e-2)
    s = found["kept"]
    closed = torch.trace(w_d @ (c - c[:, s] @ torch.linalg.solve(c[s][:, s], c[s])) @ w_d.T)
    actual = ((w_d @ z - found["down"] @ z[s]) ** 2).sum()  # the compressed MLP's output error on the tokens
    assert float(actual) == pytest.approx(float(closed), rel=1e-8)
    assert found["loss"] == pytest.approx(float(closed), rel=1e-8)
    assert torch.equal(found["gate"], w_g[s]) and torch.equal(found["up"], w_u[s])
    # the compensation is the least-squares optimum: perturbing it raises the error
    worse = ((w_d @ z - (found["down"] + 1e-3) @ z[s]) ** 2).sum()
    assert worse > actual


def test_value_output_module_reaches_svdllm_w_loss_for_one_head():
    g = torch.Generator().manual_seed(2)
    hidden, head_dim, keep = 20, 8, 3
    w_v = torch.randn(head_dim, hidden, generator=g, dtype=torch.float64)
    w_o = torch.randn(hidden, head_dim, generator=g, dtype=torch.float64)
    x = correlated(hidden, 300, 3)
    c = x @ x.T
    found = svd_vo(w_v, w_o, c, heads=1, kv_heads=1, head_dim=head_dim, keep=keep)
    product = w_o @ w_v
    svdllm_loss = factorize(product, cholesky_whitening(c)[0]).truncation_loss(keep)
    actual = float((((product - found["o"] @ found["v"]) @ x) ** 2).sum())
    assert found["v"].shape == (keep, hidden) and found["o"].shape == (hidden, keep)
    assert found["loss"] == pytest.approx(svdllm_loss, rel=1e-8)
    assert actual == pytest.approx(svdllm_loss, rel=1e-8)


def test_grouped_value_output_minimizes_the_summed_head_error():
    g = torch.Generator().manual_seed(4)
    hidden, head_dim, heads, kv, keep = 16, 6, 4, 2, 3
    w_v = torch.randn(kv * head_dim, hidden, generator=g, dtype=torch.float64)
    w_o = torch.randn(hidden, heads * head_dim, generator=g, dtype=torch.float64)
    x = correlated(hidden, 200, 5)
    c = x @ x.T

    def error(found):
        total = 0.0
        for h in range(heads):
            kvh = h // (heads // kv)
            dense = w_o[:, h * head_dim:(h + 1) * head_dim] @ w_v[kvh * head_dim:(kvh + 1) * head_dim]
            small = found["o"][:, h * keep:(h + 1) * keep] @ found["v"][kvh * keep:(kvh + 1) * keep]
            total += float((((dense - small) @ x) ** 2).sum())
        return total

    stacked = svd_vo(w_v, w_o, c, heads, kv, head_dim, keep, mode="stack")
    value = svd_vo(w_v, w_o, c, heads, kv, head_dim, keep, mode="value")
    assert error(stacked) == pytest.approx(stacked["loss"], rel=1e-8)
    assert error(value) == pytest.approx(value["loss"], rel=1e-8)
    assert error(stacked) < error(value)


def test_query_key_keeps_rope_pairs_and_a_groups_channels():
    g = torch.Generator().manual_seed(6)
    hidden, head_dim, heads, kv, keep = 12, 8, 4, 2, 4
    w_q = torch.randn(heads * head_dim, hidden, generator=g, dtype=torch.float64)
    w_k = torch.randn(kv * head_dim, hidden, generator=g, dtype=torch.float64)
    c = correlated(hidden, 100, 7) @ correlated(hidden, 100, 7).T
    found = cr_qk(w_q, w_k, c, heads, kv, head_dim, keep)
    index = found["rope_index"]
    assert index.shape == (kv, keep)
    half = head_dim // 2
    assert torch.equal(index[:, keep // 2:], index[:, :keep // 2] + half)  # pairs (i, i + d/2) together
    for h in range(heads):  # each query head keeps its key head's channels
        rows = found["q"][h * keep:(h + 1) * keep]
        assert torch.equal(rows, w_q[h * head_dim + index[h // 2]])
    assert torch.equal(found["k"][:keep], w_k[index[0]])


# --------------------------------------------------------------------------- allocation

def test_infinite_temperature_gives_uniform_sparsity():
    importance = [0.9, 0.1, 0.3, 0.05, 0.4]
    assert global_sparsity(importance, 0.3, math.inf, 0.8) == pytest.approx([0.3] * 5)
    assert global_sparsity(importance, 0.3, 1e9, 0.8) == pytest.approx([0.3] * 5, abs=1e-8)
    phi = global_sparsity(importance, 0.3, 0.15, 0.8)
    assert sum(phi) / 5 == pytest.approx(0.3)
    assert phi[0] < phi[4] < phi[2] < phi[1] < phi[3]  # more important blocks are compressed less


def test_the_cap_redistributes_and_keeps_the_mean():
    phi = global_sparsity([1.0, 0.0, 0.9, 0.8], 0.5, 0.05, 0.8)
    assert max(phi) <= 0.8 + 1e-12 and sum(phi) / 4 == pytest.approx(0.5)
    assert phi[1] == pytest.approx(0.8)


@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_dims_meet_the_parameter_budget_within_one_neuron(ratio):
    shape = {"head_dim": 64, "heads": 9, "kv_heads": 3, "hidden": 576, "inter": 1536, "o_bias": 0, "down_bias": 0,
             "gate_up_bias": 0}
    dense = 30 * (576 * 64 * (9 + 3) * 2 + 3 * 576 * 1536)
    budget = math.floor(dense * (1 - ratio))
    phi = global_sparsity([0.1 + 0.01 * i for i in range(30)], ratio, 0.15, 0.8)
    dims = block_dims(phi, shape, budget)
    used = sum(576 * 12 * (d["qk_dim"] + d["vo_dim"]) + 3 * 576 * d["intermediate"] for d in dims)
    assert used <= budget and budget - used < 3 * 576
    assert all(d["qk_dim"] % 2 == 0 for d in dims)


# --------------------------------------------------------------------------- the compressed model

def test_nothing_removed_is_exact(tmp_path):
    model = tiny_model("llama", layers=2)
    _, context = stats_of(model, tmp_path, samples=16, seqlen=64)  # 1024 tokens: C_z (128 x 128) full rank
    compressed = compress(model, context, 0.0)
    assert any(isinstance(m, StructuredAttention) for m in compressed.model.modules())
    assert torch.allclose(logits(compressed.model), logits(model), atol=1e-4, rtol=1e-4)
    assert compressed.summary["params"] == footprint(model)["params"]


def test_structured_attention_equals_the_original_with_the_removed_channels_zeroed(tmp_path):
    model = tiny_model("llama", layers=2)  # 4 heads, 2 key-value heads (GQA), head_dim 16
    attention = model.model.layers[1].self_attn
    g = torch.Generator().manual_seed(3)
    keep_pairs = [torch.sort(torch.randperm(8, generator=g)[:3]).values for _ in range(2)]
    index = torch.stack([torch.cat([p, p + 8]) for p in keep_pairs])
    small = StructuredAttention(attention, 6, 16)
    zeroed = copy.deepcopy(model)
    za = zeroed.model.layers[1].self_attn
    with torch.no_grad():
        q_rows = torch.cat([h * 16 + index[h // 2] for h in range(4)])
        k_rows = torch.cat([g_ * 16 + index[g_] for g_ in range(2)])
        small.q_proj.weight.copy_(attention.q_proj.weight[q_rows])
        small.k_proj.weight.copy_(attention.k_proj.weight[k_rows])
        small.v_proj.weight.copy_(attention.v_proj.weight)
        small.o_proj.weight.copy_(attention.o_proj.weight)
        small.rope_index.copy_(index)
        keep_q = torch.zeros(64, dtype=torch.bool)
        keep_q[q_rows] = True
        keep_k = torch.zeros(32, dtype=torch.bool)
        keep_k[k_rows] = True
        za.q_proj.weight[~keep_q] = 0
        za.k_proj.weight[~keep_k] = 0
    structured = copy.deepcopy(model)
    structured.model.layers[1].self_attn = small
    assert torch.allclose(logits(structured), logits(zeroed), atol=1e-5, rtol=1e-5)


def test_compressed_model_meets_the_ratio_and_its_kv_cache_shrinks(tmp_path):
    model = tiny_model("llama", layers=3)
    targets, context = stats_of(model, tmp_path)
    compressed = compress(model, context, 0.4)
    facts = compressed.facts["refine"]["modegpt"]
    dense = sum(t.params for t in targets)
    assert facts["block_params"] <= math.floor(dense * 0.6) and facts["block_params"] > dense * 0.6 - 3 * 64
    assert compressed.summary["target_params"] == facts["block_params"]
    assert compressed.summary["target_ratio_achieved"] == pytest.approx(facts["block_ratio_achieved"])
    assert torch.isfinite(logits(compressed.model)).all()

    def cache_bytes(m):
        with torch.no_grad():
            out = m(IDS, use_cache=True)
        return kv_cache_bytes(out.past_key_values)

    blocks = facts["blocks"].values()
    expected = sum(b["qk_dim"] + b["vo_dim"] for b in blocks) / (2 * 16 * 3)
    assert cache_bytes(compressed.model) / cache_bytes(model) == pytest.approx(expected)
    assert expected < 0.8
    # decoding with the cache gives the logits of the full forward pass
    with torch.no_grad():
        full = compressed.model(IDS, use_cache=False).logits[:, -1]
        out = compressed.model(IDS[:, :-1], use_cache=True)
        step = compressed.model(IDS[:, -1:], cache=out.past_key_values, use_cache=True).logits[:, -1]
    assert torch.allclose(step, full, atol=1e-4, rtol=1e-4)


def test_saved_model_reloads_exactly(tmp_path, tokenizer):
    model = tiny_model("llama", layers=2, vocab_size=len(tokenizer))
    _, context = stats_of(model, tmp_path)
    compressed = compress(model, context, 0.3)
    save_compressed(compressed.model, tokenizer, tmp_path / "m", {"method": "modegpt", "ratio": 0.3})
    manifest = json.loads((tmp_path / "m" / MANIFEST).read_text())
    layers = manifest["structured"]
    assert set(layers["attention"]) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert layers["linears"]["model.layers.0.mlp.gate_proj"][0] == compressed.model.model.layers[0].mlp.gate_proj.out_features
    reloaded = load_compressed(tmp_path / "m").model
    assert torch.equal(logits(reloaded), logits(compressed.model))
    assert footprint(reloaded) == footprint(compressed.model)


@pytest.mark.slow
def test_cli_run_of_modegpt_beside_svdllm_w(checkpoint_dir, tmp_path):
    args = []
    if "modegpt" not in load_registry().methods:
        plugins = tmp_path / "plugins"
        plugins.mkdir()
        (plugins / "modegpt_plugin.py").write_text("from methods.modegpt import register_methods  # noqa: F401\n")
        args = ["--plugins-dir", str(plugins)]
    out = tmp_path / "out"
    assert main([*args, "run", "--model", str(checkpoint_dir), "--methods", "svdllm_w,modegpt", "--ratios", "0.4",
                 "--tasks", "wikitext2", "--limit", "1", "--seqlen", "32", "--calib-samples", "4",
                 "--calib-seqlen", "64", "--out", str(out)]) == 0
    data = load_results(out)
    assert not data["failures"], data["failures"]
    rows = {r["method"]: r["value"] for r in data["records"] if r["task"] == "wikitext2"}
    assert {"svdllm_w", "modegpt"} <= set(rows) and all(math.isfinite(v) for v in rows.values())
    compression = next(c for c in data["compressions"].values() if c["method"] == "modegpt")
    assert compression["summary"]["target_ratio_achieved"] >= 0.4
