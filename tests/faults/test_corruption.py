"""Truncation and bit flips of every kind of file svdbench writes.

Output directory (results.json, the journal, reports, the lock), calibration
statistics, ASVD's sensitivity table, the converted-model cache, a model
directory the user gave, a saved compressed model. What svdbench owns is
detected and rebuilt (byte-identical, nothing finished computed again); what
the user gave is refused with one line and exit 2. Runs go through the real
CLI entry point (``bench.cli.main``) in this process.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from bench.cli import main
from bench.storage import JsonCache, sha256_file

from .harness import SMALL_RUN, corrupt_cache_entries, corrupt_files, journal_cells, read_results

TINY_RUN = ["--tasks", "wikitext2", "--limit", "1", "--seqlen", "32", "--calib-samples", "2", "--calib-seqlen", "32"]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip(path: Path, seed: int = 0) -> None:
    """Flip one bit at a seeded position (in the second half of a big file: past a safetensors header)."""
    data = bytearray(path.read_bytes())
    rng = random.Random(f"{path.name}-{seed}")
    low = len(data) // 2 if len(data) > 100_000 else 0
    position = rng.randrange(low, len(data))
    data[position] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def null(path: Path) -> None:
    path.write_text("null")


MODES = {"truncated": truncate, "bit-flipped": flip, "null": null}


def cli(capsys, *argv) -> tuple[int, str | None, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("svdbench:")]
    assert len(lines) <= 1, lines
    return code, lines[0] if lines else None, err


def run_small(capsys, checkpoint, out, cache, monkeypatch, *extra):
    monkeypatch.setenv("SVDBENCH_CACHE", str(cache))
    monkeypatch.delenv("SVDBENCH_STATS_CACHE", raising=False)
    return cli(capsys, "run", "--model", checkpoint, *SMALL_RUN, *extra, "--out", out)


def cell_runs(out) -> dict[str, str]:
    """Which run journaled each cell ({} before any journal exists)."""
    runs = {}
    journal = out / "journal.jsonl"
    for line in journal.read_bytes().splitlines() if journal.exists() else []:
        event = json.loads(line)
        if event["t"] == "cell":
            assert event["key"] not in runs, f"cell {event['key']} is in the journal twice"
            runs[event["key"]] = event["run"]
    return runs


# --------------------------------------------------------------------------- the output directory

@pytest.mark.parametrize("mode", [*MODES, "deleted"])
def test_corrupt_results_json_is_moved_aside_and_rebuilt(mode, finished_copy, checkpoint, capsys, monkeypatch):
    out, cache = finished_copy
    before = read_results(out)["records"]
    runs = cell_runs(out)
    path = out / "results.json"
    path.unlink() if mode == "deleted" else MODES[mode](path)
    code, line, err = run_small(capsys, checkpoint, out, cache, monkeypatch)
    assert code == 0 and line is None
    assert read_results(out)["records"] == before and cell_runs(out) == runs  # nothing lost, nothing recomputed
    assert len(list(out.glob("results.json.corrupt-*"))) == (mode != "deleted")  # kept for a look
    assert corrupt_files(out, finished=True) == []


def test_truncated_journal_drops_the_torn_line_and_keeps_every_cell(finished_copy, checkpoint, capsys, monkeypatch,
                                                                    caplog):
    out, cache = finished_copy
    before = read_results(out)["records"]
    runs = cell_runs(out)
    truncate(out / "journal.jsonl")  # a cut in the middle of a line, and every line after it gone
    code, line, err = run_small(capsys, checkpoint, out, cache, monkeypatch)
    assert code == 0 and "dropping a partly written last line" in caplog.text
    assert read_results(out)["records"] == before  # the lost lines came back from results.json ...
    assert set(cell_runs(out)) == set(runs) and set(cell_runs(out).values()) <= {*runs.values(), "salvaged"}  # ... not recomputed
    assert corrupt_files(out, finished=True) == []


def test_corrupt_journal_line_is_one_line_whose_advice_works(finished_copy, checkpoint, capsys, monkeypatch):
    out, cache = finished_copy
    before = read_results(out)["records"]
    lines = (out / "journal.jsonl").read_bytes().splitlines(keepends=True)
    number = next(i for i, line in enumerate(lines, start=1) if b'"t": "cell"' in line)
    broken = bytearray(lines[number - 1])
    broken[len(broken) // 2] ^= 0x04
    lines[number - 1] = bytes(broken)
    (out / "journal.jsonl").write_bytes(b"".join(lines))
    code, line, _ = run_small(capsys, checkpoint, out, cache, monkeypatch)
    assert code == 2 and f"journal.jsonl line {number} is corrupted" in line and str(out) in line
    advice = line[line.index("(") + 1: line.index(")")]  # "sed -i 'Nd' FILE"
    subprocess.run(advice, shell=True, check=True)
    code, line, _ = run_small(capsys, checkpoint, out, cache, monkeypatch)
    assert code == 0 and line is None
    by_key = sorted(read_results(out)["records"], key=lambda r: r["key"])
    assert by_key == sorted(before, key=lambda r: r["key"])  # the deleted line's cell came back from results.json
    assert corrupt_files(out, finished=True) == []


@pytest.mark.parametrize("name", ["report.md", "results.csv", ".svdbench.lock"])
def test_reports_and_the_lock_file_are_rewritten(name, finished_copy, checkpoint, capsys, monkeypatch):
    out, cache = finished_copy
    original = (out / name).read_bytes()
    (out / name).write_bytes(b"\x00garbage" if name.endswith(".lock") else original[: len(original) // 3])
    code, line, _ = run_small(capsys, checkpoint, out, cache, monkeypatch)
    assert code == 0 and line is None
    if not name.endswith(".lock"):  # the same file again (but for this run's timings)
        def steady(data: bytes) -> list[bytes]:
            return [line for line in data.splitlines() if b"total" not in line and b" s." not in line]
        assert steady((out / name).read_bytes()) == steady(original)


# --------------------------------------------------------------------------- calibration statistics

def test_every_statistics_file_is_verified_and_rebuilt(finished_copy, checkpoint, capsys, monkeypatch, tmp_path):
    """Each file of the statistics store, truncated / bit-flipped / replaced by null: rebuilt byte-identical
    when a new cell needs it; the finished cells are not computed again."""
    out0, cache0 = finished_copy
    stats = sorted(p.relative_to(cache0) for p in (cache0 / "stats").rglob("*") if p.is_file() and not p.name.startswith("."))
    assert stats
    digests = {p: sha256_file(cache0 / p) for p in stats}
    failures = []
    for rel in stats:
        for mode, corrupt in MODES.items():
            out, cache = tmp_path / f"{rel.name}-{mode}" / "out", tmp_path / f"{rel.name}-{mode}" / "cache"
            shutil.copytree(out0, out)
            shutil.copytree(cache0, cache)
            corrupt(cache / rel)
            runs = cell_runs(out)
            try:
                code, line, _ = run_small(capsys, checkpoint, out, cache, monkeypatch, "--ratios", "0.2,0.4,0.6")
            except Exception as error:  # noqa: BLE001 - collected, reported below
                failures.append(f"{rel} {mode}: {type(error).__name__}: {error}")
                continue
            if code != 0 or {k: v for k, v in cell_runs(out).items() if k in runs} != runs:
                failures.append(f"{rel} {mode}: exit {code} {line}")
            elif corrupt_cache_entries(cache) or sha256_file(cache / rel) != digests[rel]:
                failures.append(f"{rel} {mode}: not rebuilt byte-identical")
    legacy = all(rel.parent == Path("stats") for rel in stats)  # <key>.json + <key>.safetensors side by side
    if failures and legacy and all(".json " in f for f in failures):
        # bench/engine/calibration.py's StatisticsCache (replaced by the streaming store of issue 12) neither
        # catches TypeError nor checksums its .json; the store that replaces it must do both.
        pytest.xfail(f"legacy statistics cache: {failures}")
    assert failures == []


# --------------------------------------------------------------------------- ASVD's sensitivity table

ASVD = ["--methods", "asvd", "--method-option", "asvd.candidates=0.8,0.5", "--method-option",
        "asvd.sensitivity_samples=1", "--method-option", "asvd.sensitivity_seqlen=32", *TINY_RUN]


def _asvd_run(capsys, checkpoint, out, cache, monkeypatch, ratios: str):
    monkeypatch.setenv("SVDBENCH_CACHE", str(cache))
    return cli(capsys, "run", "--model", checkpoint, *ASVD, "--ratios", ratios, "--out", out)


@pytest.fixture(scope="module")
def asvd_done(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("asvd")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SVDBENCH_CACHE", str(root / "cache"))
        assert main(["run", "--model", str(checkpoint), *ASVD, "--ratios", "0.2", "--out", str(root / "out")]) == 0
    [table] = list((root / "cache" / "asvd_sensitivity").glob("*.json"))
    return root, table.name


@pytest.mark.parametrize("mode", MODES)
def test_corrupt_sensitivity_table_is_rebuilt(mode, asvd_done, checkpoint, capsys, monkeypatch, tmp_path, caplog):
    root, name = asvd_done
    out, cache = Path(shutil.copytree(root / "out", tmp_path / "out")), Path(shutil.copytree(root / "cache", tmp_path / "cache"))
    table = cache / "asvd_sensitivity" / name
    original = sha256_file(table)
    MODES[mode](table)
    runs = cell_runs(out)
    code, line, err = _asvd_run(capsys, checkpoint, out, cache, monkeypatch, "0.2,0.4")
    assert code == 0 and "is unusable" in caplog.text
    assert {k: v for k, v in cell_runs(out).items() if k in runs} == runs  # the 0.2 cells were kept
    assert sha256_file(table) == original and corrupt_cache_entries(cache) == []


def test_a_changed_cache_entry_never_serves_stale_results(checkpoint, capsys, monkeypatch, tmp_path, caplog):
    """The table is edited *validly* (its checksum fixed): the cells computed from it are computed again."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert _asvd_run(capsys, checkpoint, out, cache, monkeypatch, "0.2")[0] == 0
    [table] = list((cache / "asvd_sensitivity").glob("*.json"))
    entry = json.loads(table.read_text())
    for row in entry["payload"].values():  # the search now prefers keeping 80% everywhere
        for kept in row:
            row[kept] = 1.0 if kept == "0.8" else 1e6
    entry["sha256"] = JsonCache.digest(entry["payload"])
    table.write_text(json.dumps(entry))
    cells = dict(journal_cells(out))
    [asvd_key] = [k for k, records in cells.items() if records[0]["method"] == "asvd"]
    code, line, err = _asvd_run(capsys, checkpoint, out, cache, monkeypatch, "0.2")
    assert code == 0 and "has changed since; computing it again" in caplog.text
    keys = [k for k, _ in journal_cells(out)]
    assert keys.count(asvd_key) == 2  # the asvd cell, computed again from the changed table ...
    assert all(keys.count(k) == 1 for k in cells if k != asvd_key)  # ... the dense cell kept
    assert [r["key"] for r in read_results(out)["records"]].count(asvd_key) == 1  # reported once: the new one
    assert read_results(out)["records"] == [r for k, rs in dict(journal_cells(out)).items() for r in rs]


# --------------------------------------------------------------------------- the converted-model cache

@pytest.fixture(scope="module")
def converted(gguf_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SVDBENCH_CACHE", str(root / "cache"))
        assert main(["run", "--model", str(gguf_file), "--methods", "none", *TINY_RUN, "--out", str(root / "out")]) == 0
    [entry] = [p for p in (root / "cache" / "models").iterdir() if p.is_dir() and not p.name.startswith(".")]
    return root, entry.name


def _converted_files(converted) -> list[str]:
    root, entry = converted
    return sorted(p.name for p in (root / "cache" / "models" / entry).iterdir())


@pytest.mark.parametrize("mode", ["truncated", "bit-flipped", "deleted"])
def test_every_file_of_the_converted_model_is_verified_and_rebuilt(mode, converted, gguf_file, capsys, monkeypatch,
                                                                   tmp_path, caplog):
    """Weights, config.json, tokenizer files and the checksum file itself: a damaged entry is rebuilt
    byte-identical, and the model keeps its identity (the dense cell is not computed again)."""
    root, entry = converted
    for name in _converted_files(converted):
        case = tmp_path / name
        out = Path(shutil.copytree(root / "out", case / "out"))
        cache = Path(shutil.copytree(root / "cache", case / "cache"))
        directory = cache / "models" / entry
        digests = {p.name: sha256_file(p) for p in directory.iterdir()}
        (directory / name).unlink() if mode == "deleted" else MODES[mode](directory / name)
        runs = cell_runs(out)
        monkeypatch.setenv("SVDBENCH_CACHE", str(cache))
        code, line, err = cli(capsys, "run", "--model", gguf_file, "--methods", "none", *TINY_RUN, "--out", out)
        assert code == 0 and line is None, (name, line)
        assert "is unusable" in caplog.text and "rebuilding it" in caplog.text, name
        caplog.clear()
        from bench.model.loading import conversion_problem

        assert conversion_problem(directory, json.loads((directory / "svdbench-source.json").read_text())["gguf_sha256"]) is None
        assert {p.name: sha256_file(p) for p in directory.iterdir() if p.name != "svdbench-source.json"} == \
            {k: v for k, v in digests.items() if k != "svdbench-source.json"}, name
        assert cell_runs(out) == runs, name


def test_an_edited_cached_config_never_serves_results(converted, gguf_file, capsys, monkeypatch, tmp_path, caplog):
    """Editing rope_theta in the cached config.json is noticed and undone (before this, the edit changed the
    perplexity under the same model identity and resume served the old results)."""
    root, entry = converted
    out = Path(shutil.copytree(root / "out", tmp_path / "out"))
    cache = Path(shutil.copytree(root / "cache", tmp_path / "cache"))
    config = cache / "models" / entry / "config.json"
    original = config.read_bytes()
    edited = json.loads(original)
    edited.setdefault("rope_parameters", {})["rope_theta"] = 500.0
    edited["rope_theta"] = 500.0
    config.write_text(json.dumps(edited))
    monkeypatch.setenv("SVDBENCH_CACHE", str(cache))
    code, line, err = cli(capsys, "run", "--model", gguf_file, "--methods", "none", *TINY_RUN, "--out", out)
    assert code == 0 and "config.json does not match its checksum" in caplog.text
    assert config.read_bytes() == original


# --------------------------------------------------------------------------- a model directory the user gave

def test_an_edited_config_changes_the_identity(model, capsys, monkeypatch, tmp_path):
    """rope_theta edited in the user's config.json: a new model identity, so the dense cell is computed again."""
    out = tmp_path / "out"
    args = ["run", "--model", model, "--methods", "none", *TINY_RUN, "--out", out]
    assert cli(capsys, *args)[0] == 0
    first = read_results(out)["records"][0]
    config = json.loads((model / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 500.0
    (model / "config.json").write_text(json.dumps(config))
    assert cli(capsys, *args)[0] == 0
    [second] = read_results(out)["records"]
    assert second["key"] != first["key"] and second["value"] != first["value"]
    assert read_results(out)["manifest"]["model"]["identity"] != first["key"]


@pytest.mark.parametrize("name, mode, message", [
    ("config.json", "truncated", "config.json is not valid JSON"),
    ("config.json", "null", "cannot load the model in"),
    ("tokenizer.json", "truncated", "cannot load the model in"),
    ("tokenizer_config.json", "truncated", "cannot load the model in"),
    ("model.safetensors", "truncated", "cannot load the model in"),
    ("model.safetensors", "header", "cannot load the model in"),
])
def test_damaged_user_model_directory_is_one_line(name, mode, message, model, capsys, tmp_path):
    path = model / name
    if mode == "header":  # a bit flip inside the safetensors JSON header
        data = bytearray(path.read_bytes())
        data[12] ^= 0x20
        path.write_bytes(bytes(data))
    else:
        MODES[mode](path)
    code, line, _ = cli(capsys, "run", "--model", model, "--methods", "none", *TINY_RUN, "--out", tmp_path / "out")
    assert code == 2 and message in line and str(model) in line, line


def test_truncated_gguf_is_one_line(gguf_file, capsys, monkeypatch, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(gguf_file.read_bytes()[:200_000])
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    code, line, _ = cli(capsys, "run", "--model", broken, "--methods", "none", *TINY_RUN, "--out", tmp_path / "out")
    assert code == 2 and "cannot read the GGUF file" in line and str(broken) in line


# --------------------------------------------------------------------------- a saved compressed model

@pytest.fixture(scope="module")
def saved(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "model"
    assert main(["compress", "--model", str(checkpoint), "--method", "svd", "--ratio", "0.4", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("mode", ["truncated", "bit-flipped", "deleted"])
def test_every_file_of_a_saved_model_is_verified(mode, saved, capsys, tmp_path):
    for name in sorted(p.name for p in saved.iterdir()):
        copy = Path(shutil.copytree(saved, tmp_path / name / "model"))
        (copy / name).unlink() if mode == "deleted" else MODES[mode](copy / name)
        code, line, _ = cli(capsys, "run", "--model", copy, "--methods", "none", *TINY_RUN,
                            "--out", tmp_path / name / "out")
        assert code == 2 and str(copy) in line, (name, line)
