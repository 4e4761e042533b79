"""Fixtures of the fault-injection suite: a tiny checkpoint on disk and the real CLI in subprocesses."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from .harness import SMALL_RUN, make_tiny_checkpoint, svdbench, write_tiny_gguf  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random Llama saved as a Hugging Face directory (never modified by a test: copy it first)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def model(checkpoint, tmp_path) -> Path:
    """A private copy of the tiny checkpoint, which a test may corrupt."""
    return Path(shutil.copytree(checkpoint, tmp_path / "model"))


@pytest.fixture(scope="session")
def gguf_file(checkpoint, tmp_path_factory) -> Path:
    return write_tiny_gguf(checkpoint, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def finished(checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """One finished small run (output directory, cache), made once: tests copy it before touching it."""
    root = tmp_path_factory.mktemp("finished")
    done = svdbench("run", "--model", str(checkpoint), *SMALL_RUN, "--out", str(root / "out"), cache=root / "cache")
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "out", root / "cache"


@pytest.fixture
def finished_copy(finished, tmp_path) -> tuple[Path, Path]:
    out, cache = finished
    return Path(shutil.copytree(out, tmp_path / "out")), Path(shutil.copytree(cache, tmp_path / "cache"))
