"""Files on disk: where caches live, checksums, atomic verified writes, locks and disk errors.

Every file svdbench keeps (converted models, calibration statistics, method
tables, results) is written the same way: to a temporary name in the same
directory, flushed and fsync'd, read back and compared, then renamed over the
final name - a reader sees the old entry or the whole new one, never half a
file. An entry's checksum is written last and checked before use; the
checksums of the entries a run read are recorded with its results
(:func:`note_source`), so a changed entry never serves stale results.

One writer per output: :class:`Lock` is an advisory ``flock`` on a file,
released by the kernel when its process dies (so a stale lock of a killed
process is simply taken over), holding the holder's pid and command for the
error message of the process that finds it taken.

A full disk or an I/O error (ENOSPC, EDQUOT, EIO, EROFS, EACCES) becomes a
:class:`StorageError`: one line naming the path and roughly how much space the
step needs. ``SVDBENCH_FAULT_DISK=DIR:BYTES`` makes the write layer behave as if
``DIR`` sat on a filesystem of ``BYTES`` bytes (the fault-injection suite uses it
where it cannot mount a tiny tmpfs).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.errors import UsageError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

log = logging.getLogger(__name__)

DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EIO: "input/output error", errno.EROFS: "read-only file system",
               errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
               errno.ENOTDIR: "a path component is a file, not a directory",
               errno.EEXIST: "a file of that name is in the way"}
TEMPORARY_SUFFIXES = (".tmp", ".partial", ".old")


def cache_root() -> Path:
    """Where svdbench keeps converted models, calibration statistics and other caches."""
    return Path(os.environ.get("SVDBENCH_CACHE", Path.home() / ".cache" / "svdbench"))


def sha256_file(path: Path | str, chunk: int = 1 << 22) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def json_key(fields: dict) -> str:
    """A short stable hash of a JSON-able dictionary (cache keys, resume keys)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- disk errors

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


# --------------------------------------------------------------------------- atomic writes

HOST = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())  # no dots: temporary names are split on them


def temporary_sibling(path: Path, suffix: str = ".tmp") -> Path:
    """A temporary name next to ``path`` that no other process, thread or machine uses
    (``.name.PID.RANDOM-HOST.tmp``: on a filesystem several machines share, a pid means something only on its
    own host)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}-{HOST}{suffix}")


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers never see a partial file: temp name, fsync, verify, rename."""
    path = Path(path)
    make_dir(path.parent)
    tmp = temporary_sibling(path)
    with guarded(path, len(data)):
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            if tmp.read_bytes() != data:
                raise OSError(errno.EIO, "the file read back differs from what was written", str(tmp))
            os.replace(tmp, path)
            fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_directory(finished: Path, target: Path) -> None:
    """Put the complete directory ``finished`` at ``target``, replacing what is there: the old one is renamed
    aside first, so ``target`` is never a half-deleted directory."""
    with guarded(target):
        if target.exists():
            aside = temporary_sibling(target, ".old")
            os.replace(target, aside)
            os.replace(finished, target)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(finished, target)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_temporaries(directory: Path | str) -> list[Path]:
    """Remove temporaries (``.NAME.PID.X-HOST.tmp|partial|old``) that processes of this host no longer alive left
    in ``directory``; another host's are left alone (their writer may still be running there)."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        name = path.name
        if not name.startswith(".") or not name.endswith(TEMPORARY_SUFFIXES):
            continue
        parts = name.split(".")
        host = parts[-2].partition("-")[2] if len(parts) > 3 else ""
        if host and host != HOST:
            continue
        pids = [int(p) for p in parts[2:-1] if p.isdigit()]
        if not pids or any(pid_alive(pid) for pid in pids[-2:]):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) left in %s by interrupted runs", len(removed), directory)
    return removed


# --------------------------------------------------------------------------- locks

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


# --------------------------------------------------------------------------- sealed JSON

SEAL = "checksum"


def seal_digest(obj: dict) -> str:
    body = {k: v for k, v in obj.items() if k != SEAL}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()


def seal(obj: dict) -> dict:
    """``obj`` with a ``checksum`` of everything else in it: a bit flip anywhere in the file is noticed."""
    return {**{k: v for k, v in obj.items() if k != SEAL}, SEAL: seal_digest(obj)}


def is_sealed(obj) -> bool:
    """Whether ``obj`` is a dictionary whose ``checksum`` matches the rest of it."""
    return isinstance(obj, dict) and obj.get(SEAL) == seal_digest(obj)


# --------------------------------------------------------------------------- entries read by a run

_SOURCES: dict[str, str] = {}


def note_source(checksum_file: Path | str, checksum: str) -> None:
    """Record that this process used the entry whose checksum is kept in ``checksum_file``."""
    _SOURCES[str(Path(checksum_file).resolve())] = checksum


def sources() -> dict[str, str]:
    """Every entry noted so far: ``{checksum file: checksum}`` (recorded with each finished cell)."""
    return dict(_SOURCES)


def entry_checksum(checksum_file: Path | str, verify: bool = True) -> str | None:
    """The checksum of the entry described by ``checksum_file``; None when it is unreadable or (``verify``)
    does not verify now.

    Two layouts: a JSON entry holding ``payload`` and its ``sha256``
    (:class:`JsonCache`), or a manifest listing ``files`` (name -> sha256)
    of its directory; its checksum is then the hash of that list. Without
    ``verify`` only the checksum the entry claims is read (cheap).
    """
    path = Path(checksum_file)
    try:
        entry = json.loads(path.read_text())
        if not isinstance(entry, dict):
            return None
        if "payload" in entry:
            ok = not verify or JsonCache.digest(entry["payload"]) == entry.get("sha256")
            return entry["sha256"] if ok and isinstance(entry.get("sha256"), str) else None
        files = entry.get("files")
        if not isinstance(files, dict):
            return None
        if verify and not all(isinstance(name, str) and inside(path.parent, name)
                              and sha256_file(path.parent / name) == digest for name, digest in files.items()):
            return None
        return json_key(files)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def entry_changed(checksum_file: Path | str, recorded: str) -> bool:
    """Whether the entry exists, verifies, and now holds something other than what ``recorded`` describes.

    A missing or corrupt entry is not "changed": it is rebuilt when needed,
    and a rebuild from the same inputs gives the same checksum. Files are
    hashed only when the claimed checksum differs from the recorded one.
    """
    if not Path(checksum_file).exists() or entry_checksum(checksum_file, verify=False) in (None, recorded):
        return False
    current = entry_checksum(checksum_file, verify=True)
    return current is not None and current != recorded


def inside(directory: Path | str, name: str) -> bool:
    """Whether relative path ``name`` stays inside ``directory`` (no absolute path, no ``..``, no link out)."""
    if not name or os.path.isabs(name) or "\\" in name or "\x00" in name:
        return False
    if any(part in ("..", "") for part in Path(name).parts) or Path(name).parts[0] in ("/",):
        return False
    root = Path(directory).resolve()
    target = (root / name).resolve()
    return target == root or root in target.parents


# --------------------------------------------------------------------------- a JSON cache

class JsonCache:
    """Verified JSON entries ``<root>/<key>.json`` holding their settings, payload and checksum.

    ``load`` returns the payload only when the entry's settings equal the
    ones asked for and its sha256 matches; anything else (a missing,
    truncated, edited or foreign entry) is logged and reads as a miss, so the
    caller recomputes and overwrites it. ``save`` holds the entry's lock and
    writes atomically; both note the entry's checksum (:func:`note_source`).
    """

    def __init__(self, root: Path | str, what: str):
        self.root, self.what = Path(root), what

    def path(self, fields: dict) -> Path:
        return self.root / f"{json_key(fields)}.json"

    @staticmethod
    def digest(payload) -> str:
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def load(self, fields: dict):
        path = self.path(fields)
        if not path.exists():
            return None
        try:
            entry = json.loads(path.read_text())
            if not isinstance(entry, dict):
                raise ValueError("it is not a JSON object")
            if entry["fields"] != json.loads(json.dumps(fields)):
                raise ValueError("its settings do not match")
            if self.digest(entry["payload"]) != entry["sha256"]:
                raise ValueError("its checksum does not match")
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("%s cache entry %s is unusable (%s); rebuilding it", self.what, path, error)
            return None
        note_source(path, entry["sha256"])
        return entry["payload"]

    def save(self, fields: dict, payload) -> Path:
        path = self.path(fields)
        digest = self.digest(payload)
        make_dir(self.root)
        sweep_temporaries(self.root)
        with entry_lock(path):
            atomic_write_text(path, json.dumps({"fields": fields, "payload": payload, "sha256": digest}, indent=1))
        note_source(path, digest)
        return path
