"""One driver per output directory: an advisory lock on ``<out>/.svdbench.lock``.

Two drivers writing one results.json would each rewrite it from its own
records and drop the other's. The lock is ``fcntl.flock`` on a file in the
output directory: the kernel releases it when its process ends, so a killed
driver never leaves it stuck, and a second driver stops at once with a
one-line error naming the holder. (flock works on local filesystems and on
NFSv4; where ``fcntl`` does not exist, e.g. Windows, there is no lock.)
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.errors import UsageError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None

LOCK_FILE = ".svdbench.lock"


@contextmanager
def out_dir_lock(out_dir: Path | str) -> Iterator[None]:
    """Hold ``out_dir``'s lock for the block; a UsageError when another process holds it."""
    path = Path(out_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # held open, and so locked, for the whole block
    try:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise UsageError(f"{out_dir} is being written by another svdbench run ({holder}); wait for it to "
                                 "finish or give another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # closing the file releases the lock
