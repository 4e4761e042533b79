"""Where a group's results go: one :class:`Sink` interface, two sinks.

:class:`ResultsSink` writes every finished cell straight into results.json
(the local executor); :class:`Collected` keeps everything as plain data, for
a group run in another process and returned whole to the driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from bench.api.record import Record
from bench.engine.results import Results


class Sink(Protocol):
    """Where a group's results go: straight into results.json, or back to a driver."""

    def add(self, records: list[Record]) -> None: ...

    def add_compression(self, compression_id: str, info: dict) -> None: ...

    def add_failure(self, failure: dict) -> None: ...

    def add_timing(self, label: str, seconds: float) -> None: ...


@dataclass
class Collected:
    """A sink that keeps everything, for a group run in another process (plain data, returned whole)."""

    records: list[dict] = field(default_factory=list)
    compressions: dict[str, dict] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def add(self, records: list[Record]) -> None:
        self.records += [r.to_dict() for r in records]

    def add_compression(self, compression_id: str, info: dict) -> None:
        self.compressions[compression_id] = info

    def add_failure(self, failure: dict) -> None:
        self.failures.append(failure)

    def add_timing(self, label: str, seconds: float) -> None:
        self.timings[label] = seconds


class ResultsSink:
    """The local executor's sink: every finished cell goes straight into results.json."""

    def __init__(self, results: Results, timings: dict[str, float], progress):
        self.results, self.timings, self.progress = results, timings, progress
        self.add_compression, self.add_failure = results.add_compression, results.add_failure

    def add(self, records: list[Record]) -> None:
        self.results.add(records)
        self.progress.update(1)  # one call per evaluated cell

    def add_timing(self, label: str, seconds: float) -> None:
        self.results.manifest["timings"] = self.timings

