"""Measurements shared by models of one architecture, and taken interleaved across the run's models.

A task that declares ``per_architecture`` (throughput: its figures depend on
every layer's type, shape, dtype and bits, not on the weights' values) is not
evaluated as each model is built. The engine hands each such cell to
:class:`SharedMeasurements`, which keys the model by its
:func:`architecture_signature`: the first model of a signature is held, every
later one only joins it (``svd``, ``fwsvd``, ``svdllm_w``, ``svdllm`` and
``svdllm_u`` at one ratio have the same ranks, hence one signature). At the
end of the run (of a group, on a Ray worker) :meth:`SharedMeasurements.flush`
gives the held models - one per distinct signature, the dense model first -
to the task's ``evaluate_many`` at once, which interleaves its repeats across
them (dense, A, B, dense, A, B, ...) so that a drift of the machine's speed
hits all of them alike; every cell then gets the measurement of its
signature, recorded with the signature, the model it was measured on and the
models sharing it.

The held models are what the run keeps in memory for this: one per distinct
signature, their unchanged tensors (embeddings, norms) shared with the dense
model's (:func:`share_equal_tensors`). They are bounded: once they pass
:func:`hold_limit` (a quarter of the machine's memory, or
``SVDBENCH_HOLD_MB``), the engine measures what is held right away and starts
a new interleaved session, so a run of large models never holds more than
that (speed-ups across sessions are then unpaired, and the records say which
session measured each model).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from bench.api.task import Measurement, Task

log = logging.getLogger(__name__)

LAYER_FACTS = ("bits", "nbits", "group_size", "rank", "in_features", "out_features")


def architecture_signature(model: nn.Module, bits: int | None = None) -> str:
    """A hash of every module's type and its own tensors' names, shapes and dtypes (plus its bit width and
    other plain layer facts, and the model's weight ``bits``): equal for models that compute alike."""
    parts = []
    for name, module in model.named_modules():
        tensors = [[key, list(t.shape), str(t.dtype).removeprefix("torch.")]
                   for key, t in [*module._parameters.items(), *module._buffers.items()] if t is not None]
        facts = {key: getattr(module, key) for key in LAYER_FACTS
                 if isinstance(getattr(module, key, None), (bool, int, float, str))}
        parts.append([name, f"{type(module).__module__}.{type(module).__qualname__}", tensors, facts])
    device = next((str(p.device) for p in model.parameters()), "cpu")
    text = json.dumps({"bits": bits, "device": device, "modules": parts}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def share_equal_tensors(model: nn.Module, reference: nn.Module) -> int:
    """Point ``model``'s parameters and buffers at ``reference``'s of the same name where they are equal; the bytes
    saved.

    Only for held models: values stay as they were, only the copies go.
    """
    saved, seen = 0, set()
    for kind, wanted in (("_parameters", dict(reference.named_parameters(remove_duplicate=False))),
                         ("_buffers", dict(reference.named_buffers(remove_duplicate=False)))):
        for prefix, module in model.named_modules(remove_duplicate=False):
            tensors = getattr(module, kind)
            for key, tensor in list(tensors.items()):
                ref = wanted.get(f"{prefix}.{key}" if prefix else key)
                if tensor is None or ref is None or ref is tensor or tensor.device.type == "meta" \
                        or ref.shape != tensor.shape \
                        or ref.dtype != tensor.dtype or ref.device != tensor.device \
                        or not torch.equal(ref.detach(), tensor.detach()):
                    continue
                tensors[key] = ref
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    saved += tensor.numel() * tensor.element_size()
    return saved


def held_bytes(models: list[nn.Module]) -> int:
    """Bytes of the distinct tensors of ``models`` (a tensor shared by several counts once)."""
    seen: dict[tuple, int] = {}
    for model in models:
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type != "meta":
                seen[(tensor.device.type, tensor.data_ptr())] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def hold_limit() -> int:
    """Bytes the held models may take: ``SVDBENCH_HOLD_MB`` MiB, else a quarter of the physical memory."""
    configured = os.environ.get("SVDBENCH_HOLD_MB")
    if configured:
        return int(float(configured) * 2**20)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


@dataclass
class _Member:
    label: str
    emit: Callable[[list[Measurement], float], None]
    fail: Callable[[Exception], None]


@dataclass
class _Entry:
    signature: str
    model: nn.Module
    members: list[_Member] = field(default_factory=list)


class SharedMeasurements:
    """Per-architecture cells of one process, held until :meth:`flush`."""

    def __init__(self):
        self._entries: dict[str, dict[str, _Entry]] = {}  # task -> signature -> entry
        self._tasks: dict[str, Task] = {}
        self.reference: nn.Module | None = None  # the dense model, whose equal tensors held models share

    def over_limit(self) -> bool:
        """Whether the held models take more than :func:`hold_limit` (measure them now, then hold anew)."""
        models = [entry.model for entries in self._entries.values() for entry in entries.values()]
        return len(models) > 1 and held_bytes(models) > hold_limit()

    def holds(self, model: nn.Module) -> bool:
        return any(entry.model is model for entries in self._entries.values() for entry in entries.values())

    def add(self, task: Task, model: nn.Module, bits: int | None, label: str, emit, fail, dense: bool = False) -> None:
        """Hold ``model`` for ``task`` unless a model of its signature is held already; ``emit`` gets the
        measurements later, ``fail`` the error if measuring fails."""
        signature = architecture_signature(model, bits)
        entries = self._entries.setdefault(task.name, {})
        self._tasks[task.name] = task
        if dense and self.reference is None:
            self.reference = model
        if signature not in entries:
            if self.reference is not None and model is not self.reference and not self.holds(model):
                saved = share_equal_tensors(model, self.reference)
                log.debug("%s: held for %s, %.1f MiB shared with the dense model", label, task.name, saved / 2**20)
            entries[signature] = _Entry(signature, model)
        entries[signature].members.append(_Member(label, emit, fail))

    def flush(self, tokenizer, settings) -> None:
        """Measure every held model, task by task, and emit each member's records; then let the models go."""
        entries_by_task, self._entries, self.reference = self._entries, {}, None
        if entries_by_task:
            log.info("measuring %d held models (%.0f MiB of tensors in memory)",
                     len({id(e.model) for entries in entries_by_task.values() for e in entries.values()}),
                     held_bytes([e.model for entries in entries_by_task.values() for e in entries.values()]) / 2**20)
        for name, entries in entries_by_task.items():
            task, held = self._tasks[name], list(entries.values())
            start = time.perf_counter()
            try:
                measured = task.evaluate_many([entry.model for entry in held], tokenizer, settings)
            except Exception as error:  # every cell of the task fails; the run goes on
                for entry in held:
                    for member in entry.members:
                        member.fail(error)
                continue
            seconds = (time.perf_counter() - start) / max(1, len(held))
            for entry, measurements in zip(held, measured):
                models = [member.label for member in entry.members]
                for member in entry.members:
                    shared = {"signature": entry.signature, "measured_on": models[0], "models": models,
                              "shared": member is not entry.members[0], "distinct_architectures": len(held)}
                    member.emit([Measurement(m.metric, m.value, {**copy.deepcopy(m.extra), "architecture": shared},
                                             dict(m.point)) for m in measurements], seconds)
            log.info("%s: %d models measured as %d distinct architectures, interleaved", name,
                     sum(len(e.members) for e in held), len(held))
