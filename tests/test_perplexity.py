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
    # each window's own NLL sum, for the reports' bootstrap: window i alone gives window i's perplexity
    assert len(harness.extra["window_nll"]) == 3 and harness.extra["window_tokens"] == 11
    for i, nll in enumerate(harness.extra["window_nll"]):
        assert math.isclose(math.exp(nll / 11), naive_perplexity(model, batches[i:i + 1]), rel_tol=1e-5)
    assert math.isclose(math.exp(sum(harness.extra["window_nll"]) / 33), harness.value, rel_tol=1e-6)


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


def test_cross_entropy_in_chunks_holds_at_most_a_chunk_of_logits(monkeypatch):
    import tasks.perplexity as ppl

    model = tiny_model("llama")
    monkeypatch.setattr(ppl, "CHUNK_LOGITS", model.config.vocab_size * 5)  # 5 positions per chunk
    rows = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[:-1].numel()))
    torch.manual_seed(0)
    batches = torch.randint(0, 256, (3, 12))
    measured = perplexity(model, batches, batch_size=2)
    handle.remove()
    assert math.isclose(measured.value, naive_perplexity(model, batches), rel_tol=1e-5)
    check, evaluation = rows[:2], rows[2:]  # the head is checked once on 12 positions, then runs in chunks
    assert check == [12, 12] and evaluation == [5, 5, 5, 5, 2, 5, 5, 1] and sum(evaluation) == 3 * 11


def test_a_head_that_is_not_a_plain_linear_falls_back_to_the_models_logits():
    """Gemma-2 soft-caps its logits after lm_head: the chunked path would be wrong, so it is not used."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    from tasks.perplexity import _chunked_head

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                          final_logit_softcapping=0.5)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    batches = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert _chunked_head(model, batches[:1]) is None
        assert _chunked_head(tiny_model("llama"), batches[:1]) is not None
    assert math.isclose(perplexity(model, batches).value, naive_perplexity(model, batches), rel_tol=1e-5)


def test_onednn_linears_agree_with_torch_and_are_restored():
    from bench import onednn_linear_works, onednn_linears

    if not onednn_linear_works():
        pytest.skip("oneDNN's linear is not available in this torch build")
    model = tiny_model("llama")
    torch.manual_seed(0)
    batches = torch.randint(0, 256, (4, 16))
    with onednn_linears(model) as swapped:
        assert swapped == 2 * 7 + 1  # every linear of the two blocks and the head
    assert not any("forward" in vars(m) for m in model.modules())
    fast, default = perplexity(model, batches, 2), perplexity(model, batches, 2, onednn=False)
    assert math.isclose(fast.value, default.value, rel_tol=1e-5)


def test_a_bfloat16_model_reports_its_difference_from_float32(tokenizer):
    import copy

    model = tiny_model("llama", vocab_size=len(tokenizer)).to(torch.bfloat16)
    settings = EvalSettings(seqlen=32, limit=3, batch_size=2)
    [m] = WikiText2().evaluate(model, tokenizer, settings)
    check = m.extra["float32_check"]
    first = WikiText2().token_windows(tokenizer, settings)[:2]
    assert check["dtype"] == "bfloat16" and check["windows"] == 2
    assert check["perplexity"] == perplexity(model, first, 2).value
    assert check["perplexity_float32"] == perplexity(copy.deepcopy(model).float(), first, 2).value
    assert check["perplexity"] != check["perplexity_float32"]  # bfloat16 rounding shows
    assert math.isclose(check["relative_difference"], check["perplexity"] / check["perplexity_float32"] - 1)
    assert abs(check["relative_difference"]) < 0.05
    [fp32] = WikiText2().evaluate(tiny_model("llama", vocab_size=len(tokenizer)), tokenizer, settings)
    assert "float32_check" not in fp32.extra


def test_the_report_settings_show_the_precision_check_and_the_threads():
    from reports.tables import settings_lines

    manifest = {"config": {"dtype": "bfloat16"}, "threads": {"threads": 2, "torch_threads": 2, "wait_policy": "PASSIVE",
                                                             "threads_source": "affinity mask"}}
    checks = [{"extra": {"float32_check": {"dtype": "bfloat16", "windows": 8, "relative_difference": d}}}
              for d in (0.0012, -0.0003)]
    lines = settings_lines(manifest, [*checks, {"extra": {}}])
    assert ("- bfloat16 evaluation vs float32 on the same weights: perplexity -0.030% to +0.120% "
            "(2 evaluations, their first 8 windows).") in lines
    assert "- CPU: 2 torch threads (affinity mask), OpenMP wait policy PASSIVE." in lines
    assert not any("float32 on the same" in line for line in settings_lines(manifest, []))
