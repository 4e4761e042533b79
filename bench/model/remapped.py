"""Dobi-SVD's remapped storage of a low-rank layer: ``min(m, n)`` rows of each factor 8-bit, the rest 16-bit.

A rank-``k`` layer ``W ~ U Sig V^T`` (``W``: ``m x n``, out x in) is stored
as Dobi-SVD's ``modules/remapping.py:DOBI_quantize`` stores it. Let
``lo = min(m, n)``:

- ``m > n``: the first ``lo`` entries of every column of ``U Sig`` and every
  row of ``V^T`` are quantized to 8 bits, the other ``m - n`` entries of
  ``U Sig``'s columns are kept in float16;
- ``m < n``: every column of ``U`` and the first ``lo`` entries of every row
  of ``Sig V^T`` 8-bit, the other ``n - m`` entries of ``Sig V^T`` float16;
- ``m = n``: ``U Sig`` and ``V^T`` 8-bit.

Each quantized vector has its own absmax (stored float16, as the authors
store it) and is coded with bitsandbytes' 8-bit *dynamic* map
(``create_dynamic_map(signed=True)``, rebuilt here in plain torch: no
bitsandbytes, no CUDA), the nearest code value per entry. A layer thus holds
``2 k lo + 2 k (max(m, n) - lo) + 4 k = 2 k max(m, n) + 4 k`` bytes (plus the
bias): a rank up to ``min(m, n)`` fits the 16-bit dense bytes ``2 m n``.
The forward pass dequantizes the two factors and applies them (the saved
bytes are the stored size; the runtime is not).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' ``functional.create_dynamic_map``: 256 sorted float32 code values in [-1, 1]."""
    data: list[float] = []
    non_sign_bits = total_bits - (1 if signed else 0)
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                    else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        boundaries = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


CODE = dynamic_map()


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``rows`` (k x d) as uint8 indices into :data:`CODE` and its float16 absmax (k)."""
    rows = rows.float()
    absmax = rows.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    normed = rows / absmax[:, None]
    code = CODE.to(rows.device)
    upper = torch.bucketize(normed.contiguous(), code).clamp(1, code.numel() - 1)  # code[upper - 1] <= x < code[upper]
    lower = upper - 1
    nearer_upper = (code[upper] - normed).abs() < (normed - code[lower]).abs()
    index = torch.where(nearer_upper, upper, lower)
    return index.to(torch.uint8), absmax.to(torch.float16)


def dequantize_rows(index: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    return CODE.to(index.device)[index.long()] * absmax.float()[:, None]


class RemappedLinear(nn.Module):
    """``y = W_u (W_v x) + b`` with Dobi-SVD's remapped 8-bit/16-bit factors (see the module docstring).

    Buffers: ``us_q`` (uint8, k x lo), ``us_absmax`` (float16, k), ``vt_q`` (uint8, k x lo), ``vt_absmax``
    (float16, k), ``rest`` (float16, k x (max(m, n) - lo): the 16-bit part of ``U Sig`` when m > n, of
    ``Sig V^T`` when m < n; None when m = n).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, us_q: torch.Tensor, us_absmax: torch.Tensor,
                 vt_q: torch.Tensor, vt_absmax: torch.Tensor, rest: torch.Tensor | None, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.compute_dtype = in_features, out_features, rank, compute_dtype
        for name, t in (("us_q", us_q), ("us_absmax", us_absmax), ("vt_q", vt_q), ("vt_absmax", vt_absmax),
                        ("rest", rest)):
            self.register_buffer(name, t)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @staticmethod
    def shapes(in_features: int, out_features: int, rank: int) -> dict[str, tuple[list[int], str]]:
        """The shape and dtype of every stored tensor."""
        lo, hi = min(in_features, out_features), max(in_features, out_features)
        shapes = {"us_q": ([rank, lo], "uint8"), "us_absmax": ([rank], "float16"), "vt_q": ([rank, lo], "uint8"),
                  "vt_absmax": ([rank], "float16")}
        return {**shapes, "rest": ([rank, hi - lo], "float16")} if hi > lo else shapes

    @classmethod
    def from_svd(cls, u: torch.Tensor, s: torch.Tensor, vt: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype = torch.float32) -> RemappedLinear:
        """From the top-``k`` SVD of ``W`` (``u``: m x k, ``s``: k, ``vt``: k x n), as ``DOBI_quantize`` splits it."""
        m, k, n = u.shape[0], u.shape[1], vt.shape[1]
        us, svt = (u * s[None, :]).T.float(), (s[:, None] * vt).float()  # k x m, k x n
        if m > n:
            us_q, us_absmax = quantize_rows(us[:, :n])
            vt_q, vt_absmax = quantize_rows(vt.float())
            rest = us[:, n:]
        elif m < n:
            us_q, us_absmax = quantize_rows(u.T.float())
            vt_q, vt_absmax = quantize_rows(svt[:, :m])
            rest = svt[:, m:]
        else:
            us_q, us_absmax = quantize_rows(us)
            vt_q, vt_absmax = quantize_rows(vt.float())
            rest = None
        bias = bias.detach().clone().to(compute_dtype) if bias is not None else None
        rest = rest.to(torch.float16).contiguous() if rest is not None else None
        return cls(n, m, k, us_q, us_absmax, vt_q, vt_absmax, rest, bias, compute_dtype)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_u, W_v)``: ``m x k`` and ``k x n`` float32, as the stored values give them."""
        us = dequantize_rows(self.us_q, self.us_absmax)  # k x lo
        vt = dequantize_rows(self.vt_q, self.vt_absmax)
        if self.out_features > self.in_features:
            us = torch.cat([us, self.rest.float()], dim=1)
        elif self.out_features < self.in_features:
            vt = torch.cat([vt, self.rest.float()], dim=1)
        return us.T, vt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_u, w_v = (f.to(x.dtype) for f in self.factors())
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if self.rank * (self.in_features + self.out_features) >= self.in_features * self.out_features:
            return F.linear(x, w_u @ w_v, bias)  # as the authors' loader: dense when the factors are not smaller
        return F.linear(F.linear(x, w_v), w_u, bias)

    def storage_bytes(self) -> int:
        tensors = [self.us_q, self.us_absmax, self.vt_q, self.vt_absmax] + ([self.rest] if self.rest is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors + ([self.bias] if self.bias is not None else []))

    def storage_params(self) -> int:
        """Logical parameters: ``k (m + n)`` plus the bias."""
        return self.rank * (self.in_features + self.out_features) + (self.out_features if self.bias is not None else 0)

    def quantization(self) -> dict:
        return {"quantizer": "dobi_remap", "rank": self.rank, "packing": "uint8 dynamic map, per-vector float16 absmax"}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, remapped 8/16-bit"
