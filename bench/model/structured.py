"""Structurally smaller layers of the same types (MoDeGPT): attention with its own head dimensions, resized MLPs.

:class:`StructuredAttention` replaces a Llama-style attention module (``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, rotate-half RoPE applied to full heads): every
query/key head keeps ``qk_dim`` of its ``head_dim`` channels and every value/output
head ``vo_dim``. The kept query/key channels of each key-value head are stored as
``rope_index`` (``kv_heads x qk_dim``, original channel numbers, in the order
``[P, P + head_dim/2]`` so that rotate-half pairs the same channels as before): RoPE's
cos/sin are gathered at those channels, and a query head uses its key-value head's.
The attention scale stays ``head_dim^-1/2`` of the original model: the scores
``q_S . k_S`` are the original scores with channels removed, not a new attention.
Keys and values go to the cache at their reduced sizes, so the KV cache shrinks by
``(qk_dim + vo_dim) / (2 head_dim)``.

MLPs need no new module: their linears are replaced by smaller ``nn.Linear``s (the
forward passes only read the linears). :func:`structured_layout` records both in a
saved model's manifest (``structured``); :func:`apply_structured_layout` rebuilds them
(empty) in a freshly built architecture before the weights are loaded.
"""

from __future__ import annotations

import torch
from torch import nn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention_shape(module: nn.Module) -> dict:
    """Heads, key-value heads, head dim and hidden size of a Llama-style attention module; refuses others."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if not all(isinstance(getattr(module, n, None), nn.Linear) for n in names):
        raise ValueError(f"{type(module).__name__} is not a q/k/v/o attention: structured attention needs one")
    if any(hasattr(module, n) for n in ("q_norm", "k_norm", "query_key_value")):
        raise ValueError(f"{type(module).__name__} normalizes queries/keys per head: not supported")
    if any(getattr(module, n).bias is not None for n in ("q_proj", "k_proj", "v_proj")):
        raise ValueError(f"{type(module).__name__} has q/k/v biases: not supported")
    head_dim = int(module.head_dim)
    heads = module.q_proj.out_features // head_dim
    kv_heads = module.k_proj.out_features // head_dim
    return {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "hidden": module.q_proj.in_features}


class StructuredAttention(nn.Module):
    """Llama-style attention with ``qk_dim`` query/key and ``vo_dim`` value channels per head (module docstring)."""

    shape_of = staticmethod(attention_shape)

    def __init__(self, original: nn.Module, qk_dim: int, vo_dim: int, dtype: torch.dtype | None = None,
                 device=None):
        super().__init__()
        shape = attention_shape(original)
        self.config, self.layer_idx = original.config, original.layer_idx
        self.heads, self.kv_heads, self.head_dim = shape["heads"], shape["kv_heads"], shape["head_dim"]
        if qk_dim % 2 or not 0 < qk_dim <= self.head_dim or not 0 < vo_dim <= self.head_dim:
            raise ValueError(f"qk_dim {qk_dim} (even) and vo_dim {vo_dim} must lie in 1..{self.head_dim}")
        self.qk_dim, self.vo_dim = int(qk_dim), int(vo_dim)
        self.num_key_value_groups = self.heads // self.kv_heads
        self.scaling = float(getattr(original, "scaling", self.head_dim ** -0.5))  # the original scale, unchanged
        self.is_causal = True
        self.attention_dropout = 0.0
        self.sliding_window = getattr(original, "sliding_window", None)
        hidden = shape["hidden"]
        dtype = dtype or original.q_proj.weight.dtype
        kw = {"dtype": dtype, "device": device}
        self.q_proj = nn.Linear(hidden, self.heads * self.qk_dim, bias=False, **kw)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.qk_dim, bias=False, **kw)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.vo_dim, bias=False, **kw)
        self.o_proj = nn.Linear(self.heads * self.vo_dim, hidden, bias=original.o_proj.bias is not None, **kw)
        half = self.head_dim // 2
        keep = torch.arange(self.qk_dim // 2)
        default = torch.cat([keep, keep + half]).repeat(self.kv_heads, 1)
        self.register_buffer("rope_index", default.to(device=device))

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None,
                **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import eager_attention_forward

        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_values", None)
        batch, length = hidden_states.shape[:2]
        q = self.q_proj(hidden_states).view(batch, length, self.heads, self.qk_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, length, self.kv_heads, self.qk_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, length, self.kv_heads, self.vo_dim).transpose(1, 2)
        cos, sin = position_embeddings  # batch x length x head_dim
        index = self.rope_index.reshape(-1)
        cos_k = cos.index_select(-1, index).view(cos.shape[0], length, self.kv_heads, self.qk_dim).transpose(1, 2)
        sin_k = sin.index_select(-1, index).view(sin.shape[0], length, self.kv_heads, self.qk_dim).transpose(1, 2)
        cos_q = cos_k.repeat_interleave(self.num_key_value_groups, dim=1)
        sin_q = sin_k.repeat_interleave(self.num_key_value_groups, dim=1)
        q = q * cos_q + _rotate_half(q) * sin_q
        k = k * cos_k + _rotate_half(k) * sin_k
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)  # as transformers' Llama passes it
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        extra = {"sliding_window": self.sliding_window} if self.sliding_window else {}
        out, weights = interface(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **extra, **kwargs)
        out = out.reshape(batch, length, -1).contiguous()
        return self.o_proj(out), weights


# --------------------------------------------------------------------------- saving and reloading

def structured_layout(model: nn.Module) -> dict:
    """The manifest entry of a model with structured layers (empty: none): every StructuredAttention's dims and the
    shape of every other linear inside the decoder blocks (the resized MLPs among them)."""
    attention = {name: {"qk_dim": m.qk_dim, "vo_dim": m.vo_dim} for name, m in model.named_modules()
                 if isinstance(m, StructuredAttention)}
    if not attention:
        return {}
    inside = tuple(f"{name}." for name in attention)
    linears = {name: [m.out_features, m.in_features, m.bias is not None] for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not name.startswith(inside) and ".layers." in f".{name}"}
    return {"attention": attention, "linears": linears}


def layout_problem(layout) -> str | None:
    """What is wrong with a ``structured`` manifest entry (None: nothing) - the schema, before anything is built."""
    if not isinstance(layout, dict) or set(layout) != {"attention", "linears"}:
        return "structured must hold 'attention' and 'linears'"
    for name, dims in layout["attention"].items():
        if not isinstance(dims, dict) or set(dims) != {"qk_dim", "vo_dim"} or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in dims.values()):
            return f"structured attention {name!r}: dims must be positive integers qk_dim, vo_dim"
    for name, shape in layout["linears"].items():
        if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape[:2])
                and isinstance(shape[2], bool)):
            return f"structured linear {name!r}: shape must be [out, in, bias]"
    return None


def apply_structured_layout(model: nn.Module, layout: dict, dtype: torch.dtype) -> None:
    """Rebuild (empty) the structured layers ``layout`` records in a fresh architecture; ValueError if they do not fit."""
    from bench.model.targets import set_module

    for name, dims in layout["attention"].items():
        original = model.get_submodule(name)
        set_module(model, name, StructuredAttention(original, dims["qk_dim"], dims["vo_dim"], dtype=dtype))
    for name, (out_features, in_features, bias) in layout["linears"].items():
        current = model.get_submodule(name)
        if not isinstance(current, nn.Linear):
            raise ValueError(f"{name} is a {type(current).__name__}, not a linear layer")
        if (current.out_features, current.in_features, current.bias is not None) != (out_features, in_features, bias):
            set_module(model, name, nn.Linear(in_features, out_features, bias=bias, dtype=dtype))
