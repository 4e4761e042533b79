"""Saving compressed models as safetensors + svdbench.json and loading them back (bench/model/saving.py, reload.py)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_VOCAB

from bench import LowRankLinear, QuantizedLinear, factorize, uniform_ranks
from bench.cli import main
from bench.engine.compress import compress_model
from bench.errors import UsageError
from bench.model.loaded import fingerprint
from bench.model.loading import load_model
from bench.model.manifest import MANIFEST, WEIGHTS, directory_identity
from bench.model.reload import load_compressed
from bench.model.saving import save_compressed
from bench.model.targets import find_targets
from bench.storage import seal, sha256_file
from methods.hybrid import quantize_targets

IDS = torch.randint(0, TINY_VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


def compressed(loaded, bits: int | None = None):
    targets = find_targets(loaded.model)
    facts = {t.name: factorize(loaded.model.get_submodule(t.name).weight) for t in targets}
    model, _ = compress_model(loaded.model, targets, facts, uniform_ranks(targets, 0.5))
    if bits:
        quantize_targets(model, [t.name for t in targets], bits, 64, "float16")
    return model


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("bits", [None, 3])
def test_round_trip_gives_identical_logits(tiny, tmp_path, bits):
    model = compressed(tiny, bits)
    save_compressed(model, tiny.tokenizer, tmp_path / "m", {"method": "svd", "ratio": 0.5})
    loaded = load_model(str(tmp_path / "m"))  # the --model DIR path
    assert torch.equal(logits(loaded.model), logits(model))
    kinds = {type(m) for m in loaded.model.modules()}
    assert LowRankLinear in kinds and (QuantizedLinear in kinds) == bool(bits)
    manifest = json.loads((tmp_path / "m" / MANIFEST).read_text())
    assert manifest["method"] == "svd" and len(manifest["ranks"]) == len(find_targets(tiny.model))
    assert fingerprint(loaded.model) == manifest["fingerprint"]  # the weights are the saved ones
    assert loaded.identity == directory_identity(loaded.model, tmp_path / "m")  # the identity covers config/tokenizer
    assert not list((tmp_path / "m").glob("*.bin")) and not list((tmp_path / "m").glob("*.pt"))


def test_truncated_weight_file_is_detected(tiny, tmp_path):
    save_compressed(compressed(tiny), tiny.tokenizer, tmp_path / "m", {})
    weights = tmp_path / "m" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UsageError, match="edited or truncated"):
        load_compressed(tmp_path / "m")


def test_edited_weight_file_is_detected_even_with_a_fixed_checksum(tiny, tmp_path):
    save_compressed(compressed(tiny), tiny.tokenizer, tmp_path / "m", {})
    weights = tmp_path / "m" / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the last tensor's data
    weights.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="edited or truncated"):
        load_compressed(tmp_path / "m")
    manifest_path = tmp_path / "m" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["weights"][WEIGHTS] = manifest["files"][WEIGHTS] = sha256_file(weights)  # someone "repairs" the checksums
    manifest_path.write_text(json.dumps(seal(manifest)))
    with pytest.raises(UsageError, match="fingerprint"):
        load_compressed(tmp_path / "m")


def test_manifest_that_does_not_fit_the_weights_is_refused(tiny, tmp_path):
    save_compressed(compressed(tiny), tiny.tokenizer, tmp_path / "m", {})
    manifest_path = tmp_path / "m" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    name = next(iter(manifest["ranks"]))
    manifest["ranks"][name] += 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(UsageError):
        load_compressed(tmp_path / "m")


def test_compress_command_matches_in_memory_compression(tiny, tmp_path, registry):
    from bench.engine.config import RunConfig
    from bench.engine.workspace import Workspace

    source = tmp_path / "src"
    tiny.model.save_pretrained(source)
    tiny.tokenizer.save_pretrained(source)
    out = tmp_path / "out"
    assert main(["compress", "--model", str(source), "--method", "svd", "--ratio", "0.4", "--out", str(out)]) == 0
    workspace = Workspace(RunConfig(model=str(source), methods=("svd",), ratios=(0.4,), out=str(tmp_path / "r")),
                          registry)
    method, in_memory = workspace.compress("svd", 0.4)
    reloaded = load_model(str(out))
    assert torch.equal(logits(reloaded.model), logits(in_memory.model))
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["source_model"]["identity"] == workspace.loaded.identity
    assert manifest["svdbench_version"] and manifest["config"] == {} == method.settings()
    assert manifest["method"] == "svd" and manifest["ratio"] == 0.4 and manifest["calibration"] is None
    assert manifest["accounting"] == in_memory.summary and manifest["facts"] == in_memory.facts == {}
    assert reloaded.info["compressed"]["method"] == "svd" and reloaded.info["compressed"]["ratio"] == 0.4


def test_compress_command_records_the_calibration_and_facts_of_a_calibrated_method(tiny, tmp_path):
    source = tmp_path / "src"
    tiny.model.save_pretrained(source)
    tiny.tokenizer.save_pretrained(source)
    out = tmp_path / "out"
    argv = ["compress", "--model", str(source), "--method", "svdllm_w", "--ratio", "0.5", "--out", str(out),
            "--calib-samples", "1", "--calib-seqlen", "32"]  # 32 tokens < 64 channels: Cholesky needs a shift
    assert main(argv) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["calibration"] == {"dataset": "wikitext2", "samples": 1, "seqlen": 32, "seed": 3}
    assert manifest["facts"]["decomposition"]["cholesky_shift"]
    assert torch.isfinite(logits(load_model(str(out)).model)).all()
