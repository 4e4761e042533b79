"""The report of a run: report.md, results.csv, a CSV per table and the plots, from results.json alone."""

from __future__ import annotations

import math
from pathlib import Path

from reports.earlier import earlier_lines
from reports.format import fmt
from reports.plots import write_plots
from reports.published import blocks_beside, write_published_csv
from reports.records import frame
from reports.tables import build_tables, settings_lines


def nonfinite_notes(data: dict) -> list[str]:
    notes = []
    for r in data["records"]:
        value = r["value"]
        if isinstance(value, float) and not math.isfinite(value):
            source = (r.get("extra") or {}).get("nonfinite_source")
            notes.append(f"- {r['method']} at {r['ratio']:.0%} on {r['task']}: {r['metric']} is {fmt(value)}"
                         + (f"; first non-finite output in `{source}`" if source else ""))
    return notes


def render_markdown(data: dict, with_published: bool = False, plots: list[Path] | None = None) -> str:
    """The report: settings, every supported table (published LLaMA-7B blocks beside them), plots, failures,
    earlier runs' records."""
    manifest = data.get("manifest", {})
    parts = ["# svdbench report", "", *settings_lines(manifest, data.get("records"))]
    for table in build_tables(data):
        parts += ["", table.markdown()]
        if with_published:
            parts += blocks_beside(table.name, data)
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
    parts += earlier_lines(data)
    versions = manifest.get("versions", {})
    parts += ["", f"svdbench {versions.get('svdbench')}, torch {versions.get('torch')}, "
              f"transformers {versions.get('transformers')}; git {manifest.get('git_revision')}; "
              f"total {manifest.get('timings', {}).get('total', '?')} s."]
    return "\n".join(parts) + "\n"


CSV_FIELDS = ["model", "method", "ratio", "budget", "task", "metric", "value", "higher_is_better", "params", "bytes",
              "kind", "bits", "variant"]


def write_csv(data: dict, path: Path) -> None:
    """Every record, one per line (the long form; the per-table CSVs are wide)."""
    frame(data).to_csv(path, columns=CSV_FIELDS, index=False)


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
        paths.append(write_published_csv(out_dir / "published_llama7b.csv"))
    plot_paths: list[Path] = []
    if plots:
        plot_paths = write_plots(data, out_dir, with_published=with_published)
    report.write_text(render_markdown(data, with_published, plot_paths))
    return paths + plot_paths
