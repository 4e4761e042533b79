"""Published vs measured: the method notes every built-in declares, and the report tables built from them.

Also the allocation ablation table (SVD-LLM V2's rules at equal parameters),
from real runs of a tiny model.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from bench import Method, PaperNotes, load_results
from bench.engine.config import CalibrationConfig, RunConfig
from bench.engine.executor import run
from reports.records import frame
from reports.tables import allocation_table, build_tables, methods_table

ROOT = Path(__file__).resolve().parent.parent
def test_every_builtin_method_declares_its_paper_and_deviations(registry):
    for name, method in registry.methods.items():
        assert isinstance(method.notes, PaperNotes) and method.notes.paper and method.notes.paper_defaults, name
        assert all(isinstance(d, str) and d for d in method.notes.deviations), name
    # the deviations the issue names are written down where they apply
    notes = {name: " ".join(method.notes.deviations) for name, method in registry.methods.items()}
    assert "svdllm_w" in notes["svdllm_quant"] and "base=svdllm" in notes["svdllm_quant"]
    assert "L_min <= 1" in notes["svdllm_v2"] and "this project's rule" in notes["svdllm_v2"]
    assert "gram of its input in the original model" in notes["gptq"]


def test_methods_table_comes_from_the_classes_and_a_plugin_declares_its_own(registry):
    class Plugin(Method):
        name = "plugin_svd"
        notes = PaperNotes(paper="Someone 2026", paper_defaults="r = 8", deviations=("none worth naming",))

    create = registry.method_factory({"svdllm_v2": {"allocation": "power"}})
    described = {name: create(name).describe() for name in registry.methods}
    described["plugin_svd"] = Plugin().describe()
    data = {"manifest": {"methods": described}, "records": []}
    table = methods_table(data, frame(data))
    rows = {row[0]: row for row in table.rows}
    assert set(rows) == {name for name, info in described.items() if info.get("notes")}
    assert rows["plugin_svd"][1:] == ["Someone 2026", "r = 8", "none", "none worth naming"]
    v2 = registry.methods["svdllm_v2"].notes
    assert rows["svdllm_v2"][1] == v2.paper and rows["svdllm_v2"][2] == v2.paper_defaults
    assert "allocation=power" in rows["svdllm_v2"][3]  # the run's settings, beside the paper's defaults
    assert rows["svdllm_v2"][4] == "; ".join(v2.deviations)


def v2_run(tiny, out: Path, rule: str) -> dict:
    config = RunConfig(model="tiny", methods=("svdllm_w", "svdllm_v2"), ratios=(0.2, 0.4), tasks=("wikitext2",),
                       seqlen=64, limit=1, calibration=CalibrationConfig(samples=8, seqlen=64),
                       method_options={"svdllm_v2": {"allocation": rule}}, out=str(out))
    run(config, loaded=tiny)
    return load_results(out)


def test_allocation_table_puts_the_rules_side_by_side_and_merges_runs(tiny, tmp_path):
    paper = v2_run(tiny, tmp_path / "paper", "paper")
    table = next(t for t in build_tables(paper) if t.name == "allocation")
    assert table.header == ["method", "rule", "summed normalized loss ↓ @ 20%", "summed normalized loss ↓ @ 40%",
                            "wikitext2 ppl ↓ @ 20%", "wikitext2 ppl ↓ @ 40%"]
    rows = {row[1]: row for row in table.rows}
    assert set(rows) == {"paper", "power", "greedy", "uniform"} and {row[0] for row in table.rows} == {"svdllm_v2"}
    assert all(math.isfinite(v) for row in table.rows for v in row[2:4])
    assert all(v is None for rule in ("power", "greedy", "uniform") for v in rows[rule][4:])  # not evaluated
    records = {(r["method"], r["ratio"]): r["value"] for r in paper["records"]}
    assert rows["paper"][4:] == [records[("svdllm_v2", 0.2)], records[("svdllm_v2", 0.4)]]
    # the power rule is chosen by that very criterion: never above uniform
    assert rows["power"][2] <= rows["uniform"][2] + 1e-9 and rows["power"][3] <= rows["uniform"][3] + 1e-9

    # a second run with another rule, merged: both rules' perplexities, the same losses
    uniform = v2_run(tiny, tmp_path / "uniform", "uniform")
    spec = importlib.util.spec_from_file_location("v2_allocation", ROOT / "benchmarks" / "v2_allocation.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    data = script.merged([str(tmp_path / "paper"), str(tmp_path / "uniform")])
    merged = {row[1]: row for row in allocation_table(data, frame(data)).rows}
    uniform_ppl = {(r["method"], r["ratio"]): r["value"] for r in uniform["records"]}
    assert merged["uniform"][4:] == [uniform_ppl[("svdllm_v2", 0.2)], uniform_ppl[("svdllm_v2", 0.4)]]
    assert merged["paper"][2:] == rows["paper"][2:]
    assert script.main([str(tmp_path / "paper"), str(tmp_path / "uniform")]) == 0

    # a later run in the same directory without svdllm_v2: its old compressions are not reported
    run(RunConfig(model="tiny", methods=("svdllm_w",), ratios=(0.2,), tasks=("wikitext2",), seqlen=64, limit=1,
                  calibration=CalibrationConfig(samples=8, seqlen=64), out=str(tmp_path / "paper")), loaded=tiny)
    later = load_results(tmp_path / "paper")
    assert any(c["method"] == "svdllm_v2" for c in later["compressions"].values())
    assert "allocation" not in {t.name for t in build_tables(later)}
