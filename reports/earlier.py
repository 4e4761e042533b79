"""The "Earlier records" section: what earlier runs of the same ``--out`` measured with other settings.

A rerun with other ratios, tasks or settings reports only its own cells;
the earlier cells move to ``previous_records`` of results.json (the journal
keeps them too). Listing them here keeps every number of the directory
visible in report.md.
"""

from __future__ import annotations

from reports.format import fmt, markdown_table, percent

SHOWN = 30  # rows listed; the rest are counted


def earlier_lines(data: dict) -> list[str]:
    """The section's lines (none when there are no earlier records)."""
    previous = data.get("previous_records") or []
    if not previous:
        return []
    rows = [[r.get("method"), percent(r["ratio"]) if isinstance(r.get("ratio"), (int, float)) else "-",
             r.get("variant") or "-", r.get("task"), r.get("metric"), fmt(r.get("value"))]
            for r in previous[:SHOWN]]
    lines = ["", "## Earlier records", "",
             f"{len(previous)} record(s) of earlier runs of this directory with other settings (ratios, tasks or "
             "evaluation settings); not in the tables above, kept in results.json's `previous_records` and the "
             "journal.", "", markdown_table(["method", "ratio", "variant", "task", "metric", "value"], rows)]
    if len(previous) > SHOWN:
        lines += ["", f"... and {len(previous) - SHOWN} more in results.json."]
    return lines
