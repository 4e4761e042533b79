"""``results.json``: the one file every report, CSV and plot is rendered from.

Layout::

    {"manifest": {config, model, versions, git revision, seeds, data checksums,
                  methods and tasks (what reports need to know of them), timings},
     "records": [Record.to_dict(), ...],
     "compressions": {id: {method, ratio, config, summary, facts, per-matrix ranks and params}},
     "failures": [{method, ratio, stage, error}], "previous_records": [...]}

The file is rewritten atomically after every finished cell, so an
interrupted run keeps every finished record; a record's ``key`` is its
cell's resume key, and a re-run with the same ``--out`` reuses records whose
key matches instead of recomputing them. Records of an earlier run with other
settings move to ``previous_records``: kept, but not reported.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.api.record import RESULTS_FILE, Record, load_results
from bench.storage import atomic_write_text


class Results:
    """A results.json being written, loaded from ``out_dir`` when it exists."""

    def __init__(self, out_dir: Path | str):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / RESULTS_FILE
        self.data = {"manifest": {}, "records": [], "compressions": {}, "failures": [], "previous_records": []}
        if self.path.exists():
            self.data.update(load_results(self.path))
        self.data["failures"] = []  # failures are re-evaluated by every run
        self._keys = {r.get("key") for r in self.records}

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
        self._keys = {r.get("key") for r in keep}

    def done(self, key: str) -> bool:
        return key in self._keys

    def add(self, records: list[Record]) -> None:
        self.records.extend(r.to_dict() for r in records)
        self._keys.update(r.key for r in records)
        self.save()

    def add_compression(self, compression_id: str, info: dict) -> None:
        self.data["compressions"][compression_id] = info
        self.save()

    def add_failure(self, failure: dict) -> None:
        self.data["failures"].append(failure)
        self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=1, default=str))
