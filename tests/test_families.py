"""Every model family a user brings: statistics equal to a whole-model pass, MoE experts, renamed checkpoints, Conv1D.

The block-by-block statistics pass must give each block exactly what the
model itself gives it - per-layer masks and RoPE (Gemma-2/3's sliding and
global layers, Mistral's sliding window), tuple outputs (Bloom, Falcon),
routed experts - so its statistics equal hooks on one whole-model forward
pass (and its gradients equal autograd's) for every family.
"""

from __future__ import annotations

import json

import pytest
import torch
from families import FAMILIES, family_model, gemma3_multimodal, whole_model_gradients, whole_model_statistics

from bench.cli import main
from bench.engine.calibration import StatisticsStore, collect_statistics
from bench.engine.config import CalibrationConfig
from bench.model.checkpoint import checkpoint_matches
from bench.model.experts import SplitExperts
from bench.model.loaded import fingerprint
from bench.model.loading import load_model
from bench.model.targets import find_targets, footprint
from methods.statistics import AbsMean, Fisher, Gram

WINDOWS = torch.randint(0, 512, (3, 24), generator=torch.Generator().manual_seed(1))  # longer than the sliding window


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def collect(model, statistics, tmp_path):
    return collect_statistics(model, fingerprint(model), find_targets(model), WINDOWS,
                              CalibrationConfig(samples=3, seqlen=24), statistics, cache=StatisticsStore(tmp_path))


@pytest.mark.parametrize("family", FAMILIES)
def test_block_pass_statistics_equal_a_whole_model_pass(family, tmp_path):
    model = family_model(family)
    expected, groups = whole_model_statistics(model, WINDOWS, [Gram(), AbsMean()])
    got = collect(model, [Gram(), AbsMean()], tmp_path)
    assert got.input_group == groups
    for name, table in expected.items():
        assert set(got.values[name]) == set(table)
        worst = max(relative(got.values[name][key], value) for key, value in table.items() if value.abs().max() > 0)
        assert worst <= 1e-10, (family, name, worst)


@pytest.mark.parametrize("family", ["gemma3", "mistral", "bloom", "qwen3_moe"])
def test_block_pass_gradients_equal_autograd(family, tmp_path):
    """Per-layer arguments and tuple outputs in the backward pass too."""
    model = family_model(family)
    targets = find_targets(model)
    names = [targets[-1].name, [t.name for t in targets if t.block == 0][-1]]  # the last matrix of each end
    stats = collect(model, [Fisher()], tmp_path)
    grads = whole_model_gradients(model, WINDOWS, names)
    for name in names:
        expected = sum(g.pow(2).sum(0) for g in grads[name]) / len(WINDOWS)
        assert relative(stats.get("fisher", name), expected) <= 1e-8, name


def test_sliding_and_global_layers_get_their_own_arguments(tmp_path):
    """Gemma-3's global block 1 calibrated with block 0's sliding mask and local RoPE would differ by tens of
    percent: the statistics of block 1 are those of the model's own pass, not of a pass that reuses block 0's."""
    model = family_model("gemma3")
    assert model.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    expected, _ = whole_model_statistics(model, WINDOWS, [Gram()])
    got = collect(model, [Gram()], tmp_path)
    name = "model.layers.1.self_attn.o_proj"
    assert relative(got.get("gram", name), expected["gram"][name]) <= 1e-10


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_moe_experts_are_split_into_linear_targets(family):
    fused = family_model(family, prepared=False)
    model = family_model(family)
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, fused(ids).logits, rtol=1e-5, atol=1e-6)
    split = [m for m in model.modules() if isinstance(m, SplitExperts)]
    assert len(split) == model.config.num_hidden_layers
    experts = [t for t in find_targets(model) if ".experts." in t.name]
    assert len(experts) == 3 * len(split) * split[0].num_experts  # gate, up and down of every expert
    assert not any("gate.weight" in n or "router" in n for n, _ in model.named_parameters() if ".experts." in n)
    assert footprint(model)["params"] == footprint(fused)["params"]  # every expert counted, nothing twice


def _run(argv: list[str]) -> dict:
    assert main(argv) == 0
    out = argv[argv.index("--out") + 1]
    with open(f"{out}/results.json") as handle:
        return json.load(handle)


def _value(results: dict, method: str) -> float:
    return next(r["value"] for r in results["records"] if r["method"] == method and r["task"] == "wikitext2")


SMALL = ["--tasks", "wikitext2", "--limit", "2", "--seqlen", "32", "--calib-samples", "4", "--calib-seqlen", "32"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_neox", "gpt2", "gemma3_multimodal"])
def test_renamed_and_restructured_checkpoints_run_compress_and_reload(family, tmp_path, tokenizer):
    """MoE (experts fused on load), GPT-NeoX (``embed_out`` renamed), GPT-2 (Conv1D), multimodal Gemma-3 (its
    language model renamed): every method runs, ``compress`` saves, and the saved model reloads to the same
    perplexity."""
    source = tmp_path / family
    model = gemma3_multimodal() if family == "gemma3_multimodal" else family_model(family, layers=2, prepared=False)
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    methods = {"gemma3_multimodal": "svdllm_w,hqq,asvd", "qwen3_moe": "svdllm_w,gptq"}.get(family, "svdllm_w,hqq")
    results = _run(["run", "--model", str(source), "--methods", methods, "--ratios", "0.2",
                    "--out", str(tmp_path / "run"), *SMALL])
    assert results["failures"] == []
    layers = next(c["layers"] for c in results["compressions"].values() if c["method"] == "svdllm_w")
    if family in ("qwen3_moe", "mixtral"):
        expert_ranks = [v["rank"] for k, v in layers.items() if ".experts." in k]
        assert expert_ranks and all(rank is not None for rank in expert_ranks)
        assert results["manifest"]["model"]["experts"]["expert_matrices"] == len(expert_ranks)
        report = (tmp_path / "run" / "report.md").read_text()
        quantizer = next(c for c in results["compressions"].values() if c["method"] != "svdllm_w")
        assert quantizer["facts"]["refine"]["linears_quantized"] == len(layers)  # every expert quantized too
        assert f"{len(expert_ranks)} expert matrices" in report
    if family == "gpt2":
        assert results["manifest"]["model"]["conv1d_as_linear"] == 8 and "transformer.h.0.attn.c_attn" in layers
    assert main(["compress", "--model", str(source), "--method", "svdllm_w", "--ratio", "0.2", "--calib-samples", "4",
                 "--calib-seqlen", "32", "--out", str(tmp_path / "saved")]) == 0
    reloaded = _run(["run", "--model", str(tmp_path / "saved"), "--methods", "none", "--out", str(tmp_path / "again"),
                     *SMALL])
    assert _value(reloaded, "dense") == pytest.approx(_value(results, "svdllm_w"), rel=1e-6)
    from transformers import AutoModelForCausalLM

    import bench.interop.hf  # noqa: F401  (registers the quantizer: plain transformers loads it the same)

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ours = load_model(str(tmp_path / "saved")).model
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, ours(ids).logits)


def test_a_checkpoint_is_assembled_from_only_where_its_names_and_shapes_are_the_models(tmp_path, tokenizer):
    for family, expected in [("llama", True), ("qwen3_moe", True), ("mixtral", False), ("gpt_neox", False),
                             ("gpt2", False)]:
        family_model(family, layers=2, prepared=False).save_pretrained(tmp_path / family)
        tokenizer.save_pretrained(tmp_path / family)
        loaded = load_model(str(tmp_path / family))
        assert checkpoint_matches(loaded.model, tmp_path / family) is expected, family
        assert (loaded.checkpoint is not None) is expected, family
