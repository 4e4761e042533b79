"""``results.json``: the one file every report, CSV and plot is rendered from.

Layout::

    {"manifest": {config, versions, git revision, seeds, data checksums, timings},
     "records": [{model, method, ratio, task, metric, value, ...}, ...],
     "compressions": {id: {method, ratio, config, per-matrix ranks and params}},
     "failures": [{method, ratio, stage, error}], "previous_records": [...]}

The file is rewritten atomically after every evaluation, so an interrupted
run keeps every finished record; a record's ``key`` hashes everything that
determines its value, and a re-run with the same ``--out`` reuses records
whose key matches instead of recomputing them. Records of an earlier run with
other settings move to ``previous_records``: kept, but not reported.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

RESULTS_FILE = "results.json"


def record_key(**fields) -> str:
    """A stable hash of everything that determines a measurement."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24]


class Results:
    """A results.json being written, loaded from ``out_dir`` when it exists."""

    def __init__(self, out_dir: Path | str):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / RESULTS_FILE
        self.data = {"manifest": {}, "records": [], "compressions": {}, "failures": [], "previous_records": []}
        if self.path.exists():
            self.data.update(load_results(self.path))
        self.data["failures"] = []  # failures are re-evaluated by every run

    @property
    def manifest(self) -> dict:
        return self.data["manifest"]

    @property
    def records(self) -> list[dict]:
        return self.data["records"]

    def keep_only(self, planned_keys: set[str]) -> None:
        """Move records that the current plan does not produce to ``previous_records``."""
        keep = [r for r in self.records if r.get("key") in planned_keys]
        stale = [r for r in self.records if r.get("key") not in planned_keys]
        self.data["records"] = keep
        self.data["previous_records"].extend(stale)

    def done(self, key: str) -> bool:
        return any(r.get("key") == key for r in self.records)

    def add(self, records: list[dict]) -> None:
        self.records.extend(records)
        self.save()

    def add_compression(self, compression_id: str, info: dict) -> None:
        self.data["compressions"][compression_id] = info
        self.save()

    def add_failure(self, failure: dict) -> None:
        self.data["failures"].append(failure)
        self.save()

    def save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def load_results(path: Path | str) -> dict:
    """Read a results.json (a directory holding one works too)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    from bench.errors import UsageError

    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"no results at {path}; run `svdbench run --out DIR` first") from None
    except ValueError as error:
        raise UsageError(f"{path} is not valid JSON ({error}); re-run `svdbench run` with that --out") from None
    if not isinstance(data, dict) or "records" not in data:
        raise UsageError(f"{path} is not an svdbench results file (no 'records')")
    return data
