"""Saving and loading models with latent-KV attention (:mod:`bench.model.latent_attention`).

The manifest's optional ``latent_attention`` entry maps each replaced
attention module's path to its layout (group size, key and value rank per
group, which biases it has); loading puts an empty :class:`LatentKVAttention`
of that layout in place of the architecture's attention before the weights
are read (strictly), so nothing is filled at random.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.errors import UsageError
from bench.model.latent_attention import LatentKVAttention, attach_rotary
from bench.model.targets import set_module

KEYS = ("group_size", "k_rank", "v_rank", "k_bias", "o_bias", "q_bias")


def latent_layout(model: nn.Module) -> dict:
    """``{attention path: layout}`` of every latent attention of ``model`` (empty: none)."""
    return {name: {key: getattr(m, key) for key in ("group_size", "k_rank", "v_rank")}
            | {"k_bias": m.k_bias is not None, "o_bias": m.o_proj.bias is not None, "q_bias": m.q_proj.bias is not None}
            for name, m in model.named_modules() if isinstance(m, LatentKVAttention)}


def validate_latent_layout(layout, where: str) -> None:
    """The manifest's ``latent_attention`` entry against its schema (no tensor read)."""
    if not isinstance(layout, dict):
        raise UsageError(f"{where}: latent_attention must map attention module paths to layouts")
    for name, entry in layout.items():
        ok = isinstance(name, str) and isinstance(entry, dict) and set(entry) == set(KEYS) and all(
            isinstance(entry[k], int) and not isinstance(entry[k], bool) and entry[k] >= 1
            for k in ("group_size", "k_rank", "v_rank")) and all(isinstance(entry[k], bool) for k in KEYS[3:])
        if not ok:
            raise UsageError(f"{where}: latent_attention entry {name!r} is not a layout with {', '.join(KEYS)}; "
                             "re-create the model with svdbench compress")


def rebuild_latent(model: nn.Module, layout: dict, where: str, dtype: torch.dtype) -> None:
    """Replace every recorded attention of ``model`` by an empty latent attention of its layout."""
    for name, entry in layout.items():
        try:
            attention = model.get_submodule(name)
        except AttributeError:
            raise UsageError(f"{where}: latent attention {name} is not a module of the saved architecture") from None
        q, k = getattr(attention, "q_proj", None), getattr(attention, "k_proj", None)
        head_dim = getattr(attention, "head_dim", None)
        if not isinstance(q, nn.Linear) or not isinstance(k, nn.Linear) or not head_dim:
            raise UsageError(f"{where}: {name} is not a Llama-style attention (q/k/v/o_proj, head_dim)")
        heads, kv = q.out_features // head_dim, k.out_features // head_dim
        g, r_k = entry["group_size"], entry["k_rank"]
        if kv % g or r_k > g * head_dim:
            raise UsageError(f"{where}: {name}: group size {g} / key rank {r_k} do not fit {kv} heads of {head_dim}")
        set_module(model, name, LatentKVAttention(
            attention.config, getattr(attention, "layer_idx", 0), q.in_features, heads, kv, head_dim, g, r_k,
            entry["v_rank"], entry["k_bias"], entry["o_bias"], entry["q_bias"], float(attention.scaling), dtype))
    if layout:
        attach_rotary(model)
