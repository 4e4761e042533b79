"""Access to the vendored data files, verified against ``data/SHA256SUMS``.

Every file svdbench reads for evaluation or calibration lives under
``tasks/data`` with its checksum and licence, so a fresh clone needs no
network. A file whose checksum does not match is refused, not silently used.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from bench.errors import UsageError

DATA_DIR = Path(__file__).parent / "data"


@functools.cache
def checksums() -> dict[str, str]:
    lines = (DATA_DIR / "SHA256SUMS").read_text().splitlines()
    return {rel.strip(): digest for digest, rel in (line.split(maxsplit=1) for line in lines if line.strip())}


@functools.cache
def _verified(rel: str) -> Path:
    expected = checksums().get(rel)
    path = DATA_DIR / rel
    if expected is None:
        raise UsageError(f"data file '{rel}' is not listed in {DATA_DIR / 'SHA256SUMS'}; add its sha256 there")
    if not path.is_file():
        raise UsageError(f"data file {path} is missing; restore it from the repository (git checkout -- tasks/data)")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise UsageError(f"data file {path} is corrupted (sha256 {actual[:12]}..., expected {expected[:12]}...); "
                         "restore it with: git checkout -- tasks/data")
    return path


def data_file(rel: str) -> Path:
    """Path of a vendored data file, after checking its sha256."""
    return _verified(rel)
