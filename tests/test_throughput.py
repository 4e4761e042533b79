"""Throughput task: positive finite figures over the expected grid, KV-cache bytes as the shapes imply."""

import math

from bench.api.task import EvalSettings
from tasks.throughput import V2_GRID, Grid, Throughput


def test_tiny_model_through_the_throughput_task():
    from conftest import tiny_model

    model = tiny_model("llama", vocab_size=128)
    grid = Grid(batch_sizes=(1, 2), prompt_lengths=(8, 16), decode_lengths=(3,), repeats=2, warmup=1)
    measurements = Throughput("throughput", grid).evaluate(model, None, EvalSettings())
    metrics = ("prefill_tok_s", "decode_tok_s", "peak_mem_mb", "kv_cache_mb")
    points = {(m.point["batch_size"], m.point["prompt_len"], m.point["decode_len"]) for m in measurements}
    assert points == set(grid.points()) and len(measurements) == len(metrics) * len(points)
    assert not any("batch_size" in m.extra for m in measurements)  # the grid point is in `point`, not in `extra`
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


def test_registered_presets(registry):
    assert isinstance(registry.get("task", "throughput"), Throughput)
    v2 = registry.get("task", "throughput_v2")
    assert v2.grid == V2_GRID and V2_GRID.points() == [(4, 1024, 256)]
    assert v2.settings_key(EvalSettings()) != registry.get("task", "throughput").settings_key(EvalSettings())
    quick = registry.get("task", "throughput_quick")
    assert quick.grid.points() == [(1, 128, 16)] and quick.grid.repeats >= 3
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
                                                        repeats=1, warmup=0)))

    registry = load_registry(extra=[("tiny-grid", TinyGrid())])
    results = run(RunConfig(model="tiny", methods=("svd",), ratios=(0.5,), tasks=("throughput_tiny",),
                            out=str(tmp_path)), registry, tiny)
    records = results.records
    assert len(records) == 2 * 2 * 4  # (dense, svd) x two grid points x four metrics
    assert {r["kind"] for r in records} == {"throughput", "memory"}
    assert {(r["method"], r["point"]["batch_size"]) for r in records} == {(m, b) for m in ("dense", "svd") for b in (1, 2)}
    assert {r["variant"] for r in records} == {"batch_size=1 prompt_len=8 decode_len=2",
                                               "batch_size=2 prompt_len=8 decode_len=2"}
    report = write_report(results.data, tmp_path, plots=False)[0].read_text()
    assert "## Throughput and memory" in report and "prefill_tok_s speed-up ↑" in report
    assert "| svd | 50% | batch_size=2 prompt_len=8 decode_len=2 |" in report
