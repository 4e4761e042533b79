"""Markdown and CSV tables rendered from a results.json dictionary.

Every table is built from ``data["records"]`` (never from a previous
report) as a :class:`Table` of raw values; Markdown formats them for reading
and the CSV keeps them exact. A table appears only when the run's records
support it:

- ``table1``: SVD-LLM Table-1 layout, a row per (method, ratio), perplexity
  and zero-shot accuracy columns and the average accuracy;
- ``zeroshot``: every zero-shot metric (acc and acc_norm) with its stderr;
- ``ablation``: SVD-LLM Table 4 (svd, svdllm_w, svdllm_u, svdllm, asvd);
- ``budget``: SVD-LLM Table 7, methods at equal memory (records with ``budget``);
- ``quantization``: SVD-LLM Table 8, bits, bytes and quality of quantized rows
  beside the dense model and the unquantized rows at the same ratios;
- ``throughput``: tokens/s, speed-up over dense and memory per grid point.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from reports.records import (ABLATION_METHODS, AVERAGE_METRIC, DENSE, PAPER_ZERO_SHOT, bits_of, budget_of,
                             dtype_bits, fmt_budget, grid_of, is_throughput, method_label, method_rank, metric_kind,
                             task_rank)

ARROW = {True: "↑", False: "↓", None: ""}
DIRECTION = "↓ lower is better, ↑ higher is better."


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "inf"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Table:
    """A rendered table: raw values in ``rows``; ``percent`` names columns shown as percentages."""

    name: str
    title: str
    header: list[str]
    rows: list[list]
    notes: list[str] = field(default_factory=list)
    percent: tuple[str, ...] = ("ratio",)
    csv_header: list[str] | None = None  # when the CSV keeps more (or more exact) columns than the Markdown
    csv_rows: list[list] | None = None

    def display_rows(self) -> list[list]:
        cols = [i for i, h in enumerate(self.header) if h in self.percent]
        return [[f"{c:.0%}" if i in cols and isinstance(c, (int, float)) else c for i, c in enumerate(row)]
                for row in self.rows]

    def markdown(self) -> str:
        parts = [f"## {self.title}", "", markdown_table(self.header, self.display_rows())]
        if self.notes:
            parts += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(parts)

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(self.csv_header or self.header)
            writer.writerows(self.csv_rows if self.csv_rows is not None else self.rows)


# ---------------------------------------------------------------- settings notes
def settings_note(manifest: dict) -> str:
    """One line with the ratio definition and the evaluation and calibration settings."""
    config = manifest.get("config", {})
    calib = config.get("calibration", {})
    limit = config.get("limit")
    return (f"Ratio = {manifest.get('ratio_definition') or 'fraction of each compressed matrix’s parameters removed'}; "
            "params (M) and MiB count the whole model (embeddings, lm_head and norms included). "
            f"Evaluation: seqlen {config.get('seqlen')}, "
            f"{'first ' + str(limit) + ' windows/examples per task' if limit else 'full test sets'}, "
            f"{config.get('dtype')} on {config.get('device')}. Calibration: {calib.get('samples')} x "
            f"{calib.get('seqlen')} tokens of {calib.get('dataset')} (seed {calib.get('seed')}). {DIRECTION}")


def settings_lines(manifest: dict) -> list[str]:
    config = manifest.get("config", {})
    calib = config.get("calibration", {})
    model = manifest.get("model", {})
    lines = [
        f"- Model: `{model.get('name')}` ({model.get('params', 0) / 1e6:.1f}M parameters, "
        f"{model.get('bytes', 0) / 2**20:.1f} MiB; identity `{str(model.get('identity', ''))[:16]}`)"
        + (f"; {model['note']}" if model.get("note") else ""),
        f"- Ratio: {manifest.get('ratio_definition', '')}. Embeddings, lm_head and norms are never compressed but "
        "count in params and MiB.",
        f"- Evaluation: seqlen {config.get('seqlen')}, "
        f"{'first ' + str(config['limit']) + ' windows/examples per task' if config.get('limit') else 'full test sets'}, "
        f"dtype {config.get('dtype')}, device {config.get('device')}.",
        f"- Calibration: {calib.get('samples')} x {calib.get('seqlen')} tokens of {calib.get('dataset')} "
        f"(seed {calib.get('seed')}).",
        f"- {DIRECTION}",
    ]
    return lines


# ---------------------------------------------------------------- helpers
def _column_name(task: str, metric: str, higher_is_better) -> str:
    return f"{task} {metric} {ARROW[higher_is_better]}".strip()


def _directions(records: list[dict]) -> dict[tuple[str, str], bool | None]:
    return {(r["task"], r["metric"]): r.get("higher_is_better") for r in records}


def _rows_by(records: list[dict], key) -> dict:
    grouped: dict = {}
    for r in records:
        grouped.setdefault(key(r), {})[(r["task"], r["metric"])] = r
    return grouped


def _size(cells: dict) -> list:
    any_record = next(iter(cells.values()))
    return [round(any_record["params"] / 1e6, 2), round(any_record["bytes"] / 2**20, 1)]


def _sort_rows(keys, ratio_index: int = 1) -> list:
    """Dense first, then by ratio, then in the papers' method order."""
    return sorted(keys, key=lambda k: (k[0] != DENSE, k[ratio_index], method_rank(k[0])))


def quality_records(data: dict, quantized: bool = False) -> list[dict]:
    """Records of the fixed-ratio sweep: no budget search, no throughput, no stderr.

    Quantized rows (their own table) are left out unless ``quantized``.
    """
    return [r for r in data["records"]
            if budget_of(r) is None and not is_throughput(r) and metric_kind(r) != "stderr"
            and (quantized or bits_of(r) is None)]


def main_columns(records: list[dict]) -> list[tuple[str, str]]:
    """Table-1 columns: perplexities, then each zero-shot task's ``acc``, then other metrics."""
    pairs = {(r["task"], r["metric"]) for r in records}
    tasks_with_average_metric = {t for t, m in pairs if m == AVERAGE_METRIC}
    keep = [(t, m) for t, m in pairs
            if metric_kind({"metric": m}) != "accuracy" or m == AVERAGE_METRIC or t not in tasks_with_average_metric]
    return sorted(keep, key=lambda tm: (metric_kind({"metric": tm[1]}) != "perplexity", task_rank(tm[0]), tm[1]))


def average_tasks(records: list[dict]) -> list[str]:
    """The paper's zero-shot tasks present in ``records`` (their ``acc`` is averaged)."""
    present = {r["task"] for r in records if r["metric"] == AVERAGE_METRIC}
    return [t for t in PAPER_ZERO_SHOT if t in present]


def average_accuracy(cells: dict, tasks: list[str]) -> float | None:
    """Plain mean of ``acc`` over ``tasks`` (the paper's average); None if any is missing."""
    values = [cells.get((t, AVERAGE_METRIC), {}).get("value") for t in tasks]
    if not tasks or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def average_label(tasks: list[str]) -> str:
    return "avg acc ↑" if len(tasks) == len(PAPER_ZERO_SHOT) else f"avg acc ({len(tasks)}/6) ↑"


# ---------------------------------------------------------------- tables
def main_table(data: dict) -> Table | None:
    """Table-1 layout: a row per (method, ratio), a column per task metric and the average accuracy."""
    records = quality_records(data)
    if not records:
        return None
    cols = main_columns(records)
    hib = _directions(records)
    avg_tasks = average_tasks(records)
    header = ["method", "ratio", "params (M)", "MiB"] + [_column_name(t, m, hib[(t, m)]) for t, m in cols]
    if avg_tasks:
        header.append(average_label(avg_tasks))
    by_row = _rows_by(records, lambda r: (method_label(r), r["ratio"]))
    rows = []
    for label, ratio in _sort_rows(by_row):
        cells = by_row[(label, ratio)]
        row = [label, ratio, *_size(cells), *[cells[c]["value"] if c in cells else None for c in cols]]
        if avg_tasks:
            row.append(average_accuracy(cells, avg_tasks))
        rows.append(row)
    notes = [settings_note(data.get("manifest", {})),
             "Perplexity: exp(mean token NLL) over non-overlapping windows (unitless). Accuracy: lm-eval `acc`, "
             "fraction of examples correct (0-1), zero-shot."]
    if avg_tasks:
        notes.append(f"{average_label(avg_tasks)[:-2]}: plain mean of `acc` over {', '.join(avg_tasks)}"
                     + ("" if len(avg_tasks) == len(PAPER_ZERO_SHOT) else
                        f" ({len(avg_tasks)} of the paper's six: {', '.join(PAPER_ZERO_SHOT)}); "
                        "not directly comparable with the paper's six-task average") + ".")
    return Table("table1", "Results (methods x ratios, SVD-LLM Table-1 layout)", header, rows, notes)


def zeroshot_table(data: dict) -> Table | None:
    """Every zero-shot metric with its standard error, when a task reports more than ``acc``."""
    records = [r for r in quality_records(data) if metric_kind(r) == "accuracy"]
    if not any(r["metric"] != AVERAGE_METRIC for r in records):
        return None
    cols = sorted({(r["task"], r["metric"]) for r in records}, key=lambda tm: (task_rank(tm[0]), tm[1]))
    by_row = _rows_by(records, lambda r: (method_label(r), r["ratio"]))
    header = ["method", "ratio"] + [f"{t} {m} ↑" for t, m in cols]
    rows, csv_rows = [], []
    for label, ratio in _sort_rows(by_row):
        cells = by_row[(label, ratio)]
        row, csv_row = [label, ratio], [label, ratio]
        for c in cols:
            record = cells.get(c)
            value = None if record is None else record["value"]
            stderr = None if record is None else (record.get("extra") or {}).get("stderr")
            row.append(f"{fmt(value)} ± {fmt(stderr)}" if isinstance(stderr, float) else value)
            csv_row += [value, stderr]
        rows.append(row)
        csv_rows.append(csv_row)
    notes = [settings_note(data.get("manifest", {})),
             "lm-eval zero-shot accuracy (fraction correct, 0-1) ± its standard error; `acc_norm` normalizes each "
             "choice's log-likelihood by its length in bytes."]
    csv_header = ["method", "ratio"] + [f"{t} {m}{suffix}" for t, m in cols for suffix in ("", " stderr")]
    return Table("zeroshot", "Zero-shot accuracy, every metric", header, rows, notes,
                 csv_header=csv_header, csv_rows=csv_rows)


ABLATION_COMPONENTS = {"svd": ("none", "no"), "asvd": ("activation scaling", "no"), "svdllm_w": ("whitening", "no"),
                       "svdllm_u": ("none", "yes"), "svdllm": ("whitening", "yes")}


def ablation_table(data: dict) -> Table | None:
    """SVD-LLM Table 4: whitening and update separately and together, perplexity per ratio."""
    records = [r for r in quality_records(data) if r["method"] in ABLATION_METHODS and bits_of(r) is None
               and metric_kind(r) == "perplexity"]
    present = [m for m in ABLATION_METHODS if any(r["method"] == m for r in records)]
    if len(present) < 2 or not {"svdllm_w", "svdllm_u", "svdllm"} & set(present):
        return None
    cols = sorted({(r["task"], r["ratio"]) for r in records}, key=lambda tr: (task_rank(tr[0]), tr[1]))
    values = {(r["method"], r["task"], r["ratio"]): r["value"] for r in records}
    header = ["method", "transform", "update"] + [f"{t} ppl ↓ @ {ratio:.0%}" for t, ratio in cols]
    rows = [[m, *ABLATION_COMPONENTS[m], *[values.get((m, t, ratio)) for t, ratio in cols]] for m in present]
    notes = [settings_note(data.get("manifest", {})),
             "transform: the right transform S applied before the SVD (whitening = Cholesky of the calibration gram); "
             "update: the sequential LoRA update of the factors. Perplexity is unitless."]
    return Table("ablation", "Ablation (SVD-LLM Table 4): truncation-aware whitening and parameter update",
                 header, rows, notes, percent=())


def _budget_sort_key(budget) -> tuple:
    return (0, -budget) if isinstance(budget, (int, float)) else (1, str(budget))


def budget_table(data: dict) -> Table | None:
    """SVD-LLM Table 7: at each memory budget, the ratio each method needed and its quality."""
    records = [r for r in data["records"] if budget_of(r) is not None and not is_throughput(r)
               and metric_kind(r) != "stderr"]
    if not records:
        return None
    cols = main_columns(records)
    hib = _directions(records)
    by_row = _rows_by(records, lambda r: (budget_of(r), method_label(r)))
    keys = sorted(by_row, key=lambda k: (_budget_sort_key(k[0]), method_rank(k[1])))
    header = ["budget", "method", "ratio", "params (M)", "MiB"] + [_column_name(t, m, hib[(t, m)]) for t, m in cols]
    rows = []
    for budget, label in keys:
        cells = by_row[(budget, label)]
        ratio = next(iter(cells.values()))["ratio"]
        rows.append([fmt_budget(budget), label, ratio, *_size(cells), *[cells[c]["value"] if c in cells else None
                                                                         for c in cols]])
    notes = [settings_note(data.get("manifest", {})),
             "Each method takes the smallest ratio whose compressed model fits the budget (bytes as held in memory, "
             "whole model); ratio is the one it needed. Methods in one budget group are compared at equal memory."]
    return Table("budget", "Equal memory budget (SVD-LLM Table 7)", header, rows, notes)


def _removes_params(record: dict) -> bool:
    return record["method"] == DENSE or (record.get("accounting") or {}).get("params_removed", 1.0) > 0


def quantization_table(data: dict) -> Table | None:
    """SVD-LLM Table 8: quantized models beside the dense model and the unquantized rows at the same ratios."""
    records = quality_records(data, quantized=True)
    quantized = [r for r in records if bits_of(r) is not None]
    if not quantized:
        return None
    ratios = {r["ratio"] for r in quantized if r["ratio"] > 0 and _removes_params(r)}
    chosen = [r for r in records if bits_of(r) is not None or r["method"] == DENSE or r["ratio"] in ratios]
    cols = [c for c in main_columns(chosen) if metric_kind({"metric": c[1]}) == "perplexity"] or main_columns(chosen)
    hib = _directions(chosen)
    # a quantizer alone (hqq) removes no parameters: its ratio is moot and one row stands for all of them
    by_row = _rows_by(chosen, lambda r: (method_label(r), r["ratio"] if _removes_params(r) else None))
    full_bits = dtype_bits(data.get("manifest", {}))
    header = ["method", "ratio", "bits", "params (M)", "MiB"] + [_column_name(t, m, hib[(t, m)]) for t, m in cols]
    rows = []
    for label, ratio in by_row:
        cells = by_row[(label, ratio)]
        bits = bits_of(next(iter(cells.values())))
        rows.append([label, ratio, bits if bits is not None else full_bits, *_size(cells),
                     *[cells[c]["value"] if c in cells else None for c in cols]])
    rows.sort(key=lambda row: -row[4])
    notes = [settings_note(data.get("manifest", {})),
             "bits: weight bits of the quantized factors (others stay in the run's dtype); MiB counts packed weights, "
             "scales and zero points plus the unquantized embeddings, lm_head and norms. Rows sorted by memory; "
             "ratio '-': the model keeps every parameter (quantization alone)."]
    return Table("quantization", "SVD and quantization (SVD-LLM Table 8)", header, rows, notes)


def throughput_table(data: dict) -> Table | None:
    """Tokens/s and memory per grid point, with the speed-up over the dense model at the same point."""
    records = [r for r in data["records"] if is_throughput(r) and metric_kind(r) != "stderr"]
    if not records:
        return None
    metrics = sorted({r["metric"] for r in records}, key=lambda m: (metric_kind({"metric": m}) != "throughput", m))
    speed = [m for m in metrics if metric_kind({"metric": m}) == "throughput"]
    hib = {r["metric"]: r.get("higher_is_better") for r in records}
    by_row: dict = {}
    for r in records:
        by_row.setdefault((method_label(r), r["ratio"], grid_of(r), budget_of(r)), {})[r["metric"]] = r
    dense = {(key[2], m): cell["value"] for key, cells in by_row.items() if key[0] == DENSE
             for m, cell in cells.items()}
    header = ["method", "ratio", "grid", "MiB"] + [f"{m} {ARROW[hib[m]]}".strip() for m in metrics] \
        + [f"{m} speed-up ↑" for m in speed]
    rows = []
    keys = sorted(by_row, key=lambda k: (k[2], k[0] != DENSE, k[1], method_rank(k[0])))
    for label, ratio, grid, budget in keys:
        cells = by_row[(label, ratio, grid, budget)]
        any_record = next(iter(cells.values()))
        name = label if budget is None else f"{label} @ {fmt_budget(budget)}"
        values = [cells[m]["value"] if m in cells else None for m in metrics]
        ups = [cells[m]["value"] / dense[(grid, m)] if m in cells and dense.get((grid, m)) else None for m in speed]
        rows.append([name, ratio, grid or "-", round(any_record["bytes"] / 2**20, 1), *values, *ups])
    notes = [settings_note(data.get("manifest", {})),
             "tok/s: tokens per second (prefill: prompt tokens processed; decode: tokens generated), median of repeats "
             "after warm-up; *_mb: MiB (peak_mem_mb: stored weights plus the peak added while generating; kv_cache_mb: the KV cache); speed-up = compressed tok/s / dense tok/s at the same grid "
             "point, measured in the same run."]
    return Table("throughput", "Throughput and memory", header, rows, notes)


TABLE_BUILDERS = (main_table, zeroshot_table, ablation_table, budget_table, quantization_table, throughput_table)


def build_tables(data: dict) -> list[Table]:
    """Every table the run's records support, in report order."""
    return [table for table in (builder(data) for builder in TABLE_BUILDERS) if table is not None]


# ---------------------------------------------------------------- the report
def nonfinite_notes(data: dict) -> list[str]:
    notes = []
    for r in data["records"]:
        value = r["value"]
        if isinstance(value, float) and not math.isfinite(value):
            source = r.get("extra", {}).get("nonfinite_source")
            notes.append(f"- {r['method']} at {r['ratio']:.0%} on {r['task']}: {r['metric']} is {fmt(value)}"
                         + (f"; first non-finite output in `{source}`" if source else ""))
    return notes


def render_markdown(data: dict, with_published: bool = False, plots: list[Path] | None = None) -> str:
    """The report: settings, every supported table (published LLaMA-7B blocks beside them), plots, failures."""
    manifest = data.get("manifest", {})
    parts = ["# svdbench report", "", *settings_lines(manifest)]
    published = None
    if with_published:
        from reports import published as published_module

        published = published_module
    for table in build_tables(data):
        parts += ["", table.markdown()]
        if published is not None:
            parts += [block for block in published.blocks_beside(table.name, data)]
    if plots:
        parts += ["", "## Plots", ""] + [f"- [{p.name}]({p.name})" for p in plots]
    notes = nonfinite_notes(data)
    if notes:
        parts += ["", "## Non-finite results", "", *notes]
    failures = data.get("failures") or []
    if failures:
        parts += ["", "## Failures", ""]
        parts += [f"- {f['method']}" + (f" at {f['ratio']:.0%}" if f.get("ratio") is not None else "")
                  + f" ({f['stage']}): {f['error']}" for f in failures]
    versions = manifest.get("versions", {})
    parts += ["", f"svdbench {versions.get('svdbench')}, torch {versions.get('torch')}, "
              f"transformers {versions.get('transformers')}; git {manifest.get('git_revision')}; "
              f"total {manifest.get('timings', {}).get('total', '?')} s."]
    return "\n".join(parts) + "\n"


CSV_FIELDS = ["model", "method", "ratio", "budget", "task", "metric", "value", "higher_is_better", "params", "bytes"]


def write_csv(data: dict, path: Path) -> None:
    """Every record, one per line (the long form; the per-table CSVs are wide)."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS + ["variant"], extrasaction="ignore")
        writer.writeheader()
        from reports.records import variant

        for r in data["records"]:
            writer.writerow({**r, "variant": variant(r)})


def write_report(data: dict, out_dir: Path | str, with_published: bool = False, plots: bool = True) -> list[Path]:
    """Write report.md, results.csv, a CSV per table and the plots into ``out_dir``; return the paths.

    report.md comes first in the returned list.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report, table_csv = out_dir / "report.md", out_dir / "results.csv"
    write_csv(data, table_csv)
    paths = [report, table_csv]
    for table in build_tables(data):
        path = out_dir / f"{table.name}.csv"
        table.write_csv(path)
        paths.append(path)
    if with_published:
        from reports.published import write_published_csv

        paths.append(write_published_csv(out_dir / "published_llama7b.csv"))
    plot_paths: list[Path] = []
    if plots:
        from reports.plots import write_plots

        plot_paths = write_plots(data, out_dir, with_published=with_published)
    report.write_text(render_markdown(data, with_published, plot_paths))
    return paths + plot_paths
