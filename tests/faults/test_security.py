"""Security basics, kept true by tests: no pickle, no remote code, no eval of strings, no tensor name or file
name escaping its directory, no network at run time."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.model.manifest import MANIFEST, WEIGHTS
from bench.storage import sha256_file

from .harness import REPO, cli_command, cli_env, read_results

SOURCES = [p for package in ("bench", "methods", "tasks", "reports", "examples")
           for p in sorted((REPO / package).rglob("*.py"))]


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield node, owner, name


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_pickle_no_remote_code_no_eval(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            assert not {"pickle", "cPickle", "dill", "joblib", "marshal", "shelve"} & {str(n).split(".")[0] for n in names}
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
            assert isinstance(node.value, ast.Constant) and node.value.value is False, f"{path}:{node.value.lineno}"
    for node, owner, name in _calls(tree):
        where = f"{path.relative_to(REPO)}:{node.lineno}"
        assert not (isinstance(node.func, ast.Name) and name in ("eval", "exec", "compile", "__import__")), where
        if owner == "torch" and name == "load":
            weights_only = [k for k in node.keywords if k.arg == "weights_only"]
            assert weights_only and getattr(weights_only[0].value, "value", None) is True, where
        if owner == "yaml" and name in ("load", "load_all", "unsafe_load"):
            pytest.fail(f"{where}: use yaml.safe_load")
        if name in ("run", "Popen", "call", "check_output", "check_call") and owner == "subprocess":
            shell = [k for k in node.keywords if k.arg == "shell"]
            assert not shell or getattr(shell[0].value, "value", None) is False, where
        if owner == "np" and name == "load":
            allow = [k for k in node.keywords if k.arg == "allow_pickle"]
            assert not allow or getattr(allow[0].value, "value", None) is False, where


def test_tensor_names_cannot_escape_a_saved_model(checkpoint, tmp_path, capsys):
    """A safetensors file with an extra tensor named like a path, checksums and manifest 'repaired': refused."""
    from safetensors.torch import load_file, save_file

    from bench.storage import seal

    saved = tmp_path / "saved"
    assert main(["compress", "--model", str(checkpoint), "--method", "svd", "--ratio", "0.4", "--out", str(saved)]) == 0
    tensors = load_file(saved / WEIGHTS)
    tensors["../../../../tmp/evil"] = torch.zeros(1)
    save_file(tensors, saved / WEIGHTS)
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest["files"][WEIGHTS] = manifest["weights"][WEIGHTS] = sha256_file(saved / WEIGHTS)
    (saved / MANIFEST).write_text(json.dumps(seal(manifest)))
    capsys.readouterr()
    assert main(["run", "--model", str(saved), "--methods", "none", "--tasks", "wikitext2", "--limit", "1",
                 "--seqlen", "32", "--out", str(tmp_path / "out")]) == 2
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("svdbench:")]
    assert "holds tensor '../../../../tmp/evil'" in line
    assert not Path("/tmp/evil").exists()


BLOCK_SOCKETS = textwrap.dedent("""
    import os, socket
    _log = os.environ["SOCKET_LOG"]

    def _refuse(kind):
        def refuse(*args, **kwargs):
            with open(_log, "a") as handle:
                handle.write(f"{kind} {args[1:2]!r}\\n")
            raise OSError(f"network access blocked by the svdbench test suite ({kind})")
        return refuse

    _connect = socket.socket.connect
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            return _refuse("connect")(self, address)
        return _connect(self, address)
    socket.socket.connect = connect
    socket.socket.connect_ex = lambda self, address: connect(self, address)
    socket.create_connection = _refuse("create_connection")
    socket.getaddrinfo = _refuse("getaddrinfo")
""")


def test_no_network_at_run_time(checkpoint, tmp_path):
    """run and compress with every socket to the network refused and the offline variables unset:
    svdbench sets them itself, and nothing even tries to connect."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK_SOCKETS)
    log = tmp_path / "sockets.log"
    env = cli_env(tmp_path / "cache")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name)
    env.update(PYTHONPATH=str(site), SOCKET_LOG=str(log), HTTP_PROXY="", HTTPS_PROXY="")
    steps = [("run", "--model", str(checkpoint), "--methods", "svdllm_w,hqq", "--ratios", "0.4",
              "--tasks", "wikitext2,piqa", "--limit", "2", "--seqlen", "32", "--calib-samples", "2",
              "--calib-seqlen", "32", "--out", str(tmp_path / "out")),
             ("compress", "--model", str(checkpoint), "--method", "svd", "--ratio", "0.4", "--out", str(tmp_path / "m")),
             ("run", "--model", str(tmp_path / "m"), "--methods", "none", "--tasks", "wikitext2", "--limit", "1",
              "--seqlen", "32", "--out", str(tmp_path / "out-m"))]
    for step in steps:
        done = subprocess.run(cli_command(*step), capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    assert not log.exists(), log.read_text()  # not one attempt, even one a library would have survived
    assert {r["task"] for r in read_results(tmp_path / "out")["records"]} == {"wikitext2", "piqa"}
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 9))"],
                           capture_output=True, text=True, env=env, timeout=60)
    assert "network access blocked" in probe.stderr  # the block itself works
    shutil.rmtree(tmp_path / "m")
