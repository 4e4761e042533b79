"""What the fault-injection suite and ``benchmarks/faults.py`` share: a tiny model on disk, the real CLI
in a subprocess, and the checks every case ends with.

Nothing here imports svdbench's engine: the runs are real ``svdbench``
processes (``python -m bench.cli.main``), killed, interrupted, starved of
disk or raced against each other from outside, and their output directory
and caches are read back as plain files.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# a small two-method, two-ratio run: dense + svd + svdllm_w (calibration statistics) at 0.2 and 0.4
SMALL_RUN = ["--methods", "svd,svdllm_w", "--ratios", "0.2,0.4", "--tasks", "wikitext2", "--limit", "1",
             "--seqlen", "32", "--calib-samples", "2", "--calib-seqlen", "32"]


def make_tiny_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A tiny random Llama (hidden 64, 2 blocks) and a 512-token BPE tokenizer saved as a HF checkpoint."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("svdbench_test_models", REPO / "tests" / "conftest.py")
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)  # the suite's own tiny model and tokenizer, built in code
    tokenizer = models.tiny_tokenizer()
    model = models.tiny_model("llama", vocab_size=len(tokenizer), seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_tiny_gguf(checkpoint: Path, path: Path) -> Path:
    """The tiny checkpoint as a GGUF file (float32 tensors, GPT-2 style BPE vocabulary), for the conversion cache."""
    import gguf
    from safetensors.torch import load_file

    config = json.loads((checkpoint / "config.json").read_text())
    vocab_model = json.loads((checkpoint / "tokenizer.json").read_text())["model"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    tokens = sorted(vocab_model["vocab"], key=vocab_model["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) for m in vocab_model["merges"]])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    per_block = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, tensor in load_file(checkpoint / "model.safetensors").items():
        if name in top:
            gguf_name = top[name]
        else:
            parts = name.split(".")
            gguf_name = f"blk.{parts[2]}.{per_block['.'.join(parts[3:-1])]}.weight"
        writer.add_tensor(gguf_name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def cli_env(cache: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SVDBENCH_")}
    # no thread settings of its own: the child runs under svdbench's policy (or the user's), as the in-process
    # runs of the same tests do, so both write the same report
    env.update(SVDBENCH_CACHE=str(cache), SVDBENCH_PLUGINS="", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.cli.main", *args]


@dataclass
class Done:
    """A finished CLI process."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("svdbench: ")]


def svdbench(*args: str, cache: Path, timeout: float = 600, env: dict | None = None) -> Done:
    """Run the real ``svdbench`` CLI to completion."""
    start = time.perf_counter()
    proc = subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=timeout,
                          env=env or cli_env(cache), cwd=REPO)
    return Done(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start)


def start(*args: str, cache: Path, env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    """Start the real ``svdbench`` CLI (its output to ``log``)."""
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(cli_command(*args), stdout=out, stderr=subprocess.STDOUT if log else out,
                            env=env or cli_env(cache), cwd=REPO, start_new_session=True)


def kill9(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# --------------------------------------------------------------------------- reading an output back

def journal_cells(out: Path) -> list[tuple[str, list[dict]]]:
    """(key, records) of every complete cell line of the journal, in order (a torn last line is skipped)."""
    path = out / "journal.jsonl"
    if not path.exists():
        return []
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    cells = []
    for line in complete.splitlines():
        event = json.loads(line)
        if event["t"] == "cell":
            cells.append((event["key"], event["records"]))
    return cells


def _strict_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def read_results(out: Path) -> dict:
    """results.json parsed as strict JSON (NaN/Infinity literals rejected)."""
    return json.loads((out / "results.json").read_text(), parse_constant=_strict_constant)


def results_checksum_ok(data: dict) -> bool:
    body = {k: v for k, v in data.items() if k != "checksum"}
    return data.get("checksum") == hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def values(records: list[dict]) -> dict[tuple, float]:
    return {(r["key"], r["metric"], json.dumps(r.get("point") or {}, sort_keys=True)): r["value"] for r in records}


def corrupt_files(out: Path, cache: Path | None = None, finished: bool = False) -> list[str]:
    """Files svdbench would use that are not valid: results.json, journal lines, cache entries; temporaries
    left behind after a finished run."""
    problems = []
    results = out / "results.json"
    if results.exists():
        try:
            data = read_results(out)
            if not results_checksum_ok(data):
                problems.append(f"{results}: checksum mismatch")
        except ValueError as error:
            problems.append(f"{results}: {error}")
    journal = out / "journal.jsonl"
    if journal.exists():
        raw = journal.read_bytes()
        for number, line in enumerate(raw[: raw.rfind(b"\n") + 1].splitlines(), start=1):
            try:
                event = json.loads(line)
                body = {k: v for k, v in event.items() if k != "crc"}
                if event["crc"] != hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]:
                    raise ValueError("checksum")
            except (ValueError, KeyError):
                problems.append(f"{journal}: line {number}")
    if cache is not None:
        problems += corrupt_cache_entries(cache)
    if finished:
        problems += [str(p) for p in out.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".partial"))]
    return problems


def corrupt_cache_entries(cache: Path) -> list[str]:
    """Cache entries whose checksum file exists but whose data does not match it."""
    problems = []
    for meta in cache.rglob("*.json"):
        if meta.name.startswith("."):
            continue
        try:
            info = json.loads(meta.read_text())
        except ValueError:
            problems.append(f"{meta}: not JSON")
            continue
        if not isinstance(info, dict):
            problems.append(f"{meta}: not an object")
        elif "payload" in info:  # a JSON cache entry
            digest = hashlib.sha256(json.dumps(info["payload"], sort_keys=True).encode()).hexdigest()
            if digest != info.get("sha256"):
                problems.append(f"{meta}: payload checksum")
        elif "sha256" in info and "fields" in info:  # a statistics entry: <key>.json beside <key>.safetensors
            data = meta.with_suffix(".safetensors")
            if not data.exists() or hashlib.sha256(data.read_bytes()).hexdigest() != info["sha256"]:
                problems.append(f"{meta}: data checksum")
        elif "files" in info:  # a directory entry (converted model, store entry)
            for name, digest in info["files"].items():
                path = meta.parent / name
                if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
                    problems.append(f"{path}: checksum")
    return problems


# --------------------------------------------------------------------------- the kill -9 sweep

@dataclass
class SweepReport:
    points: int = 0
    kills: int = 0
    completed: int = 0
    lost: int = 0
    recomputed: int = 0
    duplicated: int = 0
    corrupt: int = 0
    wrong_values: int = 0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"lost {self.lost}, recomputed {self.recomputed}, duplicated {self.duplicated}, corrupt {self.corrupt}"


def kill_sweep(model: Path, work: Path, points: int, seed: int, progress=print) -> SweepReport:
    """Kill ``svdbench run`` with SIGKILL at ``points`` seeded random moments, resuming after each.

    One uninterrupted run gives the reference values and the duration T.
    Then runs are started on an output directory and killed after a delay
    drawn uniformly from [0, 1.1 T]; the next run resumes the same
    directory. When a run finishes, its values are compared with the
    reference and a fresh directory (and every other time a fresh cache)
    begins. After every run: no cell finished before it is lost, none
    computed again, none present twice, and no file is corrupt. A chain also
    ends when a killed run had journaled every cell (it was killed while
    writing its report), so that the kills keep landing on computation.
    """
    import random

    rng = random.Random(seed)
    report = SweepReport()
    reference_cache = work / "reference-cache"
    reference = svdbench("run", "--model", str(model), *SMALL_RUN, "--out", str(work / "reference"),
                         cache=reference_cache)
    if reference.returncode != 0:
        raise RuntimeError(f"the reference run failed:\n{reference.stderr[-3000:]}")
    expected = values(read_results(work / "reference")["records"])
    expected_cells = len({key for key, *_ in expected})
    duration = reference.seconds
    chain = 0
    out, cache = work / "out-0", work / "cache-0"
    for point in range(points + 1):
        final = point == points  # one last run without a kill finishes the last chain
        before_lines = journal_cells(out)
        before = dict(before_lines)
        proc = start("run", "--model", str(model), *SMALL_RUN, "--out", str(out), cache=cache,
                     log=work / f"log-{point}.txt")
        delay = None if final else rng.uniform(0, 1.1 * duration)
        try:
            proc.wait(timeout=delay if delay is not None else 900)
            killed = False
        except subprocess.TimeoutExpired:
            kill9(proc)
            killed = True
        if not final:
            report.points += 1
            report.kills += killed
        after = journal_cells(out)
        after_map = dict(after)
        # a finished cell is lost when it is gone or its records changed (the journal only ever grows)
        report.lost += sum(1 for key, records in before.items() if after_map.get(key) != records)
        new_lines = after[len(before_lines):] if after[:len(before_lines)] == before_lines else after
        report.recomputed += sum(1 for key, _ in new_lines if key in before)
        report.duplicated += sum(n - 1 for n in Counter(key for key, _ in after).values() if n > 1)
        problems = corrupt_files(out, cache, finished=not killed)
        if (out / "results.json").exists() and not problems:
            recorded = Counter((r["key"], r["metric"], json.dumps(r.get("point") or {}))
                               for r in read_results(out)["records"])
            report.duplicated += sum(n - 1 for n in recorded.values() if n > 1)
        report.corrupt += len(problems)
        report.problems += problems
        if not killed and proc.returncode != 0:
            report.problems.append(f"run {point} exited {proc.returncode}: see {work / f'log-{point}.txt'}")
            report.corrupt += 1
        if not killed or len(after_map) == expected_cells:  # every cell is in: this chain is done
            got = values(read_results(out)["records"] if not killed else [r for _, rs in after for r in rs])
            report.wrong_values += sum(1 for k in expected if got.get(k) != expected[k])
            report.completed += not killed
            chain += 1
            out = work / f"out-{chain}"
            cache = work / f"cache-{chain // 2}"  # every other chain starts with an empty cache
        progress(f"point {point}: {'killed' if killed else 'finished'}"
                 f"{f' after {delay:.1f} s' if killed else ''}; {len(after_map)} cells in the journal; {report.line()}")
    return report
