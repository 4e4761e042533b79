"""The on-disk stores: calibration statistics and factorizations, one safetensors file per decoder block.

An entry is a directory ``<root>/<kind>/<key>/`` holding safetensors files -
one per decoder block for statistics, one per matrix for factorizations - and
a ``manifest.json`` written last: the settings that produced the
entry (its key is their hash), the sha256 of every block file and what the
tensors mean. A writer builds the entry under a temporary name and renames the
whole directory into place when its manifest is written, so a reader sees a
complete entry or none. Several processes, on several machines sharing the
store's filesystem, may compute the same entry at once: each writes under a
name of its own (host, process, random token), the first rename wins and the
others' copies are discarded (a writer that finds a broken entry in the way
replaces it). A reader verifies the settings and every file's checksum
before use; a mismatch, a missing file or a truncated one is logged and reads
as a miss, and the entry is moved aside (atomically) and rebuilt. A writer
removes the temporary entries that dead processes of its host left behind.

Tensors are read one file at a time, each file opened and closed per read,
so a store larger than memory is fine: the statistics of one block and the
factors of one matrix are what a run holds at once.

- ``stats``: one entry per statistic (model, calibration settings and data,
  statistic version); tensors by target (or input group, or block) name.
- ``factors``: one entry per decomposition (model, method's decomposition
  key, calibration settings when the method uses them); for every target
  ``<name>.u``, ``<name>.s``, ``<name>.vt`` in float64. ``u`` and ``vt`` keep
  only the components a compressed layer can use (rank below
  ``m*n/(m+n)``); ``s`` keeps the whole spectrum.

``svdbench cache`` lists, sizes and clears them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from bench.api.grouped import ROWS as SHARED_ROWS
from bench.api.lowrank import Factorization
from bench.disk import guarded, make_dir
from bench.storage import (
    atomic_write_text,
    cache_root,
    is_sealed,
    json_key,
    note_source,
    seal,
    sha256_file,
    sweep_temporaries,
    temporary_sibling,
)

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
KINDS = ("stats", "factors")


def store_root(kind: str) -> Path:
    """Where entries of ``kind`` live (``SVDBENCH_STATS_CACHE`` moves the statistics, as before)."""
    if kind == "stats" and os.environ.get("SVDBENCH_STATS_CACHE"):
        return Path(os.environ["SVDBENCH_STATS_CACHE"])
    return cache_root() / kind


def block_file(index: int) -> str:
    return f"block-{index:04d}.safetensors"


class EntryWriter:
    """Builds one entry block by block under a temporary name; :meth:`finish` publishes it."""

    def __init__(self, root: Path, fields: dict):
        self.fields = fields
        self.final = root / json_key(fields)
        make_dir(root)
        sweep_temporaries(root)  # what killed writers left behind
        self.tmp = temporary_sibling(self.final, ".partial")
        make_dir(self.tmp)
        self.files: dict[str, str] = {}
        self.index: dict[str, str] = {}  # tensor name -> file

    def write_block(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """One block's tensors, in the block's own file (statistics: read back a block at a time)."""
        self._write(block_file(index), tensors)

    def write_part(self, tensors: dict[str, torch.Tensor]) -> None:
        """Tensors in a file of their own (factorizations: written one matrix at a time, then freed)."""
        self._write(f"part-{len(self.files):05d}.safetensors", tensors)

    def _write(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path = self.tmp / name
        with guarded(path, sum(t.numel() * t.element_size() for t in tensors.values())):
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
        self.files[name] = sha256_file(path)
        self.index.update(dict.fromkeys(tensors, name))

    def finish(self, meta: dict | None = None) -> Path:
        """Publish the entry under its final name; when another writer published it first, keep theirs."""
        manifest = seal({"format": FORMAT, "fields": self.fields, "files": self.files, "index": self.index,
                         "meta": meta or {}})  # its own checksum: an edited index or meta is noticed too
        atomic_write_text(self.tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        for _ in range(3):
            try:
                os.rename(self.tmp, self.final)  # atomic; fails when a non-empty directory holds the name
                break
            except OSError:
                if not self.final.exists():
                    raise
            try:
                _verified_manifest(self.final, self.fields)
            except (OSError, ValueError, KeyError, TypeError) as error:  # a broken entry in the way: replace it
                log.warning("store entry %s is unusable (%s); replacing it", self.final, error)
                discard(self.final)
                continue
            self.abandon()  # another process published a complete entry first: keep theirs
            break
        else:
            raise OSError(f"could not publish store entry {self.final}: another writer keeps replacing it")
        note_source(self.final / MANIFEST, json_key(self.files))
        return self.final

    def abandon(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def discard(path: Path) -> None:
    """Remove an entry directory so that no reader or writer ever sees it half deleted.

    It is first renamed to a name of its own (atomic), then deleted there.
    """
    trash = temporary_sibling(path, ".old")
    try:
        os.rename(path, trash)
    except FileNotFoundError:  # someone else discarded it first
        return
    shutil.rmtree(trash, ignore_errors=True)


class Entry:
    """A complete, verified entry: its manifest and one-file-at-a-time reads."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = path, manifest
        self.index: dict[str, str] = manifest["index"]
        self.meta: dict = manifest["meta"]

    def names(self) -> list[str]:
        return list(self.index)

    def read_file(self, name: str, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        with safe_open(str(self.path / name), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in (keys if keys is not None else handle.keys())}

    def read(self, key: str) -> torch.Tensor:
        return self.read_file(self.index[key], [key])[key]

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir())


def _verified_manifest(path: Path, fields: dict) -> dict:
    """The manifest of the entry at ``path`` when its settings are ``fields`` and every file matches its checksum."""
    manifest = json.loads((path / MANIFEST).read_text())
    if not is_sealed(manifest):
        raise ValueError(f"{MANIFEST} is corrupted or was edited (its checksum does not match)")
    if manifest.get("format") != FORMAT or manifest["fields"] != json.loads(json.dumps(fields)):
        raise ValueError("its settings do not match")
    for name, digest in manifest["files"].items():
        if sha256_file(path / name) != digest:
            raise ValueError(f"{name} does not match its checksum")
    return manifest


def open_entry(root: Path, fields: dict, what: str) -> Entry | None:
    """The entry made with exactly ``fields``, verified; None when absent or unusable (logged, then discarded)."""
    path = root / json_key(fields)
    if not path.exists():
        return None
    try:
        manifest = _verified_manifest(path, fields)
        note_source(path / MANIFEST, json_key(manifest["files"]))  # cells computed from it record its checksum
        return Entry(path, manifest)
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("%s store entry %s is unusable (%s); rebuilding it", what, path, error)
        discard(path)
        return None


class LazyTensors(Mapping):
    """A mapping name -> tensor over an entry, read from disk on each access (nothing kept)."""

    def __init__(self, entry: Entry):
        self.entry = entry

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.entry.index:
            raise KeyError(key)
        return self.entry.read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entry.index)

    def __len__(self) -> int:
        return len(self.entry.index)


# --------------------------------------------------------------------------- factorizations

def useful_rank(m: int, n: int) -> int:
    """The largest rank a compressed layer can have: above it the factors hold as many parameters as W."""
    return max(1, min(m, n, (m * n) // (m + n)))


def factor_tensors(name: str, factorization: Factorization) -> dict[str, torch.Tensor]:
    """What the store keeps of one factorization (float64; u and vt cut at the useful rank - of the stacked
    matrix for a member of a shared group, whose rank may pass its own)."""
    m, n = factorization.shape
    keep = min(factorization.u.shape[1], useful_rank(int(factorization.facts.get(SHARED_ROWS, m)), n))
    out = {f"{name}.u": factorization.u[:, :keep].double().clone(), f"{name}.s": factorization.s.double().clone(),
           f"{name}.vt": factorization.vt[:keep].double().clone()}
    if factorization.scores is not None:  # kept in full, like the spectrum
        out[f"{name}.scores"] = factorization.scores.double().clone()
    return out


class StoredFactorization(Factorization):
    """A factorization whose spectrum is in memory and whose factors are read from the store when used."""

    def __init__(self, entry: Entry, name: str, s: torch.Tensor, shape: tuple[int, int], facts: dict,
                 scores: torch.Tensor | None = None):
        self._entry, self._name, self._shape = entry, name, shape
        self.s, self.scores = s, scores
        self.facts = facts

    @property
    def u(self) -> torch.Tensor:
        return self._entry.read(f"{self._name}.u")

    @property
    def vt(self) -> torch.Tensor:
        return self._entry.read(f"{self._name}.vt")

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    def factors(self, rank: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = self._entry.read_file(self._entry.index[f"{self._name}.u"], [f"{self._name}.u", f"{self._name}.vt"])
        return Factorization(tensors[f"{self._name}.u"], self.s, tensors[f"{self._name}.vt"]).factors(rank, dtype)


def stored_factorizations(entry: Entry) -> dict[str, StoredFactorization]:
    """Every target's factorization in ``entry``: spectra read now, factors on use."""
    out = {}
    shapes, facts = entry.meta["shapes"], entry.meta.get("facts", {})
    by_file: dict[str, list[str]] = {}
    for name in shapes:
        by_file.setdefault(entry.index[f"{name}.s"], []).append(name)
    for file, names in by_file.items():
        spectra = entry.read_file(file, [f"{name}.{part}" for name in names for part in ("s", "scores")
                                         if f"{name}.{part}" in entry.index])
        for name in names:
            out[name] = StoredFactorization(entry, name, spectra[f"{name}.s"], tuple(shapes[name]),
                                            facts.get(name, {}), spectra.get(f"{name}.scores"))
    return out


def list_entries(kind: str) -> list[dict]:
    """What ``svdbench cache list`` prints: every entry of ``kind`` with its size and settings."""
    root = store_root(kind)
    rows = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if not path.is_dir() or path.name.startswith("."):
            continue
        try:
            fields = json.loads((path / MANIFEST).read_text())["fields"]
        except (OSError, ValueError, KeyError):
            fields = {"incomplete": True}
        rows.append({"kind": kind, "key": path.name, "bytes": sum(p.stat().st_size for p in path.rglob("*") if p.is_file()),
                     "fields": fields})
    return rows
