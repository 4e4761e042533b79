"""Formatting numbers and tables for Markdown and CSV."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path


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
