"""Checking ``--device`` before anything runs on it.

torch parses device strings only when a tensor first moves, and then raises
a long RuntimeError (``tpu``) or a CUDA error deep in loading (``cuda:7`` on a
one-GPU machine). These checks turn each into one line naming the device and
the ones that exist.
"""

from __future__ import annotations

import torch

from bench.errors import UsageError

DEVICE_TYPES = ("cpu", "cuda", "mps")


def parse_device(device: str) -> torch.device:
    """``device`` as a ``torch.device`` of a kind svdbench runs on (checked without touching any hardware)."""
    try:
        parsed = torch.device(str(device))
    except (RuntimeError, ValueError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise UsageError(f"--device {device} is not a device svdbench runs on; use cpu, cuda or cuda:N "
                         "(a GPU's index)")
    return parsed


def check_device(device: str) -> None:
    """Refuse ``device`` when this machine does not have it (no CUDA, a GPU index beyond the count, no MPS)."""
    parsed = parse_device(device)
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device} but CUDA is not available; use --device cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise UsageError(f"--device {device} but this machine has {count} CUDA device(s) "
                             f"(cuda:0 to cuda:{count - 1}); use one of those")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device} but MPS is not available; use --device cpu")
