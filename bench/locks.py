"""One writer per output: :class:`Lock`, an advisory ``flock`` on a file.

The kernel releases it when its process dies (so a stale lock of a killed
process is simply taken over); the file holds the holder's pid and command
for the error message of the process that finds it taken.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from bench.disk import guarded, make_dir
from bench.errors import UsageError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

log = logging.getLogger(__name__)


class LockHeld(UsageError):
    """Another live process holds the lock."""


class Lock:
    """An advisory exclusive lock on ``path`` (``flock``), with the holder's pid and command written inside.

    The kernel drops the lock when its process dies, so the lock of a killed
    run is taken over by the next one (its file still names the dead pid;
    that is overwritten). ``acquire(wait=False)`` fails at once with a
    :class:`LockHeld` naming the holder; ``wait=True`` waits for it.
    """

    _held: dict[str, list] = {}  # resolved path -> [fd, depth]: a process re-entering its own lock

    def __init__(self, path: Path | str, what: str):
        self.path, self.what = Path(path), what
        self.fd: int | None = None
        self._reentered = False

    def holder(self) -> dict:
        try:
            info = json.loads(self.path.read_text() or "{}")
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    def describe_holder(self) -> str:
        info = self.holder()
        if not info.get("pid"):
            return "another process"
        where = "" if info.get("host") in (None, socket.gethostname()) else f" on {info['host']}"
        return (f"process {info['pid']}{where} (`{info.get('command', '?')}`, started {info.get('started', '?')})")

    def acquire(self, wait: bool = False) -> Lock:
        make_dir(self.path.parent)
        key = str(self.path.resolve())
        if key in Lock._held:  # this process holds it already (e.g. the CLI around run())
            Lock._held[key][1] += 1
            self.fd, self._reentered = Lock._held[key][0], True
            return self
        with guarded(self.path):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if not wait:
                        raise LockHeld(f"{self.what} is in use by {self.describe_holder()}; wait for it to finish "
                                       "or choose another directory") from None
                    log.info("waiting for %s, which is writing %s", self.describe_holder(), self.what)
                    fcntl.flock(fd, fcntl.LOCK_EX)
            info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
                    "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            with guarded(self.path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(info).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        Lock._held[key] = [fd, 1]
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        key = str(self.path.resolve())
        held = Lock._held.get(key)
        if held is not None:
            held[1] -= 1
            if held[1] > 0:
                self.fd = None
                return
            del Lock._held[key]
        if not self._reentered or held is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self) -> Lock:
        return self.acquire(wait=True) if self.fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()


def entry_lock(path: Path | str) -> Lock:
    """The lock a writer of cache entry ``path`` holds while it builds and publishes it (others wait)."""
    path = Path(path)
    return Lock(path.with_name(f".{path.name}.lock"), f"cache entry {path}")

