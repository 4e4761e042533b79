"""Perplexity on WikiText-2 (raw test) and C4 (validation subset).

Protocol (GPTQ / SVD-LLM style, ``bench/data/README.md``): rows joined with
``"\\n\\n"``, tokenized once with no special tokens, cut into non-overlapping
windows of ``seqlen`` tokens, remainder dropped; perplexity =
``exp(mean token NLL)`` over every predicted token. ``limit`` keeps the first
N windows and the measurement records how many tokens it covered.
"""

from __future__ import annotations

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
    first_nonfinite_module,
    hookimpl,
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


@torch.no_grad()
def perplexity(model: nn.Module, batches: torch.Tensor, batch_size: int = 1, desc: str = "perplexity") -> Measurement:
    """Perplexity of ``model`` over the rows of ``batches`` (windows x seqlen)."""
    device = next(model.parameters()).device
    total_nll = 0.0
    predicted = 0
    for start in tqdm(range(0, len(batches), batch_size), desc=desc, leave=False, unit="batch"):
        chunk = batches[start:start + batch_size].to(device)
        logits = model(chunk, use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum")
        total_nll += float(nll)
        predicted += chunk[:, 1:].numel()
        if not math.isfinite(total_nll):
            source = first_nonfinite_module(model, chunk[:1])
            return Measurement("perplexity", float("nan") if math.isnan(total_nll) else float("inf"),
                               {"windows": len(batches), "tokens": int(batches.numel()), "nonfinite_source": source,
                                "nonfinite_window": start})
    value = math.exp(total_nll / predicted) if predicted else float("nan")
    return Measurement("perplexity", value, {"windows": len(batches), "tokens": int(batches.numel()),
                                             "predicted_tokens": predicted})


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
