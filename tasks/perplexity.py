"""Perplexity on WikiText-2 (raw test) and C4 (validation subset).

Protocol (GPTQ / SVD-LLM style, ``bench/data/README.md``): rows joined with
``"\\n\\n"``, tokenized once with no special tokens, cut into non-overlapping
windows of ``seqlen`` tokens, remainder dropped; perplexity =
``exp(mean token NLL)`` over every predicted token. ``limit`` keeps the first
N windows and the measurement records how many tokens it covered, and each
window's summed NLL and token count (``window_nll``, ``window_tokens``: the
reports' bootstrap intervals resample them, ``reports/stats.py``).

**Speed and memory.** The cross-entropy is computed in chunks of at most
``CHUNK_LOGITS`` logits: the decoder's last hidden states go through the LM
head a slice of positions at a time, so memory does not grow with
vocabulary x sequence x batch (SmolLM2 at batch 8 x 2048 tokens would hold
3.2 GB of logits at once). The chunked path is checked once per call against
the model's own logits on a few tokens; a model whose head does more than a
linear map (soft-capping, scaling) falls back to full logits. On CPU in
float32, linears run through oneDNN instead of the default BLAS when oneDNN
is present (``bench.onednn_linears``: about twice as fast here; the results
agree to float32 rounding).

**Lower precision.** A model in bfloat16 or float16 (``--dtype``) is
evaluated in that dtype, and its first batch of windows is also evaluated by
a float32 copy of the same weights: ``extra["float32_check"]`` holds both
perplexities and their relative difference (the report's settings show it).
"""

from __future__ import annotations

import copy
import functools
import math

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from bench import (
    EVALUATION_CORPORA,
    EvalSettings,
    Measurement,
    Metric,
    Task,
    checksums,
    evaluation_text,
    execution_device,
    first_nonfinite_module,
    hookimpl,
    onednn_linears,
)


@functools.lru_cache(maxsize=8)
def _token_stream(tokenizer, corpus: str) -> torch.Tensor:
    return tokenizer(evaluation_text(corpus), add_special_tokens=False, return_tensors="pt").input_ids[0]


def windows(ids: torch.Tensor, seqlen: int, limit: int | None) -> torch.Tensor:
    """Non-overlapping ``seqlen`` windows (remainder dropped), the first ``limit`` of them."""
    count = ids.numel() // seqlen
    if limit is not None:
        count = min(count, limit)
    return ids[: count * seqlen].view(count, seqlen)


CHUNK_LOGITS = 2**24  # logits per cross-entropy chunk: 64 MiB in float32, whatever the vocabulary and batch
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _chunked_head(model: nn.Module, sample: torch.Tensor):
    """(decoder, head, vocabulary size) when ``logits == head(decoder(ids).last_hidden_state)`` for this model,
    checked on ``sample``; ``None`` otherwise (the caller then uses the model's full logits)."""
    decoder, head = getattr(model, "base_model", None), model.get_output_embeddings()
    if decoder is None or decoder is model or not isinstance(head, nn.Module):
        return None
    try:
        expected = model(sample, use_cache=False).logits
        logits = head(decoder(input_ids=sample, use_cache=False).last_hidden_state)
    except (TypeError, AttributeError, RuntimeError):
        return None
    same = logits.shape == expected.shape and torch.allclose(logits.float(), expected.float(), rtol=1e-4, atol=1e-4)
    return (decoder, head, expected.shape[-1]) if same else None


def _batch_nll(model: nn.Module, chunk: torch.Tensor, head) -> list[float]:
    """Summed next-token NLL of each row of ``chunk`` (float64), logits computed ``CHUNK_LOGITS`` at a time."""
    targets = chunk[:, 1:].reshape(-1)
    if head is None:
        logits = model(chunk, use_cache=False).logits
        token_nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets, reduction="none")
    else:
        decoder, lm_head, vocab = head
        hidden = decoder(input_ids=chunk, use_cache=False).last_hidden_state[:, :-1].flatten(0, 1)
        rows = max(1, CHUNK_LOGITS // vocab)
        token_nll = torch.cat([F.cross_entropy(lm_head(hidden[start:start + rows]).float(),
                                               targets[start:start + rows], reduction="none")
                               for start in range(0, len(hidden), rows)])
    return token_nll.double().view(len(chunk), -1).sum(1).tolist()


@torch.no_grad()
def perplexity(model: nn.Module, batches: torch.Tensor, batch_size: int = 1, desc: str = "perplexity",
               onednn: bool = True) -> Measurement:
    """Perplexity of ``model`` over the rows of ``batches`` (windows x seqlen).

    ``onednn=False`` keeps torch's default linear kernels (for comparing them).
    """
    device = execution_device(model)  # the offload hooks' device when blocks are offloaded
    with onednn_linears(model, onednn):
        return _perplexity(model, batches, batch_size, desc, device)


def _perplexity(model: nn.Module, batches: torch.Tensor, batch_size: int, desc: str, device) -> Measurement:
    window_nll: list[float] = []
    predicted = 0
    head = _chunked_head(model, batches[:1, :16].to(device)) if len(batches) else None
    for start in tqdm(range(0, len(batches), batch_size), desc=desc, leave=False, unit="batch"):
        chunk = batches[start:start + batch_size].to(device)
        window_nll += _batch_nll(model, chunk, head)
        predicted += chunk[:, 1:].numel()
        total_nll = math.fsum(window_nll)
        if not math.isfinite(total_nll):
            source = first_nonfinite_module(model, chunk[:1])
            return Measurement("perplexity", float("nan") if math.isnan(total_nll) else float("inf"),
                               {"windows": len(batches), "tokens": int(batches.numel()), "nonfinite_source": source,
                                "nonfinite_window": start})
    value = math.exp(math.fsum(window_nll) / predicted) if predicted else float("nan")
    # per window, for the reports' bootstrap intervals: NLL sums to 7 significant digits, one token count
    return Measurement("perplexity", value, {"windows": len(batches), "tokens": int(batches.numel()),
                                             "predicted_tokens": predicted,
                                             "window_nll": [float(f"{nll:.7g}") for nll in window_nll],
                                             "window_tokens": batches.shape[1] - 1 if len(batches) else 0})


def float32_check(model: nn.Module, batches: torch.Tensor, dtype: torch.dtype) -> dict:
    """Perplexity on ``batches`` of ``model`` (in ``dtype``) and of a float32 copy of the same weights."""
    low = perplexity(model, batches, len(batches), desc="low precision").value
    reference = nn.Module.float(copy.deepcopy(model))  # nn.Module's: transformers refuses .float() on some models
    high = perplexity(reference, batches, len(batches), desc="float32 check").value
    del reference
    return {"dtype": str(dtype).removeprefix("torch."), "windows": len(batches), "perplexity": low,
            "perplexity_float32": high, "relative_difference": low / high - 1 if high else float("nan")}


class PerplexityTask(Task):
    corpus = ""
    metrics = {"perplexity": Metric("perplexity", higher_is_better=False)}

    def data_checksums(self) -> dict[str, str]:
        rel = EVALUATION_CORPORA[self.corpus]
        return {rel: checksums()[rel]}

    def token_windows(self, tokenizer, settings: EvalSettings) -> torch.Tensor:
        return windows(_token_stream(tokenizer, self.corpus), settings.seqlen, settings.limit)

    def evaluate(self, model, tokenizer, settings: EvalSettings) -> list[Measurement]:
        batches = self.token_windows(tokenizer, settings)
        measurement = perplexity(model, batches, settings.batch_size, desc=self.name)
        measurement.extra["total_windows"] = _token_stream(tokenizer, self.corpus).numel() // settings.seqlen
        dtype = next(model.parameters()).dtype
        if dtype in LOW_PRECISION and len(batches):
            measurement.extra["float32_check"] = float32_check(model, batches[:settings.batch_size], dtype)
        return [measurement]


class WikiText2(PerplexityTask):
    name = "wikitext2"
    description = "WikiText-2 raw test perplexity (lower is better)"
    corpus = "wikitext2"


class C4(PerplexityTask):
    name = "c4"
    description = "C4 validation perplexity, first 1,000 of the 2,000 vendored documents (lower is better)"
    corpus = "c4"


@hookimpl
def register_tasks(register):
    register(WikiText2())
    register(C4())
