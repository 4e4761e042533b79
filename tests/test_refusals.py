"""Input svdbench cannot honour, refused in one line with exit 2, and the small fixes of issue 27.

Encoders and encoder-decoders (perplexity needs causal attention), devices
this machine lacks, names too long for the file system, a budget number
without its unit, budgets no model reaches, a ratio a quantize-only method
would ignore; repeated ratios computed once, the quantizers' import noise
kept off stderr, and earlier runs' records kept in report.md.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from families import FAMILIES, family_model

from bench import load_results
from bench.cli import main
from bench.engine import executor
from bench.engine.budget import parse_budget
from bench.engine.config import CalibrationConfig, RunConfig
from bench.errors import UsageError
from bench.model.causal import check_causal
from bench.model.loading import load_model
from bench.model.targets import find_targets, footprint
from reports.report import write_report

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(tasks=("wikitext2",), limit=1, seqlen=32, calibration=CalibrationConfig(samples=2, seqlen=32))
EVAL = ["--tasks", "wikitext2", "--limit", "1", "--seqlen", "32", "--calib-samples", "2", "--calib-seqlen", "32"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if "error" in line.lower()]
    assert line.startswith("svdbench: error: ") and "Traceback" not in err
    return line


def run_cli(capsys, tmp_path, model, *flags) -> tuple[int, str | None]:
    code = main(["run", "--model", str(model), "--out", str(tmp_path / "out"), *flags])
    return code, one_error_line(capsys) if code == 2 else None


# --------------------------------------------------------------------------- encoders


def _encoder_checkpoints(tmp_path, tokenizer):
    import transformers as T

    torch.manual_seed(0)
    bert = T.BertForMaskedLM(T.BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=128))
    t5 = T.T5ForConditionalGeneration(T.T5Config(vocab_size=len(tokenizer), d_model=64, d_ff=128, num_layers=2,
                                                  num_heads=4, d_kv=16))
    paths = {}
    for name, model in (("bert", bert), ("t5", t5)):
        paths[name] = tmp_path / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


@pytest.mark.parametrize("family, expected", [
    ("bert", "bert (BertForMaskedLM) is loaded as BertLMHeadModel, not causal"),
    ("t5", "t5 (T5ForConditionalGeneration) is an encoder-decoder model"),
])
def test_encoders_and_encoder_decoders_are_refused(family, expected, tmp_path, tokenizer, capsys):
    model = _encoder_checkpoints(tmp_path, tokenizer)[family]
    code, line = run_cli(capsys, tmp_path, model, "--methods", "svd", "--ratios", "0.2", *EVAL)
    assert code == 2 and expected in line and "perplexity, which needs a causal" in line
    assert not (tmp_path / "out" / "results.json").exists()


def test_the_causality_probe_is_one_short_forward_pass_and_passes_every_decoder():
    for family in FAMILIES:
        model = family_model(family, layers=2)
        calls: list = []
        handle = model.register_forward_hook(lambda _m, _a, kwargs, _o, calls=calls: calls.append(
            kwargs["input_ids"].shape), with_kwargs=True)
        check_causal(model)  # raises for a model whose earlier logits see the last token
        handle.remove()
        assert calls == [(2, 8)], family


def test_the_probe_is_empirical_a_bert_decoder_is_causal():
    import transformers as T

    config = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    check_causal(T.BertLMHeadModel(T.BertConfig(is_decoder=True, **config)).eval())  # causal mask: accepted
    with pytest.raises(UsageError, match="not causal: its logits at earlier positions change"):
        check_causal(T.BertLMHeadModel(T.BertConfig(**config)).eval())


# --------------------------------------------------------------------------- devices and paths


@pytest.mark.parametrize("device, expected", [
    ("tpu", "--device tpu is not a device svdbench runs on; use cpu, cuda or cuda:N"),
    ("cuda", "--device cuda but CUDA is not available"),
    ("cuda:7", "--device cuda:7 but"),
])
def test_devices_this_machine_lacks_are_one_line(device, expected, tmp_path, tiny_dir, capsys):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the device")
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available")
    code, line = run_cli(capsys, tmp_path, tiny_dir, "--device", device, "--methods", "svd", *EVAL)
    assert code == 2 and expected in line
    if device == "cuda:7" and torch.cuda.is_available():
        assert f"this machine has {torch.cuda.device_count()} CUDA device(s)" in line


def test_an_out_name_over_255_bytes_is_one_line(tmp_path, tiny_dir, capsys):
    long = tmp_path / ("x" * 256)
    code = main(["run", "--model", str(tiny_dir), "--methods", "svd", *EVAL, "--out", str(long)])
    assert code == 2 and "--out has a name of 256 bytes" in one_error_line(capsys)
    code = main(["compress", "--model", str(tiny_dir), "--method", "svd", "--ratio", "0.2", "--out", str(long)])
    assert code == 2 and "at most 255 bytes per name" in one_error_line(capsys)
    code = main(["run", "--model", str(tmp_path / ("é" * 128)), "--out", str(tmp_path / "out")])  # 256 bytes
    assert code == 2 and "--model has a name of 256 bytes" in one_error_line(capsys)


# --------------------------------------------------------------------------- budgets


def test_a_budget_number_above_1_needs_a_unit(tmp_path, tiny_dir, capsys):
    assert parse_budget("2.0GB") == ("bytes", 2e9) and parse_budget("1") == ("fraction", 1.0)
    for spec in ("2.0", "3.1e8", "1.5"):
        with pytest.raises(UsageError, match="is a number above 1 without a unit"):
            parse_budget(spec)
    code, line = run_cli(capsys, tmp_path, tiny_dir, "--methods", "svd", "--budgets", "2.0", *EVAL)
    assert code == 2 and "budget '2.0' is a number above 1 without a unit; give a unit (2.0GB" in line


def _floor(model_dir) -> int:
    """The bytes of what no method compresses: the dense bytes less every target's weight."""
    model = load_model(str(model_dir)).model
    return footprint(model)["bytes"] - sum(t.out_features * t.in_features for t in find_targets(model)) * 4


def test_a_budget_below_the_uncompressed_parts_is_refused_before_any_decomposition(tmp_path, tiny_dir, capsys):
    floor = _floor(tiny_dir)
    code, line = run_cli(capsys, tmp_path, tiny_dir, "--methods", "svd", "--budgets", "2kB", *EVAL)
    assert code == 2 and f"budget 2kB (2000 bytes) is below {floor} bytes" in line and f"above {floor}B" in line
    results = tmp_path / "out" / "results.json"
    assert not results.exists() or not load_results(tmp_path / "out")["records"]  # nothing was evaluated


def test_a_budget_a_method_cannot_reach_is_one_line_and_keeps_the_other_results(tmp_path, tiny_dir, capsys):
    budget = f"{_floor(tiny_dir) + 8}B"  # above the never-compressed parts, below any rank-1 model
    code = main(["run", "--model", str(tiny_dir), "--methods", "svd", "--ratios", "0.2", "--budgets", budget, *EVAL,
                 "--out", str(tmp_path / "out")])
    line = one_error_line(capsys)
    assert code == 2 and line.startswith(f"svdbench: error: svd at budget {budget}: budget of ")
    assert "below the smallest model this method makes" in line and "at ratio 0.99; give a budget of at least" in line
    data = load_results(tmp_path / "out")
    assert {(r["method"], r["ratio"]) for r in data["records"]} == {("dense", 0.0), ("svd", 0.2)}  # nothing lost
    assert (tmp_path / "out" / "report.md").exists()


# --------------------------------------------------------------------------- repeated values


def test_repeated_ratios_budgets_tasks_and_methods_count_once(tiny, tmp_path):
    config = RunConfig(methods=("svd", "asvd", "svd"), ratios=(0.4, 0.2, 0.4), budgets=("0.9", "0.90", "300MB", "3e8B"),
                       tasks=("wikitext2", "c4", "wikitext2"))
    assert config.methods == ("svd", "asvd") and config.ratios == (0.4, 0.2) and config.budgets == ("0.9", "300MB")
    assert config.tasks == ("wikitext2", "c4") and config.to_dict()["ratios"] == [0.4, 0.2]
    results = executor.run(RunConfig(model="tiny", out=str(tmp_path), methods=("svd",), ratios=(0.2, 0.2), **SMALL),
                           loaded=tiny)
    assert sorted((r["method"], r["ratio"]) for r in results.records) == [("dense", 0.0), ("svd", 0.2)]
    assert len(results.data["compressions"]) == 1


# --------------------------------------------------------------------------- quantizers


def test_a_run_without_a_quantizer_prints_no_quantizer_import_noise(tmp_path, tiny_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SVDBENCH_PLUGINS": ""}
    done = subprocess.run([sys.executable, "-m", "bench.cli", "run", "--model", str(tiny_dir), "--methods", "svd",
                           "--ratios", "0.2", *EVAL, "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    noisy = [line for line in done.stderr.splitlines()
             if any(word in line for word in ("torchao", "gptqmodel", "_pytree", "triton"))]
    assert noisy == []


def test_compress_refuses_a_ratio_a_quantize_only_method_ignores(tmp_path, tiny_dir, capsys):
    out = tmp_path / "hqq"
    code = main(["compress", "--model", str(tiny_dir), "--method", "hqq", "--ratio", "0.7", "--out", str(out)])
    assert code == 2
    assert "--ratio 0.7 is ignored by hqq, a quantize-only method that removes no parameters; drop --ratio" \
        in one_error_line(capsys)
    code = main(["compress", "--model", str(tiny_dir), "--method", "svd", "--out", str(out)])
    assert code == 2 and "svd needs --ratio" in one_error_line(capsys)
    assert not out.exists()
    assert main(["compress", "--model", str(tiny_dir), "--method", "hqq", "--out", str(out)]) == 0
    assert json.loads((out / "svdbench.json").read_text())["ratio"] == 0.0


# --------------------------------------------------------------------------- the report


def test_report_lists_the_records_of_earlier_runs(tiny, tmp_path):
    executor.run(RunConfig(model="tiny", out=str(tmp_path), methods=("svd",), ratios=(0.2,), **SMALL), loaded=tiny)
    results = executor.run(RunConfig(model="tiny", out=str(tmp_path), methods=("svd",), ratios=(0.4,), **SMALL),
                           loaded=tiny)
    assert {r["ratio"] for r in results.data["previous_records"]} == {0.2}
    report = write_report(results.data, tmp_path, plots=False)[0].read_text()
    head, _, earlier = report.partition("## Earlier records")
    assert "| svd | 40% |" in head and "| svd | 20% |" not in head
    assert "1 record(s) of earlier runs" in earlier and "| svd | 20% | - | wikitext2 | perplexity |" in earlier
