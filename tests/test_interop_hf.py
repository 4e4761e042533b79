"""Saved models in plain transformers (bench/interop/hf.py): every saved kind loads with
``AutoModelForCausalLM.from_pretrained`` in a fresh process and computes what svdbench's own loader computes;
without svdbench it is refused; config.json says only what is true of the saved weights."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.model.card import CARD
from bench.model.loading import load_model
from bench.model.manifest import MANIFEST

sys.path.insert(0, str(Path(__file__).parent))
from hf_probe import measure  # noqa: E402

PROBE = Path(__file__).parent / "hf_probe.py"
CALIBRATION = ["--calib-samples", "2", "--calib-seqlen", "64"]
GPTQ = pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None,
                          reason="the gptq extra is not installed: pip install 'svdbench[gptq]'")
# every kind of model svdbench saves: low-rank (plain, whitened, updated), low-rank + quantized factors, quantized
KINDS = {
    "svd": ("svd", ["--tasks", "wikitext2", "--limit", "1", "--seqlen", "64"]),  # measured before saving
    "svdllm_w": ("svdllm_w", []),
    "svdllm": ("svdllm", ["--method-option", "svdllm.update_steps=1", "--method-option", "svdllm.batch_size=1",
                          "--method-option", "svdllm.eval_examples=1", "--method-option", "svdllm.cutoff=32"]),
    "svdllm_quant_hqq": ("svdllm_quant", ["--method-option", "svdllm_quant.quantizer=hqq"]),
    "svdllm_quant_gptq": ("svdllm_quant", ["--method-option", "svdllm_quant.quantizer=gptq"]),
    "hqq": ("hqq", []),
    "gptq": ("gptq", []),
}
LAYERS = {"svd": {"LowRankLinear"}, "svdllm_w": {"LowRankLinear"}, "svdllm": {"LowRankLinear"},
          "svdllm_quant_hqq": {"LowRankLinear", "QuantizedLinear"}, "svdllm_quant_gptq": {"LowRankLinear", "GPTQLinear"},
          "hqq": {"QuantizedLinear"}, "gptq": {"GPTQLinear"}}


def probe(mode: str, directories: list[Path]) -> dict[str, dict]:
    """Run tests/hf_probe.py in a fresh interpreter; its JSON lines by directory."""
    done = subprocess.run([sys.executable, str(PROBE), mode, *map(str, directories)], capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {Path(row["dir"]).name: row for row in rows}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """One model of every kind, compressed by ``svdbench compress`` from a tiny checkpoint whose config.json
    carries a foreign quantization_config (as SmolLM2's converted GGUF does)."""
    from conftest import tiny_model

    root = tmp_path_factory.mktemp("saved")
    source = root / "source"
    tiny_model("llama", vocab_size=len(tokenizer), layers=2).save_pretrained(source)
    tokenizer.save_pretrained(source)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    (source / "config.json").write_text(json.dumps(config))
    dirs = {}
    with pytest.MonkeyPatch.context() as patch:  # the stores of these models stay out of the user's cache
        patch.setenv("SVDBENCH_CACHE", str(root / "cache"))
        patch.setenv("SVDBENCH_STATS_CACHE", str(root / "stats"))
        for kind, (method, options) in KINDS.items():
            if "gptq" in kind and importlib.util.find_spec("gptqmodel") is None:
                continue
            out = root / kind
            ratio = [] if method in ("hqq", "gptq") else ["--ratio", "0.5"]  # quantize-only: no --ratio
            argv = ["compress", "--model", str(source), "--method", method, *ratio, "--out", str(out)]
            assert main(argv + CALIBRATION + options) == 0
            dirs[kind] = out
    return dirs


@pytest.fixture(scope="module")
def registered(saved):
    return probe("registered", list(saved.values()))


@pytest.mark.slow  # the fixture compresses seven models (about a minute on two cores)
@pytest.mark.parametrize("kind", [k if "gptq" not in k else pytest.param(k, marks=GPTQ) for k in KINDS])
def test_plain_transformers_load_equals_svdbench_load(saved, registered, kind):
    row = registered[kind]
    assert "error" not in row, row["error"]
    assert set(row["kinds"]) == LAYERS[kind]  # svdbench's layers were built, not random dense ones
    own = measure(load_model(str(saved[kind])).model)
    assert row["perplexity"] == pytest.approx(own["perplexity"], rel=1e-6)
    assert row["greedy"] == own["greedy"] and len(own["greedy"]) == 20
    assert row["resaved"]["perplexity"] == pytest.approx(own["perplexity"], rel=1e-6)  # save_pretrained round trip
    assert row["resaved"]["greedy"] == own["greedy"]


@pytest.mark.slow  # the fixture compresses seven models (about a minute on two cores)
def test_without_svdbench_loading_is_refused_never_random(saved, registered):
    dirs = list(saved.values())
    refused = probe("hidden", dirs + [Path(f"{d}-resaved") for d in dirs])
    for directory in dirs:
        row = refused[directory.name]
        assert "error" in row, f"{directory.name} loaded without svdbench: {row}"
        assert "svdbench" in row["error"] and "pip install 'svdbench[quant]'" in row["error"], row["error"]
        # what transformers' own save_pretrained wrote: its sentinel tensor makes transformers stop on a mismatch
        resaved = refused[f"{directory.name}-resaved"]
        assert "error" in resaved and "ignore_mismatched_sizes" in resaved["error"], resaved


@pytest.mark.slow  # the fixture compresses seven models (about a minute on two cores)
def test_saved_config_carries_only_svdbench_quantization_config(saved):
    for kind, directory in saved.items():
        config = json.loads((directory / "config.json").read_text())
        quantization = config["quantization_config"]
        assert quantization["quant_method"] == "svdbench", kind  # the source's gguf one is gone
        assert "gguf_file" not in json.dumps(config)
        manifest = json.loads((directory / MANIFEST).read_text())
        assert quantization["ranks"] == manifest["ranks"] and quantization["quantized"] == manifest["quantized"]
        resaved = json.loads((Path(f"{directory}-resaved") / "config.json").read_text())
        assert resaved["quantization_config"]["quant_method"] == "svdbench"


@pytest.mark.slow  # the fixture compresses seven models (about a minute on two cores)
def test_model_card_is_rendered_from_the_manifest(saved):
    directory = saved["svdllm_quant_hqq"]
    card = (directory / CARD).read_text()
    manifest = json.loads((directory / MANIFEST).read_text())
    assert card.startswith("---\nlibrary_name: transformers\n") and "- svdllm_quant" in card
    assert f"{len(manifest['ranks'])} low-rank matrices" in card
    assert f"{manifest['accounting']['bytes'] / 2**20:,.1f} MiB" in card
    assert "HQQ 4-bit, groups of 64" in card and manifest["svdbench_version"] in card
    assert "import bench.interop.hf" in card and CARD in manifest["files"]  # checksummed like every file
    assert "Nothing was measured" in card
    for directory in saved.values():
        assert (directory / CARD).is_file()
    measured = json.loads((saved["svd"] / MANIFEST).read_text())["evaluations"]
    assert [(e["task"], e["metric"]) for e in measured] == [("wikitext2", "perplexity")]
    assert f"| wikitext2 | perplexity | {measured[0]['value']:.4g} |" in (saved["svd"] / CARD).read_text()


@pytest.mark.slow  # the fixture compresses seven models (about a minute on two cores)
def test_a_checkpoint_that_does_not_fit_its_layout_is_refused(saved, tmp_path):
    """Strict: a tensor missing from the checkpoint is refused, never initialized at random."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    import bench.interop.hf  # noqa: F401
    from bench.errors import UsageError

    broken = tmp_path / "broken"
    broken.mkdir()
    for file in saved["svdllm_w"].iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    tensors = load_file(broken / "model.safetensors")
    dropped = next(k for k in tensors if k.endswith("q_proj.up.weight"))
    del tensors[dropped]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UsageError, match=f"lacks tensor {dropped}"):
        AutoModelForCausalLM.from_pretrained(broken)
    tensors = load_file(saved["svdllm_w"] / "model.safetensors")
    tensors[dropped] = torch.zeros_like(tensors[dropped])
    from safetensors import safe_open

    with safe_open(str(saved["svdllm_w"] / "model.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(tensors, broken / "model.safetensors", metadata=metadata)  # edited weights, the old fingerprint
    with pytest.raises(UsageError, match="fingerprint mismatch"):
        AutoModelForCausalLM.from_pretrained(broken)


@pytest.mark.slow  # two fresh interpreters importing torch and transformers: about 40 s on two shared cores
def test_quick_round_trip_and_refusal_in_fresh_processes(tiny, tmp_path):
    """The fast version of the tests above: a low-rank model with HQQ factors, saved by svdbench."""
    from bench import factorize, uniform_ranks
    from bench.engine.compress import compress_model
    from bench.model.saving import save_compressed
    from bench.model.targets import find_targets
    from methods.hybrid import quantize_targets

    targets = find_targets(tiny.model)
    factors = {t.name: factorize(tiny.model.get_submodule(t.name).weight) for t in targets}
    model, _ = compress_model(tiny.model, targets, factors, uniform_ranks(targets, 0.5))
    quantize_targets(model, [t.name for t in targets], 4, 64, "float16")  # both factors of every target
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "source.gguf"}  # a stale one
    out = save_compressed(model, tiny.tokenizer, tmp_path / "m", {"method": "svd", "ratio": 0.5})
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "svdbench"
    row = probe("registered", [out])["m"]
    own = measure(load_model(str(out)).model)
    assert set(row["kinds"]) == {"LowRankLinear", "QuantizedLinear"}
    assert row["perplexity"] == pytest.approx(own["perplexity"], rel=1e-6) and row["greedy"] == own["greedy"]
    refused = probe("hidden", [out])["m"]
    assert "svdbench" in refused.get("error", "") and "pip install" in refused["error"], refused


@pytest.mark.real_model
@pytest.mark.slow  # quantizes SmolLM2-135M and loads it in a fresh process: about two minutes on two cores
def test_smollm2_saved_without_its_stale_gguf_config_loads_in_plain_transformers(tmp_path):
    from bench.model.loading import load_model as load

    source = load("smollm2-135m")
    assert json.loads((source.checkpoint / "config.json").read_text())["quantization_config"]["quant_method"] == "gguf"
    out = tmp_path / "hqq"
    assert main(["compress", "--model", "smollm2-135m", "--method", "hqq", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "svdbench" and "gguf" not in json.dumps(config)
    row = probe("registered", [out])["hqq"]
    own = measure(load_model(str(out)).model)
    assert row["kinds"] == ["QuantizedLinear"]
    assert row["perplexity"] == pytest.approx(own["perplexity"], rel=1e-6) and row["greedy"] == own["greedy"]
