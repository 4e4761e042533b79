"""Editing a plugin's code recomputes what it produced - its factorizations and its cells - and nothing else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench.api.versions import source_version
from bench.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plugins" / "colnorm_svd.py"


def _run(plugins: Path, model: Path, out: Path) -> dict:
    assert main(["--plugins-dir", str(plugins), "run", "--model", str(model), "--methods", "svd,colnorm_svd",
                 "--ratios", "0.5", "--tasks", "wikitext2", "--limit", "1", "--seqlen", "32", "--calib-samples", "2",
                 "--calib-seqlen", "32", "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text())


def _values(results: dict) -> dict[str, float]:
    return {r["method"]: r["value"] for r in results["records"]}


def test_editing_a_plugins_decompose_recomputes_its_factors_and_cells_only(tmp_path, checkpoint_dir):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    shutil.copy(EXAMPLE, plugins / "colnorm_svd.py")
    first = _run(plugins, checkpoint_dir, tmp_path / "out")
    assert {"decompose:svd", "decompose:colnorm_svd"} <= set(first["manifest"]["timings"])

    source = (plugins / "colnorm_svd.py").read_text()
    edited = source.replace("weight.double().norm(dim=0) + config.eps", "weight.double().norm(dim=0) ** 2 + config.eps")
    assert edited != source
    (plugins / "colnorm_svd.py").write_text(edited)
    second = _run(plugins, checkpoint_dir, tmp_path / "out")

    timings = set(second["manifest"]["timings"])
    assert "decompose:colnorm_svd" in timings and "evaluate:colnorm_svd:0.5:wikitext2" in timings
    assert not any(label.endswith(":svd") or ":svd:" in label or label.startswith("evaluate:dense")
                   for label in timings), timings  # svd and the dense model: neither decomposed nor evaluated
    before, after = _values(first), _values(second)
    assert after["svd"] == before["svd"] and after["dense"] == before["dense"]
    assert after["colnorm_svd"] != before["colnorm_svd"]


def test_the_derived_version_follows_the_source_and_an_explicit_one_wins(tmp_path):
    from bench.api.method import Method
    from bench.engine.plugins import _load_file_plugin

    path = tmp_path / "versioned_plugin.py"
    path.write_text("from bench import Method\nclass A(Method):\n    name = 'a'\n")
    first = source_version(_load_file_plugin(path).A)
    path.write_text("from bench import Method\nclass A(Method):\n    name = 'a'  # edited\n")
    assert source_version(_load_file_plugin(path).A) != first

    class Pinned(Method):
        version = "7"
    assert Pinned().code_version() == "7" and Pinned().decomposition_version() == "7"
