"""Running work as Ray tasks: the machinery of ``--executor ray``.

:class:`RayTasks` connects to Ray (starting or joining a local instance, or
joining a cluster), submits one task per unit of work with the resources the
executor config asks for, and hands back each outcome as soon as its task
ends - a value, or the error that ended it after Ray's bounded retries of a
dead worker. What a task does is the caller's: the executor submits
:func:`bench.engine.executor.worker_execute_group`, one group of cells per
task, and writes what comes back (this module does not know about plans).

Every task runs through :func:`in_worker`, which gives the worker the
driver's ``SVDBENCH_*`` settings (so all workers read and write the same
stores, ``SVDBENCH_CACHE`` on a shared filesystem), runs torch with as many
threads as the CPUs Ray gave the task (one worker per core instead of every
worker fighting over all of them), and reports which node and process ran it.

Ray is imported only here and only when used: it is an optional extra.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from bench.engine.config import ExecutorConfig
from bench.errors import UsageError
from bench.memory import reuse_freed_memory
from bench.storage import cache_root
from bench.threads import WAIT_ENV

log = logging.getLogger(__name__)

RAY_INSTALL = 'pip install "svdbench[ray]"'
# Settings a worker must share with the driver: where the stores are, which plugins load, stay offline.
FORWARDED = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")
# How Ray starts the worker processes of svdbench's tasks. They draw no progress bars (the driver has the one
# over cells; set before tqdm is imported). They run at the driver's priority: Ray starts workers at nice 15,
# under which, on a machine doing anything else, a task gets a fraction of the CPU the local executor gets
# (Ray itself sets the same variable to 0 for the processes that run the drivers of Ray jobs).
# Their idle OpenMP workers spin briefly, then sleep, as the driver's do (bench.threads; set before the worker
# starts torch).
WORKER_ENV = {"env_vars": {"TQDM_DISABLE": "1", "RAY_worker_niceness": "0", **WAIT_ENV}}


def import_ray():
    """The ray module, or a one-line UsageError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"--executor ray needs Ray, which is not installed; install it with: {RAY_INSTALL}") from None
    return ray


def forwarded_environment() -> dict[str, str]:
    """The driver's settings every worker runs with (the cache path resolved, so a default is shared too)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("SVDBENCH_") or k in FORWARDED}
    env["SVDBENCH_CACHE"] = str(cache_root().absolute())
    return env


def this_node() -> dict:
    """Where the calling process runs: host name, Ray node (when inside Ray) and process id."""
    where = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        import ray

        if ray.is_initialized():
            context = ray.get_runtime_context()
            where.update(node_id=context.get_node_id(), ip=ray.util.get_node_ip_address())
    except ImportError:
        pass
    return where


def in_worker(function: Callable, env: dict[str, str], *args) -> dict:
    """Run ``function(*args)`` in a Ray worker with the driver's settings and one torch thread per CPU given."""
    import ray
    import torch

    os.environ.update(env)
    reuse_freed_memory()
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    threads = max(1, int(cpus)) if cpus else torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for libraries that read it when they start
    torch.set_num_threads(threads)
    start = time.perf_counter()
    value = function(*args)
    gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    return {"value": value, "node": {**this_node(), "threads": threads, "gpus": list(gpus)},
            "seconds": round(time.perf_counter() - start, 3)}


@dataclass
class Outcome:
    """How one task ended: its value (and where it ran), or the error that ended it."""

    tag: Any
    value: Any = None
    node: dict = field(default_factory=dict)
    seconds: float | None = None
    error: BaseException | None = None

    @property
    def cause(self) -> BaseException | None:
        """The error raised in the task (not Ray's wrapper), or Ray's own (a worker that died every try)."""
        return getattr(self.error, "cause", None) or self.error


class RayTasks:
    """A connection to Ray for one run: submit tasks, then collect their outcomes as they end.

    Used as a context manager: on entry it joins Ray (``ray_address``: None
    starts or joins a local instance, ``auto`` joins a running cluster,
    else a cluster address); on exit it cancels what is still running (an
    interrupted driver leaves no task behind) and disconnects, which also
    stops a local instance it started.
    """

    def __init__(self, config: ExecutorConfig, device: str):
        self.config = config
        self.num_gpus = config.gpus(device)
        self.ray = import_ray()
        self._started = False
        self._pending: dict = {}  # object ref -> tag

    def __enter__(self) -> RayTasks:
        ray = self.ray
        if not ray.is_initialized():
            try:
                ray.init(address=self.config.ray_address, logging_level=logging.WARNING)
            except ConnectionError as error:
                raise UsageError(f"--ray-address {self.config.ray_address}: no Ray cluster there ({error}); start "
                                 "one with `ray start --head` or leave --ray-address out for a local instance") from None
            self._started = True
        self._remote = ray.remote(in_worker)
        self._env = forwarded_environment()
        resources = ray.cluster_resources()
        if resources.get("CPU", 0) < self.config.cpus_per_task or resources.get("GPU", 0) < self.num_gpus:
            problem = (f"each task asks for {self.config.cpus_per_task:g} CPUs and {self.num_gpus:g} GPUs but the Ray "
                       f"cluster has {resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs in all")
            if self._started and self.config.ray_address in (None, "local"):  # a local instance never grows
                self.__exit__(None, None, None)
                raise UsageError(f"{problem}; lower --ray-cpus-per-task / --ray-gpus-per-task")
            log.warning("%s: the tasks wait until the cluster has them (an autoscaling cluster adds nodes)", problem)
        return self

    def __exit__(self, kind, error, trace) -> None:
        for ref in self._pending:
            self.ray.cancel(ref, force=True)
        self._pending.clear()
        if self._started:
            self.ray.shutdown()

    def describe(self) -> dict:
        """What the manifest records of the executor: Ray's version, the cluster and the resources per task."""
        resources = self.ray.cluster_resources()
        return {"kind": "ray", "ray_version": self.ray.__version__,
                "address": self.ray.get_runtime_context().gcs_address,
                "cluster": {"nodes": len([n for n in self.ray.nodes() if n.get("Alive")]),
                            "CPU": resources.get("CPU", 0), "GPU": resources.get("GPU", 0)},
                "cpus_per_task": self.config.cpus_per_task, "gpus_per_task": self.num_gpus,
                "max_retries": self.config.max_retries}

    def put(self, value: Any):
        """``value`` in Ray's object store once, to pass to many tasks."""
        return self.ray.put(value)

    def submit(self, function: Callable, args: tuple, tag: Any, name: str) -> None:
        """Run ``function(*args)`` as a task with the configured resources and retries."""
        ref = self._remote.options(num_cpus=self.config.cpus_per_task, num_gpus=self.num_gpus,
                                   max_retries=self.config.max_retries, retry_exceptions=False, name=name,
                                   runtime_env=WORKER_ENV).remote(function, self._env, *args)  # object refs in args arrive resolved
        self._pending[ref] = tag

    def completed(self) -> Iterator[Outcome]:
        """Each submitted task's outcome, in the order the tasks end."""
        while self._pending:
            ready, _ = self.ray.wait(list(self._pending), num_returns=1)
            ref = ready[0]
            tag = self._pending.pop(ref)
            try:
                produced = self.ray.get(ref)
            except self.ray.exceptions.RayError as error:  # raised in the task, or its worker died every try
                yield Outcome(tag, error=error)
                continue
            yield Outcome(tag, value=produced["value"], node=produced["node"], seconds=produced["seconds"])
