"""basis_sharing (methods/basis_sharing.py) and the shared-right-factor capability it needs (bench/api/grouped.py,
bench/engine/grouped.py, bench/model/shared.py): joint factorization, one rank per group, one basis module,
counted once, saved once and tied again on load."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors import safe_open

import methods.basis_sharing as basis_sharing
from bench.api.task import EvalSettings
from bench.cli import main
from bench.engine.config import CalibrationConfig, RunConfig
from bench.engine.plugins import load_registry
from bench.engine.workspace import Workspace
from bench.model.loaded import LoadedModel
from bench.model.loading import load_model
from bench.model.manifest import MANIFEST, WEIGHTS
from bench.model.reload import load_compressed
from bench.model.saving import save_compressed
from bench.model.targets import find_targets, footprint

CALIBRATION = CalibrationConfig(samples=4, seqlen=128)  # 512 tokens: every gram (n <= 128) positive definite
SHARED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
SETTINGS = EvalSettings(seqlen=128, limit=2)


def _registry(plugins_dirs=()):
    """The registry with basis_sharing: built in once the package is reinstalled, else added here."""
    if "basis_sharing" in load_registry().methods:
        return load_registry()
    if plugins_dirs:
        return load_registry(plugins_dirs)
    return load_registry(extra=[("basis_sharing", basis_sharing)])


def _workspace(loaded, tmp_path, options=None, registry=None):
    registry = registry or _registry()
    config = RunConfig(model="tiny", methods=("basis_sharing",), ratios=(0.4,), out=str(tmp_path / "run"),
                       calibration=CALIBRATION, method_options={"basis_sharing": dict(options or {})})
    return Workspace(config, registry, loaded)


def _tiny(tokenizer, layers=2):
    return LoadedModel(model=tiny_model("llama", vocab_size=len(tokenizer), layers=layers), tokenizer=tokenizer,
                       name=f"tiny-llama-{layers}", source="code")


def _perplexity(model, tokenizer):
    task = load_registry().get("task", "wikitext2")
    return {m.metric: m.value for m in task.evaluate(model, tokenizer, SETTINGS)}


def _logits(model):
    ids = torch.arange(40).reshape(2, 20) % 200
    with torch.no_grad():
        return model(input_ids=ids).logits


def _dense(layer) -> torch.Tensor:
    return layer.up.weight.detach().double() @ layer.down.weight.detach().double()


@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_group_size_one_is_svdllm_w(tokenizer, tmp_path, ratio):
    """g = 1 (every matrix private, no update) computes exactly SVD-LLM's whitening: same weights, same perplexity."""
    workspace = _workspace(_tiny(tokenizer), tmp_path, {"group_size": 1, "update": "off"})
    _, ours = workspace.compress("basis_sharing", ratio)
    _, svdllm = workspace.compress("svdllm_w", ratio)
    assert "cholesky_shift" not in ours.facts.get("decomposition", {})  # else the two shifts (7e-6, 1e-6) differ
    assert not ours.facts["allocation"]["shared_groups"]
    mine, theirs = ours.model.state_dict(), svdllm.model.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert ours.layers == svdllm.layers
    assert _perplexity(ours.model, tokenizer) == _perplexity(svdllm.model, tokenizer)


def test_truncation_error_of_the_stacked_whitened_matrix_is_the_dropped_spectrum(tokenizer, tmp_path):
    """||(W_st - W'_st) S||^2 = sum of the truncated sigma^2 of W_st S, S = chol(G_1 + G_2) (pooled inputs)."""
    workspace = _workspace(_tiny(tokenizer), tmp_path, {"update": "off"})
    _, compressed = workspace.compress("basis_sharing", 0.4)
    stats = workspace.statistics(("gram",))
    for kind in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj"):
        names = [f"model.layers.{i}.{kind}" for i in (0, 1)]
        layers = [compressed.model.get_submodule(n) for n in names]
        assert layers[0].down is layers[1].down  # one basis
        stacked = torch.cat([workspace.model.get_submodule(n).weight.detach().double() for n in names])
        approx = torch.cat([_dense(layer) for layer in layers])
        pooled = sum(stats.get("gram", n).double() for n in names)
        s = torch.linalg.cholesky(pooled)
        rank = layers[0].rank
        m, n = layers[0].out_features, layers[0].in_features
        assert rank == math.floor(2 * m * n * 0.6 / (n + 2 * m))  # the authors' compute_num_basis
        sigma = torch.linalg.svdvals(stacked @ s)
        dropped = float((sigma[rank:] ** 2).sum())
        error = float((((stacked - approx) @ s) ** 2).sum())
        assert error == pytest.approx(dropped, rel=1e-3)
        # the same loss as the members' output errors on the pooled inputs: sum_i tr((W_i - W_i') G (W_i - W_i')^T)
        members = sum(float(torch.trace((w - a) @ pooled @ (w - a).T)) for w, a in
                      zip(stacked.split(m), approx.split(m)))
        assert members == pytest.approx(dropped, rel=1e-3)
        assert dropped > 0


def test_parameter_budget_is_exact_with_an_odd_layer_count(tokenizer, tmp_path):
    """3 layers, g = 2: group {0, 1} shares, layer 2 is a group of its own with its own rank (not g's)."""
    loaded = _tiny(tokenizer, layers=3)
    workspace = _workspace(loaded, tmp_path, {"update": "off"})
    ratio = 0.4
    _, compressed = workspace.compress("basis_sharing", ratio)
    targets = find_targets(loaded.model)
    expected, authors = 0, 0
    for target in targets:
        m, n = target.out_features, target.in_features
        private = math.floor(m * n * (1 - ratio) / (m + n)) * (m + n)
        shared_rank = math.floor(2 * m * n * (1 - ratio) / (n + 2 * m))
        if target.kind.rpartition(".")[2] in SHARED and target.block < 2:
            expected += shared_rank * (n + 2 * m) // 2  # half of the group's k (n + 2m) per member
            authors += shared_rank * (n + 2 * m) // 2
        elif target.kind.rpartition(".")[2] in SHARED:
            expected += private
            authors += shared_rank * (n + m)  # the code reuses g's rank for the leftover group
        else:
            expected += private
            authors += private
    dense = sum(t.out_features * t.in_features for t in targets)
    assert compressed.summary["target_params"] == expected <= (1 - ratio) * dense
    assert authors > expected and authors > (1 - ratio) * dense  # what the fix avoids
    # whole-model accounting counts each basis once
    assert compressed.summary["params"] == footprint(compressed.model)["params"]
    assert compressed.summary["params"] == compressed.summary["dense_params"] - dense + expected
    assert compressed.model.model.layers[2].self_attn.q_proj.down is not compressed.model.model.layers[1].self_attn.q_proj.down


def test_shared_basis_is_one_module_and_is_stored_once(tokenizer, tmp_path):
    loaded = _tiny(tokenizer)
    _, compressed = _workspace(loaded, tmp_path, {"update": "off"}).compress("basis_sharing", 0.4)
    layers = compressed.model.model.layers
    for kind in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        assert layers[0].get_submodule(kind).down is layers[1].get_submodule(kind).down
    for kind in ("self_attn.o_proj", "mlp.down_proj"):
        assert layers[0].get_submodule(kind).down is not layers[1].get_submodule(kind).down
    out = save_compressed(compressed.model, tokenizer, tmp_path / "saved", {"method": "basis_sharing", "ratio": 0.4})
    with safe_open(str(out / WEIGHTS), framework="pt") as handle:
        keys = set(handle.keys())
        stored = sum(handle.get_slice(k).get_shape()[0] * math.prod(handle.get_slice(k).get_shape()[1:]) * 4
                     for k in keys)
    assert "model.layers.0.self_attn.q_proj.down.weight" in keys
    assert "model.layers.1.self_attn.q_proj.down.weight" not in keys
    assert "model.layers.1.self_attn.q_proj.up.weight" in keys
    assert stored == footprint(compressed.model)["bytes"]  # every tensor once: the file holds what is counted
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["shared"] == {f"model.layers.1.{k}.down": f"model.layers.0.{k}.down" for k in
                                  ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                                   "mlp.up_proj")}
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["shared"] == manifest["shared"]


def test_update_does_not_increase_the_loss_on_the_compressed_inputs(tokenizer, tmp_path):
    """The coefficient refit is the least-squares optimum for the compressed model's inputs (basis fixed)."""
    workspace = _workspace(_tiny(tokenizer), tmp_path, {"update": "off"})
    method, compressed = workspace.compress("basis_sharing", 0.4)
    model = compressed.model
    names = [t.name for t in workspace.targets]
    downs = {id(model.get_submodule(n).down): model.get_submodule(n).down for n in names}
    grams, _ = basis_sharing.basis_input_grams(model, downs, workspace.windows())

    def loss(name):
        layer = model.get_submodule(name)
        difference = workspace.model.get_submodule(name).weight.double() - _dense(layer)
        return float(torch.trace(difference @ grams[id(layer.down)] @ difference.T))

    before = {n: loss(n) for n in names}
    config = method.make_config({"update": "on"})
    facts = method.refine(model, 0.4, workspace.context(method), config)
    assert facts["updated_matrices"] == len(names)
    after = {n: loss(n) for n in names}
    assert all(after[n] <= before[n] * (1 + 1e-6) for n in names)
    assert sum(after.values()) < sum(before.values())
    assert model.model.layers[0].self_attn.q_proj.down is model.model.layers[1].self_attn.q_proj.down


def test_compress_command_saves_the_basis_once_and_reloads_to_the_same_perplexity(tokenizer, tmp_path):
    """``svdbench compress --method basis_sharing --ratio 0.4`` (update on by default), reloaded by svdbench and by
    plain transformers (the registered quantizer): identical logits and perplexity, the basis tied again."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    builtin = "basis_sharing" in load_registry().methods
    if not builtin:  # an installed svdbench older than the entry point: the method as a --plugins-dir plugin
        shutil.copy(Path(basis_sharing.__file__), plugins / "basis_sharing.py")
    source, out = tmp_path / "src", tmp_path / "out"
    loaded = _tiny(tokenizer)
    loaded.model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    argv = [*([] if builtin else ["--plugins-dir", str(plugins)]), "compress", "--model", str(source), "--method", "basis_sharing",
            "--ratio", "0.4", "--out", str(out), "--calib-samples", "4", "--calib-seqlen", "128"]
    assert main(argv) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["facts"]["refine"]["updated_matrices"] == 14 and len(manifest["shared"]) == 5
    config = RunConfig(model=str(source), methods=("basis_sharing",), ratios=(0.4,), out=str(tmp_path / "r"),
                       calibration=CALIBRATION)
    _, in_memory = Workspace(config, _registry([plugins])).compress("basis_sharing", 0.4)
    reloaded = load_compressed(out).model
    assert reloaded.model.layers[0].mlp.up_proj.down is reloaded.model.layers[1].mlp.up_proj.down
    assert torch.equal(_logits(reloaded), _logits(in_memory.model))
    expected = _perplexity(in_memory.model, tokenizer)
    assert _perplexity(reloaded, tokenizer) == expected
    assert _perplexity(load_model(str(out)).model, tokenizer) == expected

    from transformers import AutoModelForCausalLM

    import bench.interop.hf  # noqa: F401  (registers the svdbench quantization method)

    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.model.layers[0].self_attn.k_proj.down is plain.model.layers[1].self_attn.k_proj.down
    assert torch.equal(_logits(plain), _logits(in_memory.model))
    assert _perplexity(plain, tokenizer) == expected


def test_transformers_save_pretrained_round_trip_keeps_the_basis_shared(tokenizer, tmp_path):
    """``mark_compressed(model).save_pretrained`` writes the shared basis once; ``from_pretrained`` ties it again."""
    from transformers import AutoModelForCausalLM

    from bench.model.hf_quantizer import mark_compressed

    _, compressed = _workspace(_tiny(tokenizer), tmp_path, {"update": "off"}).compress("basis_sharing", 0.4)
    expected = _logits(compressed.model)
    mark_compressed(compressed.model).save_pretrained(tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert "model.layers.0.mlp.gate_proj.down.weight" in keys and "model.layers.1.mlp.gate_proj.down.weight" not in keys
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert plain.model.layers[0].mlp.gate_proj.down is plain.model.layers[1].mlp.gate_proj.down
    assert torch.equal(_logits(plain), expected)
