"""``results.json`` and the record journal it is rendered from.

Layout of results.json::

    {"manifest": {config, model, versions, git revision, seeds, data checksums,
                  methods and tasks (what reports need to know of them), timings},
     "records": [Record.to_dict(), ...],
     "compressions": {id: {method, ratio, config, summary, facts, per-matrix ranks and params}},
     "failures": [{method, ratio, stage, layer, error}], "previous_records": [...],
     "checksum": sha256 of everything else}

The record journal (:mod:`bench.engine.journal`) is the truth; ``results.json``
is rendered from it and replaced atomically after every event.

Recovery, every time a run opens its ``--out``:

- a torn last line (a kill mid-write) is dropped with a warning;
- a corrupt line elsewhere stops the run with one line naming the file, the
  line and the fix (delete the line; the cell it held is computed again
  unless results.json still has it);
- a results.json that is not valid JSON or fails its checksum is moved aside
  (``results.json.corrupt-<time>``) and rebuilt from the journal;
- records of a valid results.json that the journal lacks (a results.json from
  before the journal existed, or a journal line deleted as advised) are
  copied into the journal.

A record's ``key`` is its cell's resume key: a re-run with the same ``--out``
skips cells whose key is in the journal - unless a cache entry the cell was
computed from has changed since (then it is computed again). Records of an
earlier run with other settings go to ``previous_records``: kept, and listed
in report.md's "Earlier records", not in its tables. Non-finite numbers never reach the file as bare ``NaN``/``Infinity``
(results.json is strict JSON): anywhere but a record's value they are written
as the strings ``"nan"``, ``"inf"``, ``"-inf"``; a non-finite value is a
failure, not a record.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

from bench.api.record import RESULTS_FILE, Record
from bench.disk import guarded, make_dir
from bench.engine.journal import JOURNAL, Journal, dumps, strict
from bench.errors import UsageError
from bench.interrupts import check as check_interrupt
from bench.storage import atomic_write_text, entry_changed, is_sealed, seal, sources, sweep_temporaries

log = logging.getLogger(__name__)

class Results:
    """The results of one output directory: its journal, and results.json rendered from it.

    Opening it repairs what a crash can leave (see the module docstring);
    the caller holds the directory's lock (:func:`bench.engine.executor.run`)
    unless ``read_only``.
    """

    def __init__(self, out_dir: Path | str, read_only: bool = False):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / RESULTS_FILE
        self.journal = Journal(self.out_dir / JOURNAL)
        self.read_only = read_only
        self.run_id = uuid.uuid4().hex[:12]
        self._manifest: dict = {}
        self._planned: set[str] | None = None
        self._changed: dict[tuple[str, str], bool] = {}  # (cache entry, checksum used) -> changed since?
        if not read_only:
            make_dir(self.out_dir)
            sweep_temporaries(self.out_dir)
        self.journal.read(repair=not read_only)
        self._salvage(self._read_results_file())
        self._rebuild()

    # ------------------------------------------------------------------ opening

    def _read_results_file(self) -> dict | None:
        """A valid results.json's data; a corrupt one is moved aside (kept) and None returned."""
        if not self.path.exists():
            return None
        problem = None
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("records"), list):
                problem = "it is not an svdbench results file"
            elif "checksum" in data and not is_sealed(data):
                problem = "its checksum does not match"
        except (OSError, ValueError, UnicodeDecodeError) as error:
            problem = f"it is not valid JSON ({error})"
        if problem is None:
            return data
        if self.read_only:
            log.warning("%s is unusable (%s); rendering from %s", self.path, problem, self.journal.path.name)
            return None
        aside = self.path.with_name(f"{RESULTS_FILE}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        with guarded(aside):
            os.replace(self.path, aside)
        log.warning("%s was unusable (%s); moved it to %s and rebuilt it from %s", self.path, problem, aside.name,
                    self.journal.path.name)
        return None

    def _salvage(self, data: dict | None) -> None:
        """Copy into the journal what a valid results.json holds and the journal does not."""
        if not data:
            return
        journaled = {e["key"] for e in self.journal.events if e["t"] == "cell"}
        records = [r for r in [*data.get("records", []), *data.get("previous_records", [])]
                   if isinstance(r, dict) and r.get("key") and r["key"] not in journaled]
        if not records:
            return
        if self.read_only:
            for key, group in _by_key(records).items():
                self.journal.events.append({"t": "cell", "key": key, "records": group, "run": "salvaged"})
            return
        if not any(e["t"] == "run" for e in self.journal.events):
            self.journal.append({"t": "run", "run": "salvaged", "manifest": data.get("manifest", {}),
                                 "planned": sorted({r["key"] for r in data.get("records", []) if r.get("key")})})
        known = {e["id"] for e in self.journal.events if e["t"] == "compression"}
        for cid, info in (data.get("compressions") or {}).items():
            if cid not in known:
                self.journal.append({"t": "compression", "run": "salvaged", "id": cid, "info": strict(info)})
        for key, group in _by_key(records).items():
            self.journal.append({"t": "cell", "run": "salvaged", "key": key, "records": strict(group)})
        log.info("copied %d cell(s) from %s into %s", len(_by_key(records)), self.path.name, self.journal.path.name)

    def _rebuild(self) -> None:
        runs = [e for e in self.journal.events if e["t"] == "run"]
        if runs:
            self._manifest = dict(runs[-1].get("manifest") or {})
        self._cells: dict[str, dict] = {}
        for event in self.journal.events:
            if event["t"] == "cell":
                self._cells[event["key"]] = event  # a cell computed again (its entry changed) replaces the old one

    # ------------------------------------------------------------------ what is done

    @property
    def manifest(self) -> dict:
        return self._manifest

    def begin(self, manifest: dict, planned: set[str]) -> None:
        """Start this run: its manifest and planned cells go into the journal; results.json is rendered."""
        self._manifest = dict(manifest)
        self._planned = set(planned)
        self.journal.append({"t": "run", "run": self.run_id, "manifest": strict(manifest), "planned": sorted(planned)})
        self.save()

    def keep_only(self, planned_keys: set[str]) -> None:
        """Report only the cells of the current plan; the others stay in the journal as ``previous_records``."""
        self._planned = set(planned_keys)

    def done(self, key: str) -> bool:
        """Whether cell ``key`` is finished and none of the cache entries it was computed from has changed."""
        cell = self._cells.get(key)
        if cell is None:
            return False
        changed = []
        for path, checksum in (cell.get("sources") or {}).items():
            if (path, checksum) not in self._changed:
                self._changed[path, checksum] = entry_changed(path, checksum)
            if self._changed[path, checksum]:
                changed.append(path)
        if changed:
            log.warning("cell %s was computed from %s, which has changed since; computing it again", key, changed[0])
            return False
        return True

    # ------------------------------------------------------------------ writing

    def add(self, records: list[Record]) -> None:
        """One finished cell (its records share a key): journaled, then results.json rendered."""
        for key, group in _by_key([r.to_dict() for r in records]).items():
            event = {"t": "cell", "run": self.run_id, "key": key, "records": strict(group), "sources": sources(),
                     "timings": strict(self._manifest.get("timings", {}))}
            self.journal.append(event)
            self._cells[key] = self.journal.events[-1]
        self.save()
        check_interrupt()  # the cell is safe; a Ctrl-C swallowed while computing it stops the run here

    def add_compression(self, compression_id: str, info: dict) -> None:
        self.journal.append({"t": "compression", "run": self.run_id, "id": compression_id, "info": strict(info)})
        self.save()

    def add_failure(self, failure: dict) -> None:
        self.journal.append({"t": "failure", "run": self.run_id, "failure": strict(failure)})
        self.save()

    def add_group(self, label: str, info: dict) -> None:
        """Where a group of cells ran and how long it took (the manifest's ``executor.groups``)."""
        self.journal.append({"t": "group", "run": self.run_id, "label": label, "info": strict(info)})
        groups = self._manifest.get("executor", {}).get("groups")
        if isinstance(groups, dict):
            groups[label] = info
        self.save()

    def finish(self, timings: dict) -> None:
        self._manifest["timings"] = timings
        self.journal.append({"t": "end", "run": self.run_id, "timings": strict(timings)})
        self.save()

    # ------------------------------------------------------------------ rendering

    @property
    def data(self) -> dict:
        """results.json's content, rendered from the journal."""
        planned = self._planned
        if planned is None:
            runs = [e for e in self.journal.events if e["t"] == "run"]
            planned = set(runs[-1].get("planned", [])) if runs else set(self._cells)
        records, previous = [], []
        for key, cell in self._cells.items():
            (records if key in planned else previous).extend(cell["records"])
        runs = [e for e in self.journal.events if e["t"] == "run"]
        current = self.run_id if self._planned is not None else (runs[-1]["run"] if runs else None)
        manifest = dict(self._manifest)
        if self._planned is None and runs:
            timings = [e["timings"] for e in self.journal.events
                       if e.get("run") == current and e["t"] in ("cell", "end") and e.get("timings")]
            if timings:
                manifest["timings"] = timings[-1]
        executor = manifest.get("executor")
        if isinstance(executor, dict) and isinstance(executor.get("groups"), dict):
            # the planned groups, each with where it last ran (in this run or an earlier one of this --out)
            ran = {e["label"]: e["info"] for e in self.journal.events if e["t"] == "group"}
            manifest["executor"] = {**executor, "groups": {label: ran.get(label, info)
                                                           for label, info in executor["groups"].items()}}
        data = {"manifest": manifest, "records": records,
                "compressions": {e["id"]: e["info"] for e in self.journal.events if e["t"] == "compression"},
                "failures": [e["failure"] for e in self.journal.events if e["t"] == "failure" and e["run"] == current],
                "previous_records": previous}
        return seal(strict(data))

    @property
    def records(self) -> list[dict]:
        return self.data["records"]

    def save(self) -> None:
        """Render results.json from the journal (atomically)."""
        if self.read_only:
            raise UsageError(f"{self.path} was opened read-only")
        atomic_write_text(self.path, dumps(self.data, indent=1))


def _by_key(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for record in records:
        out.setdefault(record["key"], []).append(record)
    return out


def load_rendered(out_dir: Path | str) -> dict:
    """What ``svdbench report`` reads: the journal rendered when there is one, else results.json as it is."""
    from bench.api.record import load_results

    out_dir = Path(out_dir)
    if (out_dir / JOURNAL).exists():
        return Results(out_dir, read_only=True).data
    return load_results(out_dir)
