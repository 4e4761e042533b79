"""Model structure discovery across families, accounting and identity."""

import json

import pytest
import torch
from conftest import TINY_VOCAB, tiny_model
from torch import nn

from bench import LowRankLinear, factorize, uniform_ranks
from bench.engine.compress import compress_model
from bench.model.loaded import fingerprint
from bench.model.loading import conversion_problem
from bench.model.targets import decoder_blocks, find_targets, footprint
from bench.storage import seal

EXPECTED_KINDS = {
    "llama": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "qwen2": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "gemma": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "opt": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"},
}


@pytest.mark.parametrize("family", sorted(EXPECTED_KINDS))
def test_targets_found_from_structure_and_compression_runs(family):
    model = tiny_model(family)
    targets = find_targets(model)
    assert {t.kind for t in targets} == EXPECTED_KINDS[family]
    assert len(targets) == 2 * len(EXPECTED_KINDS[family])
    assert not any("embed" in t.name or "lm_head" in t.name for t in targets)
    facts = {t.name: factorize(model.get_submodule(t.name).weight) for t in targets}
    compressed, layers = compress_model(model, targets, facts, uniform_ranks(targets, 0.5))
    assert any(isinstance(m, LowRankLinear) for m in compressed.modules())
    assert isinstance(compressed.get_output_embeddings(), nn.Linear)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        out = compressed(ids).logits
    assert out.shape == (2, 12, TINY_VOCAB) and torch.isfinite(out).all()
    assert footprint(compressed)["params"] < footprint(model)["params"]


def test_decoder_blocks_are_the_longest_list_of_blocks():
    model = tiny_model("llama", layers=3)
    prefix, blocks = decoder_blocks(model)
    assert prefix == "model.layers" and len(blocks) == 3


def test_grouped_query_attention_shapes():
    targets = {t.kind: t for t in find_targets(tiny_model("llama"))}
    assert targets["self_attn.k_proj"].out_features == targets["self_attn.q_proj"].out_features // 2


def test_footprint_counts_tied_weights_once():
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.lm_head.weight = model.model.embed_tokens.weight
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    assert footprint(model)["params"] == sum(unique.values())
    assert footprint(model)["bytes"] == 4 * sum(unique.values())


def test_footprint_of_an_offloaded_model_counts_its_weights():
    """Offloaded weights sit on ``meta`` (every data pointer 0): still each weight once, tied ones once."""
    from bench.model.loading import offload

    model = tiny_model("llama")
    model.lm_head.weight = model.model.embed_tokens.weight
    on_cpu = footprint(model)
    offload(model, "cpu")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert footprint(model) == on_cpu


def test_fingerprint_tells_models_apart():
    a, b = tiny_model(seed=0), tiny_model(seed=1)
    assert fingerprint(a) == fingerprint(tiny_model(seed=0))
    assert fingerprint(a) != fingerprint(b)


def test_conversion_cache_detects_corruption(tmp_path):
    """Every file of the converted model - weights, config, tokenizer - is checked, not only the weights."""
    import hashlib

    files = {"model.safetensors": b"weights", "config.json": b"{}", "tokenizer.json": b"{}"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    meta = {"gguf_sha256": "g", "files": digests, "weights": {"model.safetensors": digests["model.safetensors"]}}
    (tmp_path / "svdbench-source.json").write_text(json.dumps(seal(meta)))
    assert conversion_problem(tmp_path, "g") is None
    assert "another GGUF" in conversion_problem(tmp_path, "other-gguf")
    (tmp_path / "config.json").write_bytes(b'{"rope_theta": 1.0}')
    assert "config.json does not match its checksum" in conversion_problem(tmp_path, "g")
    (tmp_path / "config.json").write_bytes(b"{}")
    (tmp_path / "tokenizer.json").unlink()
    assert "tokenizer.json is missing" in conversion_problem(tmp_path, "g")


@pytest.mark.real_model
def test_smollm2_loads_offline_with_expected_structure(smollm2):
    targets = find_targets(smollm2.model)
    assert len(targets) == 30 * 7
    assert smollm2.info["gguf_sha256"].startswith("b179c952")
    assert footprint(smollm2.model)["params"] == 134_515_008
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = smollm2.model.generate(ids, max_new_tokens=2, do_sample=False)
    assert "Paris" in smollm2.tokenizer.decode(out[0, ids.shape[1]:])
