"""Bad numbers and failed stages: NaN/inf checks that say where they came from, and failure records.

A failure is recorded (method, ratio, stage, layer, error) and the run goes
on; a full disk is not a method's fault and ends the run instead.
"""

from __future__ import annotations

import logging

import torch

from bench.disk import disk_error, is_disk_error
from bench.engine.plan import CellGroup
from bench.engine.sinks import Sink
from bench.errors import NonFinite
from bench.storage import cache_root

log = logging.getLogger(__name__)


def check_finite(tensor: torch.Tensor, layer: str | None, stage: str, what: str) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise NonFinite(layer, stage, what)


class at_layer:
    """Tags an error raised inside with the layer it happened in (for the failure record)."""

    def __init__(self, layer: str):
        self.layer = layer

    def __enter__(self):
        return self

    def __exit__(self, kind, error, _tb):
        if isinstance(error, Exception) and getattr(error, "layer", None) is None:
            try:
                error.layer = self.layer
            except AttributeError:  # exceptions with __slots__
                pass
        return False


def check_model_finite(model, stage: str) -> None:
    """Every floating-point parameter and buffer of a compressed model is finite; else which layer is not."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        check_finite(tensor.detach(), name.rpartition(".")[0], stage, f"weights ({name.rpartition('.')[2]})")



def record_failure(sink: Sink, method: str, ratio: float | None, stage: str, error: Exception) -> None:
    """Record a failed stage in ``failures`` (with the layer, where known); a full disk ends the run instead."""
    import traceback

    if is_disk_error(error):  # not the method's fault: the run stops (finished cells are kept)
        raise disk_error(error, getattr(error, "filename", None) or cache_root()) from None
    stage = getattr(error, "stage", None) or stage
    layer = getattr(error, "layer", None)
    log.error("%s%s failed during %s%s: %s: %s", method, f" at ratio {ratio}" if ratio is not None else "",
              stage, f" at {layer}" if layer else "", type(error).__name__, error)
    sink.add_failure({"method": method, "ratio": ratio, "stage": stage, "layer": layer,
                      "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=6)})


def group_failures(group: CellGroup, error: BaseException) -> list[dict]:
    """A group whose task never returned: every method of it failed (the others go on)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return [{"method": name, "ratio": None, "stage": "ray task", "layer": None,
             "error": f"{type(error).__name__}: {first}"} for name in group.methods]


