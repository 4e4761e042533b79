"""Attention that caches low-rank latents instead of keys and values (Palu's latent KV cache, in plain torch).

Keys and values of a decoder block are made by grouped low-rank projections:
the ``n_kv`` key/value heads are cut into ``G`` groups of ``g`` heads, and
group ``i`` computes ``K_i = B_i h_i`` (``g d_h x r``) from its latent
``h_i = A_i x`` (``r`` numbers per token). :class:`LatentKVAttention` stores
``h`` for keys and values in the model's ordinary transformers ``Cache``
(``DynamicCache`` or ``StaticCache``: a latent is laid out as ``G`` "heads"
of width ``r``), so the cache holds ``G (r_k + r_v)`` numbers per token and
layer instead of ``2 n_kv d_h``. When attention reads the cache:

- keys are rebuilt, ``B_k h_k`` for every cached position, and RoPE is
  applied to them at their positions (RoPE sits between the up-projection
  and the dot product, so it cannot be folded into the query);
- values are never rebuilt: attention weights the *latents*, and the value
  up-projection is folded into the output projection per query head,
  ``O_h B_{v,i(h)}`` (``hidden x r_v``), with ``B_v``'s bias folded into
  ``o_proj``'s bias (attention weights sum to one).

The same code runs on every device (no Triton, no custom kernel); the
attention itself is the model's configured transformers attention function.
Positions of cached keys are ``0 .. T-1`` (no left padding).
"""

from __future__ import annotations

import torch
from torch import nn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x`` (batch x heads x tokens x d) with ``cos``/``sin`` of batch x tokens x d."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class LatentKVAttention(nn.Module):
    """A Llama-style attention block whose cache holds key and value latents (see the module docstring).

    ``k_down``/``v_down``: ``n -> G r`` linears (the concatenated ``A_i``); ``k_up``: ``G x g d_h x r_k``;
    ``o_proj``: ``H r_v -> hidden``, the value up-projection folded in. ``q_proj`` is the original one.
    """

    def __init__(self, config, layer_idx: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
                 group_size: int, k_rank: int, v_rank: int, k_bias: bool, o_bias: bool, q_bias: bool,
                 scaling: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        if kv_heads % group_size or heads % kv_heads:
            raise ValueError(f"group size {group_size} must divide the {kv_heads} key/value heads")
        self.config, self.layer_idx = config, layer_idx
        self.head_dim, self.heads, self.kv_heads, self.group_size = head_dim, heads, kv_heads, group_size
        self.groups = kv_heads // group_size
        self.k_rank, self.v_rank = int(k_rank), int(v_rank)
        self.num_key_value_groups = heads // kv_heads
        self.scaling, self.is_causal = scaling, True
        self.attention_dropout = float(getattr(config, "attention_dropout", 0.0) or 0.0)
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=q_bias, dtype=dtype)
        self.k_down = nn.Linear(hidden, self.groups * self.k_rank, bias=False, dtype=dtype)
        self.k_up = nn.Parameter(torch.zeros(self.groups, group_size * head_dim, self.k_rank, dtype=dtype))
        self.k_bias = nn.Parameter(torch.zeros(kv_heads * head_dim, dtype=dtype)) if k_bias else None
        self.v_down = nn.Linear(hidden, self.groups * self.v_rank, bias=False, dtype=dtype)
        self.o_proj = nn.Linear(heads * self.v_rank, hidden, bias=o_bias, dtype=dtype)
        self.__dict__["rotary"] = None  # the model's rotary embedding, not a submodule (set by install)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_factors(cls, attention: nn.Module, layer_idx: int, group_size: int, k_down: torch.Tensor,
                     k_up: torch.Tensor, v_down: torch.Tensor, v_up: torch.Tensor) -> LatentKVAttention:
        """Replace a Llama-style ``attention`` (q/k/v/o_proj) by the latent form of the grouped factors.

        ``k_down``/``v_down``: ``G r x n`` (group-major rows); ``k_up``/``v_up``: ``G x g d_h x r``.
        """
        unsupported = [key for key in ("q_norm", "k_norm", "sliding_window", "attn_logit_softcapping")
                       if getattr(attention, key, None) is not None]
        if unsupported:  # computed by the original attention and not by this one: refuse rather than differ
            raise ValueError(f"latent KV attention supports Llama-style attention only; this one has "
                             f"{', '.join(unsupported)}")
        q, k, v, o = attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj
        d = attention.head_dim
        heads, kv_heads = q.out_features // d, k.out_features // d
        groups = kv_heads // group_size
        dtype, device = q.weight.dtype, q.weight.device
        module = cls(attention.config, layer_idx, q.in_features, heads, kv_heads, d, group_size,
                     k_up.shape[-1], v_up.shape[-1], k.bias is not None,
                     o.bias is not None or v.bias is not None, q.bias is not None,
                     float(attention.scaling), dtype)
        with torch.no_grad():
            module.q_proj.weight.copy_(q.weight)
            if q.bias is not None:
                module.q_proj.bias.copy_(q.bias)
            module.k_down.weight.copy_(k_down)
            module.k_up.copy_(k_up)
            if k.bias is not None:
                module.k_bias.copy_(k.bias)
            module.v_down.weight.copy_(v_down)
            w_o = o.weight.detach().to(torch.float64)
            v_up64 = v_up.to(torch.float64).reshape(groups, group_size, d, -1)
            fused = []
            for h in range(heads):
                kv = h // (heads // kv_heads)
                fused.append(w_o[:, h * d:(h + 1) * d] @ v_up64[kv // group_size, kv % group_size])
            module.o_proj.weight.copy_(torch.cat(fused, dim=1))
            if module.o_proj.bias is not None:
                bias = o.bias.detach().to(torch.float64) if o.bias is not None else torch.zeros(o.out_features,
                                                                                                dtype=torch.float64)
                if v.bias is not None:  # sum_t p_t (B h_t + b) = B sum_t p_t h_t + b
                    b_v = v.bias.detach().to(torch.float64)
                    for h in range(heads):
                        kv = h // (heads // kv_heads)
                        bias = bias + w_o[:, h * d:(h + 1) * d] @ b_v[kv * d:(kv + 1) * d]
                module.o_proj.bias.copy_(bias)
        return module.to(device)

    # ------------------------------------------------------------------ the cache
    def latent_width(self) -> int:
        """Numbers cached per token (keys + values) by this layer."""
        return self.groups * (self.k_rank + self.v_rank)

    def dense_width(self) -> int:
        """Numbers a plain key/value cache holds per token for this layer."""
        return 2 * self.kv_heads * self.head_dim

    def rebuilt_keys(self, latents: torch.Tensor) -> torch.Tensor:
        """``B_k h_k`` (+ bias) for latents of batch x G x T x r_k: batch x n_kv x T x d_h, before RoPE."""
        b, _, t, _ = latents.shape
        keys = torch.einsum("bgtr,gor->bgto", latents, self.k_up)
        keys = keys.reshape(b, self.groups, t, self.group_size, self.head_dim).transpose(2, 3)
        keys = keys.reshape(b, self.kv_heads, t, self.head_dim)
        if self.k_bias is not None:
            keys = keys + self.k_bias.view(1, self.kv_heads, 1, self.head_dim)
        return keys

    def key_rotary(self, keys: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of positions 0 .. length-1 (batch x length x d_h), shared by the layers of one decoding step
        (one entry kept on the rotary module; not when compiling, where the graph computes it)."""
        b = keys.shape[0]
        key = (length, b, keys.device, keys.dtype)
        memo = None if torch.compiler.is_compiling() else self.rotary.__dict__.setdefault("_latent_kv_memo", {})
        if memo is not None and key in memo:
            return memo[key]
        positions = torch.arange(length, device=keys.device)[None].expand(b, -1)
        k_cos, k_sin = self.rotary(keys, positions)
        found = (k_cos.to(keys.dtype), k_sin.to(keys.dtype))
        if memo is not None:
            memo.clear()
            memo[key] = found
        return found

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import eager_attention_forward

        cache = cache if cache is not None else past_key_values
        b, t, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        h_k = self.k_down(hidden_states).view(b, t, self.groups, self.k_rank).transpose(1, 2)
        h_v = self.v_down(hidden_states).view(b, t, self.groups, self.v_rank).transpose(1, 2)
        cos, sin = position_embeddings
        query = _rope(query, cos, sin)
        if cache is not None:
            h_k, h_v = cache.update(h_k, h_v, self.layer_idx, kwargs=kwargs)
        length = h_k.shape[-2]
        keys = self.rebuilt_keys(h_k)
        if length == t:  # nothing cached before: the keys are the queries' positions
            keys = _rope(keys, cos, sin)
        else:  # cached positions 0 .. T-1
            keys = _rope(keys, *self.key_rotary(keys, length))
        values = h_v if self.group_size == 1 else h_v.repeat_interleave(self.group_size, dim=1)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = interface(self, query, keys, values, attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout,
                                 scaling=self.scaling, **kwargs)
        out = out.reshape(b, t, -1).contiguous()
        return self.o_proj(out), weights


def latent_layers(model: nn.Module) -> list[LatentKVAttention]:
    return [m for m in model.modules() if isinstance(m, LatentKVAttention)]


def attach_rotary(model: nn.Module) -> None:
    """Point every latent attention at the model's rotary embedding (after building, loading or copying)."""
    rotary = next((m for n, m in model.named_modules() if n.endswith("rotary_emb")), None)
    if rotary is None:
        raise ValueError("the model has no rotary embedding (rotary_emb) for the latent attention's keys")
    for layer in latent_layers(model):
        layer.__dict__["rotary"] = rotary


def kv_accounting(model: nn.Module, element_size: int) -> dict:
    """KV-cache bytes per token of ``model`` (latent layers at their latent width) against the plain cache."""
    layers = latent_layers(model)
    if not layers:
        return {}
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    total = int(text.num_hidden_layers)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    dense = 2 * total * text.num_key_value_heads * head_dim
    kept = dense - sum(layer.dense_width() - layer.latent_width() for layer in layers)
    return {"kv_bytes_per_token": kept * element_size, "dense_kv_bytes_per_token": dense * element_size,
            "kv_ratio_achieved": 1 - kept / dense}


def kv_summary(model: nn.Module, kv_ratio: float | None) -> dict:
    """What a record says about the KV cache: the KV ratio asked (``kv_ratio``, a KV method's ratio), the bytes per
    token the model's cache holds and the ratio achieved; empty for a model with a plain cache and no KV ratio."""
    first = next(model.parameters(), None)
    facts = kv_accounting(model, first.element_size() if first is not None else 4)
    if kv_ratio is not None:
        facts["kv_ratio"] = kv_ratio
    return facts
