"""Modules shared by several compressed layers (a basis shared across layers), saved once and tied on load.

A model holds a shared factor as one ``nn.Linear`` used by several
:class:`~bench.model.layers.LowRankLinear` (``layer.down``). safetensors
refuses shared storage, so the saved file holds the tensor once, under the
first name (the owner's); the layout records every other name as an alias
of it (``shared``: alias module path -> owner module path), and loading
makes each alias the owner's module again before any weight is read, so
the saved model is rebuilt exactly - the same module used in the same places.
"""

from __future__ import annotations

import re

from torch import nn

from bench.model.layers import LowRankLinear
from bench.model.targets import set_module

_MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


def shared_modules(model: nn.Module) -> dict[str, str]:
    """Every factor of a LowRankLinear that is also reachable under an earlier name: alias -> owner."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    lowrank = {name for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, LowRankLinear)}
    for name, module in model.named_modules(remove_duplicate=False):
        if name.rpartition(".")[0] not in lowrank:
            continue
        owner = first.setdefault(id(module), name)
        if owner != name:
            aliases[name] = owner
    return aliases


def alias_weights(shared: dict[str, str]) -> dict[str, str]:
    """The state-dict keys of the aliases' tensors, each with its owner's key (what the file holds)."""
    return {f"{alias}.weight": f"{owner}.weight" for alias, owner in shared.items()}


def layout_error(shared, ranks: dict) -> str | None:
    """What is wrong with a layout's ``shared`` entry (None: nothing); both ends must be factors of ranked layers."""
    if not isinstance(shared, dict):
        return "shared must map module names to module names"
    for alias, owner in shared.items():
        for name in (alias, owner):
            if not (isinstance(name, str) and _MODULE_PATH.fullmatch(name) and "__" not in name):
                return f"shared module name {name!r} is not a module path"
            if name.rpartition(".")[0] not in ranks or name.rpartition(".")[2] not in ("down", "up"):
                return f"shared module {name} is not a factor of a compressed matrix"
        if alias == owner or owner in shared:
            return f"shared module {alias} must name an owner that is no alias itself, not {owner}"
    return None


def tie_modules(model: nn.Module, shared: dict[str, str]) -> None:
    """Make every alias the owner's module (shapes must agree: the layout is checked, never repaired)."""
    for alias, owner in shared.items():
        mine, theirs = model.get_submodule(alias), model.get_submodule(owner)
        if not isinstance(theirs, nn.Linear) or getattr(mine, "weight", None) is None \
                or mine.weight.shape != theirs.weight.shape:
            raise ValueError(f"{alias} cannot share {owner}: their shapes differ")
        set_module(model, alias, theirs)
