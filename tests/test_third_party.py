"""A third-party method and task, registered in code, land in every report table like built-in ones.

Reports know no method or task by name: a method's place in the ablation
table comes from the ``components`` it declares, a task's columns and their
arrows from its :class:`bench.Metric` kinds and directions, the row order from
the run. This runs a plugin of each kind through the executor on the tiny
model and reads report.md, results.csv and table1.csv.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass

import pytest
import torch

from bench import (
    Diagonal,
    EvalSettings,
    Measurement,
    Method,
    Metric,
    PaperNotes,
    Task,
    evaluation_text,
    factorize,
    hookimpl,
    load_results,
)
from bench.engine.config import CalibrationConfig, RunConfig
from bench.engine.executor import run
from bench.engine.plugins import load_registry
from reports.report import write_report


@dataclass(frozen=True)
class RowNormConfig:
    power: float = 1.0
    eps: float = 1e-6


class RowNormSVD(Method):
    """SVD of ``W diag(||W[:, j]|| ** power)``: needs no calibration data."""

    name = "rownorm_svd"
    description = "third-party: SVD with input channels scaled by column norms to a power"
    config_class = RowNormConfig
    components = {"transform": "column norms", "update": "no", "rank rule": "uniform"}
    notes = PaperNotes(paper="A. Author, Column norms are enough (2031)", paper_defaults="power 1",
                       deviations=("eps keeps S invertible",))

    def decompose(self, target, weight, context, config):
        scale = weight.double().norm(dim=0).pow(config.power) + config.eps
        return factorize(weight, Diagonal(scale))


class NextTokenQuiz(Task):
    """How often the model's top token is the next one (accuracy), and its mean NLL per window length (other)."""

    name = "next_token_quiz"
    description = "third-party: next-token hit rate and NLL on WikiText-2 windows"
    metrics = {"hit_rate": Metric("accuracy", higher_is_better=True),
               "nll": Metric("other", higher_is_better=False, unit="nats")}
    LENGTHS = (16,)

    def settings_key(self, settings: EvalSettings) -> dict:
        return {"lengths": list(self.LENGTHS), "windows": 2}

    def evaluate(self, model, tokenizer, settings: EvalSettings) -> list[Measurement]:
        ids = tokenizer(evaluation_text("wikitext2")[:5000], add_special_tokens=False, return_tensors="pt").input_ids[0]
        measurements = []
        with torch.no_grad():
            for length in self.LENGTHS:
                batch = ids[: 2 * length].view(2, length)
                logits = model(batch).logits[:, :-1]
                targets = batch[:, 1:]
                hits = float((logits.argmax(-1) == targets).float().mean())
                nll = float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()))
                if length == self.LENGTHS[0]:
                    measurements.append(Measurement("hit_rate", hits, {"stderr": None, "tokens": targets.numel()}))
                measurements.append(Measurement("nll", nll, {"tokens": targets.numel()}, {"length": length}))
        return measurements


class ThirdPartyPlugin:
    __version__ = "2.0"

    @hookimpl
    def register_methods(self, register):
        register(RowNormSVD())

    @hookimpl
    def register_tasks(self, register):
        register(NextTokenQuiz())


def _csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def third_party_run(tiny, tmp_path):
    registry = load_registry(extra=[("third-party", ThirdPartyPlugin())])
    config = RunConfig(model="tiny", methods=("svd", "rownorm_svd"), ratios=(0.2, 0.4),
                       tasks=("wikitext2", "next_token_quiz"), seqlen=32, limit=1,
                       calibration=CalibrationConfig(samples=2, seqlen=32),
                       method_options={"rownorm_svd": {"power": "0.5"}}, out=str(tmp_path / "run"))
    results = run(config, registry, tiny)
    assert not results.data["failures"], results.data["failures"]
    paths = write_report(results.data, tmp_path / "run")
    return load_results(tmp_path / "run"), paths, tmp_path / "run"


def test_third_party_records_and_manifest(third_party_run):
    data, _, _ = third_party_run
    records = [r for r in data["records"] if r["method"] == "rownorm_svd"]
    assert {(r["task"], r["metric"], r["ratio"]) for r in records} == {
        (task, metric, ratio) for ratio in (0.2, 0.4)
        for task, metric in (("wikitext2", "perplexity"), ("next_token_quiz", "hit_rate"), ("next_token_quiz", "nll"))}
    by_metric = {r["metric"]: r for r in records if r["ratio"] == 0.4}
    assert by_metric["hit_rate"]["kind"] == "accuracy" and by_metric["hit_rate"]["higher_is_better"] is True
    assert by_metric["nll"]["kind"] == "other" and by_metric["nll"]["higher_is_better"] is False
    assert by_metric["nll"]["point"] == {"length": 16} and by_metric["nll"]["variant"] == "length=16"
    assert by_metric["hit_rate"]["point"] == {} and by_metric["hit_rate"]["variant"] == ""
    assert all(r["config"] == {"power": 0.5, "eps": 1e-6} for r in records)
    assert all(math.isfinite(r["value"]) for r in data["records"])
    manifest = data["manifest"]
    assert list(manifest["methods"]) == ["svd", "rownorm_svd"]
    assert manifest["methods"]["rownorm_svd"]["components"] == RowNormSVD.components
    assert manifest["methods"]["rownorm_svd"]["notes"]["paper"].startswith("A. Author")
    assert manifest["method_configs"]["rownorm_svd"] == {"power": 0.5, "eps": 1e-6}
    metrics = manifest["tasks"]["next_token_quiz"]["metrics"]
    assert metrics == {"hit_rate": {"kind": "accuracy", "higher_is_better": True, "unit": ""},
                       "nll": {"kind": "other", "higher_is_better": False, "unit": "nats"}}


def test_third_party_method_and_task_in_report_md(third_party_run):
    data, paths, out = third_party_run
    assert paths[0] == out / "report.md"
    report = paths[0].read_text()
    table1 = report.split("## Results (methods x ratios, SVD-LLM Table-1 layout)")[1].split("\n## ")[0]
    header = next(line for line in table1.splitlines() if line.startswith("| method"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    # perplexity first, then the accuracy column (higher is better), then the other metric (lower is better)
    assert columns == ["method", "ratio", "params (M)", "MiB", "wikitext2 perplexity ↓", "next_token_quiz hit_rate ↑",
                       "next_token_quiz nll [length=16] ↓"]
    rows = [line for line in table1.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split("|")[1].strip() for row in rows] == ["dense", "svd", "rownorm_svd", "svd", "rownorm_svd"]
    assert "| rownorm_svd | 40% |" in table1

    ablation = report.split("## Ablation (SVD-LLM Table 4)")[1].split("\n## ")[0]
    assert "| method | transform | update | rank rule | wikitext2 ppl ↓ @ 20% | wikitext2 ppl ↓ @ 40% |" in ablation
    assert "| svd | none | no | - |" in ablation and "| rownorm_svd | column norms | no | uniform |" in ablation
    assert "next_token_quiz" not in ablation  # the ablation compares perplexities

    notes = report.split("## Method notes: published vs measured")[1]
    assert "| rownorm_svd | A. Author, Column norms are enough (2031) | power 1 | power=0.5, eps=1e-06 |" in notes


def test_third_party_method_and_task_in_the_csv_files(third_party_run):
    data, paths, out = third_party_run
    assert {p.name for p in paths} >= {"report.md", "results.csv", "table1.csv", "ablation.csv", "methods.csv"}
    long = _csv(out / "results.csv")
    quiz = [r for r in long if r["method"] == "rownorm_svd" and r["task"] == "next_token_quiz"]
    assert {(r["metric"], r["kind"], r["higher_is_better"], r["variant"]) for r in quiz} == {
        ("hit_rate", "accuracy", "True", ""), ("nll", "other", "False", "length=16")}
    expected = {(r["method"], r["ratio"], r["metric"]): r["value"] for r in data["records"]
                if r["task"] == "next_token_quiz"}
    wide = _csv(out / "table1.csv")
    row = next(r for r in wide if r["method"] == "rownorm_svd" and float(r["ratio"]) == 0.4)
    assert float(row["next_token_quiz hit_rate ↑"]) == pytest.approx(expected[("rownorm_svd", 0.4, "hit_rate")])
    assert float(row["next_token_quiz nll [length=16] ↓"]) == pytest.approx(expected[("rownorm_svd", 0.4, "nll")])
    dense = next(r for r in wide if r["method"] == "dense")
    assert float(dense["next_token_quiz nll [length=16] ↓"]) == pytest.approx(expected[("dense", 0.0, "nll")])
    ablation = _csv(out / "ablation.csv")
    assert [r["method"] for r in ablation] == ["svd", "rownorm_svd"]
    assert ablation[1]["transform"] == "column norms" and ablation[0]["rank rule"] == "-"
