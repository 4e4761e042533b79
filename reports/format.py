"""Formatting numbers and tables for Markdown and CSV."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from bench import atomic_write_text


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


def percent(value: float) -> str:
    """A fraction as a percentage: ``0.4`` is 40%; decimals are added only where rounding would show
    0% or 100% for a value strictly between (0.999 is 99.9%, never 100%)."""
    text = f"{value:.0%}"
    for digits in range(1, 6):
        if not 0 < value < 1 or 0 < float(text[:-1]) < 100:
            break
        text = f"{value:.{digits}%}"
    return text


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
    display: list[list] | None = None  # Markdown cells where they say more than the raw value (marks, intervals)

    def display_rows(self) -> list[list]:
        cols = [i for i, h in enumerate(self.header) if h in self.percent]
        return [[percent(c) if i in cols and isinstance(c, (int, float)) and not isinstance(c, bool) else c
                 for i, c in enumerate(row)]
                for row in (self.display if self.display is not None else self.rows)]

    def markdown(self) -> str:
        parts = [f"## {self.title}", "", markdown_table(self.header, self.display_rows())]
        if self.notes:
            parts += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(parts)

    def write_csv(self, path: Path) -> None:
        """Written atomically (a killed run never leaves half a CSV)."""
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer)
        writer.writerow(self.csv_header or self.header)
        writer.writerows(self.csv_rows if self.csv_rows is not None else self.rows)
        atomic_write_text(path, buffer.getvalue())
