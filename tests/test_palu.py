"""Palu (methods/palu.py) and its latent KV cache (bench/model/latent_attention.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from bench import Context, LatentKVAttention, cholesky_whitening, kv_accounting, latent_layers
from bench.engine.calibration import StatisticsStore, collect_statistics
from bench.engine.compress import build_compressed
from bench.engine.config import CalibrationConfig
from bench.engine.plugins import load_registry
from bench.model.targets import find_targets, footprint
from methods.palu import Palu, PaluFisher, allocate_units, grouped_factors, truncate
from tasks.throughput import generate_timed, kv_cache_bytes


def tiny_stats(model, tmp_path, samples=4, seqlen=32):
    targets = find_targets(model)
    windows = torch.randint(0, 256, (samples, seqlen), generator=torch.Generator().manual_seed(0))
    stats = collect_statistics(model, "tiny-palu", targets, windows, CalibrationConfig(samples=samples, seqlen=seqlen),
                               [load_registry().get("statistic", "gram"), PaluFisher()],
                               cache=StatisticsStore(tmp_path / "stats"))
    return targets, windows, stats


def palu(options=None):
    method = Palu()
    return method.configured(method.make_config(options or {}), None)


def context_of(model, targets, stats, windows):
    return Context(model=model, tokenizer=None, targets=targets, stats=stats, calibration=windows, device="cpu",
                   cache_dir=Path("."), model_identity="tiny-palu")


def rebuilt_model(model, method, context, ratio):
    """Palu's Hugging Face path: k/v_proj replaced by the dense ``B A`` (keys and values rebuilt at once)."""
    ranks = method.latent_ranks(ratio, context, method.config, model)["ranks"]
    rebuilt = copy.deepcopy(model)
    for target in context.targets:
        if target.name in ranks:
            found, _ = method.factors(target, context, method.config, model)
            a, b = truncate(found, ranks[target.name])
            r = ranks[target.name]
            weight = torch.cat([b[i] @ a[i * r:(i + 1) * r] for i in range(b.shape[0])])
            rebuilt.get_submodule(target.name).weight.data.copy_(weight)
    return rebuilt


def compress(model, targets, stats, windows, ratio, options=None):
    method = palu(options)
    context = context_of(model, targets, stats, windows)
    return method, context, build_compressed(method, ratio, {}, context, footprint(model))


@pytest.mark.parametrize("family,group_size", [("llama", 1), ("llama", 2), ("qwen2", 1)])
def test_latent_cache_decodes_the_same_tokens_as_rebuilding(family, group_size, tmp_path):
    model = tiny_model(family, layers=3)
    targets, windows, stats = tiny_stats(model, tmp_path)
    method, context, compressed = compress(model, targets, stats, windows, 0.5, {"group_size": str(group_size)})
    latent = compressed.model
    assert len(latent_layers(latent)) == 3
    rebuilt = rebuilt_model(model, method, context, 0.5)
    with torch.no_grad():
        a, b = latent(windows[:2]).logits, rebuilt(windows[:2]).logits
        assert torch.allclose(a, b, atol=1e-4)
        assert not torch.allclose(b, model(windows[:2]).logits, atol=1e-3)  # compression changed something
    prompt = windows[:2, :8]
    tokens_latent = latent.generate(prompt, max_new_tokens=24, do_sample=False)
    tokens_rebuilt = rebuilt.generate(prompt, max_new_tokens=24, do_sample=False)
    assert torch.equal(tokens_latent, tokens_rebuilt)


def test_the_cache_holds_latents_and_their_bytes_are_the_kv_ratio(tmp_path):
    model = tiny_model("llama", layers=3)
    targets, windows, stats = tiny_stats(model, tmp_path)
    _, _, compressed = compress(model, targets, stats, windows, 0.5)
    prompt = windows[:1, :16]
    _, _, dense_bytes = generate_timed(model, prompt, 4)
    _, _, latent_bytes = generate_timed(compressed.model, prompt, 4)
    assert latent_bytes == pytest.approx(0.5 * dense_bytes, rel=1e-9)
    facts = kv_accounting(compressed.model, 4)
    assert facts["kv_ratio_achieved"] == pytest.approx(0.5)
    assert compressed.summary["kv_ratio"] == 0.5 and compressed.summary["kv_ratio_achieved"] == pytest.approx(0.5)
    out = compressed.model(prompt, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    layer = latent_layers(compressed.model)[0]
    assert cache.layers[0].keys.shape == (1, layer.groups, 16, layer.k_rank)
    assert kv_cache_bytes(cache) == 16 * sum(m.latent_width() for m in latent_layers(compressed.model)) * 4


def test_static_cache_path_gives_the_dynamic_cache_tokens(tmp_path):
    from tasks.throughput import CompiledDecoder

    model = tiny_model("llama", layers=2)
    targets, windows, stats = tiny_stats(model, tmp_path)
    _, _, compressed = compress(model, targets, stats, windows, 0.3)
    prompt = windows[:1, :8]
    static = CompiledDecoder(compressed.model, 8 + 6, compile=False).generate(prompt, 6)[3]
    dynamic = compressed.model.generate(prompt, max_new_tokens=6, do_sample=False)[:, 8:]
    assert torch.equal(torch.cat(static, dim=1).reshape(1, -1)[:, :6], dynamic)


def whitened_loss(weight, gram, rows, rank):
    """``sum_i ||(W_i - B_i A_i) S||_F^2`` computed from the factors, not from the spectrum."""
    found, _ = grouped_factors(weight, gram, rows)
    a, b = truncate(found, rank)
    s = cholesky_whitening(gram, 1e-3)[0].factor
    approx = torch.cat([b[i] @ a[i * rank:(i + 1) * rank] for i in range(b.shape[0])])
    return float(((weight.double() - approx) @ s).pow(2).sum()), sum(f.truncation_loss(rank) for f in found)


def test_whitened_loss_joint_below_grouped_below_per_head_at_equal_total_rank():
    generator = torch.Generator().manual_seed(4)
    heads, d, n = 4, 16, 48
    weight = torch.randn(heads * d, n, generator=generator, dtype=torch.float64)
    x = torch.randn(n, 400, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 3, n)[:, None]
    gram = x @ x.T
    losses = []
    for g in (heads, 2, 1):  # joint (one group), grouped, per head; total rank 24 each
        explicit, spectrum = whitened_loss(weight, gram, g * d, 24 * g // heads)
        assert explicit == pytest.approx(spectrum, rel=1e-8)
        losses.append(explicit)
    assert losses[0] < losses[1] < losses[2]


def test_allocation_meets_the_total_exactly_and_follows_the_fisher():
    units = allocate_units({"a": 5.0, "b": 1.0, "c": 1.0, "d": 3.0}, 17, 8)
    assert sum(units.values()) == 17 and max(units.values()) <= 8
    assert units["a"] > units["d"] > units["b"]
    assert allocate_units({"a": 100.0, "b": 0.001}, 5, 4) == {"a": 4, "b": 1}  # cap and minimum, total kept


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_kv_budget_met_exactly_on_a_tiny_model(ratio, tmp_path):
    model = tiny_model("llama", layers=4)
    targets, windows, stats = tiny_stats(model, tmp_path)
    method = palu({"group_size": "1"})
    context = context_of(model, targets, stats, windows)
    plan = method.latent_ranks(ratio, context, method.config, model)
    # 8 modules x 2 groups x 16 dims; kept total (1 - ratio) 256 is a multiple of G = 2 at 0.5 only
    kept = sum(2 * r for r in plan["ranks"].values())
    assert kept == round((1 - ratio) * 256 / 2) * 2
    assert len(set(plan["ranks"].values())) > 1  # the Fisher spread them
    fisher = stats.values["palu_fisher"]
    assert set(fisher) == {t.name for t in targets if t.kind.endswith(("k_proj", "v_proj"))}


def test_latent_attention_module_has_no_dense_k_or_v(tmp_path):
    model = tiny_model("llama", layers=2)
    targets, windows, stats = tiny_stats(model, tmp_path)
    _, _, compressed = compress(model, targets, stats, windows, 0.5)
    layer = compressed.model.model.layers[0].self_attn
    assert isinstance(layer, LatentKVAttention)
    names = {n for n, _ in layer.named_parameters()}
    assert not any(n.startswith(("k_proj", "v_proj")) for n in names)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_saved_palu_model_reloads_with_the_same_loss_and_latent_cache(family, tmp_path, tokenizer):
    from bench.model.reload import load_compressed
    from bench.model.saving import save_compressed

    model = tiny_model(family, layers=2, vocab_size=len(tokenizer))
    targets, windows, stats = tiny_stats(model, tmp_path)
    _, _, compressed = compress(model, targets, stats, windows, 0.5, {"group_size": "2"})
    save_compressed(compressed.model, tokenizer, tmp_path / "m", {"method": "palu", "ratio": 0.5})
    loaded = load_compressed(tmp_path / "m").model
    assert len(latent_layers(loaded)) == 2
    with torch.no_grad():
        before = compressed.model(windows, labels=windows).loss
        after = loaded(windows, labels=windows).loss
    assert float(before) == float(after)
    prompt = windows[:1, :8]
    assert torch.equal(loaded.generate(prompt, max_new_tokens=8, do_sample=False),
                       compressed.model.generate(prompt, max_new_tokens=8, do_sample=False))


def test_kv_ratios_in_the_run_config_and_the_plan():
    from bench.engine.config import resolve_config
    from bench.errors import UsageError

    config = resolve_config(None, {"methods": ["palu"], "kv_ratios": "0.3,0.5"})
    assert config.kv_ratios == (0.3, 0.5) and config.ratios == ()
    with pytest.raises(UsageError):
        resolve_config(None, {"methods": ["palu"], "kv_ratios": "1.5"})


@pytest.mark.slow
def test_cli_run_with_kv_ratios_records_them_and_reports_the_kv_table(checkpoint_dir, tmp_path):
    from bench import DENSE, load_results
    from bench.cli import main
    from reports.tables import build_tables

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    if "palu" not in load_registry().methods:  # an installed svdbench older than the entry point
        (plugins / "palu_plugin.py").write_text("from methods.palu import register_methods, register_statistics  "
                                                "# noqa: F401\n")
    out = tmp_path / "out"
    assert main(["--plugins-dir", str(plugins), "run", "--model", str(checkpoint_dir), "--methods", "palu",
                 "--kv-ratios", "0.5", "--tasks", "wikitext2,throughput_quick", "--limit", "1", "--seqlen", "32",
                 "--calib-samples", "4", "--calib-seqlen", "64", "--out", str(out)]) == 0
    data = load_results(out)
    assert not data["failures"], data["failures"]
    palu_records = [r for r in data["records"] if r["method"] == "palu"]
    assert palu_records and all(r["ratio"] == 0.5 and r["accounting"]["kv_ratio"] == 0.5 for r in palu_records)
    kv = {r["method"]: r["value"] for r in data["records"] if r["metric"] == "kv_cache_mb"}
    assert kv["palu"] == pytest.approx(kv[DENSE] * 0.5, rel=1e-6)  # 3 layers x 2 heads x 16: exact at 0.5
    table = next(t for t in build_tables(data) if t.name == "kv_cache")
    assert [row[0] for row in table.rows] == [DENSE, "palu"]
    assert table.rows[1][2] == pytest.approx(0.5)


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_at_half_the_kv_cache_holds_half_the_bytes_and_decodes_like_rebuilding(smollm2, tmp_path):
    model = smollm2.model
    targets = find_targets(model)
    windows = torch.randint(0, 49152, (2, 128), generator=torch.Generator().manual_seed(0))
    stats = collect_statistics(model, smollm2.identity, targets, windows, CalibrationConfig(samples=2, seqlen=128),
                               [load_registry().get("statistic", "gram"), PaluFisher()],
                               cache=StatisticsStore(tmp_path / "stats"))
    method, context, compressed = compress(model, targets, stats, windows, 0.5)
    assert compressed.summary["kv_ratio_achieved"] == pytest.approx(0.5)  # 30 x 2 x 192 x 0.5 is a multiple of 3
    prompt = windows[:1, :16].repeat(1, 64)  # 1024 tokens
    _, _, dense_bytes = generate_timed(model, prompt, 2)
    _, _, latent_bytes = generate_timed(compressed.model, prompt, 2)
    assert latent_bytes <= 0.52 * dense_bytes
    rebuilt = rebuilt_model(model, method, context, 0.5)
    short = windows[:1, :32]
    assert torch.equal(compressed.model.generate(short, max_new_tokens=12, do_sample=False),
                       rebuilt.generate(short, max_new_tokens=12, do_sample=False))
