"""Refusing models that are not causal language models.

Perplexity and the zero-shot log-likelihoods read the logits at position
``i`` as the model's prediction of token ``i + 1`` from the tokens before it;
that holds only with causal attention. An encoder-decoder (T5, BART) is
refused by its config; an encoder loaded as a language model (BERT loads as
``BertLMHeadModel``, attending in both directions) only shows itself by its
outputs, so a probe checks them: changing the last token of a short random
sequence must leave the logits at every earlier position unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from bench.errors import UsageError

log = logging.getLogger(__name__)

PROBE_TOKENS = 8
PROBE_VOCAB = 10_000  # ids drawn below this: special tokens (Gemma-3's image token, 262144) sit at the top
TOLERANCE = 1e-4  # relative to the logits' scale: a causal model's earlier logits agree to rounding


def architecture(config) -> str:
    """The model's type and class names as the config gives them (``bert (BertForMaskedLM)``)."""
    get = config.get if isinstance(config, Mapping) else lambda key, default=None: getattr(config, key, default)
    names = ", ".join(get("architectures", None) or [])
    return f"{get('model_type', None) or 'unknown'}" + (f" ({names})" if names else "")


def _refusal(config, why: str) -> UsageError:
    return UsageError(f"{architecture(config)} is {why}; svdbench measures perplexity, which needs a causal "
                      "(decoder-only) language model: give a decoder-only checkpoint (Llama, Qwen, Gemma, OPT, ...)")


def check_not_encoder_decoder(config) -> None:
    """Refuse an encoder-decoder config (``is_encoder_decoder``) before any weight is read."""
    get = config.get if isinstance(config, Mapping) else lambda key, default=None: getattr(config, key, default)
    if get("is_encoder_decoder", False):
        raise _refusal(config, "an encoder-decoder model")


@torch.no_grad()
def check_causal(model: torch.nn.Module) -> None:
    """Refuse ``model`` when an earlier position's logits depend on a later token (bidirectional attention).

    One forward pass over two rows of ``PROBE_TOKENS`` random tokens that
    differ only in their last token: milliseconds, even for large models.
    """
    config = getattr(model, "config", None)
    check_not_encoder_decoder(config or {})
    vocab = min(model.get_input_embeddings().num_embeddings, PROBE_VOCAB)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, PROBE_TOKENS), generator=generator).repeat(2, 1)
    ids[1, -1] = (ids[0, -1] + 1) % vocab
    device = next(model.parameters()).device
    try:
        logits = model(input_ids=ids.to(device), use_cache=False).logits.double()
    except Exception as error:  # a model that needs more than token ids: evaluation will say what it lacks
        log.warning("could not check that %s is causal (%s: %s); its perplexity is valid only if it is",
                    architecture(config or {}), type(error).__name__, str(error).strip()[:200])
        return
    earlier = logits[:, :-1]
    if not torch.isfinite(earlier).all():  # NaN/inf weights: the run's NaN checks name the layer, not this probe
        log.warning("could not check that %s is causal: its logits are not finite", architecture(config or {}))
        return
    scale = earlier.abs().max().item()
    change = (earlier[0] - earlier[1]).abs().max().item()
    if not change <= TOLERANCE * max(scale, 1e-30):
        loaded = type(model).__name__
        raise _refusal(config or {}, f"loaded as {loaded}, not causal: its logits at earlier positions change with the last token "
                       f"(by {change:.3g}, logits up to {scale:.3g}), so it attends in both directions (an encoder?)")
