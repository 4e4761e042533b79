"""The record journal, the output lock and the write layer, on their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.api.record import Record
from bench.disk import StorageError
from bench.engine.journal import JOURNAL
from bench.engine.results import Results, load_rendered
from bench.errors import UsageError
from bench.locks import Lock, LockHeld
from bench.storage import atomic_write_text, inside, is_sealed


def record(key: str, value: float = 1.0) -> Record:
    return Record(key=key, model="m", method="svd", ratio=0.2, task="t", metric="perplexity", value=value,
                  kind="perplexity", higher_is_better=False, params=1, bytes=1)


def fill(out, keys=("a", "b", "c")) -> Results:
    results = Results(out)
    results.begin({"config": {}}, set(keys))
    for i, key in enumerate(keys):
        results.add([record(key, float(i))])
    results.finish({"total": 1.0})
    return results


def test_every_cell_is_one_fsynced_line_and_results_json_is_rendered_from_them(tmp_path):
    fill(tmp_path)
    lines = [json.loads(line) for line in (tmp_path / JOURNAL).read_text().splitlines()]
    assert [line["t"] for line in lines] == ["run", "cell", "cell", "cell", "end"]
    data = json.loads((tmp_path / "results.json").read_text())
    assert is_sealed(data) and [r["key"] for r in data["records"]] == ["a", "b", "c"]
    assert data["manifest"]["timings"] == {"total": 1.0}
    reopened = Results(tmp_path)
    assert all(reopened.done(k) for k in "abc") and not reopened.done("d")
    assert load_rendered(tmp_path)["records"] == data["records"]


def test_a_torn_last_line_is_dropped_and_cut_off(tmp_path, caplog):
    fill(tmp_path)
    journal = tmp_path / JOURNAL
    journal.write_bytes(journal.read_bytes() + b'{"t": "cell", "key": "d", "rec')  # a kill mid-write
    results = Results(tmp_path)
    assert "dropping a partly written last line" in caplog.text
    assert journal.read_bytes().endswith(b"\n") and not results.done("d") and results.done("c")


def test_a_corrupt_line_names_file_line_and_fix(tmp_path):
    fill(tmp_path)
    journal = tmp_path / JOURNAL
    lines = journal.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace('"value": 1.0', '"value": 7.0')  # valid JSON, wrong checksum
    journal.write_text("".join(lines))
    with pytest.raises(UsageError) as error:
        Results(tmp_path)
    message = str(error.value)
    assert f"{journal} line 3 is corrupted" in message and f"sed -i '3d' {journal}" in message
    subprocess.run(["sed", "-i", "3d", str(journal)], check=True)
    results = Results(tmp_path)  # the advice works: the cell comes back from results.json
    assert results.done("b") and [r["value"] for r in results.data["records"] if r["key"] == "b"] == [1.0]


def test_a_corrupt_results_json_is_moved_aside_and_rebuilt(tmp_path):
    fill(tmp_path)
    (tmp_path / "results.json").write_text('{"records": [')
    results = Results(tmp_path)
    results.save()
    [aside] = tmp_path.glob("results.json.corrupt-*")
    assert aside.read_text() == '{"records": ['
    assert [r["key"] for r in json.loads((tmp_path / "results.json").read_text())["records"]] == ["a", "b", "c"]


def test_results_json_from_before_the_journal_is_taken_over(tmp_path):
    old = {"manifest": {"config": {}}, "records": [record("a").to_dict(), record("b").to_dict()], "compressions": {},
           "failures": [], "previous_records": []}
    (tmp_path / "results.json").write_text(json.dumps(old))
    results = Results(tmp_path)
    assert results.done("a") and results.done("b")
    assert [json.loads(line)["t"] for line in (tmp_path / JOURNAL).read_text().splitlines()] == ["run", "cell", "cell"]


def test_a_failed_append_leaves_no_partial_line(tmp_path, monkeypatch):
    tmp_path = tmp_path / "out"
    fill(tmp_path)
    journal = tmp_path / JOURNAL
    size = journal.stat().st_size
    used = sum(p.stat().st_size for p in tmp_path.iterdir() if p.is_file())
    monkeypatch.setenv("SVDBENCH_FAULT_DISK", f"{tmp_path}:{used + 10}")
    results = Results(tmp_path)
    with pytest.raises(StorageError, match="no space left on device writing .*journal.jsonl; this step needs about"):
        results.add([record("d")])
    assert journal.stat().st_size == size
    monkeypatch.delenv("SVDBENCH_FAULT_DISK")
    assert not Results(tmp_path).done("d")


def test_atomic_write_leaves_the_old_file_when_the_disk_is_full(tmp_path, monkeypatch):
    tmp_path = tmp_path / "out"
    target = tmp_path / "f.json"
    atomic_write_text(target, "old")
    monkeypatch.setenv("SVDBENCH_FAULT_DISK", f"{tmp_path}:10")
    with pytest.raises(StorageError, match="needs about 1.0 KiB"):
        atomic_write_text(target, "x" * 1024)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


HOLD = """
import sys, time
from bench.locks import Lock
Lock(sys.argv[1], "--out x").acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_lock_held_by_another_process_names_it_and_is_taken_over_when_it_dies(tmp_path):
    path = tmp_path / ".svdbench.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=f"--out x is in use by process {holder.pid} "):
            Lock(path, "--out x").acquire()
    finally:
        holder.kill()  # SIGKILL: no cleanup, the lock file still names it
        holder.wait()
    assert json.loads(path.read_text())["pid"] == holder.pid
    lock = Lock(path, "--out x").acquire()  # taken over at once
    assert json.loads(path.read_text())["pid"] == os.getpid()
    again = Lock(path, "--out x").acquire()  # the same process may re-enter (the CLI around run())
    again.release()
    lock.release()


@pytest.mark.parametrize("name, ok", [("config.json", True), ("a/b.json", True), ("../x", False), ("/etc/passwd", False),
                                      ("a/../../x", False), ("", False), ("a\x00b", False)])
def test_inside(tmp_path, name, ok):
    assert inside(tmp_path, name) is ok
