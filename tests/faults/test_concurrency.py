"""Two runs at once: on one ``--out`` the second fails at once naming the first; on one cache both succeed."""

from __future__ import annotations

import json
import os
import subprocess
import time

from .harness import (
    SMALL_RUN,
    cli_env,
    corrupt_cache_entries,
    corrupt_files,
    journal_cells,
    read_results,
    start,
    svdbench,
)


def _wait_for_lock(out, proc, timeout: float = 300) -> dict:
    """The lock file's holder record, once ``proc`` has written it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            holder = json.loads((out / ".svdbench.lock").read_text())
            if holder.get("pid") == proc.pid:
                return holder
        except (OSError, ValueError):
            pass
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)


def test_second_run_on_the_same_out_fails_at_once_naming_the_first(checkpoint, tmp_path):
    """Before: both exited 0 and results.json held only the second run's record."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    first = start("run", "--model", str(checkpoint), *SMALL_RUN[:2], "--ratios", "0.2", *SMALL_RUN[4:],
                  "--out", str(out), cache=cache, log=tmp_path / "first.txt")
    _wait_for_lock(out, first)
    second = svdbench("run", "--model", str(checkpoint), *SMALL_RUN[:2], "--ratios", "0.4", *SMALL_RUN[4:],
                      "--out", str(out), cache=cache)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    [line] = second.error_lines()
    assert f"--out {out} is in use by process {first.pid}" in line and "wait for it to finish" in line
    assert first.wait(timeout=600) == 0
    ratios = {(r["method"], r["ratio"]) for r in read_results(out)["records"]}
    assert ratios == {("dense", 0.0), ("svd", 0.2), ("svdllm_w", 0.2)}
    again = svdbench("run", "--model", str(checkpoint), *SMALL_RUN[:2], "--ratios", "0.4", *SMALL_RUN[4:],
                     "--out", str(out), cache=cache)  # once the first is done, the second goes ahead
    assert again.returncode == 0
    data = read_results(out)
    assert {(r["method"], r["ratio"]) for r in data["records"]} == {("dense", 0.0), ("svd", 0.4), ("svdllm_w", 0.4)}
    assert {(r["method"], r["ratio"]) for r in data["previous_records"]} == {("svd", 0.2), ("svdllm_w", 0.2)}
    assert corrupt_files(out, cache, finished=True) == []


def test_lock_of_a_dead_process_is_taken_over(checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    probe = subprocess.Popen(["true"])  # a pid that is surely not running any more: a finished child's
    probe.wait()
    (out / ".svdbench.lock").write_text(json.dumps({"pid": probe.pid, "host": os.uname().nodename,
                                                    "command": "svdbench run (killed)", "started": "earlier"}))
    done = svdbench("run", "--model", str(checkpoint), "--methods", "none", *SMALL_RUN[4:], "--out", str(out),
                    cache=tmp_path / "cache")
    assert done.returncode == 0
    assert len(read_results(out)["records"]) == 1


def test_two_runs_sharing_one_cache_never_corrupt_it(checkpoint, gguf_file, tmp_path):
    """Two runs start together on an empty cache - both convert the GGUF model, collect statistics and write
    them - and both finish with the values of a run alone; the cache verifies."""
    cache = tmp_path / "cache"
    procs = [start("run", "--model", str(gguf_file), *SMALL_RUN, "--out", str(tmp_path / f"out-{i}"), cache=cache,
                   log=tmp_path / f"log-{i}.txt", env=cli_env(cache)) for i in range(2)]
    assert [p.wait(timeout=900) for p in procs] == [0, 0], [(tmp_path / f"log-{i}.txt").read_text()[-2000:]
                                                              for i in range(2)]
    alone = svdbench("run", "--model", str(gguf_file), *SMALL_RUN, "--out", str(tmp_path / "alone"),
                     cache=tmp_path / "cache-alone")
    assert alone.returncode == 0
    expected = {(r["method"], r["ratio"]): r["value"] for r in read_results(tmp_path / "alone")["records"]}
    for i in range(2):
        out = tmp_path / f"out-{i}"
        assert {(r["method"], r["ratio"]): r["value"] for r in read_results(out)["records"]} == expected
        assert corrupt_files(out, finished=True) == [] and len(journal_cells(out)) == 5
    assert corrupt_cache_entries(cache) == []
    leftovers = [p for p in cache.rglob(".*") if p.name.endswith((".tmp", ".partial", ".old"))]
    assert leftovers == []
