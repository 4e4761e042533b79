"""A full disk: one line naming the path and the space needed, exit 2, results valid, the next run resumes.

Where the suite may mount a tmpfs in a private mount namespace (``unshare
--user --map-root-user --mount``), the output directory or the cache really
sits on a tiny filesystem; elsewhere the write layer is told to behave as if
it did (``SVDBENCH_FAULT_DISK``), which covers svdbench's own writes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

import pytest

from .harness import REPO, SMALL_RUN, cli_command, cli_env, corrupt_files, journal_cells, read_results


@cache
def tmpfs_allowed() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


SCENARIO = textwrap.dedent("""
    import json, shutil, subprocess, sys
    mount, size, args, env, keep, report = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:5]), sys.argv[5], sys.argv[6]
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mount], check=True)
    first = subprocess.run(args, capture_output=True, text=True, env=env)
    left = sorted(p.name for p in __import__("pathlib").Path(mount).rglob("*") if p.is_file())
    snapshot = keep + "-after-first"
    shutil.copytree(mount, snapshot, symlinks=True)
    subprocess.run(["mount", "-o", "remount,size=64m", mount], check=True)
    second = subprocess.run(args, capture_output=True, text=True, env=env)
    shutil.copytree(mount, keep, symlinks=True)
    json.dump({"first": [first.returncode, first.stderr], "second": [second.returncode, second.stderr],
               "left": left}, open(report, "w"))
""")


def full_disk_then_space(tmp_path: Path, args: list[str], where: str, size_bytes: int, cache: Path) -> dict:
    """Run ``args`` with ``where`` ("out" or "cache") on a tiny filesystem, then again with room.

    Returns the two runs' exit codes and stderr, and the paths (on this
    machine) of the directory after the first run and after the second.
    """
    mount = tmp_path / "tiny-fs"
    mount.mkdir()
    env = cli_env(cache)
    if where == "cache":
        env["SVDBENCH_CACHE"] = str(mount)
    full = [a if a != "@" else str(mount) for a in args]
    if tmpfs_allowed():
        report = tmp_path / "report.json"
        subprocess.run(["unshare", "--user", "--map-root-user", "--mount", sys.executable, "-c", SCENARIO, str(mount),
                        str(size_bytes), json.dumps(full), json.dumps(env), str(tmp_path / "kept"), str(report)],
                       check=True, timeout=900, cwd=REPO)
        data = json.loads(report.read_text())
        return {"first": data["first"], "second": data["second"], "after_first": tmp_path / "kept-after-first",
                "after_second": tmp_path / "kept", "real_tmpfs": True}
    injected = {**env, "SVDBENCH_FAULT_DISK": f"{mount}:{size_bytes}"}
    first = subprocess.run(full, capture_output=True, text=True, env=injected, cwd=REPO, timeout=900)
    shutil.copytree(mount, tmp_path / "kept-after-first")
    second = subprocess.run(full, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    return {"first": [first.returncode, first.stderr], "second": [second.returncode, second.stderr],
            "after_first": tmp_path / "kept-after-first", "after_second": mount, "real_tmpfs": False}


def _one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    [line] = [line for line in stderr.splitlines() if line.startswith("svdbench:")]
    return line


def test_full_output_directory(checkpoint, tmp_path):
    args = cli_command("run", "--model", str(checkpoint), *SMALL_RUN, "--out", "@")
    result = full_disk_then_space(tmp_path, args, "out", 24 * 1024, tmp_path / "cache")
    code, stderr = result["first"]
    assert code == 2, stderr[-3000:]
    line = _one_line(stderr)
    assert "no space left on device writing" in line and str(tmp_path / "tiny-fs") in line, line
    assert "needs about" in line and "run the same command again" in line
    first = result["after_first"]
    assert corrupt_files(first) == []  # results.json (when written at all) and the journal are valid
    finished = dict(journal_cells(first))
    if (first / "results.json").exists():
        assert {r["key"] for r in read_results(first)["records"]} <= set(finished)
    code, stderr = result["second"]
    assert code == 0, stderr[-3000:]
    second = result["after_second"]
    cells = journal_cells(second)
    assert [k for k, _ in cells[:len(finished)]] == list(finished)  # nothing finished was lost ...
    assert not {k for k, _ in cells[len(finished):]} & set(finished)  # ... or computed again
    assert len(read_results(second)["records"]) == 5 and corrupt_files(second, finished=True) == []


def test_full_cache(checkpoint, tmp_path):
    if not tmpfs_allowed():
        pytest.skip("needs a tmpfs: the statistics store writes with safetensors, outside the injected write layer")
    out = tmp_path / "out"
    args = cli_command("run", "--model", str(checkpoint), *SMALL_RUN, "--out", str(out))
    result = full_disk_then_space(tmp_path, args, "cache", 12 * 1024, tmp_path / "unused")
    code, stderr = result["first"]
    assert code == 2, stderr[-3000:]
    line = _one_line(stderr)
    assert "no space left on device writing" in line and str(tmp_path / "tiny-fs") in line, line
    code, stderr = result["second"]
    assert code == 0, stderr[-3000:]
    assert corrupt_files(out, result["after_second"], finished=True) == []
    keys = [key for key, _ in journal_cells(out)]
    assert len(keys) == len(set(keys)) == 5  # the dense cell of the first run was kept, not computed again
    assert len(read_results(out)["records"]) == 5
