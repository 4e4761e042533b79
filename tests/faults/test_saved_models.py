"""Saved models of every kind load and evaluate; a tampered manifest is refused before any tensor is read;
``compress --out`` never overwrites a directory it should not."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from bench.cli import main
from bench.model.manifest import MANIFEST, WEIGHTS
from bench.storage import sha256_file

CALIB = ["--calib-samples", "2", "--calib-seqlen", "32"]
EVAL = ["--tasks", "wikitext2", "--limit", "1", "--seqlen", "32", *CALIB]


def cli(capsys, *argv) -> tuple[int, str]:
    """Run the CLI in this process: its exit status and its one error line (None when it printed none)."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("svdbench:")]
    assert len(lines) <= 1, lines
    return code, lines[0] if lines else None


def values(out) -> dict:
    data = json.loads((out / "results.json").read_text())
    return {(r["method"], r["ratio"]): r["value"] for r in data["records"]}


@pytest.mark.parametrize("method", ["svd", "svdllm_w", "hqq", "svdllm_quant"])
def test_every_kind_of_saved_model_loads_and_gives_the_runs_numbers(method, model, tmp_path, capsys):
    """svd-family, hqq (dense, quantized) and svdllm_quant (factors quantized): saved, loaded back, evaluated -
    and the perplexity is exactly the one ``svdbench run`` measured in memory."""
    assert cli(capsys, "run", "--model", model, "--methods", method, "--ratios", "0.4", *EVAL,
               "--out", tmp_path / "direct") == (0, None)
    ratio = 0.0 if method == "hqq" else 0.4
    in_memory = values(tmp_path / "direct")[(method, ratio)]
    saved = tmp_path / "saved"
    ratio_flag = [] if method == "hqq" else ["--ratio", "0.4"]  # hqq removes no parameters: no --ratio
    assert cli(capsys, "compress", "--model", model, "--method", method, *ratio_flag, "--out", saved,
               *CALIB) == (0, None)
    assert cli(capsys, "run", "--model", saved, "--methods", "none", *EVAL, "--out", tmp_path / "reloaded") == (0, None)
    reloaded = values(tmp_path / "reloaded")[("dense", 0.0)]
    assert math.isfinite(reloaded) and reloaded == in_memory
    code, line = cli(capsys, "run", "--model", saved, "--methods", "svd", "--ratios", "0.2", *EVAL,
                     "--out", tmp_path / "again")
    assert code == 2 and "already compressed" in line and "--methods none" in line


@pytest.fixture(scope="module")
def saved_hqq(tmp_path_factory, checkpoint):
    out = tmp_path_factory.mktemp("hqq") / "saved"
    assert main(["compress", "--model", str(checkpoint), "--method", "hqq", "--out", str(out)]) == 0
    return out


def tamper(saved, tmp_path, edit, fix_checksums: bool = True):
    """A copy of ``saved`` whose manifest ``edit`` changed (resealed, as a tool writing manifests would), and
    whose weights are garbage with a matching checksum: a check that reads tensors would fail differently."""
    try:
        from bench.storage import seal
    except ImportError:  # an svdbench whose manifests carry no checksum of their own
        def seal(manifest):
            return manifest

    copy = shutil.copytree(saved, tmp_path / "tampered")
    manifest = json.loads((copy / MANIFEST).read_text())
    edit(manifest)
    if fix_checksums:
        (copy / WEIGHTS).write_bytes(b"not a safetensors file")
        for table in ("files", "weights"):
            if isinstance(manifest.get(table), dict) and WEIGHTS in manifest[table]:
                manifest[table][WEIGHTS] = sha256_file(copy / WEIGHTS)
        manifest = seal(manifest)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    return copy


def _first_layer(manifest) -> dict:
    return manifest["quantized"][sorted(manifest["quantized"])[0]]


def _set(table: str, key: str, value):
    def edit(manifest):
        manifest[table] = {key: value} if table == "weights" else {**manifest[table], key: value}
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda m: _first_layer(m).update(nbits=2), "does not match nbits 2"),
    (lambda m: _first_layer(m).update(nbits=2, packing="2bit_u8"), "does not fit the layout"),
    (lambda m: _first_layer(m).update(out_features=_first_layer(m)["out_features"] + 1), "out_features"),
    (lambda m: m.update(dtype="load"), "dtype 'load' is not one of"),
    (lambda m: _first_layer(m)["tensors"]["scale"].update(dtype="load"), "dtype 'load'"),
    (lambda m: m["quantized"].update({"../../x": _first_layer(m)}), "'../../x' is not a module path"),
    (lambda m: m["ranks"].update({"model.layers.0.__class__": 4}), "is not a module path"),
    (lambda m: m.update(weights={"../../../../etc/hostname": "0" * 64}), "weights must be"),
    (_set("files", "../../../../etc/hostname", "0" * 64), "is not a plain file name"),
    (_set("files", "/etc/passwd", "0" * 64), "is not a plain file name"),
    (lambda m: m["quantized"].update({"model.layers.0.mlp.up_proj": {"quantizer": "pickle"}}), "quantizer 'pickle'"),
])
def test_tampered_manifest_is_refused_before_any_tensor_is_read(saved_hqq, tmp_path, capsys, edit, message):
    copy = tamper(saved_hqq, tmp_path, edit)
    code, line = cli(capsys, "run", "--model", copy, "--methods", "none", *EVAL, "--out", tmp_path / "out")
    assert code == 2 and message in line and str(copy) in line, line
    assert not (tmp_path / "out" / "journal.jsonl").exists() or "dense" not in (tmp_path / "out" / "journal.jsonl").read_text()


def test_a_manifest_edited_without_its_checksum_is_refused(saved_hqq, tmp_path, capsys):
    copy = tamper(saved_hqq, tmp_path, lambda m: m.update(ratio=0.5), fix_checksums=False)
    code, line = cli(capsys, "run", "--model", copy, "--methods", "none", *EVAL, "--out", tmp_path / "out")
    assert code == 2 and "corrupted or was edited" in line


def test_a_saved_config_edit_is_refused(saved_hqq, tmp_path, capsys):
    copy = shutil.copytree(saved_hqq, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (copy / "config.json").write_text(json.dumps(config))
    code, line = cli(capsys, "run", "--model", copy, "--methods", "none", *EVAL, "--out", tmp_path / "out")
    assert code == 2 and "config.json was edited or truncated" in line


def test_compress_refuses_an_existing_directory_and_the_source(model, tmp_path, capsys):
    before = {p.name: sha256_file(p) for p in model.iterdir()}
    compress = ["compress", "--model", model, "--method", "svd", "--ratio", "0.4"]
    code, line = cli(capsys, *compress, "--out", model)  # before: exit 0, the source model overwritten
    assert code == 2 and "source model's directory" in line, line
    for out in (model, model / "sub", tmp_path):  # the source, inside it, around it: not even with --force
        code, line = cli(capsys, *compress, "--out", out, "--force")
        assert code == 2 and "source model's directory" in line, line
    assert {p.name: sha256_file(p) for p in model.iterdir()} == before  # never written into
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    code, line = cli(capsys, *compress, "--out", busy)
    assert code == 2 and "exists and is not empty" in line and "--force" in line
    code, line = cli(capsys, *compress, "--out", busy, "--force")  # --force replaces saved models only
    assert code == 2 and "not a model saved by svdbench" in line and (busy / "notes.txt").read_text() == "mine"
    (tmp_path / "a-file").write_text("x")
    code, line = cli(capsys, *compress, "--out", tmp_path / "a-file")
    assert code == 2 and "is a file" in line
    saved = tmp_path / "saved"
    assert cli(capsys, *compress, "--out", saved) == (0, None)
    code, line = cli(capsys, *compress, "--out", saved)
    assert code == 2 and "exists and is not empty" in line
    first = sha256_file(saved / MANIFEST)
    assert cli(capsys, "compress", "--model", model, "--method", "svd", "--ratio", "0.2", "--out", saved,
               "--force") == (0, None)
    assert sha256_file(saved / MANIFEST) != first and json.loads((saved / MANIFEST).read_text())["ratio"] == 0.2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".saved") and not p.name.endswith(".lock")]
