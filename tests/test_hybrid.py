"""HQQ-quantized layers, the SVD + quantization hybrid and its dense baseline (methods/hybrid.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from torch import nn

from bench import factorize, uniform_ranks
from bench.engine.compress import compress_model
from bench.errors import UsageError
from bench.model.quantized import QuantizedLinear
from bench.model.targets import find_targets, footprint
from methods.hybrid import HybridConfig, QuantConfig, quantize_targets


def held_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor the model holds (its state dict, tied tensors once)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def factorized(model, ratio=0.5):
    targets = find_targets(model)
    facts = {t.name: factorize(model.get_submodule(t.name).weight) for t in targets}
    compressed, _ = compress_model(model, targets, facts, uniform_ranks(targets, ratio))
    return compressed, targets


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_layer_bytes_are_the_tensors_it_holds(bits):
    torch.manual_seed(0)
    linear = nn.Linear(96, 42, bias=True)  # 4032 weights: 63 groups of 64, padded to 64 groups
    q = QuantizedLinear.quantize(linear, bits, group_size=64)
    held = sum(t.numel() * t.element_size() for t in q.state_dict().values())
    assert q.storage_bytes() == held
    assert q.storage_params() == 96 * 42 + 42
    packed_bits = q.packed.numel() * q.packed.element_size() * 8
    values = 64 * 64
    # 2/4 bits pack exactly; 3 bits pack 10 values per 32-bit word
    assert packed_bits == (values * bits if bits != 3 else 32 * 64 * -(-64 // 10))
    assert q.scale.dtype == torch.float16 and q.scale.numel() == 64


def test_model_footprint_counts_real_bytes():
    model, targets = factorized(tiny_model("llama"))
    before = footprint(model)
    facts = quantize_targets(model, [t.name for t in targets], bits=2, group_size=64, meta_dtype="float16")
    after = footprint(model)
    assert after["bytes"] == held_bytes(model)
    assert after["params"] == before["params"]  # logical parameters are unchanged
    assert before["bytes"] - after["bytes"] == facts["bytes_before"] - facts["bytes_after"]
    assert facts["linears_quantized"] == 2 * len(targets)


def test_four_bit_factors_stay_close_and_fewer_bits_are_worse():
    model, targets = factorized(tiny_model("llama", seed=1))
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
    errors = {}
    for bits in (2, 4):
        quantized, _ = factorized(tiny_model("llama", seed=1))
        quantize_targets(quantized, [t.name for t in targets], bits, 64, "float16")
        with torch.no_grad():
            out = quantized(ids).logits
        errors[bits] = float((out - reference).norm() / reference.norm())
    # random Gaussian weights are the hard case for 4 bits: about 6% weight error per matrix (measured)
    assert errors[4] < 0.1, errors
    assert errors[2] > 3 * errors[4], errors


def test_quantized_layer_matches_its_dequantized_weight():
    torch.manual_seed(0)
    linear = nn.Linear(64, 20)
    q = QuantizedLinear.quantize(linear, 4)
    x = torch.randn(3, 64)
    assert torch.allclose(q(x), x @ q.dequantize().T + linear.bias, atol=1e-6)
    assert float((q.dequantize() - linear.weight).norm() / linear.weight.norm()) < 0.1


def test_configs_reject_bad_settings(registry):
    with pytest.raises(UsageError, match="bits"):
        QuantConfig(bits=5)
    with pytest.raises(UsageError, match="bits"):
        HybridConfig(bits=5)
    # the base is a method name, checked when the method is made for a run
    with pytest.raises(UsageError, match="unknown method 'nope'"):
        registry.method_factory({"svdllm_quant": {"base": "nope"}})("svdllm_quant")
    with pytest.raises(UsageError, match="base cannot be svdllm_quant itself"):
        registry.method_factory({"svdllm_quant": {"base": "svdllm_quant"}})("svdllm_quant")
    with pytest.raises(UsageError, match="base=hqq removes no parameters"):
        registry.method_factory({"svdllm_quant": {"base": "hqq"}})("svdllm_quant")


def test_runner_rows_for_hybrid_and_dense_quantization(tiny, tmp_path):
    from bench.engine.config import CalibrationConfig, RunConfig
    from bench.engine.executor import run

    config = RunConfig(model="tiny", methods=("svd", "svdllm_quant", "hqq"), ratios=(0.5,), tasks=("wikitext2",),
                       seqlen=64, limit=1, calibration=CalibrationConfig(samples=2, seqlen=64),
                       method_options={"svdllm_quant": {"bits": "2"}, "hqq": {"bits": 2}}, out=str(tmp_path / "run"))
    results = run(config, loaded=tiny)
    assert not results.data["failures"], results.data["failures"]
    rows = {r["method"]: r for r in results.records}
    assert rows["hqq"]["bytes"] < rows["dense"]["bytes"]
    assert rows["svdllm_quant"]["bytes"] < rows["svd"]["bytes"]
    assert rows["svdllm_quant"]["bytes"] < rows["hqq"]["bytes"]
    assert rows["hqq"]["params"] == rows["dense"]["params"]
    # the weight bits are part of the record, so reports tell quantized rows apart
    assert rows["svdllm_quant"]["bits"] == rows["hqq"]["bits"] == 2 and rows["svd"]["bits"] is None
    assert rows["svdllm_quant"]["variant"] == "2-bit" and rows["hqq"]["ratio"] == 0.0
    facts = results.data["compressions"][rows["svdllm_quant"]["compression"]]["facts"]
    assert facts["refine"]["quantization"]["bits"] == 2
    assert rows["svdllm_quant"]["config"]["base_config"] == {}  # svdllm_w, the default base, has no settings
    assert results.manifest["methods"]["svdllm_quant"]["bits"] == 2
