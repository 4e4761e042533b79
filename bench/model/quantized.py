"""Weight-only quantization of linears with HQQ, stored bit-packed.

:class:`QuantizedLinear` holds what a deployment would hold: the bit-packed
integer weights from HQQ (calibration-free, half-quadratic optimized
zero points and scales), one scale and one zero point per group of
``group_size`` consecutive weights (stored in ``meta_dtype``, float16 by
default, as HQQ does on GPUs), and the bias. Its ``storage_bytes()`` counts
exactly those tensors, so :func:`bench.model.targets.footprint` reports real bytes.
The forward pass dequantizes the weight and calls ``F.linear`` (simple and
exact to the stored values; no fused low-bit kernel on CPU).

Grouping: the weight is flattened row by row and cut into groups of
``group_size`` values (HQQ's ``axis=1``); when ``in_features`` is a multiple
of ``group_size`` every group lies inside one row. The flat weight is
zero-padded to a multiple of ``4 * group_size`` values (HQQ's packers need
whole rows; factors of arbitrary rank ``r`` need the padding), and the
padding is counted in the bytes.

:class:`GPTQLinear` holds a linear quantized with GPTQ (Frantar et al., ICLR
2023) through GPTQModel (the optional ``svdbench[gptq]`` extra; imported only
when a layer is quantized, because its import is slow and rewrites
environment variables - they are restored here). GPTQ needs the gram of the
layer's input, ``G = X X^T``, the statistic svdbench collects anyway; it
runs on a CPU copy of the weight (GPTQModel's per-linear API), and the layer
then joins the model on its device. The layer stores GPTQModel's packed format as it would be deployed: ``qweight``
(int32 words, ``bits`` per weight, input-major), ``qzeros`` (int32 words, one
zero point per group and output), ``scales`` (float16, per group and output)
and ``g_idx`` (int32, the group of every input channel), plus the bias. The
packer needs input and output sizes divisible by 32, so the weight is
zero-padded to them first (a low-rank factor's rank rarely is); the padding
is counted in the bytes and sliced off before computing. Dequantizing reads
the packed words as one little-endian bit stream per column (the layout of
GPTQModel's packer for 2, 3, 4 and 8 bits, tested against its own
dequantization), so a saved model evaluates without GPTQModel installed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import UsageError
from bench.model.targets import set_module

log = logging.getLogger(__name__)

BITS = (2, 3, 4, 8)
GPTQ_GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)  # what GPTQModel's packed layers accept
GPTQ_INSTALL = "pip install 'svdbench[gptq]'"  # the extra pins gptqmodel==7.6.0
META_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _packing(nbits: int) -> str:
    from hqq.core.quantize import Quantizer

    return Quantizer.bit_to_packing[nbits]


class QuantizedLinear(nn.Module):
    """``y = dequant(W_q) x + b`` with HQQ bit-packed weights."""

    def __init__(self, in_features: int, out_features: int, nbits: int, group_size: int,
                 packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.nbits, self.group_size, self.compute_dtype = nbits, group_size, compute_dtype
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def quantize(cls, linear: nn.Linear, nbits: int, group_size: int = 64,
                 meta_dtype: torch.dtype = torch.float16) -> QuantizedLinear:
        """Quantize ``linear``'s weight with HQQ (no calibration data)."""
        from hqq.core.quantize import Quantizer

        if nbits not in BITS:
            raise UsageError(f"cannot quantize to {nbits} bits; use one of {', '.join(map(str, BITS))}")
        if group_size < 1:
            raise UsageError(f"quantization group size must be >= 1, got {group_size}")
        weight = linear.weight.detach()
        flat = weight.float().reshape(-1)
        # HQQ packs 4 (2-bit) or 2 (4-bit) groups per row: pad the group count to a multiple of 4.
        groups = 4 * math.ceil(flat.numel() / (4 * group_size))
        flat = F.pad(flat, (0, groups * group_size - flat.numel()))
        packed, meta = Quantizer.quantize(flat.reshape(groups, group_size), nbits=nbits, group_size=group_size,
                                          axis=1, optimize=True, bitpack=True, device=str(weight.device))
        scale, zero = meta["scale"].to(meta_dtype), meta["zero"].to(meta_dtype)
        for label, t in (("scale", scale), ("zero point", zero)):
            if not torch.isfinite(t).all():
                raise FloatingPointError(f"HQQ produced a non-finite {label} quantizing a {tuple(weight.shape)} weight to {nbits} bits")
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(linear.in_features, linear.out_features, nbits, group_size, packed.contiguous(),
                   scale.contiguous(), zero.contiguous(), bias, compute_dtype=weight.dtype)

    def dequantize(self) -> torch.Tensor:
        """The weight the layer computes with (``out x in``)."""
        from hqq.core.quantize import Quantizer

        levels = Quantizer.unpack[_packing(self.nbits)](self.packed, dtype=torch.float32)[:self.scale.shape[0]]
        weight = (levels - self.zero.float()) * self.scale.float()
        return weight.reshape(-1)[:self.in_features * self.out_features].reshape(
            self.out_features, self.in_features).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def storage_bytes(self) -> int:
        """Bytes of the packed weight, scales, zero points and bias."""
        tensors = [self.packed, self.scale, self.zero] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def storage_params(self) -> int:
        """Logical parameters: the weights represented plus the bias."""
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def quantization(self) -> dict:
        """How this layer was quantized, for manifests."""
        return {"quantizer": "hqq", "nbits": self.nbits, "group_size": self.group_size,
                "packing": _packing(self.nbits), "meta_dtype": str(self.scale.dtype).removeprefix("torch.")}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nbits={self.nbits}, group_size={self.group_size}"


def quantize_linears(model: nn.Module, names: list[str], nbits: int, group_size: int = 64,
                     meta_dtype: torch.dtype = torch.float16) -> dict[str, dict]:
    """Replace each named ``nn.Linear`` of ``model`` by a :class:`QuantizedLinear`, in place.

    Returns per-layer bytes before and after, for the record.
    """
    layers = {}
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise UsageError(f"cannot quantize {name}: it is a {type(linear).__name__}, not an nn.Linear")
        before = sum(p.numel() * p.element_size() for p in linear.parameters())
        quantized = QuantizedLinear.quantize(linear, nbits, group_size, meta_dtype)
        set_module(model, name, quantized)
        layers[name] = {"bytes_before": before, "bytes": quantized.storage_bytes()}
    return layers


# --------------------------------------------------------------------------- GPTQ

@contextlib.contextmanager
def _environment_kept(**overrides: str):
    """Run a block with ``overrides`` set and every environment variable restored afterwards."""
    saved = dict(os.environ)
    os.environ.update(overrides)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _gptqmodel():
    """GPTQModel's function-level API: ``(GPTQ, QuantizeConfig, TorchLinear)``.

    Imported on first use only: the import takes seconds, prints a banner and
    sets environment variables (HF_HOME among them); the banner is logged at
    debug level and the environment restored.
    """
    banner = io.StringIO()
    try:
        with _environment_kept(), contextlib.redirect_stdout(banner), contextlib.redirect_stderr(banner):
            from gptqmodel.nn_modules.qlinear.torch import TorchLinear
            from gptqmodel.quantization import GPTQ, QuantizeConfig
    except ImportError as error:
        raise UsageError(f"GPTQ needs the gptqmodel package ({error}); install it with {GPTQ_INSTALL}") from None
    log.debug("gptqmodel imported: %s", banner.getvalue().strip())
    return GPTQ, QuantizeConfig, TorchLinear


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def unpack_stream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` ``bits``-wide values of each column of ``words`` (int32, rows x columns).

    Each column's words are one little-endian bit stream: value ``i`` sits at
    bits ``[i*bits, (i+1)*bits)``, spilling into the next word when it crosses
    a word boundary (3-bit values do).
    """
    stream = words.to(torch.int64) & 0xFFFFFFFF  # the words as unsigned 32-bit numbers
    position = torch.arange(count, device=words.device) * bits
    index, offset = position // 32, (position % 32)[:, None]
    values = stream[index] >> offset
    spills = (offset + bits > 32).flatten()
    if bool(spills.any()):
        following = stream[(index + 1).clamp(max=stream.shape[0] - 1)] << (32 - offset)
        values = torch.where(spills[:, None], values | following, values)
    return values & ((1 << bits) - 1)


class GPTQLinear(nn.Module):
    """``y = dequant(W_q) x + b`` with GPTQ weights in GPTQModel's packed int32 format."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, qweight: torch.Tensor,
                 qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bias: torch.Tensor | None,
                 sym: bool = True, desc_act: bool = False, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym, self.desc_act = bits, group_size, sym, desc_act
        self.compute_dtype = compute_dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("qzeros", qzeros)
        self.register_buffer("scales", scales)
        self.register_buffer("g_idx", g_idx)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def quantize(cls, linear: nn.Linear, gram: torch.Tensor, bits: int, group_size: int = 64, sym: bool = False,
                 desc_act: bool = False, damp: float = 0.01) -> GPTQLinear:
        """GPTQ of ``linear``'s weight against ``gram`` (``X X^T`` of its inputs, any positive scale).

        Asymmetric unless ``sym``; GPTQModel's activation-group-aware column
        order unless ``desc_act`` (GPTQ's act-order) is asked for; ``damp``
        times the mean diagonal added to the Hessian (raised by GPTQModel
        until it factorizes). GPTQ runs on a CPU copy of the weight; the layer
        is returned on the weight's device.
        """
        if bits not in BITS:
            raise UsageError(f"cannot quantize to {bits} bits; use one of {', '.join(map(str, BITS))}")
        if group_size not in GPTQ_GROUP_SIZES:
            raise UsageError(f"GPTQ group size {group_size} is not supported; use one of "
                             f"{', '.join(map(str, GPTQ_GROUP_SIZES))}")
        GPTQ, QuantizeConfig, TorchLinear = _gptqmodel()
        weight = linear.weight.detach()
        out_features, in_features = weight.shape
        if gram.shape != (in_features, in_features):
            raise ValueError(f"gram of shape {tuple(gram.shape)} does not fit a {tuple(weight.shape)} weight")
        rows, columns = _round_up(out_features, 32), _round_up(in_features, 32)
        padded = nn.Linear(columns, rows, bias=False, dtype=torch.float32)
        hessian = torch.zeros(columns, columns, dtype=torch.float32)
        with torch.no_grad():
            padded.weight.zero_()
            padded.weight[:out_features, :in_features] = weight.float().cpu()  # GPTQ runs on the CPU here
            g = gram.detach().to("cpu", torch.float64)
            scale = float(g.diagonal().mean())
            # GPTQ's H is 2 X X^T / tokens; its result does not depend on H's scale, so H is set to mean diagonal 1
            hessian[:in_features, :in_features] = (g / scale if scale > 0 else g).float()
        config = QuantizeConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act,
                                act_group_aware=not desc_act, damp_percent=damp, offload_to_disk=False)
        with _environment_kept():
            gptq = GPTQ(padded, config)
            gptq.quantizer.configure(perchannel=True)
            gptq.H, gptq.nsamples = hessian, 1
            quantized, scales, zeros, g_idx, *_ = gptq.quantize()
        if not (torch.isfinite(quantized).all() and torch.isfinite(scales).all()):
            raise FloatingPointError(f"GPTQ produced non-finite values quantizing a {tuple(weight.shape)} weight "
                                     f"to {bits} bits")
        with torch.no_grad():
            padded.weight.copy_(quantized)
        packer = TorchLinear(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, in_features=columns,
                             out_features=rows, bias=False, pack_dtype=torch.int32)
        with _environment_kept(GPTQMODEL_DISABLE_PACK_EXT="1"):  # its C++ packer would be compiled on first use
            packer.pack_block(padded, scales, zeros, g_idx)
        bias = linear.bias.detach().clone().cpu() if linear.bias is not None else None
        layer = cls(in_features, out_features, bits, group_size, packer.qweight.contiguous(),
                    packer.qzeros.contiguous(), packer.scales.contiguous(), packer.g_idx.to(torch.int32).contiguous(),
                    bias, sym=sym, desc_act=desc_act, compute_dtype=weight.dtype)
        return layer.to(weight.device)  # where the model it joins lives

    def dequantize(self) -> torch.Tensor:
        """The weight the layer computes with (``out x in``)."""
        columns, rows = self.g_idx.numel(), self.scales.shape[1]
        codes = unpack_stream(self.qweight, self.bits, columns)  # in x out
        zeros = unpack_stream(self.qzeros.T, self.bits, rows).T  # groups x out
        groups = self.g_idx.long()
        weight = self.scales.float()[groups] * (codes - zeros[groups]).float()
        return weight.T[:self.out_features, :self.in_features].to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def storage_bytes(self) -> int:
        """Bytes of the packed weights and zero points, the scales, the group index and the bias (padding included)."""
        tensors = [self.qweight, self.qzeros, self.scales, self.g_idx] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def storage_params(self) -> int:
        """Logical parameters: the weights represented plus the bias."""
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def quantization(self) -> dict:
        """How this layer was quantized, for manifests."""
        return {"quantizer": "gptq", "nbits": self.bits, "group_size": self.group_size, "sym": self.sym,
                "desc_act": self.desc_act, "packing": "gptq int32"}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}")


def gptq_quantize_linears(model: nn.Module, grams: dict[str, torch.Tensor], bits: int, group_size: int = 64,
                          sym: bool = False, desc_act: bool = False, damp: float = 0.01) -> dict[str, dict]:
    """Replace each ``nn.Linear`` named in ``grams`` by a :class:`GPTQLinear`, in place, in the given order.

    ``grams[name]`` is ``X X^T`` of that linear's inputs. Returns per-layer
    bytes before and after, for the record.
    """
    layers = {}
    for name, gram in grams.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise UsageError(f"cannot quantize {name}: it is a {type(linear).__name__}, not an nn.Linear")
        before = sum(p.numel() * p.element_size() for p in linear.parameters())
        quantized = GPTQLinear.quantize(linear, gram, bits, group_size, sym, desc_act, damp)
        set_module(model, name, quantized)
        layers[name] = {"bytes_before": before, "bytes": quantized.storage_bytes()}
    return layers
