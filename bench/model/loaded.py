"""A loaded model and its identity: the hash every cache key and resume key starts from."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


def fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer name, shape, dtype and bytes.

    This is the model identity used in every cache key: two models share
    cached statistics only when their weights are bit-identical.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass
class LoadedModel:
    """A model ready to benchmark, with what identifies it.

    ``checkpoint`` is the safetensors directory the weights were read from
    (None for a model built in code or a saved compressed model): with one,
    the engine may drop the model from memory and read weights back from it.
    """

    model: nn.Module
    tokenizer: object
    name: str
    source: str
    identity: str = ""
    info: dict = field(default_factory=dict)
    checkpoint: Path | None = None

    def __post_init__(self) -> None:
        if not self.identity:
            self.identity = fingerprint(self.model)
