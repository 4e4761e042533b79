"""How svdbench uses the CPU: a thread policy that holds up when the machine is shared.

torch's OpenMP workers spin while they wait at the end of every parallel
region. On a machine where another process wants a core, a spinning worker
keeps the core from the worker that still has work, and every region of a
forward pass (hundreds per pass) waits for the scheduler: on two cores one
competing process made SVDs and evaluations many times slower (issue 15;
``benchmarks/contention.py`` measures it). Never spinning
(``OMP_WAIT_POLICY=PASSIVE``) survives sharing but costs a sleep and a wake-up
per region: a float64 SVD, thousands of tiny regions, ran 2x slower on a
quiet machine. A short bounded spin keeps most of both. :func:`configure`
therefore, before torch starts its thread pools (it must run before
``import torch``):

- sets ``GOMP_SPINCOUNT=300`` (GNU OpenMP, which torch's Linux wheels use:
  an idle worker spins 300 rounds, then sleeps) unless the user set
  ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``. Measured on two cores
  (``benchmarks/contention.py``, medians of 5): the evaluation 1.95-2.08 s
  alone and 1.65-1.72x slower beside a busy process (torch's defaults:
  1.90-1.94 s and 2.5-2.8x; passive: 1.94-2.00 s and 1.74x);
- sizes the pools from the CPUs this process may actually use - its affinity
  mask and its cgroup CPU quota, whichever is smaller - instead of the
  machine's core count (a container limited to 2 CPUs on a 64-core host
  would otherwise start 64 workers); ``--threads N`` or ``OMP_NUM_THREADS``
  override it;
- turns off the tokenizers library's own thread pool
  (``TOKENIZERS_PARALLELISM=false``) unless the user set it: a third pool
  competing with torch's for the same cores buys nothing here.

Work made of LAPACK's many small parallel regions - the decompositions - runs
instead a matrix per thread with one torch thread each
(:func:`ordered_in_threads`): 1.18 s alone and 1.47x beside a busy process,
against 1.72 s and 3.1x for torch's defaults one matrix after another (up to
25x in other runs).

:func:`describe` is what the run manifest records. This module imports no
torch at module level, so the command line can call :func:`configure` first.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from bench.errors import UsageError

SPIN_COUNT = 300
WAIT_ENV = {"GOMP_SPINCOUNT": str(SPIN_COUNT)}  # the environment of svdbench's wait policy (also Ray's workers')
USER_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

T = TypeVar("T")
R = TypeVar("R")
_END = object()

_state: dict = {}
_ours: dict[str, str] = {}  # the variables an earlier configure() set itself: not the user's on a second call


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup's CPU quota (v2 ``cpu.max``, else v1 ``cfs_quota_us``); ``None``: no quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> tuple[int, str]:
    """(CPUs this process may use, where the limit comes from): the affinity mask or the cgroup quota."""
    try:
        count, source = len(os.sched_getaffinity(0)), "affinity mask"
    except (AttributeError, OSError):  # not Linux
        count, source = os.cpu_count() or 1, "cpu count"
    quota = _cgroup_quota(cgroup_root)
    if quota is not None and math.ceil(quota) < count:
        count, source = max(1, math.ceil(quota)), "cgroup CPU quota"
    return count, source


def _positive(value: str | None) -> int | None:
    try:
        number = int(value) if value is not None else None
    except ValueError:
        return None
    return number if number and number > 0 else None


def _assignments(variables: dict[str, str]) -> str:
    """``NAME=value, ...``: how the manifest and the report name a wait policy."""
    return ", ".join(f"{name}={value}" for name, value in variables.items())


def configure(threads: int | str | None = None) -> dict:
    """Set the thread policy for this process; call it before ``import torch``. Returns :func:`describe`.

    ``threads`` (``--threads``) wins over ``OMP_NUM_THREADS``, which wins
    over the CPUs available. If torch is already imported, the thread count
    is still applied but the wait policy no longer can be (it is read when
    torch loads OpenMP); ``describe()`` says so.
    """
    if threads is not None:
        count = _positive(str(threads))
        if count is None:
            raise UsageError(f"--threads {threads} must be a whole number >= 1 (or leave it out: the CPUs available)")
        threads = count
    late = "torch" in sys.modules
    users = {name: os.environ[name] for name in USER_WAIT_VARIABLES
             if name in os.environ and os.environ[name] != _ours.get(name)}
    if users:
        policy, policy_source = _assignments(users), "environment"
    else:
        os.environ.update(WAIT_ENV)
        _ours.update(WAIT_ENV)
        policy, policy_source = _assignments(WAIT_ENV), "svdbench"
    cpus, cpus_source = available_cpus()
    env_threads = os.environ.get("OMP_NUM_THREADS")
    from_env = _positive(env_threads) if env_threads != _ours.get("OMP_NUM_THREADS") else None
    if threads is not None:
        count, count_source = threads, "--threads"
    elif from_env is not None:
        count, count_source = from_env, "OMP_NUM_THREADS"
    else:
        count, count_source = cpus, cpus_source
    os.environ["OMP_NUM_THREADS"] = str(count)
    if count_source == "OMP_NUM_THREADS":
        _ours.pop("OMP_NUM_THREADS", None)
    else:
        _ours["OMP_NUM_THREADS"] = str(count)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if late:
        import torch

        torch.set_num_threads(count)
    _state.clear()
    _state.update({"wait_policy": policy, "wait_policy_source": policy_source,
                   "threads": count, "threads_source": count_source, "cpus_available": cpus,
                   "cpus_source": cpus_source, "tokenizers_parallelism": os.environ["TOKENIZERS_PARALLELISM"],
                   "applied_before_torch": not late})
    return describe()


def describe() -> dict:
    """The thread policy in force (for the run manifest): wait policy, thread count and where each came from."""
    found = {name: os.environ[name] for name in USER_WAIT_VARIABLES if name in os.environ}
    info = dict(_state) if _state else {"wait_policy": _assignments(found) or "unset (torch default)",
                                        "wait_policy_source": "not configured by svdbench"}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
    return info


def ordered_in_threads(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[tuple[T, R | None, BaseException | None]]:
    """``(item, fn(item), None)`` - or ``(item, None, error)`` - for each item, in order, computed by
    ``workers`` threads that each run torch with one thread.

    Why: LAPACK's SVD, Cholesky and eigh are thousands of small parallel
    regions, so one matrix on two threads is barely faster than on one; two
    matrices at once, one thread each, keep both cores busy and wait at no
    barrier (on two cores: 28 float64 SVDs of SmolLM2's linears took 1.22 s
    this way, 1.81 s one after another on two threads; torch releases the GIL
    inside its ops). A single-threaded task also has no OpenMP team to stall
    when another process takes a core.

    At most ``workers + 1`` results are held at a time (results are consumed
    in order), so memory stays that of a few tasks. While this runs, torch in
    the calling thread is single-threaded too; its thread count is restored
    when the generator ends. ``workers <= 1`` runs each item in the calling
    thread, unchanged.
    """
    if workers <= 1:
        for item in items:
            try:
                yield item, fn(item), None
            except Exception as error:  # the caller decides; KeyboardInterrupt and the like go up
                yield item, None, error
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # also MKL's global count, which its LAPACK reads in every thread
    pool = ThreadPoolExecutor(workers, thread_name_prefix="svdbench", initializer=torch.set_num_threads,
                              initargs=(1,))
    try:
        queue: deque = deque()
        remaining = iter(items)
        for item in itertools.islice(remaining, workers):
            queue.append((item, pool.submit(fn, item)))
        while queue:
            item, future = queue.popleft()
            following = next(remaining, _END)
            if following is not _END:
                queue.append((following, pool.submit(fn, following)))
            try:
                yield item, future.result(), None
            except Exception as error:
                yield item, None, error
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(before)
