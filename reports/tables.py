"""Markdown and CSV tables rendered from a results.json dictionary."""

from __future__ import annotations

import csv
import math
from pathlib import Path

ARROW = {True: "↑", False: "↓", None: ""}


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


def columns(records: list[dict]) -> list[tuple[str, str]]:
    """(task, metric) pairs in first-seen order."""
    seen: dict[tuple[str, str], None] = {}
    for r in records:
        seen.setdefault((r["task"], r["metric"]), None)
    return list(seen)


def method_order(records: list[dict]) -> list[tuple[str, float]]:
    seen: dict[tuple[str, float], None] = {}
    for r in sorted(records, key=lambda r: (r["method"] != "dense", r["ratio"])):
        seen.setdefault((r["method"], r["ratio"]), None)
    methods = list(dict.fromkeys(m for m, _ in seen))
    return sorted(seen, key=lambda mr: (mr[1], methods.index(mr[0])))


def main_table(data: dict) -> tuple[list[str], list[list]]:
    """Table-1 layout: a row per (method, ratio), a column per task metric."""
    records = data["records"]
    cols = columns(records)
    hib = {(r["task"], r["metric"]): r.get("higher_is_better") for r in records}
    header = ["method", "ratio", "params (M)", "MB"] + [f"{t} {m} {ARROW[hib[(t, m)]]}".strip() for t, m in cols]
    by_row: dict[tuple[str, float], dict] = {}
    for r in records:
        by_row.setdefault((r["method"], r["ratio"]), {})[(r["task"], r["metric"])] = r
    rows = []
    for method, ratio in method_order(records):
        cells = by_row[(method, ratio)]
        any_record = next(iter(cells.values()))
        rows.append([method, f"{ratio:.0%}", round(any_record["params"] / 1e6, 2), round(any_record["bytes"] / 2**20, 1)]
                    + [cells[c]["value"] if c in cells else None for c in cols])
    return header, rows


def nonfinite_notes(data: dict) -> list[str]:
    notes = []
    for r in data["records"]:
        value = r["value"]
        if isinstance(value, float) and not math.isfinite(value):
            source = r.get("extra", {}).get("nonfinite_source")
            notes.append(f"- {r['method']} at {r['ratio']:.0%} on {r['task']}: {r['metric']} is {fmt(value)}"
                         + (f"; first non-finite output in `{source}`" if source else ""))
    return notes


def settings_lines(manifest: dict) -> list[str]:
    config = manifest.get("config", {})
    calib = config.get("calibration", {})
    model = manifest.get("model", {})
    lines = [
        f"- Model: `{model.get('name')}` ({model.get('params', 0) / 1e6:.1f}M parameters, "
        f"{model.get('bytes', 0) / 2**20:.1f} MiB; identity `{str(model.get('identity', ''))[:16]}`)"
        + (f"; {model['note']}" if model.get("note") else ""),
        f"- Ratio: {manifest.get('ratio_definition', '')}. Embeddings, lm_head and norms are never compressed but "
        "count in params and MB.",
        f"- Evaluation: seqlen {config.get('seqlen')}, "
        f"{'first ' + str(config['limit']) + ' windows/examples per task' if config.get('limit') else 'full test sets'}, "
        f"dtype {config.get('dtype')}, device {config.get('device')}.",
        f"- Calibration: {calib.get('samples')} x {calib.get('seqlen')} tokens of {calib.get('dataset')} "
        f"(seed {calib.get('seed')}).",
        "- ↓ lower is better, ↑ higher is better.",
    ]
    return lines


def render_markdown(data: dict) -> str:
    manifest = data.get("manifest", {})
    header, rows = main_table(data)
    parts = ["# svdbench report", "", *settings_lines(manifest), "", "## Results (methods x ratios)", "",
             markdown_table(header, rows)]
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


CSV_FIELDS = ["model", "method", "ratio", "task", "metric", "value", "higher_is_better", "params", "bytes"]


def write_csv(data: dict, path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in data["records"]:
            writer.writerow(r)


def write_report(data: dict, out_dir: Path | str) -> list[Path]:
    """Write report.md and results.csv next to results.json; return the paths."""
    out_dir = Path(out_dir)
    report, table = out_dir / "report.md", out_dir / "results.csv"
    report.write_text(render_markdown(data))
    write_csv(data, table)
    return [report, table]
