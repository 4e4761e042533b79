"""Files on disk: where caches live, checksums, and atomic, verified writes.

Every cache svdbench keeps (converted models, calibration statistics, method
tables) is written the same way: to a temporary name in the same directory,
flushed, then renamed over the final name, so a reader sees either the old
entry or the whole new one - never half a file. An entry's checksum is
written last and checked before use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import socket
from pathlib import Path

log = logging.getLogger(__name__)


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


def unique_suffix() -> str:
    """A name part no other writer uses: the host and process (for whoever finds leftovers) and a random token.

    The process id alone is not enough: on a filesystem shared by several
    machines two writers can have the same one.
    """
    return f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"


def temporary_sibling(path: Path) -> Path:
    """A temporary name next to ``path`` that no other process or machine uses."""
    return path.with_name(f".{path.name}.{unique_suffix()}.tmp")


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))



class JsonCache:
    """Verified JSON entries ``<root>/<key>.json`` holding their settings, payload and checksum.

    ``load`` returns the payload only when the entry's settings equal the
    ones asked for and its sha256 matches; anything else (a missing,
    truncated, edited or foreign entry) is logged and reads as a miss, so the
    caller recomputes and overwrites it.
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
            if entry["fields"] != json.loads(json.dumps(fields)):
                raise ValueError("its settings do not match")
            if self.digest(entry["payload"]) != entry["sha256"]:
                raise ValueError("its checksum does not match")
            return entry["payload"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("%s cache entry %s is unusable (%s); rebuilding it", self.what, path, error)
            return None

    def save(self, fields: dict, payload) -> Path:
        path = self.path(fields)
        atomic_write_text(path, json.dumps({"fields": fields, "payload": payload, "sha256": self.digest(payload)},
                                           indent=1))
        return path
