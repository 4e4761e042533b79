"""Shared fixtures: tiny random models of several families and a tiny tokenizer, built in code.

Unit tests run on ``tiny`` (a random Llama with a 512-token byte-level BPE
tokenizer trained here on WikiText-2 validation text) and need no model
download or wheel; tests of the real SmolLM2-135M carry the ``real_model``
marker and use the ``smollm2`` fixture.
"""

from __future__ import annotations

import functools
import os
import signal

import pytest
import torch

# Installed third-party plugins must never leak into the suite.
os.environ["SVDBENCH_PLUGINS"] = ""
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# A test runner started as a background job of a non-interactive shell (``cmd &`` in a script)
# inherits SIGINT ignored, and so would every svdbench process it starts: svdbench then rightly
# leaves Ctrl-C alone, and the interrupt tests fail. Python's own handler here makes the suite and
# its child processes (reset to the default action on exec) receive SIGINT as from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from bench.engine.plugins import load_registry  # noqa: E402
from bench.model.loaded import LoadedModel  # noqa: E402
from bench.model.loading import load_model  # noqa: E402

TINY_VOCAB = 512


@functools.cache
def tiny_tokenizer():
    """A byte-level BPE tokenizer with 512 tokens, trained in about a second on WikiText-2 validation text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from bench.corpora import WIKITEXT2_VALID, data_file

    text = data_file(WIKITEXT2_VALID).read_text(encoding="utf-8")[:300_000]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(text.splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def tiny_model(family: str = "llama", vocab_size: int = TINY_VOCAB, seed: int = 0, layers: int = 2):
    """A random causal LM with hidden size 64: milliseconds per forward pass."""
    from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, OPTConfig, Qwen2Config

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
    """The real default model (converted once into the svdbench cache). Mark tests using it ``real_model``."""
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def tiny(tokenizer) -> LoadedModel:
    """A tiny random Llama with the tiny tokenizer (so real tasks run on it)."""
    model = tiny_model("llama", vocab_size=len(tokenizer))
    return LoadedModel(model=model, tokenizer=tokenizer, name="tiny-llama", source="code")


@pytest.fixture
def checkpoint_dir(tmp_path, tokenizer):
    """A tiny random Llama saved as an ordinary Hugging Face checkpoint (safetensors + config + tokenizer)."""
    path = tmp_path / "tiny-checkpoint"
    tiny_model("llama", vocab_size=len(tokenizer), layers=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def registry():
    return load_registry()


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Statistics and method caches go to a fresh directory; the converted model cache stays shared."""
    from bench.storage import cache_root

    shared_models = cache_root() / "models"
    shared_models.mkdir(parents=True, exist_ok=True)
    root = tmp_path / "svdbench-cache"
    root.mkdir()
    (root / "models").symlink_to(shared_models, target_is_directory=True)
    monkeypatch.setenv("SVDBENCH_CACHE", str(root))  # method caches (asvd_sensitivity, ...) start empty
    monkeypatch.setenv("SVDBENCH_STATS_CACHE", str(tmp_path / "stats"))


@pytest.fixture
def tiny_dir(tiny, tmp_path):
    """The tiny model saved as a Hugging Face directory: what ``--model DIR`` loads."""
    path = tmp_path / "tiny-model"
    tiny.model.save_pretrained(path)
    tiny.tokenizer.save_pretrained(path)
    return path
