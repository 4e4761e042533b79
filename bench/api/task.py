"""The task contract: what an evaluation plugin implements.

A task declares its metrics (:class:`Metric`: what kind of number each one is
and which direction is better) so that reports can place any task's results -
built-in or third-party - without knowing its name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from bench.api.versions import code_version

# What a metric measures; reports pick tables and tolerances by it.
METRIC_KINDS = ("perplexity", "accuracy", "throughput", "memory", "other")


@dataclass(frozen=True)
class Metric:
    """One metric a task reports: its kind (one of ``METRIC_KINDS``) and direction."""

    kind: str
    higher_is_better: bool | None
    unit: str = ""

    def __post_init__(self):
        if self.kind not in METRIC_KINDS:
            raise ValueError(f"metric kind {self.kind!r} is not one of {METRIC_KINDS}")


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
    """One metric value.

    ``point`` locates it when a task measures several settings (a throughput
    grid point: batch size, prompt and decode lengths); ``extra`` holds what
    qualifies it (tokens, stderr, ...).
    """

    metric: str
    value: float
    extra: dict = field(default_factory=dict)
    point: dict = field(default_factory=dict)


class Task:
    """An evaluation: perplexity on a corpus, zero-shot accuracy, speed.

    Subclasses set ``name``, ``metrics`` and implement :meth:`evaluate`.
    ``average`` names a group of tasks whose plain mean of one metric the
    reports show (``("svdllm-zero-shot", "acc", members)``), or ``None``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    metrics: ClassVar[dict[str, Metric]] = {}
    average: ClassVar[tuple[str, str, tuple[str, ...]] | None] = None
    # Part of every resume key; None: derived from the plugin's source (bench.api.versions).
    version: ClassVar[str | None] = None

    def code_version(self) -> str:
        """The version of this task's code: ``version``, else derived from its source files."""
        return code_version(self)
    # True: the result depends on the model's architecture (every layer's type, shape, dtype, bits), not on its
    # weights' values (speed). The engine then measures it once per distinct architecture of the run, all of
    # them together through :meth:`evaluate_many`, and models of one architecture share the measurement.
    per_architecture: ClassVar[bool] = False

    def settings_key(self, settings: EvalSettings) -> dict:
        """The settings that change this task's result (part of a record's resume key)."""
        return {"seqlen": settings.seqlen, "limit": settings.limit}

    def data_checksums(self) -> dict[str, str]:
        """sha256 of every data file the task reads, for the run manifest."""
        return {}

    def describe(self) -> dict:
        """What reports need to know about this task (recorded in the run manifest)."""
        info = {"description": self.description,
                "metrics": {name: {"kind": m.kind, "higher_is_better": m.higher_is_better, "unit": m.unit}
                            for name, m in self.metrics.items()}}
        if self.average:
            group, metric, members = self.average
            info["average"] = {"group": group, "metric": metric, "members": list(members)}
        return info

    def evaluate(self, model: nn.Module, tokenizer, settings: EvalSettings) -> list[Measurement]:
        """Evaluate ``model`` and return its measurements."""
        raise NotImplementedError

    def evaluate_many(self, models: list[nn.Module], tokenizer, settings: EvalSettings) -> list[list[Measurement]]:
        """Each model's measurements (default: one after the other); a ``per_architecture`` task gets every
        distinct architecture of a run at once and interleaves its repeats across them."""
        return [self.evaluate(model, tokenizer, settings) for model in models]
