"""Bad input and bad numbers: one line and exit 2, or a failure recorded with its layer and stage -
never a traceback, never a NaN in results.json, never a row labelled with a ratio it does not have."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from bench.cli import main

from .harness import REPO, cli_command, cli_env, read_results
from .test_disk_full import tmpfs_allowed

TINY_RUN = ["--tasks", "wikitext2", "--limit", "1", "--seqlen", "32", "--calib-samples", "2", "--calib-seqlen", "32"]


def cli(capsys, *argv) -> tuple[int, str | None]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("svdbench:")]
    assert len(lines) <= 1, lines
    return code, lines[0] if lines else None


# --------------------------------------------------------------------------- one line and exit 2

@pytest.mark.parametrize("flags, message", [
    (["--methods", "svd", "--budgets", "1e400"], "budget '1e400' must be a positive, finite size"),
    (["--methods", "", "--ratios", "0.2"], "--methods is empty"),
    (["--methods", " , ", "--ratios", "0.2"], "--methods is empty"),
    (["--methods", "svd", "--ratios", ""], "--ratios is empty and no --budgets are given"),
    (["--methods", "svd", "--ratios", "0.2", "--seqlen", "4096"], "--seqlen 4096 is longer than model's max_position_embeddings 512"),
    (["--methods", "svdllm_w", "--ratios", "0.2", "--calib-seqlen", "600"], "--calib-seqlen 600 is longer than"),
    (["--methods", "dipsvd", "--ratios", "0.2", "--method-option", "dipsvd.spread=inf"], "dipsvd.spread='inf' is not a finite number"),
    (["--methods", "svdllm_v2", "--ratios", "0.2", "--method-option", "svdllm_v2.delta=inf"], "is not a finite number"),
    (["--methods", "fwsvd", "--ratios", "0.2", "--method-option", "fwsvd.eps=inf"], "fwsvd.eps='inf' is not a finite number"),
    (["--methods", "asvd", "--ratios", "0.2", "--method-option", "asvd.alpha=inf"], "asvd.alpha='inf' is not a finite number"),
    (["--methods", "asvd", "--ratios", "0.2", "--method-option", "asvd.alpha=1e400"], "is not a finite number"),
    (["--methods", "asvd", "--ratios", "0.2", "--method-option", "asvd.alpha=nan"], "is not a finite number"),
])
def test_bad_input_is_one_line_and_exit_2(flags, message, model, tmp_path, capsys):
    args = ["run", "--model", model, *TINY_RUN, *flags, "--out", tmp_path / "out"]
    if "--seqlen" in flags:
        args = ["run", "--model", model, *TINY_RUN[:4], *flags, "--out", tmp_path / "out"]
    if "--calib-seqlen" in flags:
        args = ["run", "--model", model, *TINY_RUN[:6], *flags, "--out", tmp_path / "out"]
    code, line = cli(capsys, *args)
    assert code == 2 and line.startswith("svdbench: error: ") and message in line, line


def test_out_that_is_a_file_fails_before_the_model_loads(model, tmp_path):
    (tmp_path / "taken").write_text("a file")
    done = subprocess.run(cli_command("run", "--model", str(model), "--methods", "none", *TINY_RUN,
                                      "--out", str(tmp_path / "taken")),
                          capture_output=True, text=True, env=cli_env(tmp_path / "cache"), cwd=REPO, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    [line] = [x for x in done.stderr.splitlines() if x.startswith("svdbench:")]
    assert "is a file, not a directory" in line and str(tmp_path / "taken") in line
    assert "Loading weights" not in done.stderr  # refused before the model was read


def test_out_on_a_read_only_filesystem_is_one_line(model, tmp_path):
    script = textwrap.dedent(f"""
        set -e
        mkdir -p {tmp_path}/ro
        mount -t tmpfs -o ro,size=64k tmpfs {tmp_path}/ro
        exec {" ".join(cli_command("run", "--model", str(model), "--methods", "none", *TINY_RUN, "--out",
                                   f"{tmp_path}/ro/out"))}
    """)
    if tmpfs_allowed():
        done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                              capture_output=True, text=True, env=cli_env(tmp_path / "cache"), cwd=REPO, timeout=300)
    elif os.geteuid() != 0:
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o500)
        done = subprocess.run(cli_command("run", "--model", str(model), "--methods", "none", *TINY_RUN, "--out",
                                          str(tmp_path / "ro" / "out")),
                              capture_output=True, text=True, env=cli_env(tmp_path / "cache"), cwd=REPO, timeout=300)
    else:
        pytest.skip("needs a read-only filesystem: no mount namespace here, and root ignores permissions")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    [line] = [x for x in done.stderr.splitlines() if x.startswith("svdbench:")]
    assert ("read-only file system" in line or "permission denied" in line) and "give a writable directory" in line
    assert "Loading weights" not in done.stderr


# --------------------------------------------------------------------------- bad numbers

PLUGIN = '''
import torch
from bench import Factorization, Measurement, Method, Metric, Task, factorize, hookimpl, LowRankLinear


class NaNFactors(Method):
    name = "nan_factors"

    def decompose(self, target, weight, context, config):
        f = factorize(weight)
        if target.name == "model.layers.1.self_attn.v_proj":
            f.s[0] = float("nan")
        return f


class InfRefine(Method):
    name = "inf_refine"

    def decompose(self, target, weight, context, config):
        return factorize(weight)

    def refine(self, model, ratio, context, config):
        layer = model.get_submodule("model.layers.0.mlp.up_proj")
        with torch.no_grad():
            layer.up.weight[0, 0] = float("inf")
        return {}


class NaNTask(Task):
    name = "nan_task"
    metrics = {"score": Metric("accuracy", True)}

    def evaluate(self, model, tokenizer, settings):
        return [Measurement("score", float("nan"), {"nonfinite_source": "model.layers.0.mlp.down_proj"})]


@hookimpl
def register_methods(register):
    register(NaNFactors())
    register(InfRefine())


@hookimpl
def register_tasks(register):
    register(NaNTask())
'''


@pytest.fixture
def plugins(tmp_path):
    directory = tmp_path / "plugins"
    directory.mkdir()
    (directory / "bad_numbers.py").write_text(PLUGIN)
    return directory


def test_nan_and_inf_stop_the_cell_with_layer_and_stage(model, plugins, tmp_path, capsys):
    out = tmp_path / "out"
    code, line = cli(capsys, "--plugins-dir", plugins, "run", "--model", model, "--methods",
                     "nan_factors,inf_refine,svd", "--ratios", "0.4", "--tasks", "wikitext2,nan_task",
                     "--limit", "1", "--seqlen", "32", "--out", out)
    assert code == 1 and line is None  # methods failed: exit 1, the others went on
    text = (out / "results.json").read_text()
    data = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in results.json"))
    failures = {(f["method"], f["stage"]): f for f in data["failures"]}
    assert failures[("nan_factors", "decompose")]["layer"] == "model.layers.1.self_attn.v_proj"
    assert failures[("inf_refine", "compress")]["layer"] == "model.layers.0.mlp.up_proj.up"
    assert failures[("svd", "evaluate nan_task")]["layer"] == "model.layers.0.mlp.down_proj"
    assert failures[("dense", "evaluate nan_task")]["ratio"] is None
    rows = {(r["method"], r["task"]) for r in data["records"]}
    assert rows == {("dense", "wikitext2"), ("svd", "wikitext2")}  # no NaN ever became a record
    cells = [cell.strip().lower() for line in (out / "report.md").read_text().splitlines() if line.startswith("|")
             for cell in line.split("|")]
    assert cells and not {"nan", "inf", "-inf"} & set(cells)  # never a table's number


def test_zero_perplexity_windows_are_a_failure_not_a_nan(model, tmp_path, capsys):
    """--seqlen longer than the corpus: 0 windows. Before, a bare NaN landed in results.json."""
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = 10_000_000
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    code, line = cli(capsys, "run", "--model", model, "--methods", "none", "--tasks", "wikitext2",
                     "--seqlen", "5000000", "--out", out)
    assert code == 1
    data = read_results(out)  # strict JSON: a NaN literal would not parse
    assert data["records"] == [] and data["failures"][0]["stage"] == "evaluate wikitext2"
    assert "non-finite" in data["failures"][0]["error"]


def test_extreme_finite_options_give_a_result_or_a_recorded_failure(model, tmp_path, capsys):
    """asvd.alpha=1e300 overflows the channel scales: a failure naming the layer, not a bare LinAlgError."""
    out = tmp_path / "out"
    code, _ = cli(capsys, "run", "--model", model, "--methods", "asvd", "--method-option", "asvd.alpha=1e300",
                  "--method-option", "asvd.allocation=uniform", "--ratios", "0.2", *TINY_RUN, "--out", out)
    data = read_results(out)
    if code == 1:
        [failure] = data["failures"]
        assert failure["layer"].startswith("model.layers.") and failure["stage"] in ("decompose", "compress")
    else:
        [record] = [r for r in data["records"] if r["method"] == "asvd"]
        assert record["value"] == record["value"]  # finite (strict JSON already excludes NaN)


def test_ratio_near_one_is_shown_as_it_is(model, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(capsys, "run", "--model", model, "--methods", "svd", "--ratios", "0.999", *TINY_RUN,
               "--out", out) == (0, None)
    [record] = [r for r in read_results(out)["records"] if r["method"] == "svd"]
    assert record["ratio"] == 0.999
    report = (out / "report.md").read_text()
    assert "| svd | 99.9% |" in report and "| svd | 100% |" not in report
    from reports.format import percent

    assert [percent(x) for x in (0.2, 0.999, 0.9999, 0.001, 0.0, 1.0)] == ["20%", "99.9%", "99.99%", "0.1%", "0%", "100%"]


def test_results_json_is_strict_json_even_for_non_finite_facts(tmp_path):
    """Infinities inside facts or extras (ASVD's sensitivity of a broken truncation) are written as strings."""
    sys.path.insert(0, str(REPO))
    from bench.api.record import Record
    from bench.engine.results import Results

    results = Results(tmp_path)
    results.begin({"note": float("inf")}, {"k"})
    results.add([Record(key="k", model="m", method="svd", ratio=0.2, task="t", metric="perplexity", value=3.0,
                        kind="perplexity", higher_is_better=False, params=1, bytes=1, extra={"x": float("nan")})])
    results.add_compression("c", {"facts": {"shift": float("-inf")}})
    data = json.loads((tmp_path / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert data["manifest"]["note"] == "inf" and data["records"][0]["extra"]["x"] == "nan"
    assert data["compressions"]["c"]["facts"]["shift"] == "-inf"


def test_nan_weights_stop_statistics_and_evaluation_with_the_layer(model, tmp_path, capsys):
    """A model with one NaN weight: the dense cell and the calibration statistics fail, each naming a layer."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code, line = cli(capsys, "run", "--model", model, "--methods", "svdllm_w", "--ratios", "0.4", *TINY_RUN,
                     "--out", out)
    assert code == 1 and line is None
    data = read_results(out)
    failures = {f["method"]: f for f in data["failures"]}
    assert failures["svdllm_w"]["stage"] == "statistics" and failures["svdllm_w"]["layer"].startswith("model.layers.")
    assert failures["dense"]["stage"] == "evaluate wikitext2" and failures["dense"]["layer"].startswith("model.layers.1")
    assert data["records"] == []
