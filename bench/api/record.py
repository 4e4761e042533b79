"""One measured value: the record every table, CSV, plot and regression check reads.

The engine writes records; the reports read them and nothing else of the
engine. A record carries everything a report needs to place it - the kind of
its metric and its direction (from the task's :class:`~bench.api.task.Metric`),
its weight bits (from the method), its memory budget and its grid point - so a
third-party method or task lands in the right table without a line of report
code knowing its name.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from bench.errors import UsageError

DENSE = "dense"  # the method name of the uncompressed model's records
RESULTS_FILE = "results.json"


def format_budget(budget: float | int | None) -> str:
    """A budget as a reader wants it: a share of the dense bytes, or MiB."""
    if budget is None:
        return ""
    return f"{budget:.0%} of dense" if budget <= 1.5 else f"{budget / 2**20:.1f} MiB"


def format_point(point: dict) -> str:
    """A grid point, e.g. ``batch_size=4 prompt_len=128 decode_len=32``."""
    return " ".join(f"{k}={v}" for k, v in point.items())


@dataclass(frozen=True)
class Record:
    """One (model, method, ratio or budget, task, metric) value.

    ``variant`` tells apart records of the same (method, ratio, task, metric):
    a budget, a bit width, a grid point. ``budget`` is a fraction of the
    dense model's bytes (<= 1.5) or a number of bytes; ``key`` is the resume
    key of the cell that produced the record.
    """

    key: str
    model: str
    method: str
    ratio: float
    task: str
    metric: str
    value: float
    kind: str
    higher_is_better: bool | None
    params: int
    bytes: int
    bits: int | None = None
    budget: float | None = None
    point: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    compression: str | None = None
    accounting: dict = field(default_factory=dict)
    budget_fit: dict | None = None
    seconds: float | None = None

    @property
    def variant(self) -> str:
        parts = []
        if self.budget is not None:
            parts.append(f"budget={format_budget(self.budget)}")
        if self.bits is not None:
            parts.append(f"{self.bits}-bit")
        if self.point:
            parts.append(format_point(self.point))
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "variant": self.variant}

    @classmethod
    def from_dict(cls, data: dict) -> Record:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def load_results(path: Path | str) -> dict:
    """Read a results.json (a directory holding one works too)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"no results at {path}; run `svdbench run --out DIR` first") from None
    except ValueError as error:
        raise UsageError(f"{path} is not valid JSON ({error}); re-run `svdbench run` with that --out") from None
    if not isinstance(data, dict) or "records" not in data:
        raise UsageError(f"{path} is not an svdbench results file (no 'records')")
    return data
