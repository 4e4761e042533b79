"""The task contract: what an evaluation plugin implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn


@dataclass(frozen=True)
class EvalSettings:
    """Evaluation settings shared by every task of a run.

    ``limit`` caps the work per task (perplexity windows, zero-shot
    examples); ``None`` means the full split.
    """

    seqlen: int = 2048
    limit: int | None = None
    batch_size: int = 1
    device: str = "cpu"


@dataclass
class Measurement:
    """One metric value; ``extra`` holds what qualifies it (tokens, stderr, ...)."""

    metric: str
    value: float
    extra: dict = field(default_factory=dict)


class Task:
    """An evaluation: perplexity on a corpus, zero-shot accuracy, speed.

    Subclasses set ``name`` and ``higher_is_better`` (metric -> bool) and
    implement :meth:`evaluate`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    higher_is_better: ClassVar[dict[str, bool]] = {}

    def settings_key(self, settings: EvalSettings) -> dict:
        """The settings that change this task's result (part of a record's resume key)."""
        return {"seqlen": settings.seqlen, "limit": settings.limit}

    def data_checksums(self) -> dict[str, str]:
        """sha256 of every data file the task reads, for the run manifest."""
        return {}

    def evaluate(self, model: nn.Module, tokenizer, settings: EvalSettings) -> list[Measurement]:
        """Evaluate ``model`` and return its measurements."""
        raise NotImplementedError
