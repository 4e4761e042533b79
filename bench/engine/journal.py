"""The record journal (``journal.jsonl`` beside results.json): the truth results.json is rendered from.

An append-only file of one JSON line per event - a run's start (its manifest
and planned cells), a finished cell (its records and the checksums of the
cache entries it was computed from), a compression, a failure, a finished
group (where it ran), a run's end. Each line carries its own checksum and is
fsync'd before the next cell starts, so a kill -9 loses at most the cell
being computed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

from bench.disk import guarded
from bench.errors import UsageError
from bench.storage import fsync_dir

log = logging.getLogger(__name__)

JOURNAL = "journal.jsonl"
JOURNAL_FORMAT = 1


def strict(value):
    """``value`` with every non-finite float as a string, so ``json.dumps(allow_nan=False)`` accepts it."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return strict(json.loads(json.dumps(value, default=str)))  # numpy scalars, paths, ...


def dumps(value, indent: int | None = None) -> str:
    """Strict JSON (no NaN/Infinity literals), keys sorted within each object as given."""
    return json.dumps(strict(value), indent=indent, allow_nan=False)


def _line_checksum(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()[:16]


class Journal:
    """The append-only record journal of one output directory (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = path
        self.events: list[dict] = []

    def read(self, repair: bool) -> list[dict]:
        """Every event; a torn last line is dropped (and cut off the file when ``repair``)."""
        if not self.path.exists():
            self.events = []
            return self.events
        with guarded(self.path):
            raw = self.path.read_bytes()
        complete, _, torn = raw.rpartition(b"\n")
        if torn:
            log.warning("%s: dropping a partly written last line (%d bytes; a run was killed while writing it)",
                        self.path, len(torn))
            if repair:
                with guarded(self.path), open(self.path, "r+b") as handle:
                    handle.truncate(len(complete) + 1 if complete else 0)
                    os.fsync(handle.fileno())
        events, bad = [], []
        for number, line in enumerate(complete.split(b"\n") if complete else [], start=1):
            try:
                event = json.loads(line)
                body = {k: v for k, v in event.items() if k != "crc"}
                if event.get("crc") != _line_checksum(body) or "t" not in body:
                    raise ValueError("checksum mismatch")
            except (ValueError, TypeError, AttributeError):
                bad.append(number)
                continue
            events.append(body)
        if bad:
            numbers = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            script = ";".join(f"{n}d" for n in bad)
            raise UsageError(f"{self.path} line{'s' if len(bad) > 1 else ''} {numbers} "
                             f"{'are' if len(bad) > 1 else 'is'} corrupted; delete "
                             f"{'them' if len(bad) > 1 else 'it'} (sed -i '{script}' {self.path}) and run the "
                             "same command again: cells still in results.json are kept, the others are computed again")
        self.events = events
        return events

    def append(self, event: dict) -> None:
        """Append one event as one line and fsync it; on failure the file is cut back to what it was."""
        body = {**event, "v": JOURNAL_FORMAT}
        line = (json.dumps({**body, "crc": _line_checksum(body)}, allow_nan=False) + "\n").encode()
        new = not self.path.exists()
        with guarded(self.path, len(line)):
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                size = os.fstat(fd).st_size
                try:
                    written = os.write(fd, line)
                    if written != len(line):
                        raise OSError(28, "No space left on device", str(self.path))
                    os.fsync(fd)
                except BaseException:
                    os.ftruncate(fd, size)  # never leave half a line behind
                    raise
            finally:
                os.close(fd)
        if new:
            fsync_dir(self.path.parent)
        self.events.append(body)
