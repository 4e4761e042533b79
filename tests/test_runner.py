"""The harness end to end on a tiny model: records, resume, failures, CLI errors."""

import json
import math

import pytest

from bench import Method, hookimpl, load_results
from bench.cli import main
from bench.engine import executor
from bench.engine.config import CalibrationConfig, RunConfig
from bench.engine.plugins import load_registry
from bench.errors import UsageError
from reports.report import write_report

SMALL = dict(tasks=("wikitext2",), limit=1, seqlen=32, calibration=CalibrationConfig(samples=2, seqlen=32))


class Exploding(Method):
    name = "exploding"

    def decompose(self, target, weight, context, config):
        raise RuntimeError("boom")


class Plugin:
    @hookimpl
    def register_methods(self, register):
        register(Exploding())


def run(tiny, tmp_path, registry=None, **overrides):
    config = RunConfig(model="tiny", out=str(tmp_path), **{**SMALL, **overrides})
    return executor.run(config, registry=registry, loaded=tiny)


def test_run_writes_records_manifest_and_report(tiny, tmp_path):
    results = run(tiny, tmp_path, methods=("svd",), ratios=(0.2, 0.6))
    data = load_results(tmp_path)
    rows = {(r["method"], r["ratio"]): r for r in data["records"]}
    assert set(rows) == {("dense", 0.0), ("svd", 0.2), ("svd", 0.6)}
    for r in data["records"]:
        assert {"key", "model", "method", "ratio", "task", "metric", "value", "kind", "higher_is_better", "params",
                "bytes", "bits", "budget", "point", "variant", "accounting", "seconds"} <= set(r)
        assert r["task"] == "wikitext2" and r["metric"] == "perplexity" and math.isfinite(r["value"])
        assert r["kind"] == "perplexity" and r["higher_is_better"] is False
        assert r["bits"] is None and r["budget"] is None and r["point"] == {} and r["variant"] == ""
    assert rows[("svd", 0.6)]["params"] < rows[("svd", 0.2)]["params"] < rows[("dense", 0.0)]["params"]
    compression = data["compressions"][rows[("svd", 0.2)]["compression"]]
    assert len(compression["layers"]) == 14 and compression["summary"]["target_ratio_achieved"] >= 0.2
    assert compression["method"] == "svd" and compression["ratio"] == 0.2 and compression["facts"] == {}
    manifest = data["manifest"]
    assert manifest["config"]["methods"] == ["svd"] and manifest["model"]["identity"] == tiny.identity
    assert manifest["methods"]["svd"]["components"] == {"transform": "none", "update": "no"}
    assert manifest["methods"]["svd"]["uses_ratio"] is True and manifest["method_configs"] == {"svd": {}}
    assert manifest["tasks"]["wikitext2"]["metrics"]["perplexity"]["kind"] == "perplexity"
    assert manifest["versions"]["torch"] and manifest["seeds"]["calibration"] == 3
    assert manifest["data_checksums"]["tasks"]["wikitext2/wiki.test.raw"].startswith("173c87a5")
    assert "total" in manifest["timings"] and "decompose:svd" in manifest["timings"]
    report = write_report(results.data, tmp_path)[0].read_text()
    assert "| svd | 60% |" in report and "| dense | 0% |" in report


def test_rerun_reuses_finished_records(tiny, tmp_path, monkeypatch):
    run(tiny, tmp_path, methods=("svd",), ratios=(0.2,))
    from tasks import perplexity as ppl

    calls = []
    real = ppl.PerplexityTask.evaluate
    monkeypatch.setattr(ppl.PerplexityTask, "evaluate", lambda self, *a: calls.append(1) or real(self, *a))
    run(tiny, tmp_path, methods=("svd",), ratios=(0.2,))
    assert calls == []
    run(tiny, tmp_path, methods=("svd",), ratios=(0.2, 0.4))  # only the new ratio is evaluated
    assert calls == [1]
    assert len(load_results(tmp_path)["records"]) == 3


def test_changed_settings_do_not_reuse_records(tiny, tmp_path):
    run(tiny, tmp_path, methods=("svd",), ratios=(0.2,))
    run(tiny, tmp_path, methods=("svd",), ratios=(0.2,), seqlen=16)
    data = load_results(tmp_path)
    assert len(data["records"]) == 2 and len(data["previous_records"]) == 2


def test_one_failing_method_does_not_take_the_others_down(tiny, tmp_path):
    registry = load_registry(extra=[("exploding", Plugin())])
    results = run(tiny, tmp_path, registry=registry, methods=("exploding", "svd"), ratios=(0.4,))
    methods = {r["method"] for r in results.records}
    assert methods == {"dense", "svd"}
    [failure] = results.data["failures"]
    assert failure["method"] == "exploding" and "boom" in failure["error"]
    assert "exploding" in write_report(results.data, tmp_path)[0].read_text()


def test_methods_none_evaluates_only_the_dense_model(tiny, tmp_path):
    results = run(tiny, tmp_path, methods=("none",), ratios=(0.2,))
    assert {r["method"] for r in results.records} == {"dense"}
    assert results.manifest["methods"] == {}
    with pytest.raises(UsageError, match="--methods is empty"):
        run(tiny, tmp_path, methods=(), ratios=(0.2,))


@pytest.mark.parametrize("argv, message", [
    (["run", "--methods", "svdd"], "unknown method 'svdd'; did you mean 'svd'?"),
    (["run", "--tasks", "wikitext"], "unknown task 'wikitext'; did you mean 'wikitext2'?"),
    (["run", "--ratios", "1.2"], "ratio 1.2 is outside (0, 1)"),
    (["run", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["run", "--method-option", "svd.rank"], "must look like METHOD.OPTION=VALUE"),
    (["run", "--methods", "asvd", "--method-option", "asvd.foo=1"],
     "asvd has no setting 'foo'; its settings are: alpha, eps, allocation"),
    (["run", "--methods", "asvd", "--method-option", "asvd.alpha=x"], "asvd.alpha='x' is not a float"),
    (["run", "--methods", "svd", "--method-option", "asvd.alpha=x"], "asvd.alpha='x' is not a float"),
    (["run", "--methods", ""], "--methods is empty"),
    (["run", "--budgets", "12 parsecs"], "budget '12 parsecs' is not understood"),
    (["--plugins-dir", "/nonexistent", "plugins"], "is not a directory"),
    (["report", "/nonexistent"], "no results at"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path, tiny_dir):
    if argv[0] == "run":  # the tiny model unless the case is about the model
        argv = [*argv, "--out", str(tmp_path / "out"), *([] if "--model" in argv else ["--model", str(tiny_dir)])]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    # one line of error (progress bars of loading the model may precede it: names are checked after loading)
    [line] = [line for line in err.splitlines() if "error" in line.lower()]
    assert line.startswith("svdbench: error: ") and message in line and "Traceback" not in err


def test_cli_run_on_a_model_directory_writes_the_report(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["run", "--model", str(tiny_dir), "--methods", "svd", "--ratios", "0.4", "--tasks", "wikitext2",
            "--limit", "1", "--seqlen", "32", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| svd | 40% |" in printed and "wrote" in printed
    data = load_results(out)
    assert {r["method"] for r in data["records"]} == {"dense", "svd"}
    assert data["manifest"]["config"]["model"] == str(tiny_dir)
    assert (out / "report.md").exists() and (out / "results.csv").exists() and (out / "table1.csv").exists()


def test_example_plugin_from_the_readme_runs(tiny, tmp_path):
    from pathlib import Path

    registry = load_registry(plugins_dirs=[Path(__file__).parent.parent / "examples" / "plugins"])
    results = run(tiny, tmp_path, registry=registry, methods=("colnorm_svd",), ratios=(0.4,))
    [record] = [r for r in results.records if r["method"] == "colnorm_svd"]
    assert math.isfinite(record["value"]) and record["config"] == {"eps": 1e-6}
    assert results.manifest["methods"]["colnorm_svd"]["config"] == {"eps": 1e-6}


@pytest.mark.real_model
@pytest.mark.slow  # about 30 s on two cores
def test_cli_run_on_the_real_model_resumes(tmp_path, capsys):
    """The documented command, made small: real SmolLM2, one window, then a resume."""
    argv = ["run", "--model", "smollm2-135m", "--methods", "svd", "--ratios", "0.2", "--tasks", "wikitext2",
            "--limit", "1", "--seqlen", "128", "--out", str(tmp_path)]
    assert main(argv) == 0
    first = json.loads((tmp_path / "results.json").read_text())
    dense = [r for r in first["records"] if r["method"] == "dense"][0]
    assert 5 < dense["value"] < 100  # a trained model, not a random one
    assert (tmp_path / "report.md").exists() and (tmp_path / "results.csv").exists()
    assert main(argv) == 0
    second = json.loads((tmp_path / "results.json").read_text())
    assert [r["value"] for r in second["records"]] == [r["value"] for r in first["records"]]
    assert "decompose:svd" not in second["manifest"]["timings"]  # nothing recomputed


def test_a_method_that_removes_no_parameters_runs_once_at_ratio_zero(tiny, tmp_path):
    results = run(tiny, tmp_path, methods=("hqq", "svd"), ratios=(0.2, 0.6))
    ratios = sorted((r["method"], r["ratio"]) for r in results.records)
    assert ratios == [("dense", 0.0), ("hqq", 0.0), ("svd", 0.2), ("svd", 0.6)]
    hqq = [r for r in results.records if r["method"] == "hqq"][0]
    assert hqq["bytes"] < [r for r in results.records if r["method"] == "dense"][0]["bytes"]


def test_methods_with_the_same_decomposition_share_it(tiny, tmp_path, monkeypatch):
    """svd and svdllm_u (vanilla SVD + update) factorize once; fwsvd, listed between them, does not break that."""
    from methods.svd import VanillaSVD

    calls = []
    original = VanillaSVD.decompose
    monkeypatch.setattr(VanillaSVD, "decompose", lambda self, *a: calls.append(self.name) or original(self, *a))
    run(tiny, tmp_path, methods=("svd", "fwsvd", "svdllm_u"), ratios=(0.4,),
        method_options={"svdllm_u": {"update_steps": "1", "batch_size": "1", "eval_examples": "1"}})
    data = load_results(tmp_path)
    assert set(calls) == {"svd"} and len(calls) == 14  # one factorization per matrix, not two
    assert "decompose:svdllm_u" not in data["manifest"]["timings"]
    rows = {r["method"]: r["value"] for r in data["records"]}
    assert set(rows) == {"dense", "svd", "fwsvd", "svdllm_u"} and all(math.isfinite(v) for v in rows.values())


def test_statistics_of_every_method_are_collected_in_one_pass(tiny, tmp_path):
    """asvd (abs_mean) and svdllm_w (gram) in one run: one forward pass collects both."""
    run(tiny, tmp_path, methods=("asvd", "svdllm_w"), ratios=(0.4,),
        method_options={"asvd": {"allocation": "uniform"}})
    timings = load_results(tmp_path)["manifest"]["timings"]
    passes = [key for key in timings if key.startswith("statistics:")]
    assert len(passes) == 1 and {"abs_mean", "gram"} <= set(passes[0].split(":")[1].split(","))
