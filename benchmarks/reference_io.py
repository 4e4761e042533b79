"""What the fidelity scripts (``*_reference.py``) share: writing a transplanted method's weights as a plain HF directory."""

from __future__ import annotations

import torch


def save(model, tokenizer, weights: dict, out: str) -> None:
    """``model`` with ``weights`` (module path -> new weight) as a float32 Hugging Face directory ``out``.

    The model is rebuilt from its config first: ``save_pretrained`` refuses a GGUF-loaded model."""
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    state = model.state_dict()
    state.update({f"{key}.weight": w.to(torch.float32) for key, w in weights.items()})
    fresh.load_state_dict(state)
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
