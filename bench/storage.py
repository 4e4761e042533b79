"""Files on disk: where caches live, checksums and atomic verified writes.

Every file svdbench keeps (converted models, calibration statistics, method
tables, results) is written the same way: to a temporary name in the same
directory, flushed and fsync'd, read back and compared, then renamed over the
final name - a reader sees the old entry or the whole new one, never half a
file. An entry's checksum is written last and checked before use; the
checksums of the entries a run read are recorded with its results
(:func:`note_source`), so a changed entry never serves stale results. Disk
errors: :mod:`bench.disk`; locks: :mod:`bench.locks`.
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
import uuid
from pathlib import Path

from bench.disk import guarded, make_dir
from bench.locks import entry_lock

log = logging.getLogger(__name__)

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
