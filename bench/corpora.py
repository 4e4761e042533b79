"""The vendored data and the corpora read from it, verified against ``data/SHA256SUMS``.

Every file svdbench reads for evaluation, calibration or the LoRA update
lives under ``bench/data`` with its checksum and licence (``data/README.md``),
so a fresh clone needs no network. A file whose checksum does not match is
refused, not silently used.

The two text corpora are read here once for both of their users: the
perplexity tasks evaluate on WikiText-2 test and the first 1,000 C4
documents; calibration draws from WikiText-2 validation and the other 1,000
C4 documents, so calibration never sees evaluation text.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
from pathlib import Path

from bench.errors import UsageError

DATA_DIR = Path(__file__).parent / "data"
WIKITEXT2_TEST = "wikitext2/wiki.test.raw"
WIKITEXT2_VALID = "wikitext2/wiki.valid.tokens"
C4_FILE = "c4/c4_validation_2k.jsonl.gz"
C4_EVAL_DOCS = 1000  # documents [0, 1000) are evaluated; [1000, 2000) are left for calibration

# corpus name -> (file, part) for evaluation and for calibration
EVALUATION_CORPORA = {"wikitext2": WIKITEXT2_TEST, "c4": C4_FILE}
CALIBRATION_CORPORA = {"wikitext2": WIKITEXT2_VALID, "c4": C4_FILE}


@functools.cache
def checksums() -> dict[str, str]:
    """sha256 of every vendored file, by path relative to the data directory."""
    lines = (DATA_DIR / "SHA256SUMS").read_text().splitlines()
    return {rel.strip(): digest for digest, rel in (line.split(maxsplit=1) for line in lines if line.strip())}


@functools.cache
def data_file(rel: str) -> Path:
    """Path of a vendored data file, after checking its sha256."""
    expected = checksums().get(rel)
    path = DATA_DIR / rel
    if expected is None:
        raise UsageError(f"data file '{rel}' is not listed in {DATA_DIR / 'SHA256SUMS'}; add its sha256 there")
    if not path.is_file():
        raise UsageError(f"data file {path} is missing; restore it from the repository (git checkout -- bench/data)")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise UsageError(f"data file {path} is corrupted (sha256 {actual[:12]}..., expected {expected[:12]}...); "
                         "restore it with: git checkout -- bench/data")
    return path


def wikitext2_rows(split_file: str = WIKITEXT2_TEST) -> list[str]:
    """The Hugging Face rows of a WikiText file: lines with their newline, blank ones as ''."""
    lines = data_file(split_file).read_text(encoding="utf-8").splitlines(keepends=True)
    return [line if line.strip() else "" for line in lines]


def c4_rows(part: str = "eval") -> list[str]:
    """C4 documents: the first 1,000 for evaluation (``eval``), the other 1,000 for ``calibration``."""
    with gzip.open(data_file(C4_FILE), "rt", encoding="utf-8") as handle:
        docs = [json.loads(line)["text"] for line in handle if line.strip()]
    return docs[:C4_EVAL_DOCS] if part == "eval" else docs[C4_EVAL_DOCS:]


def evaluation_text(corpus: str) -> str:
    """The evaluation text of ``corpus``: its rows joined with blank lines (the GPTQ/SVD-LLM protocol)."""
    rows = wikitext2_rows() if corpus == "wikitext2" else c4_rows("eval")
    return "\n\n".join(rows)


def calibration_text(corpus: str) -> str:
    """The calibration text of ``corpus`` (never its evaluation part)."""
    if corpus not in CALIBRATION_CORPORA:
        raise UsageError(f"unknown calibration dataset '{corpus}'; use one of: {', '.join(CALIBRATION_CORPORA)}")
    rows = wikitext2_rows(WIKITEXT2_VALID) if corpus == "wikitext2" else c4_rows("calibration")
    return "\n\n".join(rows)


def calibration_checksum(corpus: str) -> str:
    return checksums()[CALIBRATION_CORPORA[corpus]]
