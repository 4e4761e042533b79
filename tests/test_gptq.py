"""GPTQ through GPTQModel: the packed layer, its bytes, the hybrid's grams, runs and saved models.

Needs the ``svdbench[gptq]`` extra (``tox -e tests`` installs it); without it
only the test of the install message runs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from torch import nn

from bench import GPTQLinear, LowRankLinear, factorize, load_results, uniform_ranks
from bench.engine.compress import compress_model
from bench.engine.config import CalibrationConfig, RunConfig
from bench.engine.executor import run
from bench.engine.plugins import load_registry
from bench.engine.workspace import Workspace
from bench.errors import UsageError
from bench.model.loaded import LoadedModel
from bench.model.manifest import MANIFEST
from bench.model.quantized import _gptqmodel, unpack_stream
from bench.model.reload import load_compressed
from bench.model.saving import save_compressed
from bench.model.targets import find_targets, footprint
from methods.hybrid import GPTQConfig, HybridConfig, gptq_targets

if importlib.util.find_spec("gptqmodel") is None:  # not imported here: its import rewrites environment variables
    pytest.skip("the gptq extra is not installed: pip install 'svdbench[gptq]'", allow_module_level=True)


def inputs(n: int, tokens: int = 400, seed: int = 0) -> torch.Tensor:
    """``tokens x n`` correlated inputs with channel scales spread over a factor of ~50."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(n, generator=g))
    return (torch.randn(tokens, n, generator=g) @ torch.randn(n, n, generator=g)) * scales / math.sqrt(n)


def linear(m: int, n: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n, m, bias=bias)


def output_error(weight: torch.Tensor, reference: torch.Tensor, x: torch.Tensor) -> float:
    return float(((weight - reference) @ x.T).norm() / (reference @ x.T).norm())


def round_to_nearest(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Asymmetric min-max rounding per group of ``group`` inputs: what GPTQ improves on."""
    m, n = weight.shape
    w = weight.reshape(m, n // group, group)
    low, high = w.amin(-1, keepdim=True).clamp(max=0), w.amax(-1, keepdim=True).clamp(min=0)
    scale = (high - low) / (2**bits - 1)
    zero = torch.round(-low / scale)
    return ((torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1) - zero) * scale).reshape(m, n)


@pytest.mark.parametrize("bits, desc_act", [(2, False), (3, False), (4, False), (8, False), (3, True), (4, True)])
def test_unpacking_matches_gptqmodels_own_dequantization(bits, desc_act):
    """svdbench reads GPTQModel's packed words itself (a saved model needs no GPTQModel): same weights.

    With ``desc_act`` (act-order) the group index is a permutation, not ``i // group``.
    """
    layer = linear(40, 72)  # neither size a multiple of 32: both are padded
    x = inputs(72)
    q = GPTQLinear.quantize(layer, x.double().T @ x.double(), bits, group_size=32, desc_act=desc_act)
    from gptqmodel.nn_modules.qlinear import PackableQuantLinear  # imported (environment kept) by quantize
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    assert q.desc_act == desc_act and bool((q.g_idx[:72].diff() < 0).any()) == desc_act  # act-order permutes groups
    reference = TorchLinear(bits=bits, group_size=32, sym=False, desc_act=desc_act, in_features=q.g_idx.numel(),
                            out_features=q.scales.shape[1], bias=False, pack_dtype=torch.int32)
    reference.qweight, reference.qzeros, reference.scales, reference.g_idx = q.qweight, q.qzeros, q.scales, q.g_idx
    theirs = PackableQuantLinear.dequantize_weight(reference.eval()).T.float()  # float16 arithmetic
    ours = q.dequantize()
    assert ours.shape == (40, 72)
    assert torch.allclose(ours, theirs[:40, :72], rtol=0, atol=2e-3 * float(ours.abs().max()))
    assert not theirs[40:].any() and not theirs[:, 72:].any()  # the padding holds zeros
    # and the layer computes with exactly that weight
    assert torch.allclose(q(x[:5]), x[:5] @ ours.T + layer.bias, atol=1e-5)


def test_bit_stream_unpacking_of_hand_packed_words():
    # 3-bit values 0..7 repeated: 32 of them fill three words, value 10 and 21 straddle word boundaries
    values = [i % 8 for i in range(32)]
    stream = sum(v << (3 * i) for i, v in enumerate(values))
    words = [(stream >> (32 * k)) & 0xFFFFFFFF for k in range(3)]
    signed = torch.tensor([[w - (1 << 32) if w >= 1 << 31 else w] for w in words], dtype=torch.int32)
    assert unpack_stream(signed, 3, 32).flatten().tolist() == values


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_round_to_nearest_on_the_layer_output(bits):
    layer = linear(64, 128, seed=1)
    x = inputs(128, seed=2)
    q = GPTQLinear.quantize(layer, x.double().T @ x.double(), bits, group_size=32)
    gptq = output_error(q.dequantize(), layer.weight.detach(), x)
    rtn = output_error(round_to_nearest(layer.weight.detach(), bits, 32), layer.weight.detach(), x)
    assert gptq < 0.8 * rtn, (gptq, rtn)
    # the gram's scale does not matter (GPTQ is invariant to it)
    scaled = GPTQLinear.quantize(layer, 1e4 * x.double().T @ x.double(), bits, group_size=32)
    assert torch.equal(scaled.qweight, q.qweight)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bytes_are_packed_words_scales_zeros_group_index_and_padding(bits):
    layer = linear(40, 72)
    q = GPTQLinear.quantize(layer, torch.eye(72, dtype=torch.float64), bits, group_size=32)
    rows, columns, groups = 64, 96, 3  # padded to multiples of 32; 96 inputs / 32 per group
    assert q.qweight.dtype == q.qzeros.dtype == q.g_idx.dtype == torch.int32 and q.scales.dtype == torch.float16
    assert q.qweight.shape == (columns * bits // 32, rows)
    assert q.qzeros.shape == (groups, rows * bits // 32)
    expected = columns * rows * bits // 8 + groups * rows * bits // 8 + groups * rows * 2 + columns * 4 + 40 * 4
    assert q.storage_bytes() == expected == sum(t.numel() * t.element_size() for t in q.state_dict().values())
    assert q.storage_params() == 40 * 72 + 40


def test_quantizing_leaves_the_environment_as_it_was():
    """gptqmodel's import sets HF_HOME, TRANSFORMERS_CACHE and others; in a fresh process none of it stays."""
    script = ("import os, torch; from torch import nn; from bench import GPTQLinear; before = dict(os.environ); "
              "GPTQLinear.quantize(nn.Linear(32, 32), torch.eye(32, dtype=torch.float64), 4, group_size=32); "
              "import gptqmodel; changed = sorted(k for k in set(before) | set(os.environ) "
              "if before.get(k) != os.environ.get(k)); print('changed:', changed)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "changed: []" in result.stdout, result.stdout[-2000:]


def test_missing_gptqmodel_is_one_line_with_the_install_command(monkeypatch, registry):
    # simulate an environment without the extra: the import of gptqmodel fails
    for name in [n for n in sys.modules if n == "gptqmodel" or n.startswith("gptqmodel.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "gptqmodel", None)
    with pytest.raises(UsageError, match=r"pip install 'svdbench\[gptq\]'") as error:
        _gptqmodel()
    assert "\n" not in str(error.value)
    # and a run asking for GPTQ stops before anything is computed, naming the same command
    for name, options in (("gptq", {}), ("svdllm_quant", {"svdllm_quant": {"quantizer": "gptq"}})):
        with pytest.raises(UsageError, match=r"needs the gptqmodel package.*pip install 'svdbench\[gptq\]'"):
            registry.method_factory(options)(name)
    registry.method_factory({})("svdllm_quant")  # HQQ, the default quantizer, needs no GPTQModel


def test_factor_grams_are_the_inputs_each_factor_reads():
    """W_v against G; W_u against W_v' G W_v'^T with W_v' the quantized W_v (no second calibration pass)."""
    model = tiny_model("llama", layers=1)
    targets = find_targets(model)
    x = {t.name: inputs(t.in_features, seed=i) for i, t in enumerate(targets)}
    grams = {name: v.double().T @ v.double() for name, v in x.items()}
    factorizations = {t.name: factorize(model.get_submodule(t.name).weight) for t in targets}
    compressed, _ = compress_model(model, targets, factorizations, uniform_ranks(targets, 0.4))
    target = targets[0].name
    down = compressed.get_submodule(f"{target}.down")
    up = compressed.get_submodule(f"{target}.up")
    facts = gptq_targets(compressed, [target], grams.get, 4, 32)
    expected_down = GPTQLinear.quantize(down, grams[target], 4, 32, sym=False, damp=0.01)
    w_v = expected_down.dequantize().double()
    expected_up = GPTQLinear.quantize(up, w_v @ grams[target] @ w_v.T, 4, 32, sym=False, damp=0.01)
    layer = compressed.get_submodule(target)
    assert isinstance(layer, LowRankLinear) and isinstance(layer.down, GPTQLinear) and isinstance(layer.up, GPTQLinear)
    assert torch.equal(layer.down.qweight, expected_down.qweight) and torch.equal(layer.up.qweight, expected_up.qweight)
    assert facts["linears_quantized"] == 2 and facts["quantizer"] == "gptq"


def test_configs_reject_what_gptq_cannot_pack():
    with pytest.raises(UsageError, match="group_size=48"):
        GPTQConfig(group_size=48)
    with pytest.raises(UsageError, match="quantizer='awq'"):
        HybridConfig(quantizer="awq")
    with pytest.raises(UsageError, match="damp"):
        GPTQConfig(damp=0)
    assert HybridConfig(quantizer="gptq", group_size=128).group_size == 128


def perplexity(loaded: LoadedModel, out) -> float:
    """WikiText-2 perplexity of ``loaded`` on two 64-token windows (the dense row of a run of no method)."""
    run(RunConfig(model="tiny", methods=("none",), tasks=("wikitext2",), seqlen=64, limit=2, out=str(out)),
        loaded=loaded)
    return load_results(out)["records"][0]["value"]


def test_runs_and_saved_models_reproduce_their_perplexity(tiny, tmp_path):
    """The dense gptq baseline and svdllm_quant with GPTQ on a tiny model; a saved one reloads exactly."""
    config = RunConfig(model="tiny", methods=("svdllm_w", "svdllm_quant", "gptq", "hqq"), ratios=(0.4,),
                       tasks=("wikitext2",), seqlen=64, limit=2, calibration=CalibrationConfig(samples=4, seqlen=64),
                       method_options={"svdllm_quant": {"quantizer": "gptq", "bits": "3", "group_size": "32"},
                                       "gptq": {"bits": "3", "group_size": "32"}, "hqq": {"bits": "3"}},
                       out=str(tmp_path / "run"))
    run(config, loaded=tiny)
    data = load_results(tmp_path / "run")
    assert not data["failures"], data["failures"]
    rows = {r["method"]: r for r in data["records"]}
    assert all(math.isfinite(r["value"]) for r in rows.values())
    assert rows["gptq"]["ratio"] == 0.0 and rows["gptq"]["bits"] == 3
    assert rows["gptq"]["params"] == rows["dense"]["params"] and rows["gptq"]["bytes"] < rows["dense"]["bytes"]
    assert rows["svdllm_quant"]["bytes"] < rows["svdllm_w"]["bytes"]
    facts = data["compressions"][rows["svdllm_quant"]["compression"]]["facts"]["refine"]["quantization"]
    assert facts["quantizer"] == "gptq" and facts["bits"] == 3
    assert facts["linears_quantized"] == 2 * len(find_targets(tiny.model))
    assert data["manifest"]["methods"]["gptq"]["notes"]["paper"].startswith("Frantar")

    # a saved svdllm_quant (GPTQ) model loads back with the same logits, bytes and perplexity
    _, compressed = Workspace(config, load_registry(), tiny).compress("svdllm_quant", 0.4)
    out = tmp_path / "saved"
    save_compressed(compressed.model, tiny.tokenizer, out, {"method": "svdllm_quant", "ratio": 0.4})
    manifest = json.loads((out / MANIFEST).read_text())
    assert {q["quantizer"] for q in manifest["quantized"].values()} == {"gptq"}
    loaded = load_compressed(out)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, compressed.model(ids).logits)
    assert footprint(loaded.model)["bytes"] == footprint(compressed.model)["bytes"] == compressed.summary["bytes"]
    direct = LoadedModel(model=compressed.model, tokenizer=tiny.tokenizer, name="direct", source="memory")
    assert perplexity(loaded, tmp_path / "reloaded") == perplexity(direct, tmp_path / "direct")
