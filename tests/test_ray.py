"""The Ray executor on a real local Ray instance (2 CPUs), and the stores it shares between workers.

The same plan gives the same records under ``local`` and ``ray``; a worker
killed mid-task is run again and nothing is lost; a group whose worker always
dies is a failure and the others finish; a second driver on the same
``--out`` is refused; an interrupted driver resumes. Faults come from the
methods in ``tests/fault_plugins`` (loaded with ``--plugins-dir``), which
misbehave inside real Ray workers: nothing of Ray is replaced.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from bench.api.record import load_results
from bench.cli import main
from bench.engine.config import CalibrationConfig, ExecutorConfig, RunConfig
from bench.engine.executor import run
from bench.engine.stores import EntryWriter, open_entry
from bench.errors import UsageError
from bench.storage import HOST, json_key

FAULTS = str(Path(__file__).parent / "fault_plugins")
SMALL = dict(tasks=("wikitext2",), limit=1, seqlen=32, calibration=CalibrationConfig(samples=2, seqlen=32))
RAY = ExecutorConfig(kind="ray")


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray instance with 2 CPUs for this module's tests; its address."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    # log_to_driver=False: Ray's own log lines (e.g. the raylet's disk-space warnings) are not forwarded into this
    # process's stderr, where the tests read svdbench's one-line errors.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             object_store_memory=200 * 2**20, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def by_cell(records: list[dict]) -> dict:
    """Records by (cell, metric, variant), without their wall times."""
    return {(r["key"], r["metric"], r["variant"]): {k: v for k, v in r.items() if k != "seconds"} for r in records}


def without_facts(compressions: dict) -> dict:
    return {key: {k: v for k, v in info.items() if k != "facts"} for key, info in compressions.items()}


RAY_LOG_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?\((raylet|gcs_server|pid=|ray::)")


def svdbench_lines(err: str) -> list[str]:
    """The lines of captured stderr that svdbench wrote: Ray's forwarded log lines (``(raylet) ...``) are not ours."""
    return [line for line in err.strip().splitlines() if not RAY_LOG_LINE.match(line)]


def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen in {seconds:.0f} s")
        time.sleep(0.2)


# --------------------------------------------------------------------------- without Ray

def test_without_ray_the_ray_executor_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without the extra looks like to `import ray`
    assert main(["run", "--executor", "ray", "--methods", "svd", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "svdbench[ray]"' in err
    assert not (tmp_path / "r").exists()  # nothing was loaded or written


def test_executor_flags_are_checked(capsys, tmp_path):
    for flags, words in ((["--executor", "dask"], "use local or ray"),
                         (["--executor", "ray", "--ray-cpus-per-task", "0"], "--ray-cpus-per-task"),
                         (["--executor", "ray", "--ray-max-retries", "-1"], "--ray-max-retries")):
        assert main(["run", *flags, "--out", str(tmp_path / "r")]) == 2
        assert words in capsys.readouterr().err


@pytest.mark.slow
def test_asking_a_local_instance_for_gpus_it_lacks_is_an_error_not_a_hang(checkpoint_dir, tmp_path):
    pytest.importorskip("ray")
    done = subprocess.run([sys.executable, "-m", "bench.cli", "run", "--executor", "ray", "--ray-gpus-per-task", "1",
                           "--model", str(checkpoint_dir), "--methods", "svd", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "svdbench: error: each task asks for 1 CPUs and 1 GPUs but the Ray cluster has" in done.stderr


# --------------------------------------------------------------------------- stores shared by workers

def test_two_writers_of_one_entry_with_one_process_id_never_clash(tmp_path):
    """Two machines sharing the store can run writers with the same pid; each writes under a name of its own."""
    tmp_path = tmp_path / "store"
    first, second = EntryWriter(tmp_path, {"test": 1}), EntryWriter(tmp_path, {"test": 1})
    assert first.tmp != second.tmp
    first.write_block(0, {"x": torch.ones(4)})
    second.write_block(0, {"x": torch.zeros(4)})
    assert first.finish() == second.finish()  # the second finds the first's complete entry and keeps it
    entry = open_entry(tmp_path, {"test": 1}, "test")
    assert torch.equal(entry.read("x"), torch.ones(4))
    assert [p.name for p in tmp_path.iterdir()] == [json_key({"test": 1})]  # no temporary left


def test_a_broken_entry_in_the_way_of_a_writer_is_replaced(tmp_path):
    broken = tmp_path / json_key({"test": 2})
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    writer = EntryWriter(tmp_path, {"test": 2})
    writer.write_block(0, {"x": torch.ones(3)})
    writer.finish()
    assert torch.equal(open_entry(tmp_path, {"test": 2}, "test").read("x"), torch.ones(3))


def _write_entry(root: str, value: float, barrier) -> None:
    writer = EntryWriter(Path(root), {"test": 3})
    writer.write_block(0, {"x": torch.full((1000,), value)})
    barrier.wait()  # every writer publishes at the same moment
    writer.finish()


def test_concurrent_writers_publish_one_complete_entry(tmp_path):
    tmp_path = tmp_path / "store"
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(4)
    workers = [spawn.Process(target=_write_entry, args=(str(tmp_path), float(i), barrier)) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    entry = open_entry(tmp_path, {"test": 3}, "test")
    x = entry.read("x")
    assert x.unique().numel() == 1 and x[0].item() in (0.0, 1.0, 2.0, 3.0)  # one writer's, whole
    assert [p.name for p in tmp_path.iterdir()] == [json_key({"test": 3})]


def test_a_dead_writers_temporary_entry_is_removed(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    key = json_key({"a": 1})
    dead = tmp_path / f".{key}.{dead_pid}.abcd1234-{HOST}.partial"
    alive = tmp_path / f".{key}.{os.getpid()}.abcd1234-{HOST}.partial"
    elsewhere = tmp_path / f".{key}.{dead_pid}.abcd1234-other-host.partial"  # its writer may be running there
    for path in (dead, alive, elsewhere):
        path.mkdir()
    EntryWriter(tmp_path, {"b": 2}).abandon()
    assert not dead.exists() and alive.exists() and elsewhere.exists()


# --------------------------------------------------------------------------- on a real Ray instance

@pytest.mark.slow
def test_local_and_ray_give_identical_records(checkpoint_dir, tmp_path, monkeypatch, ray_cluster):
    import ray

    config = RunConfig(model=str(checkpoint_dir), methods=("svd", "svdllm_w", "asvd"), ratios=(0.2, 0.5),
                       out=str(tmp_path / "local"), **SMALL)
    local = run(config)
    for name in ("SVDBENCH_CACHE", "SVDBENCH_STATS_CACHE"):  # the Ray workers compute everything again
        monkeypatch.setenv(name, str(tmp_path / f"ray-{name}"))
    distributed = run(RunConfig.from_dict({**config.to_dict(), "out": str(tmp_path / "ray")}), executor=RAY)

    assert len(local.records) == 1 + 3 * 2 and not local.data["failures"] and not distributed.data["failures"]
    assert by_cell(distributed.records) == by_cell(local.records)
    # the same ranks and sizes; facts such as a Cholesky shift may differ in the last bits: the workers run
    # torch with 1 thread, this process with all cores, and float64 sums add up in another order
    assert without_facts(distributed.data["compressions"]) == without_facts(local.data["compressions"])
    assert by_cell(load_results(tmp_path / "ray")["records"]) == by_cell(local.records)  # and on disk
    executor = distributed.manifest["executor"]
    assert executor["kind"] == "ray" and executor["ray_version"] == ray.__version__
    assert set(executor["groups"]) == {"dense", "svd", "svdllm_w", "asvd"}
    for group in executor["groups"].values():
        assert group["node"]["node_id"] and group["node"]["host"] and group["node"]["threads"] == 1
    assert "decompose:svdllm_w" in executor["groups"]["svdllm_w"]["timings"]  # done in a worker, not read back
    assert local.manifest["executor"]["kind"] == "local"


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_nothing_is_lost(checkpoint_dir, tmp_path, ray_cluster):
    pid_file = tmp_path / "victim.pid"
    config = RunConfig(model=str(checkpoint_dir), methods=("svd", "victim"), ratios=(0.3,), plugins_dirs=(FAULTS,),
                       method_options={"victim": {"path": str(pid_file)}}, out=str(tmp_path / "run"), **SMALL)
    killed: list[int] = []

    def kill_the_victim():
        wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 300, "the victim's start")
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_the_victim, daemon=True)
    killer.start()
    results = run(config, executor=RAY)
    killer.join(10)
    assert killed and killed[0] != os.getpid()
    assert results.data["failures"] == []
    assert {(r["method"], r["ratio"]) for r in results.records} == {("dense", 0.0), ("svd", 0.3), ("victim", 0.3)}
    assert by_cell(load_results(tmp_path / "run")["records"]) == by_cell(results.records)
    assert results.manifest["executor"]["groups"]["victim"]["node"]["pid"] != killed[0]  # the retry's worker
    factors = Path(os.environ["SVDBENCH_CACHE"]) / "factors"
    assert not list(factors.glob(".*.partial"))  # the killed worker's temporary entry was cleaned up


@pytest.mark.slow
def test_a_group_whose_worker_always_dies_is_a_failure_and_the_others_finish(checkpoint_dir, tmp_path, ray_cluster):
    config = RunConfig(model=str(checkpoint_dir), methods=("doomed", "svd"), ratios=(0.3,), plugins_dirs=(FAULTS,),
                       method_options={"doomed": {"spare_pid": os.getpid()}}, out=str(tmp_path / "run"), **SMALL)
    results = run(config, executor=ExecutorConfig(kind="ray", max_retries=1))
    assert {(r["method"], r["ratio"]) for r in results.records} == {("dense", 0.0), ("svd", 0.3)}
    [failure] = results.data["failures"]
    assert failure["method"] == "doomed" and failure["stage"] == "ray task"
    assert "WorkerCrashedError" in failure["error"] or "died" in failure["error"]
    assert results.manifest["executor"]["groups"]["doomed"]["node"] is None
    assert load_results(tmp_path / "run")["failures"] == results.data["failures"]


@pytest.mark.slow
def test_bad_input_found_in_a_worker_stops_the_run_with_its_message(checkpoint_dir, tmp_path, ray_cluster):
    config = RunConfig(model=str(checkpoint_dir), methods=("misused",), ratios=(0.3,), plugins_dirs=(FAULTS,),
                       out=str(tmp_path / "run"), **SMALL)
    with pytest.raises(UsageError, match="misused needs what it was not given; give it that"):
        run(config, executor=RAY)


@pytest.mark.slow
def test_a_second_driver_is_refused_and_an_interrupted_driver_resumes(checkpoint_dir, tmp_path, ray_cluster, capsys,
                                                                      caplog):
    """Driver 1 (another process, joining the cluster by address) holds --out while a group waits; a second driver
    on that --out stops with a one-line error; driver 1 is interrupted; the same command again computes only what
    is missing."""
    release, out = tmp_path / "release", tmp_path / "run"
    argv = ["--plugins-dir", FAULTS, "run", "--executor", "ray", "--ray-address", ray_cluster,
            "--model", str(checkpoint_dir), "--methods", "svd,waiter", "--ratios", "0.3", "--tasks", "wikitext2",
            "--limit", "1", "--seqlen", "32", "--calib-samples", "2", "--calib-seqlen", "32",
            "--method-option", f"waiter.path={release}", "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "bench.cli", *argv], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        def svd_saved() -> bool:
            assert first.poll() is None, first.stderr.read()
            try:
                records = json.loads((out / "results.json").read_text())["records"]
            except (OSError, ValueError):
                return False
            return {r["method"] for r in records} == {"dense", "svd"}

        wait_until(svd_saved, 300, "driver 1 saving the finished groups")
        assert main(argv) == 2
        err = svdbench_lines(capsys.readouterr().err)
        assert len(err) == 1 and "is in use by process" in err[0]
        assert f"process {first.pid}" in err[0]

        first.send_signal(signal.SIGINT)
        first.wait(60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode != 0
    before = load_results(out)["records"]
    assert {r["method"] for r in before} == {"dense", "svd"}

    release.touch()
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    assert "2 of 3 cells already in" in caplog.text
    after = load_results(out)["records"]
    assert {r["method"] for r in after} == {"dense", "svd", "waiter"}
    kept = {r["key"]: r for r in after}
    assert all(kept[r["key"]] == r for r in before)  # not recomputed: the very same records, wall times included
