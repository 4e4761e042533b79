"""The perplexity task against a naive computation, and the data protocol."""

import math

import pytest
import torch
from conftest import tiny_model
from torch.nn import functional as F

from bench.api.task import EvalSettings
from bench.corpora import c4_rows, calibration_text, evaluation_text, wikitext2_rows
from tasks.perplexity import C4, WikiText2, _token_stream, perplexity, windows


def naive_perplexity(model, batches):
    """Token by token: the NLL of each next token given its full prefix."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in batches:
            for t in range(1, len(row)):
                logits = model(row[None, :t]).logits[0, -1]
                nll -= float(F.log_softmax(logits.double(), -1)[row[t]])
                count += 1
    return math.exp(nll / count)


def test_perplexity_matches_token_by_token():
    model = tiny_model("llama")
    torch.manual_seed(0)
    batches = torch.randint(0, 256, (3, 12))
    harness = perplexity(model, batches, batch_size=2)
    assert harness.extra["predicted_tokens"] == 3 * 11
    assert math.isclose(harness.value, naive_perplexity(model, batches), rel_tol=1e-5)


def test_windows_drop_the_remainder_and_honour_limit():
    ids = torch.arange(10)
    assert windows(ids, 3, None).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert windows(ids, 3, 2).shape == (2, 3)


def test_wikitext2_rows_follow_the_hugging_face_loader():
    rows = wikitext2_rows()
    assert len(rows) == 4358
    assert rows[0] == ""  # the file's first line is blank
    assert all(r == "" or r.endswith("\n") for r in rows)


def test_evaluation_and_calibration_text_never_overlap():
    assert evaluation_text("wikitext2") == "\n\n".join(wikitext2_rows())
    evaluated, calibration = c4_rows("eval"), c4_rows("calibration")
    assert len(evaluated) == len(calibration) == 1000 and not set(evaluated) & set(calibration)
    assert evaluation_text("c4") == "\n\n".join(evaluated) and calibration_text("c4") == "\n\n".join(calibration)
    assert calibration_text("wikitext2") != evaluation_text("wikitext2")


@pytest.mark.real_model
def test_wikitext2_token_count_matches_the_published_protocol(smollm2):
    # bench/data/README.md: 304,986 tokens with the SmolLM2 tokenizer
    assert _token_stream(smollm2.tokenizer, "wikitext2").numel() == 304_986


def test_task_records_tokens_covered(tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    [m] = WikiText2().evaluate(model, tokenizer, EvalSettings(seqlen=32, limit=2))
    assert m.metric == "perplexity" and math.isfinite(m.value)
    assert m.extra["windows"] == 2 and m.extra["tokens"] == 64
    assert m.extra["total_windows"] == _token_stream(tokenizer, "wikitext2").numel() // 32 > 1000


def test_perplexity_tasks_declare_their_metric():
    for task in (WikiText2(), C4()):
        [(name, metric)] = task.metrics.items()
        assert name == "perplexity" and metric.kind == "perplexity" and metric.higher_is_better is False
        assert task.describe()["metrics"]["perplexity"]["kind"] == "perplexity" and "average" not in task.describe()
        [(rel, digest)] = task.data_checksums().items()
        assert rel.startswith(task.corpus) and len(digest) == 64


def test_nonfinite_perplexity_names_the_layer():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    m = perplexity(model, torch.randint(0, 256, (1, 8)))
    assert math.isnan(m.value)
    assert m.extra["nonfinite_source"] == "model.layers.1.mlp.down_proj"
