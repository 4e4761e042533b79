"""The layer that replaces a compressed ``nn.Linear``: two thin linears."""

from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """``y = W_u (W_v x) + b``: two linears replacing one ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)  # W_v
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)  # W_u

    @classmethod
    def from_factors(cls, w_u: torch.Tensor, w_v: torch.Tensor, bias: torch.Tensor | None) -> LowRankLinear:
        layer = cls(w_v.shape[1], w_u.shape[0], w_u.shape[1], bias is not None, dtype=w_u.dtype, device=w_u.device)
        with torch.no_grad():
            layer.up.weight.copy_(w_u)
            layer.down.weight.copy_(w_v)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
