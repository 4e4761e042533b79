"""Throughput task: positive finite figures over the expected grid, KV-cache bytes as the shapes imply."""

import math

from bench.task import EvalSettings
from tasks.throughput import V2_GRID, Grid, Throughput


def test_tiny_model_through_the_throughput_task():
    from conftest import tiny_model

    model = tiny_model("llama", vocab_size=128)
    grid = Grid(batch_sizes=(1, 2), prompt_lengths=(8, 16), decode_lengths=(3,), repeats=2, warmup=1)
    measurements = Throughput("throughput", grid).evaluate(model, None, EvalSettings())
    metrics = ("prefill_tok_s", "decode_tok_s", "peak_mem_mb", "kv_cache_mb")
    points = {(m.extra["batch_size"], m.extra["prompt_len"], m.extra["decode_len"]) for m in measurements}
    assert points == set(grid.points()) and len(measurements) == len(metrics) * len(points)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    for m in measurements:
        assert m.metric in metrics and math.isfinite(m.value) and m.value > 0, m
        assert m.extra["repeats"] == 2 and len(m.extra.get("seconds", [0, 0])) == 2
        batch, prompt, decode = m.extra["batch_size"], m.extra["prompt_len"], m.extra["decode_len"]
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
