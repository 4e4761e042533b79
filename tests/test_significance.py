"""Differences a reader can trust: bootstrap intervals, significance marks, compare and check with noise,
throughput shared per architecture and interleaved, and ``--methods all`` with an optional extra missing."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from synthetic_results import WINDOW_TOKENS, synthetic_results

from bench import Method, factorize, hookimpl
from bench.cli import main
from bench.engine.config import RunConfig
from bench.engine.executor import run
from bench.engine.plan import left_out, left_out_line, run_methods, validate
from bench.engine.plugins import load_registry
from bench.engine.shared import architecture_signature
from bench.errors import UsageError
from reports import stats
from reports.records import frame
from reports.regression import check, make_baseline
from reports.tables import ablation_table, interval_lines, main_table, throughput_table
from tasks.throughput import Grid, Throughput, measure_many


def _perplexity_evidence(log_ppl: np.ndarray) -> stats.Evidence:
    return stats.Evidence("perplexity", log_ppl * WINDOW_TOKENS, np.full(len(log_ppl), WINDOW_TOKENS, float))


def _pair(windows: int, shift: float = 0.01, noise: float = 0.05, seed: int = 1):
    """Two methods on the same windows: window difficulty shared, B worse by ``shift`` nats/token give or take
    ``noise`` per window."""
    rng = np.random.default_rng(seed)
    difficulty = 3.0 + rng.normal(0, 0.5, windows)
    return (_perplexity_evidence(difficulty),
            _perplexity_evidence(difficulty + shift + rng.normal(0, noise, windows)))


# ---------------------------------------------------------------- the bootstrap
def test_the_bootstrap_is_seeded_and_holds_the_value():
    a, _ = _pair(32)
    assert stats.interval(a) == stats.interval(a)  # fixed seed: the same report every time
    low, high = stats.interval(a)
    assert low < stats.point(a) < high
    assert math.isclose(stats.point(a), math.exp(a.values.sum() / a.tokens.sum()))
    accuracy = stats.evidence({"extra": {"correct": "1101100111"}})
    assert accuracy.kind == "accuracy" and stats.point(accuracy) == 0.7
    low, high = stats.interval(accuracy)
    assert 0.3 < low < 0.7 < high <= 1.0


def test_pairing_cancels_the_windows_shared_difficulty():
    a, b = _pair(32, shift=0.03)
    paired = stats.difference(a, b)
    shuffled = stats.Evidence("perplexity", b.values[::-1].copy(), b.tokens)  # same windows, order lost: unpaired
    unpaired = stats.difference(a, stats.Evidence("perplexity", b.values[:31], b.tokens[:31]))
    assert paired.paired and not unpaired.paired
    assert paired.high - paired.low < 0.2 * (unpaired.high - unpaired.low)
    assert paired.significant and not unpaired.significant
    assert stats.difference(a, shuffled).value == pytest.approx(paired.value)  # the point estimate is order-free


def test_a_difference_is_significant_with_many_windows_and_not_with_few():
    few, many = stats.difference(*_pair(4)), stats.difference(*_pair(400))
    assert not few.significant and few.low < 0 < few.high
    assert many.significant and many.low > 0
    assert few.value > 0 and many.value > 0  # B is worse in both: only the evidence differs


def test_an_average_is_resampled_task_by_task():
    tasks = [stats.evidence({"extra": {"correct": flags}}) for flags in ("11110000", "11111100")]
    low, high = stats.interval(tasks)
    assert stats.point(tasks) == pytest.approx(0.625) and low < 0.625 < high


# ---------------------------------------------------------------- marks, averages, settings
def _with_zero_shot_evidence(data: dict, examples: int) -> dict:
    """Zero-shot records with per-example correctness matching their accuracies (rounded to whole examples)."""
    data = copy.deepcopy(data)
    for r in data["records"]:
        if r["kind"] == "accuracy":
            right = round(r["value"] * examples)
            r["value"] = right / examples
            r["extra"]["correct"] = "1" * right + "0" * (examples - right)
    return data


def _display(table, label, ratio, column):
    row = next(row for row in table.display if row[0] == label and row[1] == ratio)
    return row[table.header.index(column)]


def test_the_headline_table_marks_the_best_and_what_is_not_distinguishable():
    data = synthetic_results(zero_shot=False, budgets=False, quantized=False, throughput=False)
    best = next(r for r in data["records"] if (r["method"], r["ratio"], r["task"]) == ("svdllm", 0.2, "wikitext2"))
    close = next(r for r in data["records"] if (r["method"], r["ratio"], r["task"]) == ("svdllm_w", 0.2, "wikitext2"))
    # svdllm_w: 1% worse than svdllm on average, but windows scatter by +-10%: not distinguishable
    scatter = [0.1 * (-1) ** i for i in range(len(best["extra"]["window_nll"]))]
    close["extra"]["window_nll"] = [nll + math.log(1.01) * WINDOW_TOKENS + s * WINDOW_TOKENS
                                    for nll, s in zip(best["extra"]["window_nll"], scatter)]
    close["value"] = math.exp(sum(close["extra"]["window_nll"]) / (WINDOW_TOKENS * len(scatter)))
    table = main_table(data, frame(data))
    column = "wikitext2 perplexity ↓"
    assert _display(table, "svdllm", 0.2, column).startswith("**")
    assert _display(table, "svdllm_w", 0.2, column).startswith("*") and \
        not _display(table, "svdllm_w", 0.2, column).startswith("**")
    assert "*" not in _display(table, "svd", 0.2, column)  # 20x worse on every window
    assert "*" not in _display(table, "dense", 0.0, column)  # alone at its ratio: nothing to rank
    assert all(isinstance(row[4], float) for row in table.rows)  # raw values stay numbers for the CSV
    ablation = ablation_table(data, frame(data))  # the same marks, per column
    cells = {row[0]: row[ablation.header.index("wikitext2 ppl ↓ @ 20%")] for row in ablation.display}
    assert cells["svdllm"].startswith("**") and cells["svdllm_w"].startswith("*") and "*" not in cells["svd"]


def test_averages_carry_intervals_and_too_few_examples_are_flagged():
    few = _with_zero_shot_evidence(synthetic_results(budgets=False, quantized=False, throughput=False), 8)
    table = main_table(few, frame(few))
    average = _display(table, "svdllm", 0.2, "avg acc ↑")
    assert "[" in average and "]" in average
    lines = interval_lines(few["records"])
    assert "windows per task: wikitext2 8, c4 8" in lines[0] and "examples per task: piqa 8" in lines[0]
    assert any("Too few examples to rank by accuracy" in line for line in lines)
    many = _with_zero_shot_evidence(synthetic_results(budgets=False, quantized=False, throughput=False), 400)
    assert not any("Too few" in line for line in interval_lines(many["records"]))


# ---------------------------------------------------------------- compare and check
def _write(tmp_path, name, results):
    path = tmp_path / name
    path.mkdir()
    (path / "results.json").write_text(json.dumps(results))
    return path


def _shifted(data: dict, method: str, shift: float, scatter: float) -> dict:
    """``method``'s wikitext2 perplexity at 20% moved by ``shift`` nats/token, each window +-``scatter``."""
    data = copy.deepcopy(data)
    for r in data["records"]:
        if (r["method"], r["ratio"], r["task"]) == (method, 0.2, "wikitext2"):
            nll = r["extra"]["window_nll"]
            r["extra"]["window_nll"] = [v + (shift + scatter * (-1) ** i) * WINDOW_TOKENS for i, v in enumerate(nll)]
            r["value"] = math.exp(sum(r["extra"]["window_nll"]) / (WINDOW_TOKENS * len(nll)))
    return data


def test_compare_prints_each_difference_with_its_interval(tmp_path, capsys):
    data = synthetic_results(zero_shot=False, budgets=False, quantized=False, throughput=False)
    moved = _shifted(_shifted(data, "svd", 0.05, 0.0), "asvd", 0.05, 0.5)
    assert main(["compare", str(_write(tmp_path, "a", data)), str(_write(tmp_path, "b", moved))]) == 0
    out = capsys.readouterr().out
    lines = {tuple(line.split()[1:6:4]): line for line in out.splitlines() if "wikitext2" in line and "20%" in line}
    svd, asvd = lines[("svd", "perplexity")], lines[("asvd", "perplexity")]
    assert "WORSE" in svd and " yes " in svd  # +5% on every window
    assert " no " in asvd and "noise" in asvd  # +5% on average, windows +-50%: not significant
    assert "[" in svd and "95% interval" in out and "seed 0" in out


def test_check_fails_only_beyond_tolerance_and_noise():
    data = synthetic_results(zero_shot=False, budgets=False, quantized=False, throughput=False)
    baseline = make_baseline(data)
    assert baseline["measured"]["items_per_task"] == {"wikitext2": 8, "c4": 8}
    assert baseline["records"][0]["samples"]["window_tokens"] == WINDOW_TOKENS
    noisy = check(_shifted(data, "asvd", 0.05, 0.5), baseline)
    assert noisy.ok and {row.status for row in noisy.rows} == {"ok", "noise"}
    consistent = check(_shifted(data, "asvd", 0.05, 0.0), baseline)
    assert [(row.key[1], row.status) for row in consistent.failures] == [("asvd", "worse")]


# ---------------------------------------------------------------- throughput per architecture
def test_repeats_go_round_the_models():
    from conftest import tiny_model

    models = [tiny_model("llama", vocab_size=128) for _ in range(3)]
    order = []
    for index, model in enumerate(models):
        model.register_forward_pre_hook(lambda _m, args, kwargs, i=index: order.append(i)
                                        if kwargs["input_ids"].shape[1] > 1 else None, with_kwargs=True)
    grid = Grid(batch_sizes=(1,), prompt_lengths=(8,), decode_lengths=(2,), repeats=3, warmup=1, paths=("eager",))
    measured = measure_many(models, grid)
    assert order == [0, 1, 2] * (1 + 3)  # warm-up, then three rounds of every model
    sessions = {m.extra["session"] for ms in measured for m in ms}
    assert len(sessions) == 1 and len(measured) == 3
    decode = next(m for m in measured[0] if m.metric == "decode_tok_s")
    spread = decode.extra["tok_s"]
    assert decode.value == pytest.approx(spread["median"]) and spread["q1"] <= spread["median"] <= spread["q3"]


class _Whitened(Method):
    """svdllm_w's factorization under another name, without its statistics: another method, same shapes."""

    name = "same_shapes"

    def decompose(self, target, weight, context, config):
        return factorize(weight * 1.5)


def _plugins(*objects):
    class Plugin:
        @hookimpl
        def register_methods(self, register):
            for method in objects:
                register(method)

        @hookimpl
        def register_tasks(self, register):
            register(Throughput("throughput_tiny", Grid(batch_sizes=(1,), prompt_lengths=(8,), decode_lengths=(2,),
                                                        repeats=3, warmup=0, paths=("eager",))))

    return Plugin()


def test_models_of_one_architecture_share_one_measurement(tiny, tmp_path):
    registry = load_registry(extra=[("same-shapes", _plugins(_Whitened()))])
    results = run(RunConfig(model="tiny", methods=("svd", "same_shapes"), ratios=(0.3, 0.5),
                            tasks=("throughput_tiny",), out=str(tmp_path)), registry, tiny)
    decode = {(r["method"], r["ratio"]): r for r in results.records if r["metric"] == "decode_tok_s"}
    assert len(decode) == 5
    shared = {key: r["extra"]["architecture"] for key, r in decode.items()}
    for ratio in (0.3, 0.5):
        a, b = shared[("svd", ratio)], shared[("same_shapes", ratio)]
        assert a["signature"] == b["signature"] and a["measured_on"] == b["measured_on"] == f"svd {ratio:g}"
        assert (a["shared"], b["shared"]) == (False, True) and a["models"] == [f"svd {ratio:g}", f"same_shapes {ratio:g}"]
        assert decode[("svd", ratio)]["value"] == decode[("same_shapes", ratio)]["value"]
    signatures = {s["signature"] for s in shared.values()}
    assert len(signatures) == 3 and all(s["distinct_architectures"] == 3 for s in shared.values())
    assert len({r["extra"]["session"] for r in decode.values()}) == 1  # measured together, interleaved
    table = throughput_table(results.data, frame(results.data))
    row = next(row for row in table.display if row[0] == "same_shapes" and row[1] == 0.5)
    assert row[table.header.index("measured on")].startswith("svd 0.5 (2 models")
    up = row[table.header.index("decode_tok_s speed-up ↑")]
    assert up.count("[") == 1 and "IQR" in row[table.header.index("decode_tok_s ↑")]


def test_held_models_share_the_dense_models_equal_tensors():
    import copy as copying

    import torch
    from conftest import tiny_model

    from bench.engine.shared import held_bytes, share_equal_tensors

    dense = tiny_model("llama", vocab_size=128)
    compressed = copying.deepcopy(dense)
    with torch.no_grad():
        compressed.model.layers[0].mlp.down_proj.weight.mul_(0.5)  # what compression changed
    alone = held_bytes([dense, compressed])
    saved = share_equal_tensors(compressed, dense)
    assert compressed.model.embed_tokens.weight is dense.model.embed_tokens.weight
    assert compressed.model.layers[0].mlp.down_proj.weight is not dense.model.layers[0].mlp.down_proj.weight
    assert saved > 0 and held_bytes([dense, compressed]) == alone - saved
    assert held_bytes([dense, compressed]) - held_bytes([dense]) == compressed.model.layers[0].mlp.down_proj.weight.nbytes


def test_the_signature_follows_shapes_types_and_dtypes_not_values():
    import torch
    from conftest import tiny_model

    a, b = tiny_model("llama", vocab_size=128), tiny_model("llama", vocab_size=128)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    assert architecture_signature(a) == architecture_signature(b)
    assert architecture_signature(a) != architecture_signature(a, bits=4)
    assert architecture_signature(a) != architecture_signature(tiny_model("llama", vocab_size=128).to(torch.float64))
    assert architecture_signature(a) != architecture_signature(tiny_model("llama", vocab_size=128, layers=3))


# ---------------------------------------------------------------- --methods all
class _NeedsExtra(Method):
    name = "needs_extra"
    packages = {"svdbench_surely_not_installed": "pip install 'svdbench[surely]'"}

    def decompose(self, target, weight, context, config):
        return factorize(weight)


def test_methods_all_leaves_out_what_is_not_installed_and_says_how_to_install_it():
    registry = load_registry(extra=[("needs-extra", _plugins(_NeedsExtra()))])
    config = RunConfig(methods=("all",), tasks=("wikitext2",))
    names = run_methods(config, registry)
    assert "needs_extra" not in names and {"svd", "svdllm_w", "svdllm"} <= set(names)
    assert left_out(config, registry) == {"needs_extra": dict(_NeedsExtra.packages)}
    line = left_out_line(config, registry)
    assert "needs_extra" in line and "pip install 'svdbench[surely]'" in line and "\n" not in line
    validate(config, registry)  # all: fine
    with pytest.raises(UsageError, match="needs_extra needs the svdbench_surely_not_installed package.*pip install"):
        validate(RunConfig(methods=("needs_extra",), tasks=("wikitext2",)), registry)


def test_naming_an_uninstalled_method_is_an_exit_2_error(tmp_path, capsys):
    plugin = tmp_path / "plugins"
    plugin.mkdir()
    (plugin / "needs_extra.py").write_text(
        "from bench import Method, factorize, hookimpl\n\n\n"
        "class NeedsExtra(Method):\n    name = 'needs_extra'\n"
        "    packages = {'svdbench_surely_not_installed': \"pip install 'svdbench[surely]'\"}\n\n"
        "    def decompose(self, target, weight, context, config):\n        return factorize(weight)\n\n\n"
        "@hookimpl\ndef register_methods(register):\n    register(NeedsExtra())\n")
    assert main(["--plugins-dir", str(plugin), "run", "--methods", "needs_extra", "--out", str(tmp_path / "o")]) == 2
    assert "needs_extra needs the svdbench_surely_not_installed package" in capsys.readouterr().err


def test_the_built_in_methods_declare_their_optional_packages(registry):
    assert registry.get("method", "gptq").packages == {"gptqmodel": "pip install 'svdbench[gptq]'"}
    assert "hqq" in registry.get("method", "hqq").packages and "hqq" in registry.get("method", "svdllm_quant").packages
    assert "peft" in registry.get("method", "svdllm").packages and "peft" in registry.get("method", "svdllm_u").packages
    assert not registry.get("method", "svd").packages


def test_methods_all_runs_without_the_gptq_extra_and_names_it(monkeypatch, registry):
    """`pip install svdbench[all]` has no GPTQModel: `--methods all` leaves gptq out (one line, the install
    command) instead of failing before doing anything."""
    import sys

    for name in [n for n in sys.modules if n == "gptqmodel" or n.startswith("gptqmodel.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "gptqmodel", None)  # what an environment without the extra looks like
    config = RunConfig(methods=("all",), tasks=("wikitext2",))
    validate(config, registry)
    assert "gptq" not in run_methods(config, registry) and "svdllm_quant" in run_methods(config, registry)
    assert left_out_line(config, registry) == ("--methods all leaves out gptq (not installed: gptqmodel); to run it "
                                               "too: pip install 'svdbench[gptq]'")
    with pytest.raises(UsageError, match=r"gptq needs the gptqmodel package.*pip install 'svdbench\[gptq\]'"):
        validate(RunConfig(methods=("gptq",), tasks=("wikitext2",)), registry)


def test_held_models_are_measured_early_once_they_pass_the_memory_bound(tiny, tmp_path, monkeypatch):
    """With room for one model only, every distinct architecture is measured in a session of its own."""
    monkeypatch.setenv("SVDBENCH_HOLD_MB", "0.001")
    registry = load_registry(extra=[("same-shapes", _plugins(_Whitened()))])
    results = run(RunConfig(model="tiny", methods=("svd", "same_shapes"), ratios=(0.3, 0.5),
                            tasks=("throughput_tiny",), out=str(tmp_path)), registry, tiny)
    decode = [r for r in results.records if r["metric"] == "decode_tok_s"]
    assert len(decode) == 5 and not results.data["failures"]
    assert len({r["extra"]["session"] for r in decode}) > 1  # not all held together
