"""The thread policy: set before torch loads, sized from the CPUs available, overridable, recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.threads import _cgroup_quota, available_cpus

ROOT = Path(__file__).resolve().parent.parent
POLICY_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM")
SVDBENCH = [sys.executable, "-c", "import sys; from bench.cli import main; sys.exit(main())"]


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter whose environment has no thread settings but ``env``."""
    clean = {k: v for k, v in os.environ.items() if k not in POLICY_VARIABLES}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True,
                          text=True, timeout=300)


CONFIGURE_THEN_TORCH = """
import json, sys
from bench.threads import configure, describe
configure({threads!r})
import torch
torch.ones(4, 4) @ torch.ones(4, 4)  # starts the OpenMP pool
print(json.dumps({{"torch": torch.get_num_threads(), "policy": describe()}}))
"""


def test_importing_bench_and_its_cli_does_not_import_torch():
    done = _python("import sys, bench, bench.cli.main, bench.threads; print('torch' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_configure_reaches_openmp_before_torch_starts():
    """OpenMP itself reports the bounded spin and the thread count (``OMP_DISPLAY_ENV``)."""
    done = _python(CONFIGURE_THEN_TORCH.format(threads=None), OMP_DISPLAY_ENV="VERBOSE")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    cpus, _ = available_cpus()
    assert result["torch"] == cpus == result["policy"]["threads"] == result["policy"]["torch_threads"]
    assert result["policy"]["wait_policy"] == "GOMP_SPINCOUNT=300"
    assert result["policy"]["wait_policy_source"] == "svdbench" and result["policy"]["applied_before_torch"] is True
    displayed = done.stdout + done.stderr
    assert "GOMP_SPINCOUNT = '300'" in displayed and f"OMP_NUM_THREADS = '{cpus}'" in displayed


def test_threads_flag_beats_the_environment_and_a_user_policy_is_kept():
    done = _python(CONFIGURE_THEN_TORCH.format(threads="1"), OMP_NUM_THREADS="2", OMP_WAIT_POLICY="ACTIVE")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["torch"] == 1 and result["policy"]["threads_source"] == "--threads"
    assert result["policy"]["wait_policy"] == "OMP_WAIT_POLICY=ACTIVE"
    assert result["policy"]["wait_policy_source"] == "environment"


def test_a_user_spin_count_is_kept():
    done = _python(CONFIGURE_THEN_TORCH.format(threads=None), GOMP_SPINCOUNT="10000", OMP_DISPLAY_ENV="VERBOSE")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["policy"]["wait_policy"] == "GOMP_SPINCOUNT=10000"
    assert result["policy"]["wait_policy_source"] == "environment"
    assert "GOMP_SPINCOUNT = '10000'" in done.stdout + done.stderr


def test_omp_num_threads_is_respected_without_the_flag():
    done = _python(CONFIGURE_THEN_TORCH.format(threads=None), OMP_NUM_THREADS="1")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["torch"] == 1 and result["policy"]["threads_source"] == "OMP_NUM_THREADS"


def test_a_second_configure_reports_the_same_sources_not_its_own_settings():
    """The CLI called twice in one process (tests, plugin commands) records the same policy both times."""
    done = _python("import json\nfrom bench.threads import configure\nprint(json.dumps([configure(), configure()]))")
    first, second = json.loads(done.stdout.strip().splitlines()[-1])
    assert first["threads_source"] == second["threads_source"] != "OMP_NUM_THREADS"
    assert first["wait_policy_source"] == second["wait_policy_source"] == "svdbench"


def test_configure_after_torch_still_sets_the_count_and_says_the_policy_came_late():
    done = _python("import json, torch\nfrom bench.threads import configure\n"
                   "print(json.dumps([configure(1), torch.get_num_threads()]))")
    policy, torch_threads = json.loads(done.stdout.strip().splitlines()[-1])
    assert torch_threads == 1 and policy["applied_before_torch"] is False


def test_cli_rejects_a_bad_thread_count_in_one_line():
    done = subprocess.run([*SVDBENCH, "--threads", "0", "plugins"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--threads 0 must be a whole number >= 1" in done.stderr


@pytest.mark.real_model
def test_cli_runs_with_threads_and_the_manifest_records_the_policy(tmp_path):
    """``svdbench --threads 1 run``: the manifest holds the thread count and where it came from."""
    out = tmp_path / "run"
    done = subprocess.run([*SVDBENCH, "--threads", "1", "run", "--methods", "none",
                           "--tasks", "wikitext2", "--limit", "1", "--seqlen", "32", "--model", "smollm2-135m",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k not in POLICY_VARIABLES})
    assert done.returncode == 0, done.stderr[-2000:]
    threads = json.loads((out / "results.json").read_text())["manifest"]["threads"]
    assert threads["threads"] == threads["torch_threads"] == 1 and threads["threads_source"] == "--threads"
    assert threads["wait_policy"] == "GOMP_SPINCOUNT=300"
    assert "- CPU: 1 torch threads (--threads), OpenMP wait policy GOMP_SPINCOUNT=300." in (out / "report.md").read_text()


@pytest.mark.parametrize(("files", "expected"), [
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1.0),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cgroup_quota_v1_and_v2(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert _cgroup_quota(tmp_path) == expected


def test_a_cpu_quota_below_the_affinity_mask_limits_the_threads(tmp_path):
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU
    assert available_cpus(tmp_path) == (1, "cgroup CPU quota")
    (tmp_path / "cpu.max").write_text(f"{1000 * 100000} 100000\n")  # far more than the mask allows
    count, source = available_cpus(tmp_path)
    assert count == len(os.sched_getaffinity(0)) and source == "affinity mask"


def test_work_in_threads_comes_back_in_order_one_torch_thread_each_with_errors_in_place():
    import threading
    import time

    import torch

    from bench.threads import ordered_in_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen, pulled = [], []

    def items():
        for i in range(8):
            pulled.append(i)
            yield i

    def work(i):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        if i == 3:
            raise ValueError("three")
        time.sleep(0.02 * (8 - i))  # early items finish last
        return i * i

    try:
        out = []
        for item, value, error in ordered_in_threads(work, items(), 2):
            assert len(pulled) <= len(out) + 3  # at most workers + 1 items ahead of the consumer
            out.append((item, value, error))
        assert torch.get_num_threads() == 2  # the caller's count is back
    finally:
        torch.set_num_threads(before)
    assert [item for item, _, _ in out] == list(range(8))
    assert [value for _, value, error in out if error is None] == [i * i for i in range(8) if i != 3]
    assert isinstance(out[3][2], ValueError) and out[3][1] is None
    assert {count for _, count in seen} == {1}
    assert {name.split("_")[0] for name, _ in seen} == {"svdbench"}


def test_decompositions_in_threads_equal_single_threaded_ones_bit_for_bit():
    import torch

    from bench import factorize
    from bench.threads import ordered_in_threads

    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator) for shape in [(96, 64), (64, 160), (128, 128)] * 3]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = [factorize(w) for w in weights]
    finally:
        torch.set_num_threads(before)
    threaded = [f for _, f, error in ordered_in_threads(factorize, weights, 2) if error is None]
    assert len(threaded) == len(weights)
    for a, b in zip(alone, threaded):
        assert torch.equal(a.u, b.u) and torch.equal(a.s, b.s) and torch.equal(a.vt, b.vt)
