"""Methods that fail the way workers fail on a cluster, for the Ray executor's tests (loaded with --plugins-dir).

Each is a plain SVD, except that its first ``decompose`` call misbehaves:

- ``victim`` writes its process id to ``path`` and waits there (up to two
  minutes) for the test to kill the process; once ``path`` exists, it works;
- ``doomed`` kills its own process every time (a worker that always dies),
  but never the process whose id is ``spare_pid`` (the test's own);
- ``waiter`` waits until ``path`` exists (a group that is still running);
- ``misused`` raises a UsageError (bad input, which must stop the run).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from bench import Method, UsageError, factorize, hookimpl


@dataclass(frozen=True)
class FaultConfig:
    path: str = ""
    spare_pid: int = 0


def _wait_for(path: Path, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear in {seconds:.0f} s")
        time.sleep(0.1)


class Victim(Method):
    name = "victim"
    description = "test: waits to be killed the first time it decomposes"
    config_class = FaultConfig

    def decompose(self, target, weight, context, config):
        path = Path(config.path)
        if not path.exists():
            path.write_text(str(os.getpid()))
            time.sleep(120)
            raise TimeoutError("nobody killed this worker")
        return factorize(weight)


class Doomed(Method):
    name = "doomed"
    description = "test: its worker dies every time it decomposes"
    config_class = FaultConfig

    def decompose(self, target, weight, context, config):
        if os.getpid() == config.spare_pid:
            raise RuntimeError("doomed runs only in Ray workers")
        os.kill(os.getpid(), signal.SIGKILL)


class Waiter(Method):
    name = "waiter"
    description = "test: decomposes once a file exists"
    config_class = FaultConfig

    def decompose(self, target, weight, context, config):
        _wait_for(Path(config.path))
        return factorize(weight)


class Misused(Method):
    name = "misused"
    description = "test: finds its input wrong"

    def decompose(self, target, weight, context, config):
        raise UsageError("misused needs what it was not given; give it that")


@hookimpl
def register_methods(register):
    for method in (Victim(), Doomed(), Waiter(), Misused()):
        register(method)
