"""Throughput task: positive finite figures over the expected grid, KV-cache bytes as the shapes imply;
the compiled static-cache path decodes the tokens ``generate`` does."""

import math

import pytest
import torch

from bench.api.task import EvalSettings
from tasks.throughput import V2_GRID, CompiledDecoder, Grid, Throughput


def test_tiny_model_through_the_throughput_task():
    from conftest import tiny_model

    model = tiny_model("llama", vocab_size=128)
    grid = Grid(batch_sizes=(1, 2), prompt_lengths=(8, 16), decode_lengths=(3,), repeats=2, warmup=1, paths=("eager",))
    measurements = Throughput("throughput", grid).evaluate(model, None, EvalSettings())
    metrics = ("prefill_tok_s", "decode_tok_s", "peak_mem_mb", "kv_cache_mb")
    points = {(m.point["batch_size"], m.point["prompt_len"], m.point["decode_len"]) for m in measurements}
    assert points == set(grid.points()) and len(measurements) == len(metrics) * len(points)
    assert not any("batch_size" in m.extra for m in measurements)  # the grid point is in `point`, not in `extra`
    assert {m.point["path"] for m in measurements} == {"eager"}
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    for m in measurements:
        assert m.metric in metrics and math.isfinite(m.value) and m.value > 0, m
        assert m.extra["repeats"] == 2 and len(m.extra.get("seconds", [0, 0])) == 2
        batch, prompt, decode = m.point["batch_size"], m.point["prompt_len"], m.point["decode_len"]
        if m.metric == "kv_cache_mb":  # keys + values of every layer for prompt + decoded tokens, float32
            expected = 2 * config.num_hidden_layers * batch * config.num_key_value_heads * (prompt + decode) * head_dim * 4
            assert m.extra["bytes"] == expected
        if m.metric == "peak_mem_mb":
            assert m.value >= m.extra["weights_mb"] > 0


def test_decoding_is_measured_without_autograd():
    """As deployed (and as ``generate`` runs): no layer's forward builds a graph, whose cache-held history kept
    every decode step's dequantized weights alive (13.9 GB for the HQQ model in the main job)."""
    from conftest import tiny_model

    model = tiny_model("llama", vocab_size=128)
    assert any(p.requires_grad for p in model.parameters())  # loaded weights are trainable: autograd would record
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    grid = Grid(batch_sizes=(1,), prompt_lengths=(8,), decode_lengths=(3,), repeats=1, warmup=0, paths=("eager",))
    Throughput("throughput", grid).evaluate(model, None, EvalSettings())
    assert len(seen) == 4 and not any(seen)  # the prefill and 3 decode steps


def test_registered_presets(registry):
    assert isinstance(registry.get("task", "throughput"), Throughput)
    v2 = registry.get("task", "throughput_v2")
    assert v2.grid == V2_GRID and V2_GRID.points() == [(4, 1024, 256)]
    assert v2.settings_key(EvalSettings()) != registry.get("task", "throughput").settings_key(EvalSettings())
    quick = registry.get("task", "throughput_quick")
    assert quick.grid.points() == [(1, 128, 16)] and quick.grid.repeats >= 3
    assert quick.grid.paths == ("eager",)  # compiling each of the main job's models is too slow
    assert registry.get("task", "throughput").grid.paths == v2.grid.paths == ("eager", "compiled")
    with pytest.raises(ValueError, match="paths"):
        Grid(paths=("jit",))
    kinds = {name: metric.kind for name, metric in quick.metrics.items()}
    assert kinds == {"prefill_tok_s": "throughput", "decode_tok_s": "throughput", "peak_mem_mb": "memory",
                     "kv_cache_mb": "memory"}
    assert quick.metrics["prefill_tok_s"].higher_is_better and not quick.metrics["peak_mem_mb"].higher_is_better


def test_throughput_records_carry_their_point_and_the_report_shows_the_speed_up(tiny, tmp_path):
    """Through the executor: a record per metric and grid point, its point in ``point`` and ``variant``."""
    from bench import hookimpl
    from bench.engine.config import RunConfig
    from bench.engine.executor import run
    from bench.engine.plugins import load_registry
    from reports.report import write_report

    class TinyGrid:
        @hookimpl
        def register_tasks(self, register):
            register(Throughput("throughput_tiny", Grid(batch_sizes=(1, 2), prompt_lengths=(8,), decode_lengths=(2,),
                                                        repeats=1, warmup=0, paths=("eager",))))

    registry = load_registry(extra=[("tiny-grid", TinyGrid())])
    results = run(RunConfig(model="tiny", methods=("svd",), ratios=(0.5,), tasks=("throughput_tiny",),
                            out=str(tmp_path)), registry, tiny)
    records = results.records
    assert len(records) == 2 * 2 * 4  # (dense, svd) x two grid points x four metrics
    assert {r["kind"] for r in records} == {"throughput", "memory"}
    assert {(r["method"], r["point"]["batch_size"]) for r in records} == {(m, b) for m in ("dense", "svd") for b in (1, 2)}
    assert {r["variant"] for r in records} == {"batch_size=1 prompt_len=8 decode_len=2 path=eager",
                                               "batch_size=2 prompt_len=8 decode_len=2 path=eager"}
    report = write_report(results.data, tmp_path, plots=False)[0].read_text()
    assert "## Throughput and memory" in report and "prefill_tok_s speed-up ↑" in report
    assert "| svd | 50% | batch_size=2 prompt_len=8 decode_len=2 path=eager |" in report


def test_the_static_cache_step_decodes_what_generate_decodes():
    """The compiled path's decoding loop (run eagerly here) gives ``generate``'s greedy tokens, prompt after prompt."""
    from conftest import tiny_model

    model = tiny_model("llama", vocab_size=128)
    prompt = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    decoder = CompiledDecoder(model, max_len=16, compile=False)
    for length in (8, 6):  # the cache is reset between generations
        _, _, kv, tokens = decoder.generate(prompt[:, :length], 4)
        expected = model.generate(prompt[:, :length], attention_mask=torch.ones_like(prompt[:, :length]),
                                  max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert torch.equal(torch.cat(tokens, 1), expected[:, length:])
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    assert kv == 2 * config.num_hidden_layers * 2 * config.num_key_value_heads * 16 * head_dim * 4  # all 16 positions


@pytest.mark.slow
def test_the_compiled_step_decodes_what_generate_decodes():
    """Frozen, autotuned and run without guard checks after its first call, the compiled step still gives
    ``generate``'s greedy tokens, for two prompts in a row."""
    from conftest import tiny_model

    model = tiny_model("llama", vocab_size=128)
    prompt = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    decoder = CompiledDecoder(model, max_len=16)
    for length in (8, 5):
        _, _, _, tokens = decoder.generate(prompt[:, :length], 6)
        expected = model.generate(prompt[:, :length], attention_mask=torch.ones_like(prompt[:, :length]),
                                  max_new_tokens=7, min_new_tokens=7, do_sample=False)
        assert torch.equal(torch.cat(tokens, 1), expected[:, length:])
    assert decoder.warm


@pytest.mark.slow
def test_the_compiled_path_through_the_task():
    """torch.compile of a tiny model: decode figures for every point, the compile time kept aside."""
    from conftest import tiny_model

    model = tiny_model("llama", vocab_size=128)
    grid = Grid(batch_sizes=(1,), prompt_lengths=(8, 12), decode_lengths=(3,), repeats=2, warmup=1, paths=("compiled",))
    measurements = Throughput("throughput", grid).evaluate(model, None, EvalSettings())
    assert {(m.metric, m.point["prompt_len"], m.point["path"]) for m in measurements} == {
        (metric, p, "compiled") for metric in ("decode_tok_s", "kv_cache_mb") for p in (8, 12)}
    for m in measurements:
        assert math.isfinite(m.value) and m.value > 0 and "error" not in m.extra, m
        assert m.extra["compile_seconds"] > 0 and m.extra["cache"] == "static, 15 positions"
