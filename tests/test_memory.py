"""The C allocator's settings: freed blocks up to 32 MiB are reused, not faulted back in from the kernel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# An MLP's forward pass on 3072 tokens (its intermediates are 18 MiB each), 5 times after 3 warm-up
# passes; counts the page faults of those 5.
FAULTS = """
import json, resource, sys
from bench.memory import reuse_freed_memory
settings = reuse_freed_memory() if sys.argv[1] == "svdbench" else {}
import torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x, w_in, w_out = torch.randn(3072, 576), torch.randn(1536, 576), torch.randn(576, 1536)
def one_pass():
    for _ in range(4):
        (torch.nn.functional.silu(x @ w_in.T) * (x @ w_in.T)) @ w_out.T
for _ in range(3):
    one_pass()
before = faults()
for _ in range(5):
    one_pass()
print(json.dumps({"faults": faults() - before, "settings": settings}))
"""


def _faults(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", FAULTS, mode], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_freed_blocks_are_reused_without_page_faults():
    svdbench = _faults("svdbench")
    if svdbench["settings"].get("allocator") != "glibc":
        pytest.skip(f"not glibc: {svdbench['settings']}")  # nothing to test where mallopt is missing
    assert svdbench["settings"]["mmap_threshold"] == 32 * 2**20
    assert svdbench["faults"] < 1000  # every block came from memory already held
    assert _faults("default")["faults"] > 10 * 4608  # glibc's default: 18 MiB blocks (4608 pages) faulted in again
