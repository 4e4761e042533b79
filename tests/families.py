"""Tiny random models of every family svdbench is tested on, and the whole-model statistics reference.

Each model has hidden size 64 and a few blocks; families with sliding-window
attention get a window of 8 tokens, shorter than the test windows, so the
sliding and global layers really differ.
"""

from __future__ import annotations

import torch

from bench.model.prepare import prepare_model
from bench.model.targets import find_targets

VOCAB = 512
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, max_position_embeddings=512)


def _config(family: str, layers: int):
    import transformers as T

    c = dict(COMMON, num_hidden_layers=layers)
    alternating = (["sliding_attention", "full_attention"] * layers)[:layers]
    builders = {
        "llama": lambda: T.LlamaConfig(**c, intermediate_size=128, num_key_value_heads=2),
        "qwen2": lambda: T.Qwen2Config(**c, intermediate_size=128, num_key_value_heads=2),
        "qwen3": lambda: T.Qwen3Config(**c, intermediate_size=128, num_key_value_heads=2, head_dim=16),
        "gemma": lambda: T.GemmaConfig(**c, intermediate_size=128, num_key_value_heads=1, head_dim=16),
        "gemma2": lambda: T.Gemma2Config(**c, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                                         sliding_window=8),
        "gemma3": lambda: T.Gemma3TextConfig(**c, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                                             sliding_window=8, layer_types=alternating),
        "mistral": lambda: T.MistralConfig(**c, intermediate_size=128, num_key_value_heads=2, sliding_window=8),
        "phi3": lambda: T.Phi3Config(**c, intermediate_size=128, num_key_value_heads=2, pad_token_id=0,
                                     bos_token_id=1, eos_token_id=2),
        "opt": lambda: T.OPTConfig(**c, ffn_dim=128, word_embed_proj_dim=64),
        "gptj": lambda: T.GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, rotary_dim=8,
                                     n_positions=512, bos_token_id=1, eos_token_id=2),
        "bloom": lambda: T.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=layers, n_head=4),
        "falcon": lambda: T.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers,
                                         num_attention_heads=4),
        "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=512,
                                     bos_token_id=1, eos_token_id=2),
        "gpt_neox": lambda: T.GPTNeoXConfig(**c, intermediate_size=128),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**c, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                                              num_experts_per_tok=2, num_key_value_heads=2, head_dim=16,
                                              decoder_sparse_step=1, mlp_only_layers=[]),
        "mixtral": lambda: T.MixtralConfig(**c, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                                           num_key_value_heads=2),
    }
    return builders[family]()


FAMILIES = ["llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "mistral", "phi3", "opt", "gptj", "bloom",
            "falcon", "gpt2", "gpt_neox", "qwen3_moe", "mixtral"]


def family_model(family: str, layers: int = 3, seed: int = 0, prepared: bool = True):
    """A random model of ``family`` (float32, eval mode), prepared as svdbench's loader prepares it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, layers), dtype=torch.float32).eval()
    if prepared:
        prepare_model(model)
    return model


def gemma3_multimodal(layers: int = 2, seed: int = 0):
    """A random Gemma-3 image-text model: its language model's tensors are renamed when transformers loads it, and
    its vision tower has more blocks than its language model."""
    import transformers as T

    torch.manual_seed(seed)
    text = _config("gemma3", layers)
    vision = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers + 1, num_attention_heads=2,
                                  image_size=32, patch_size=8)
    return T.Gemma3ForConditionalGeneration(T.Gemma3Config(text_config=text, vision_config=vision,
                                                           mm_tokens_per_image=4)).eval()


def whole_model_statistics(model, batches, statistics):
    """The reference: every window through the whole model at once, hooks on every linear (the old engine)."""
    targets = find_targets(model)
    groups, last = {}, {"tensor": None, "target": None, "first": True}
    for statistic in statistics:
        statistic.start()

    def hook(target):
        def observe(_module, inputs, _output):
            x = inputs[0]
            if last["first"]:
                groups[target.name] = groups[last["target"]] if last["tensor"] is x else target.name
                last["tensor"], last["target"] = x, target.name
            if groups[target.name] == target.name:
                for statistic in statistics:
                    statistic.observe(target.name, x.detach().reshape(-1, x.shape[-1]))
        return observe

    handles = [model.get_submodule(t.name).register_forward_hook(hook(t)) for t in targets]
    with torch.no_grad():
        for row in batches:
            model(row[None], use_cache=False)
            last["first"], last["tensor"] = False, None
    for handle in handles:
        handle.remove()
    return {s.name: s.result() for s in statistics}, groups


def whole_model_gradients(model, batches, names):
    """The reference for gradient statistics: each window's LM-loss gradient of each named weight, by autograd."""
    grads = {name: [] for name in names}
    for row in batches:
        model.zero_grad()
        model(row[None], labels=row[None], use_cache=False).loss.backward()
        for name in names:
            grads[name].append(model.get_submodule(name).weight.grad.double().clone())
    model.zero_grad()
    return grads
