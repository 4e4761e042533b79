"""The one-call Python API (bench/interop/api.py) and its README example (examples/compress_in_memory.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_VOCAB

from bench import uniform_ranks
from bench.cli import main
from bench.engine.calibration import calibration_batches
from bench.engine.config import CalibrationConfig
from bench.errors import UsageError
from bench.interop.api import compress, save
from bench.model.loaded import fingerprint
from bench.model.loading import load_model
from bench.model.manifest import MANIFEST
from bench.model.targets import find_targets, footprint

ROOT = Path(__file__).parent.parent
IDS = torch.randint(0, TINY_VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.slow  # two compressions with calibration: about 40 s on two shared cores
def test_compress_returns_the_model_svdbench_compress_saves(checkpoint_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    before = fingerprint(model)
    windows = calibration_batches(tokenizer, CalibrationConfig(samples=4, seqlen=64))  # what the command reads
    small, facts = compress(model, "svdllm_w", ratio=0.4, tokenizer=tokenizer, calibration=windows)
    assert fingerprint(model) == before  # the model given is left as it was
    assert main(["compress", "--model", str(checkpoint_dir), "--method", "svdllm_w", "--ratio", "0.4",
                 "--out", str(tmp_path / "cli"), "--calib-samples", "4", "--calib-seqlen", "64"]) == 0
    saved = load_model(str(tmp_path / "cli"))
    assert torch.allclose(logits(small), logits(saved.model), rtol=1e-5, atol=1e-6)
    assert facts["ranks"] == json.loads((tmp_path / "cli" / MANIFEST).read_text())["ranks"]
    assert facts["ranks"] == {k: v for k, v in uniform_ranks(find_targets(model), 0.4).items() if k in facts["ranks"]}
    assert facts["bytes"] == footprint(small)["bytes"] < facts["dense_bytes"] == footprint(model)["bytes"]
    assert facts["calibration"] == "given"
    out = save(small, tokenizer, tmp_path / "api", facts)
    assert torch.equal(logits(load_model(str(out)).model), logits(small))
    assert "svdllm_w at ratio 0.4" in (out / "README.md").read_text()


def test_calibration_windows_budget_and_bad_input(tiny):
    windows = torch.randint(0, TINY_VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
    small, facts = compress(tiny.model, "svdllm_w", budget=0.8, calibration=windows)
    assert facts["bytes"] <= 0.8 * facts["dense_bytes"] and 0 < facts["ratio"] < 1 and facts["calibration"] == "given"
    other, _ = compress(tiny.model, "svdllm_w", budget=0.8, calibration=(windows + 1) % TINY_VOCAB)  # other factors
    assert not torch.equal(logits(small), logits(other))
    with pytest.raises(UsageError, match="exactly one of ratio"):
        compress(tiny.model, "svd", ratio=0.4, budget=0.8)
    with pytest.raises(UsageError, match="unknown method"):
        compress(tiny.model, "nope", ratio=0.4)
    with pytest.raises(UsageError, match="pass tokenizer"):
        compress(tiny.model, "svdllm_w", ratio=0.4)


@pytest.mark.slow  # the example in a fresh interpreter: about 40 s on two shared cores
def test_readme_example_runs(checkpoint_dir, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "compress_in_memory.py"), str(checkpoint_dir),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reloaded with from_pretrained: identical logits: True" in done.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()
    readme = (ROOT / "README.md").read_text()
    assert "examples/compress_in_memory.py" in readme


def test_a_config_object_and_a_mapping_of_options_make_the_same_method(tiny):
    from methods.hybrid import HybridConfig

    windows = torch.randint(0, TINY_VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    by_object, facts = compress(tiny.model, "svdllm_quant", ratio=0.5, calibration=windows, config=HybridConfig(bits=3))
    by_options, same = compress(tiny.model, "svdllm_quant", ratio=0.5, calibration=windows, config={"bits": 3})
    assert facts["config"] == same["config"] and facts["config"]["bits"] == 3
    assert torch.equal(logits(by_object), logits(by_options))
    assert facts["bytes"] < compress(tiny.model, "svdllm_quant", ratio=0.5, calibration=windows)[1]["bytes"]  # 3 < 4 bits
