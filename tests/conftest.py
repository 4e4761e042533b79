"""Shared fixtures: tiny random models of several families, built in code."""

from __future__ import annotations

import os

import pytest
import torch

# Installed third-party plugins must never leak into the suite.
os.environ["SVDBENCH_PLUGINS"] = ""
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench.models import LoadedModel, load_model  # noqa: E402
from bench.plugins import load_registry  # noqa: E402


def tiny_model(family: str = "llama", vocab_size: int = 256, seed: int = 0, layers: int = 2):
    """A random causal LM with hidden size 64: milliseconds per forward pass."""
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig, Qwen2Config, GemmaConfig

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4)
    if family == "llama":
        config = LlamaConfig(intermediate_size=128, num_key_value_heads=2, max_position_embeddings=512, **common)
    elif family == "qwen2":
        config = Qwen2Config(intermediate_size=128, num_key_value_heads=2, max_position_embeddings=512, **common)
    elif family == "gemma":
        config = GemmaConfig(intermediate_size=128, num_key_value_heads=1, head_dim=16, max_position_embeddings=512, **common)
    elif family == "opt":
        config = OPTConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                           ffn_dim=128, max_position_embeddings=512, word_embed_proj_dim=64)
    else:
        raise ValueError(family)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The real default model (converted once into the svdbench cache)."""
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    return smollm2.tokenizer


@pytest.fixture
def tiny(tokenizer) -> LoadedModel:
    """A tiny random Llama sharing SmolLM2's tokenizer (so real tasks run on it)."""
    model = tiny_model("llama", vocab_size=len(tokenizer))
    return LoadedModel(model=model, tokenizer=tokenizer, name="tiny-llama", source="code")


@pytest.fixture
def registry():
    return load_registry()


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Statistics caches go to a fresh directory; the converted model cache is shared."""
    monkeypatch.setenv("SVDBENCH_STATS_CACHE", str(tmp_path / "stats"))
