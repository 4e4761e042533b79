"""Head-to-head comparison, the regression check against a baseline, baselines and profiles."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from synthetic_results import degraded, synthetic_results

from bench import Allocation, Method, factorize, hookimpl
from bench.api.record import load_results
from bench.cli import main
from bench.cli.main import _explicit, build_parser
from bench.engine.config import PROFILES, RunConfig, load_profile, resolve_config
from bench.engine.executor import run
from bench.engine.plugins import load_registry
from bench.errors import UsageError
from bench.model.loaded import LoadedModel
from reports.regression import (
    BASELINE_FORMAT,
    baseline_rows,
    check,
    compare,
    format_rows,
    make_baseline,
    parse_overrides,
    run_differences,
    tolerance_for,
)


@pytest.fixture
def data():
    return synthetic_results()


def _statuses(result):
    return {(row.key[1], row.key[4], row.key[5], row.status) for row in result.failures}


def test_identical_run_passes(data):
    result = check(data, make_baseline(data, "ci"))
    assert result.ok and result.rows and not result.config_diffs
    assert all(row.status == "ok" for row in result.rows)


def test_baseline_keeps_quality_rows_and_settings(data):
    baseline = make_baseline(data, "ci", "svdbench baseline", 12.5)
    metrics = {r["metric"] for r in baseline["records"]}
    assert {"perplexity", "acc", "acc_norm"} <= metrics
    assert not metrics & {"prefill_tok_s", "decode_tok_s", "peak_mem_mb"}  # machine-dependent
    assert baseline["config"]["seqlen"] == 512 and baseline["config"]["model_identity"] == "abc123"
    assert baseline["generated"]["wall_s"] == 12.5
    budget_rows = [r for r in baseline["records"] if r["variant"].startswith("budget")]
    assert budget_rows and all(r["ratio"] is None for r in budget_rows)


def test_baseline_rows_carry_their_kind_and_old_formats_are_refused(data):
    baseline = make_baseline(data)
    assert baseline["format"] == BASELINE_FORMAT
    kinds = {(r["metric"], r["kind"]) for r in baseline["records"]}
    assert kinds == {("perplexity", "perplexity"), ("acc", "accuracy"), ("acc_norm", "accuracy")}
    old = {**baseline, "format": "svdbench-baseline/1"}
    with pytest.raises(UsageError, match="regenerate it with `svdbench baseline`"):
        check(data, old)


def test_tolerance_follows_the_metric_kind_not_its_name():
    assert tolerance_for("mytask", "score", "accuracy", 0.02, {}) == (0.02, "absolute")
    assert tolerance_for("mytask", "score", "other", 0.02, {}) == (0.02, "relative")
    assert tolerance_for("mytask", "score", "other", 0.02, {"mytask.score": 0.5}) == (0.5, "relative")
    assert tolerance_for("mytask", "score", "other", 0.02, {"score": 0.1, "mytask.score": 0.5})[0] == 0.5


def test_committed_ci_baseline_matches_the_ci_profile():
    """tests/baselines/ci.json (README: `svdbench check runs/ci --baseline tests/baselines/ci.json`) is readable."""
    from pathlib import Path

    baseline = json.loads((Path(__file__).parent / "baselines" / "ci.json").read_text())
    rows = baseline_rows(baseline)
    ci = resolve_config("ci", {})
    assert {key[1] for key in rows} == {"dense", *ci.methods}
    assert {key[3] for key in rows if key[1] != "dense"} == set(ci.ratios)
    assert {(key[4], key[5]) for key in rows} == {(task, "perplexity") for task in ci.tasks}
    assert all(row["kind"] == "perplexity" for row in rows.values())
    config = baseline["config"]
    assert (config["model"], config["seqlen"], config["limit"], config["dtype"]) == (ci.model, ci.seqlen, ci.limit,
                                                                                    ci.dtype)
    assert config["calibration"] == ci.to_dict()["calibration"]


def test_degraded_method_fails_and_only_it(data):
    result = check(degraded(data, "svdllm_w", 1.5), make_baseline(data))
    assert not result.ok
    assert {method for method, *_ in _statuses(result)} == {"svdllm_w"}
    assert {status for *_, status in _statuses(result)} == {"worse"}
    table = format_rows(result.failures, "baseline", "run")
    assert "WORSE" in table and "+50.00%" in table


def test_better_beyond_tolerance_also_fails(data):
    result = check(degraded(data, "svd", 0.5), make_baseline(data))
    assert {status for *_, status in _statuses(result)} == {"better"}


def test_missing_rows_fail(data):
    run = copy.deepcopy(data)
    run["records"] = [r for r in run["records"] if not (r["method"] == "asvd" and r["ratio"] == 0.4)]
    result = check(run, make_baseline(data))
    missing = [row for row in result.failures if row.status == "missing"]
    assert missing and all(row.key[1] == "asvd" and row.key[3] == 0.4 for row in missing)
    assert len(missing) == len(result.failures)
    assert "MISSING" in format_rows(missing)


def test_relative_tolerance_and_overrides(data):
    baseline = make_baseline(data)
    slightly = degraded(data, "svd", 1.01)  # +1% perplexity
    assert check(slightly, baseline).ok  # default 2% relative
    assert not check(slightly, baseline, tolerance=0.005).ok
    assert check(slightly, baseline, tolerance=0.005, overrides=parse_overrides(["perplexity=0.02"])).ok
    only_c4 = parse_overrides(["wikitext2.perplexity=0.02"])
    failing = check(slightly, baseline, tolerance=0.005, overrides=only_c4)
    assert {task for _, task, *_ in _statuses(failing)} == {"c4"}


def test_absolute_tolerance_for_accuracy(data):
    baseline = make_baseline(data)
    run = copy.deepcopy(data)
    for r in run["records"]:
        if r["task"] == "piqa" and r["metric"] == "acc" and r["method"] == "svd":
            r["value"] -= 0.03  # 3 points: absolute, whatever the accuracy level
    result = check(run, baseline)
    assert {(m, t, metric, s) for m, t, metric, s in _statuses(result)} == {("svd", "piqa", "acc", "worse")}
    assert check(run, baseline, overrides=parse_overrides(["acc=0.05"])).ok
    assert check(run, baseline, overrides=parse_overrides(["piqa.acc=0.031"])).ok


def test_config_mismatch_fails(data):
    baseline = make_baseline(data)
    run = copy.deepcopy(data)
    run["manifest"]["config"]["seqlen"] = 1024
    run["manifest"]["model"]["identity"] = "other"
    result = check(run, baseline)
    assert not result.ok and not result.failures
    assert {name for name, *_ in result.config_diffs} == {"seqlen", "model_identity"}


def test_bad_overrides_are_usage_errors():
    for bad in (["perplexity"], ["perplexity=abc"], ["=0.1"], ["acc=-1"]):
        with pytest.raises(UsageError, match="METRIC=VALUE"):
            parse_overrides(bad)


def test_compare_rows_direction_and_shared_only(data):
    other = degraded(data, "svdllm", 0.9)
    other["records"] = [r for r in other["records"] if r["method"] != "asvd"]
    rows = compare(data, other)
    assert not any(row.key[1] == "asvd" for row in rows)  # only shared rows
    row = next(r for r in rows if r.key[1] == "svdllm" and r.key[3] == 0.4 and r.key[4] == "wikitext2")
    assert row.diff == pytest.approx(-0.1 * row.a) and row.relative == pytest.approx(-0.1)
    assert row.status == "better"
    throughput = [r for r in rows if r.key[5] == "prefill_tok_s"]
    assert throughput and all(r.status == "ok" for r in throughput)  # compare covers every metric


def _write(tmp_path, name, results):
    path = tmp_path / name
    path.mkdir()
    (path / "results.json").write_text(json.dumps(results))
    return path


def test_cli_check_compare_and_baseline(tmp_path, capsys, data):
    good = _write(tmp_path, "good", data)
    bad = _write(tmp_path, "bad", degraded(data, "svdllm_w", 1.5))
    baseline = tmp_path / "baselines" / "ci.json"
    assert main(["baseline", "--from", str(good), "--out", str(baseline)]) == 0
    assert json.loads(baseline.read_text())["records"]
    assert main(["check", str(good), "--baseline", str(baseline)]) == 0
    assert "check passed" in capsys.readouterr().out
    assert main(["check", str(bad), "--baseline", str(baseline)]) == 1
    out = capsys.readouterr().out
    assert "check FAILED" in out and "svdllm_w" in out and "WORSE" in out
    assert main(["check", str(bad), "--baseline", str(baseline), "--metric-tolerance", "perplexity=0.6"]) == 0
    capsys.readouterr()
    assert main(["compare", str(good), str(bad)]) == 0
    out = capsys.readouterr().out
    assert "WORSE" in out and "shared rows" in out and " ok" in out
    assert main(["compare", str(good), str(bad), "--flagged"]) == 0
    assert " ok " not in capsys.readouterr().out
    assert main(["check", str(good), "--baseline", str(tmp_path / "nope.json")]) == 2


# ---------------------------------------------------------------- a degraded method through the runner
class Probe(Method):
    """Plain SVD under a name of its own, so a test can swap in a broken one."""

    name = "probe"

    def decompose(self, target, weight, context, config):
        return factorize(weight)


class BrokenProbe(Probe):
    """The same method with a bug: it keeps only one singular direction per matrix."""

    def allocate(self, ratio, factorizations, context, config):
        return Allocation(dict.fromkeys(factorizations, 1))


def _plugin(method):
    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register(method)

    return Plugin()


def _peaked(tiny: LoadedModel) -> LoadedModel:
    """Sharper logits, so perplexity reacts to what the compressed layers compute."""
    with torch.no_grad():
        tiny.model.lm_head.weight.mul_(20)
    return tiny


def test_degraded_method_fails_the_check_end_to_end(tiny, tmp_path, capsys):
    loaded = _peaked(tiny)
    # 64 windows: a regression must be beyond the tolerance and beyond the windows' noise (its interval excludes 0)
    settings = dict(model="tiny", methods=("probe",), ratios=(0.2,), tasks=("wikitext2",), seqlen=32, limit=64)
    good = run(RunConfig(out=str(tmp_path / "good"), **settings), load_registry(extra=[("probe", _plugin(Probe()))]),
               loaded)
    baseline = tmp_path / "ci.json"
    assert main(["baseline", "--from", str(tmp_path / "good"), "--out", str(baseline)]) == 0
    again = run(RunConfig(out=str(tmp_path / "again"), **settings), load_registry(extra=[("probe", _plugin(Probe()))]),
                loaded)
    assert main(["check", str(tmp_path / "again"), "--baseline", str(baseline)]) == 0
    broken = run(RunConfig(out=str(tmp_path / "broken"), **settings),
                 load_registry(extra=[("probe", _plugin(BrokenProbe()))]), loaded)
    capsys.readouterr()
    assert main(["check", str(tmp_path / "broken"), "--baseline", str(baseline)]) == 1
    out = capsys.readouterr().out
    assert "probe" in out and "check FAILED" in out
    values = [r["value"] for r in (good.records + again.records + broken.records) if r["method"] == "probe"]
    assert values[0] == values[1] != values[2]
    result = check(load_results(tmp_path / "broken"), json.loads(baseline.read_text()))
    assert [row.key[1] for row in result.failures] == ["probe"]


# ---------------------------------------------------------------- profiles
def test_profiles_fill_unset_options_and_flags_win(registry):
    argv = ["run", "--profile", "ci", "--limit", "5", "--tasks", "wikitext2,c4", "--calib-samples", "4"]
    explicit = _explicit(build_parser(registry.commands).parse_args(argv))
    assert {"limit", "tasks", "calibration"} <= set(explicit) and "seqlen" not in explicit
    assert explicit["calibration"] == {"samples": "4"}  # only what was given
    config = resolve_config("ci", explicit)
    assert config.limit == 5 and config.tasks == ("wikitext2", "c4")  # explicit flags win
    assert config.seqlen == PROFILES["ci"]["seqlen"] and config.methods == tuple(PROFILES["ci"]["methods"])
    # a nested setting given on the command line overrides that field only
    assert config.calibration.samples == 4 and config.calibration.seqlen == PROFILES["ci"]["calibration"]["seqlen"]
    # without a profile, the RunConfig defaults apply
    assert resolve_config(None, {}) == RunConfig()


def test_profile_values_are_valid_run_options(registry):
    for name in PROFILES:
        config = resolve_config(name, {})  # every value is read by the RunConfig field types
        create = registry.method_factory(config.method_options)
        for method in config.method_options:
            create(method)  # raises on an unknown option or a bad value
        for task in config.tasks:
            registry.get("task", task)
    paper = resolve_config("paper", {})
    assert paper.seqlen == 2048 and paper.limit is None
    assert paper.calibration.samples == 256 and paper.calibration.seqlen == 2048
    default = resolve_config("default", {})
    assert default.method_options["asvd"]["candidates"] == [0.8, 0.6, 0.4]
    assert registry.method_factory(default.method_options)("asvd").config.candidates == (0.8, 0.6, 0.4)


def test_profile_file_and_unknown_names(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"limit": 3, "seqlen": 128}))
    assert load_profile(str(path)) == {"limit": 3, "seqlen": 128}
    assert resolve_config(str(path), {"limit": 4}).seqlen == 128
    with pytest.raises(UsageError, match="did you mean 'paper'"):
        load_profile("papr")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"limitt": 3}))
    with pytest.raises(UsageError, match="'limitt', which is not a run setting"):
        resolve_config(str(bad), {})


def test_profile_names_are_registered(registry):
    for name, profile in PROFILES.items():
        for task in profile["tasks"]:
            assert task in registry.tasks, (name, task)
        if profile["methods"] != ["all"]:
            for method in profile["methods"]:
                assert method in registry.methods, (name, method)


def test_compare_names_the_settings_two_runs_do_not_share(data):
    other = json.loads(json.dumps(data))
    other["manifest"]["config"]["seqlen"] = 128
    assert run_differences(data, data) == []
    assert ("seqlen", data["manifest"]["config"]["seqlen"], 128) in run_differences(data, other)


@pytest.mark.real_model
@pytest.mark.slow
def test_ci_profile_reproduces_the_committed_baseline(tmp_path, capsys):
    """`svdbench baseline` runs the ci profile on the real SmolLM2; the run passes `check` against tests/baselines/ci.json."""
    from pathlib import Path

    committed = Path(__file__).parent / "baselines" / "ci.json"
    fresh = tmp_path / "ci.json"
    assert main(["baseline", "--profile", "ci", "--out", str(fresh), "--run-dir", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["check", str(tmp_path / "run"), "--baseline", str(committed)]) == 0, capsys.readouterr().out
    rows, expected = baseline_rows(json.loads(fresh.read_text())), baseline_rows(json.loads(committed.read_text()))
    assert set(rows) == set(expected)
    # the same numbers up to float noise (the committed one was made with other library versions: ~1e-5)
    assert all(rows[key]["value"] == pytest.approx(expected[key]["value"], rel=1e-3) for key in rows)
