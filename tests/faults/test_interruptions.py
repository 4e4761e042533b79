"""kill -9 at seeded random moments and Ctrl-C: nothing finished is lost, recomputed or duplicated."""

from __future__ import annotations

import os
import signal
import time

import pytest

from .harness import SMALL_RUN, corrupt_files, journal_cells, kill_sweep, read_results, start, svdbench


def _sweep(checkpoint, tmp_path, points: int, seed: int):
    report = kill_sweep(checkpoint, tmp_path, points=points, seed=seed, progress=lambda line: None)
    assert report.line() == "lost 0, recomputed 0, duplicated 0, corrupt 0", report.problems[:5]
    assert report.wrong_values == 0  # every finished chain has the values of an uninterrupted run
    assert report.kills >= points // 2 and report.completed >= 1
    return report


def test_kill9_at_seeded_random_moments(checkpoint, tmp_path):
    """The CI-sized sweep: 6 kills (the full one below and ``benchmarks/faults.py`` do more)."""
    _sweep(checkpoint, tmp_path, points=6, seed=16)


@pytest.mark.slow
def test_kill9_at_30_seeded_random_moments(checkpoint, tmp_path):
    _sweep(checkpoint, tmp_path, points=30, seed=1616)


def _finished_records(out) -> int:
    try:
        return len(read_results(out)["records"])
    except (OSError, ValueError):
        return 0


def _wait_for_cells(out, count: int, proc, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while _finished_records(out) < count:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_ctrl_c_is_one_line_exit_130_and_the_rerun_resumes(checkpoint, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    log = tmp_path / "log.txt"
    proc = start("run", "--model", str(checkpoint), *SMALL_RUN, "--out", str(out), cache=cache, log=log)
    _wait_for_cells(out, 1, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: SIGINT to the foreground group
    assert proc.wait(timeout=120) == 130
    text = log.read_text()
    assert "Traceback" not in text
    [line] = [line for line in text.splitlines() if line.startswith("svdbench:")]
    assert "interrupted" in line and "run the same command again" in line
    assert corrupt_files(out) == []
    finished = dict(journal_cells(out))
    assert finished and read_results(out)["records"]
    again = svdbench("run", "--model", str(checkpoint), *SMALL_RUN, "--out", str(out), cache=cache)
    assert again.returncode == 0, again.stderr[-2000:]
    cells = journal_cells(out)
    assert [key for key, _ in cells[:len(finished)]] == list(finished)  # kept, in order
    assert not {key for key, _ in cells[len(finished):]} & set(finished)  # none computed again
    assert len({key for key, _ in cells}) == len(cells) == 5  # dense + 2 methods x 2 ratios, each once
