"""Reports rendered from results.json: tables, CSVs, published blocks and plots."""

from __future__ import annotations

import csv
import json

import pytest
from synthetic_results import AVERAGE, COMPONENTS, ZERO_SHOT, accuracy, degraded, perplexity, synthetic_results

from bench.cli import main
from reports.format import fmt
from reports.plots import pareto_front
from reports.published import generation_2025_block, load_published, ordering_agreement, table1_curves
from reports.report import render_markdown, write_report
from reports.tables import build_tables
from tasks.zeroshot import PAPER_TASKS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _table(data, name):
    return next(t for t in build_tables(data) if t.name == name)


def _csv_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_full_run_writes_every_table_csv_and_plot(tmp_path):
    paths = write_report(synthetic_results(), tmp_path)
    names = {p.name for p in paths}
    assert paths[0].name == "report.md"
    for table in ("table1", "zeroshot", "ablation", "budget", "quantization", "throughput"):
        assert f"{table}.csv" in names
    for plot in ("perplexity_vs_ratio", "accuracy_vs_ratio", "perplexity_vs_bytes", "throughput_speedup"):
        path = tmp_path / f"{plot}.png"
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000
    report = (tmp_path / "report.md").read_text()
    for title in ("SVD-LLM Table-1 layout", "Ablation (SVD-LLM Table 4)", "Equal memory budget", "SVD and quantization",
                  "Throughput and memory", "## Plots"):
        assert title in report
    assert "Published" not in report  # only with --with-published


def test_table1_values_units_and_average(tmp_path):
    data = synthetic_results()
    table = _table(data, "table1")
    header = table.header
    assert header[:4] == ["method", "ratio", "params (M)", "MiB"]
    assert "wikitext2 perplexity ↓" in header and "piqa acc ↑" in header and header[-1] == "avg acc ↑"
    assert not any("acc_norm" in h for h in header)  # acc_norm lives in the zero-shot table
    row = next(r for r in table.rows if r[0] == "svdllm_w" and r[1] == 0.4)
    assert row[header.index("wikitext2 perplexity ↓")] == pytest.approx(perplexity("svdllm_w", 0.4))
    expected_avg = sum(accuracy("svdllm_w", 0.4, t) for t in PAPER_TASKS) / 6
    assert row[-1] == pytest.approx(expected_avg)
    assert table.rows[0][0] == "dense"
    # quantized, budget and throughput rows have their own tables
    assert not any("bit" in str(r[0]) for r in table.rows)
    notes = " ".join(table.notes)
    for needed in ("Ratio = fraction", "seqlen 512", "first 2 windows", "8 x 512 tokens of wikitext2",
                   "lower is better", "fraction of examples correct"):
        assert needed in notes
    write_report(data, tmp_path, plots=False)
    rows = _csv_rows(tmp_path / "table1.csv")
    svd = next(r for r in rows if r["method"] == "svd" and float(r["ratio"]) == 0.2)
    assert float(svd["wikitext2 perplexity ↓"]) == pytest.approx(perplexity("svd", 0.2))
    # every value's 95% interval (from its windows) beside it in the CSV
    low, high = float(svd["wikitext2 perplexity ↓ 95% low"]), float(svd["wikitext2 perplexity ↓ 95% high"])
    assert low < perplexity("svd", 0.2) < high


def test_partial_average_is_labelled():
    data = synthetic_results()
    data["records"] = [r for r in data["records"] if r["task"] not in ("mathqa", "winogrande")]
    table = _table(data, "table1")
    assert table.header[-1] == "avg acc (4/6) ↑"
    assert any("not directly comparable" in n for n in table.notes)


def test_only_supported_tables_and_plots(tmp_path):
    data = synthetic_results(methods=("svd",), zero_shot=False, budgets=False, quantized=False, throughput=False)
    assert [t.name for t in build_tables(data)] == ["table1"]
    names = {p.name for p in write_report(data, tmp_path)}
    assert names == {"report.md", "results.csv", "table1.csv", "perplexity_vs_ratio.png", "perplexity_vs_bytes.png"}


def test_ablation_budget_quantization_throughput_layouts():
    data = synthetic_results()
    ablation = _table(data, "ablation")
    # the methods that declare their components, in the run's method order
    assert [r[0] for r in ablation.rows] == ["svd", "asvd", "svdllm_w", "svdllm_u", "svdllm"]
    assert ablation.header[:3] == ["method", "transform", "update"]
    col = ablation.header.index("wikitext2 ppl ↓ @ 60%")
    assert ablation.rows[-1][col] == pytest.approx(perplexity("svdllm", 0.6))
    assert ablation.rows[-1][1:3] == ["whitening", "yes"]

    budget = _table(data, "budget")
    assert [r[0] for r in budget.rows] == ["90% of dense"] * 2 + ["75% of dense"] * 2
    assert budget.rows[0][2] == 0.12  # the ratio the method needed

    quant = _table(data, "quantization")
    sizes = [r[quant.header.index("MiB")] for r in quant.rows]
    assert sizes == sorted(sizes, reverse=True)
    bits = {r[0]: r[2] for r in quant.rows}
    assert bits["svdllm_quant (2-bit)"] == 2 and bits["dense"] == 32
    hqq = [r for r in quant.rows if r[0] == "hqq (4-bit)"]
    assert len(hqq) == 1 and hqq[0][1] is None  # one row, no ratio: quantization alone removes nothing

    tp = _table(data, "throughput")
    speed = tp.header.index("prefill_tok_s speed-up ↑")
    grid = tp.header.index("grid")
    row = next(r for r in tp.rows if r[0] == "svd" and r[1] == 0.6 and r[grid].startswith("batch_size=4"))
    assert row[speed] == pytest.approx(1 + 0.6 * (0.5 + 0.25 * 4) * (1 - 0.05 * 3))
    assert all(r[speed] == 1.0 for r in tp.rows if r[0] == "dense")


def test_variant_tells_rows_apart():
    data = synthetic_results()
    keys = [(r["method"], r["ratio"], r["variant"], r["task"], r["metric"]) for r in data["records"]]
    assert len(keys) == len(set(keys))
    variants = {r["variant"] for r in data["records"]}
    assert {"budget=90% of dense", "2-bit", "batch_size=4 prompt_len=128 decode_len=32 path=eager"} <= variants


def test_with_published_block_and_ordering(tmp_path):
    data = synthetic_results()
    report = render_markdown(data, with_published=True)
    assert report.count("### Published, LLaMA-7B") == 5  # table 1, ablation, budget, quantization, throughput
    assert "20%: measured svdllm < svdllm_w < asvd < svd; published svdllm < svdllm_w < asvd < svd (same order)" in report
    flipped = degraded(data, "svdllm", 100.0)
    assert "(order differs)" in "\n".join(ordering_agreement(flipped))
    paths = write_report(data, tmp_path, with_published=True, plots=False)
    published_csv = tmp_path / "published_llama7b.csv"
    assert published_csv in paths
    rows = _csv_rows(published_csv)
    assert {"table1", "table4", "tables2-3", "table7", "table8"} <= {r["table"] for r in rows}
    assert "ZS-SVD project page" in {r["table"] for r in rows}


def test_generation_2025_block_sits_beside_measured_values():
    """Every Part-2 row is printed; a row whose method and ratio were measured shows the measured value."""
    data = synthetic_results(ratios=(0.2, 0.4, 0.6))
    block = "\n".join(generation_2025_block(data))
    measured = {(r["method"], r["ratio"]): r["value"] for r in data["records"]
                if r["task"] == "wikitext2" and r["kind"] == "perplexity" and not r.get("budget") and not r.get("bits")}
    svdllm_row = next(line for line in block.splitlines() if line.startswith("| AdaSVD Table 1")
                      and "| svdllm | 40% |" in line)
    assert svdllm_row.rstrip(" |").endswith(fmt(measured[("svdllm", 0.4)]))
    rows = load_published()["generation_2025"]["rows"]
    assert sum(line.startswith("| ") for line in block.splitlines()) == len(rows) + 1  # + header
    assert all(row["ratio"] > 0 and row["method"] and row["model"] for row in rows)


def test_published_data_is_consistent():
    pub = load_published()
    curves = table1_curves()
    assert curves["dense"] == [(0.0, pub["dense"]["wikitext2"])]
    for method, points in curves.items():
        ratios = [r for r, _ in points]
        assert ratios == sorted(ratios) and len(set(ratios)) == len(ratios), method
        assert all(v > 0 for _, v in points)
    ablation = {r["method"]: r["value"] for r in pub["ablation"]["rows"]}
    assert ablation["svdllm"] == dict(curves["svdllm"])[pub["ablation"]["ratio"]]
    assert all("note" in pub[k] for k in ("table1", "ablation", "budget", "quantization", "throughput"))


def test_pareto_front():
    points = [(100, 5.0), (50, 9.0), (60, 8.0), (70, 12.0), (100, 4.0), (30, 50.0)]
    assert pareto_front(points) == [(30, 50.0), (50, 9.0), (60, 8.0), (100, 4.0)]


def test_nonfinite_values_are_reported_not_plotted(tmp_path):
    data = synthetic_results(zero_shot=False, budgets=False, quantized=False, throughput=False)
    bad = next(r for r in data["records"] if r["method"] == "svd" and r["ratio"] == 0.6 and r["task"] == "wikitext2")
    bad["value"] = float("nan")
    bad["extra"]["nonfinite_source"] = "model.layers.3.mlp.down_proj"
    paths = write_report(data, tmp_path)
    report = paths[0].read_text()
    assert "| svd | 60% |" in report and "NaN" in report and "model.layers.3.mlp.down_proj" in report
    assert (tmp_path / "perplexity_vs_ratio.png").exists()  # drawn without the NaN point


def test_report_command_rerenders_from_results_json(tmp_path, capsys):
    data = synthetic_results(methods=("svd", "svdllm"), ratios=(0.2, 0.4), budgets=False, quantized=False,
                             throughput=False)
    (tmp_path / "results.json").write_text(json.dumps(data))
    assert main(["report", str(tmp_path), "--with-published"]) == 0
    first = (tmp_path / "report.md").read_text()
    (tmp_path / "report.md").write_text("garbage the report must not read back")
    assert main(["report", str(tmp_path), "--with-published"]) == 0
    assert (tmp_path / "report.md").read_text() == first
    assert "wrote" in capsys.readouterr().out
    assert all(f"{task} acc ↑" in first for task in ZERO_SHOT) and "### Published, LLaMA-7B" in first


def test_synthetic_manifest_describes_the_real_methods_and_tasks(registry):
    """The synthetic results stay true to what the built-in plugins declare."""
    data = synthetic_results()
    create = registry.method_factory({})
    for name, info in data["manifest"]["methods"].items():
        real = create(name).describe()
        assert info.get("components") == real.get("components"), name
        assert info["uses_ratio"] == real["uses_ratio"] and (info["bits"] is None) == (real["bits"] is None), name
    declared = {name for name, method in registry.methods.items() if method.components}
    assert set(COMPONENTS) <= declared
    for name, info in data["manifest"]["tasks"].items():
        real = registry.get("task", name).describe()
        kinds = {m: (v["kind"], v["higher_is_better"]) for m, v in real["metrics"].items()}
        assert all(kinds[m] == (v["kind"], v["higher_is_better"]) for m, v in info["metrics"].items()), name
        assert info.get("average") == real.get("average"), name
    assert AVERAGE["members"] == list(PAPER_TASKS)


def test_results_csv_carries_kind_bits_and_variant(tmp_path):
    write_report(synthetic_results(), tmp_path, plots=False)
    rows = _csv_rows(tmp_path / "results.csv")
    assert {"kind", "bits", "variant", "budget"} <= set(rows[0])
    quantized = [r for r in rows if r["method"] == "svdllm_quant"]
    assert {r["variant"] for r in quantized} == {"2-bit", "3-bit", "4-bit"}
    assert {float(r["bits"]) for r in quantized} == {2, 3, 4}  # written "2.0": pandas reads a None/int column as float
    assert {r["kind"] for r in rows} == {"perplexity", "accuracy", "throughput", "memory"}
    budget = [r for r in rows if r["budget"]]
    assert {r["variant"] for r in budget} == {"budget=90% of dense", "budget=75% of dense"}


def _text_boxes(fig) -> list[tuple[str, object]]:
    """(what, window extent) of every title, the figure title and every legend of a drawn figure."""
    renderer = fig.canvas.get_renderer()
    boxes = [(f"title of panel {i}", ax.title.get_window_extent(renderer)) for i, ax in enumerate(fig.axes)
             if ax.get_title()]
    if fig._suptitle is not None and fig._suptitle.get_text():
        boxes.append(("figure title", fig._suptitle.get_window_extent(renderer)))
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    boxes += [(f"legend {i}", legend.get_window_extent(renderer)) for i, legend in enumerate(legends)]
    return boxes


@pytest.mark.parametrize("one_grid_point", [False, True])
def test_no_plot_has_overlapping_titles_or_legends(tmp_path, monkeypatch, one_grid_point):
    """Every plot of a synthetic run, drawn at its default size: no two titles or legends intersect (the main job's
    throughput plot has one grid point, whose long name once ran the two panel titles into each other)."""
    import reports.plots as plots

    data = synthetic_results()
    if one_grid_point:
        data["records"] = [r for r in data["records"] if (r.get("point") or {}).get("batch_size", 1) == 1]
    overlaps, drawn = {}, []
    save = plots._save

    def checked_save(fig, path):
        fig.canvas.draw()
        boxes = _text_boxes(fig)
        overlaps[path.name] = [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:]
                               if box_a.overlaps(box_b)]
        drawn.append(path.name)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", checked_save)
    plots.write_plots(data, tmp_path, with_published=True)
    assert set(drawn) == {"perplexity_vs_ratio.png", "accuracy_vs_ratio.png", "perplexity_vs_bytes.png",
                          "throughput_speedup.png"}
    assert all(not found for found in overlaps.values()), overlaps


def test_block_allocation_shows_where_each_method_put_its_parameters():
    from reports.tables import block_allocation_table

    def layers(kept):  # two matrices per block, 100 dense parameters each
        return {f"model.layers.{b}.{m}": {"rank": 1, "dense_params": 100, "params": p}
                for b, p in enumerate(kept) for m in ("q", "k")}

    data = {"records": [{"compression": "u"}, {"compression": "a"}],
            "compressions": {"u": {"method": "uniform", "ratio": 0.5, "layers": layers([50, 50, 50])},
                             "a": {"method": "adaptive", "ratio": 0.5, "layers": layers([20, 50, 80])},
                             "old": {"method": "gone", "ratio": 0.5, "layers": layers([10, 90, 50])}},
            "manifest": {"methods": {"uniform": {}, "adaptive": {}}}}
    table = block_allocation_table(data, None)
    assert [row[:7] for row in table.rows] == [["uniform", 0.5, 0.5, 0.5, 0.5, 0, 0],
                                               ["adaptive", 0.5, 0.2, 0.5, 0.8, 0, 2]]  # no row of earlier runs
    data["compressions"].pop("a")
    assert block_allocation_table(data, None) is None  # nothing but uniform: no table
