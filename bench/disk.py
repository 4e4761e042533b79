"""Disk errors: a full disk or an I/O error becomes one line naming the path and the space a step needs.

ENOSPC, EDQUOT, EIO, EROFS, EACCES and the like become a :class:`StorageError`.
``SVDBENCH_FAULT_DISK=DIR:BYTES`` makes the write layer behave as if ``DIR``
sat on a filesystem of ``BYTES`` bytes (the fault-injection suite uses it
where it cannot mount a tiny tmpfs).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.errors import UsageError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None



DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EIO: "input/output error", errno.EROFS: "read-only file system",
               errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
               errno.ENOTDIR: "a path component is a file, not a directory",
               errno.EEXIST: "a file of that name is in the way"}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


class StorageError(UsageError):
    """A write or read that the filesystem refused (full, read-only, failing): one line, exit 2."""


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def os_errno(error: BaseException) -> int | None:
    """The OS error number of ``error``: an ``OSError``'s, or one quoted by a library that wraps it
    (safetensors: ``... (os error 28)``)."""
    if isinstance(error, OSError):
        return error.errno
    found = re.search(r"os error (\d+)|Os \{ code: (\d+)", str(error))
    return int(found.group(1) or found.group(2)) if found else None


def disk_error(error: BaseException, path: Path | str, need: int | None = None) -> StorageError:
    """``error`` as one line naming ``path``, the reason, and (for a full disk) the space needed and free."""
    path = Path(error.filename) if getattr(error, "filename", None) else Path(path)
    code = os_errno(error)
    reason = DISK_ERRORS.get(code, getattr(error, "strerror", None) or str(error))
    parts = [f"{reason} writing {path}"]
    if code in (errno.ENOTDIR, errno.EEXIST):
        parts = [f"{path} (or a directory above it) is a file, not a directory"]
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(path.parent)
        need_text = f"this step needs about {human_bytes(need)}" if need else "this step needs more space"
        parts.append(need_text + (f", {human_bytes(free)} free there" if free is not None else ""))
        parts.append("free some space (or point --out / SVDBENCH_CACHE elsewhere) and run the same command "
                     "again: finished cells are kept")
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST):
        parts.append("give a writable directory")
    else:
        parts.append("check the disk, then run the same command again: finished cells are kept")
    return StorageError("; ".join(parts))


def is_disk_error(error: BaseException) -> bool:
    return os_errno(error) in DISK_ERRORS


def _injected_fault(path: Path, need: int) -> None:
    """``SVDBENCH_FAULT_DISK=DIR:BYTES``: behave as if DIR were a filesystem of BYTES bytes (tests)."""
    spec = os.environ.get("SVDBENCH_FAULT_DISK")
    if not spec or not need:
        return
    root, _, size = spec.rpartition(":")
    root_path = Path(root).resolve()
    target = path.resolve()
    if root_path != target and root_path not in target.parents:
        return
    used = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root_path) for f in files)
    if used + need > int(size):  # an atomic write's new copy sits beside the old one until the rename
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@contextmanager
def guarded(path: Path | str, need: int | None = None) -> Iterator[None]:
    """Turn a disk error raised inside into a one-line :class:`StorageError` about ``path``."""
    try:
        _injected_fault(Path(path), need or 0)
        yield
    except StorageError:
        raise
    except Exception as error:  # OSError, or a library's error quoting one
        if is_disk_error(error):
            raise disk_error(error, path, need) from None
        raise


def make_dir(path: Path | str) -> Path:
    """``mkdir -p`` with a one-line error when it cannot be made (a file in the way, read-only, full)."""
    path = Path(path)
    with guarded(path):
        if path.exists() and not path.is_dir():
            raise OSError(errno.ENOTDIR, "not a directory", str(path))
        path.mkdir(parents=True, exist_ok=True)
    return path

