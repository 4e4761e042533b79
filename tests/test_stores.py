"""The streaming pipeline's stores: factorizations on disk, models assembled from the checkpoint, reuse."""

from __future__ import annotations

import json
import logging
import math

import torch
from conftest import tiny_model

from bench import factorize
from bench.cli import main
from bench.engine.compress import assemble_from_checkpoint, compress_model
from bench.engine.config import CalibrationConfig, RunConfig
from bench.engine.executor import run
from bench.engine.plugins import load_registry
from bench.engine.stores import EntryWriter, factor_tensors, open_entry, stored_factorizations, useful_rank
from bench.engine.workspace import Workspace
from bench.model.checkpoint import Checkpoint
from bench.model.loaded import LoadedModel
from bench.model.targets import find_targets

SMALL = dict(tasks=("wikitext2",), limit=1, seqlen=32, calibration=CalibrationConfig(samples=2, seqlen=32))


def values(results) -> dict:
    return {(r["method"], r["ratio"], r["task"]): r["value"] for r in results.records}


def test_stored_factorization_reads_back_what_was_written(tmp_path):
    torch.manual_seed(0)
    weight = torch.randn(48, 80, dtype=torch.float64)
    original = factorize(weight)
    writer = EntryWriter(tmp_path, {"test": 1})
    writer.write_block(0, factor_tensors("w", original))
    writer.finish({"shapes": {"w": [48, 80]}, "facts": {"w": {"cholesky_shift": 1e-3}}})
    entry = open_entry(tmp_path, {"test": 1}, "test")
    stored = stored_factorizations(entry)["w"]
    assert stored.shape == (48, 80) and stored.facts == {"cholesky_shift": 1e-3}
    assert torch.equal(stored.s, original.s)  # the whole spectrum: normalized losses need it
    assert stored.u.shape == (48, useful_rank(48, 80)) and stored.vt.shape == (useful_rank(48, 80), 80)
    for rank in (1, 7, useful_rank(48, 80) - 1):
        for got, want in zip(stored.factors(rank), original.factors(rank)):
            assert torch.equal(got, want)
    assert stored.normalized_loss(10) == original.normalized_loss(10)


def test_a_corrupted_entry_is_detected_and_dropped(tmp_path, caplog):
    writer = EntryWriter(tmp_path, {"test": 2})
    writer.write_block(0, {"x": torch.ones(4)})
    path = writer.finish()
    block = path / "block-0000.safetensors"
    block.write_bytes(block.read_bytes()[:-3] + b"xyz")
    with caplog.at_level(logging.WARNING):
        assert open_entry(tmp_path, {"test": 2}, "test") is None
    assert "does not match its checksum" in caplog.text and not path.exists()
    assert open_entry(tmp_path, {"other": 1}, "test") is None  # never written


def test_an_entry_without_its_manifest_is_not_an_entry(tmp_path):
    root = tmp_path / "store"
    writer = EntryWriter(root, {"test": 3})
    writer.write_block(0, {"x": torch.ones(4)})
    assert open_entry(root, {"test": 3}, "test") is None  # a writer killed before finish() leaves nothing usable
    writer.abandon()
    assert not any(root.iterdir())


def test_assembling_from_the_checkpoint_gives_the_in_memory_model(checkpoint_dir):
    checkpoint = Checkpoint(checkpoint_dir)
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32).eval()
    targets = find_targets(dense)
    factorizations = {t.name: factorize(dense.get_submodule(t.name).weight) for t in targets}
    ranks = {t.name: (5 if t.block != 1 else 64) for t in targets}  # block 1 stays dense
    expected, layers = compress_model(dense, targets, factorizations, ranks)
    built, built_layers = assemble_from_checkpoint(checkpoint, torch.float32, "cpu", targets, factorizations, ranks)
    assert built_layers == layers
    for (name, a), (other, b) in zip(expected.state_dict().items(), built.state_dict().items()):
        assert name == other and torch.equal(a, b), name
    ids = torch.randint(0, 512, (1, 24))
    assert torch.equal(expected(ids).logits, built(ids).logits)


def test_a_checkpoint_run_matches_the_in_memory_run(checkpoint_dir, tmp_path, tokenizer):
    """Streamed statistics, stored factors and models built from the checkpoint: the same perplexities."""
    from transformers import AutoModelForCausalLM

    config = RunConfig(model=str(checkpoint_dir), methods=("svd", "svdllm_w", "fwsvd"), ratios=(0.3,),
                       out=str(tmp_path / "streamed"), **SMALL)
    streamed = run(config)
    dense = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32).eval()
    in_memory = run(RunConfig(**{**config.__dict__, "out": str(tmp_path / "in-memory")}),
                    loaded=LoadedModel(dense, tokenizer, "tiny-checkpoint", "code", identity=streamed.manifest["model"]["identity"]))
    got, want = values(streamed), values(in_memory)
    assert set(got) == set(want) and len(got) == 4
    for key in want:
        assert math.isclose(got[key], want[key], rel_tol=1e-6), key


def test_a_second_run_with_one_more_ratio_decomposes_nothing(checkpoint_dir, tmp_path):
    config = RunConfig(model=str(checkpoint_dir), methods=("svdllm_w",), ratios=(0.3,), out=str(tmp_path / "run"),
                       **SMALL)
    first = run(config)
    assert "decompose:svdllm_w" in first.manifest["timings"]
    second = run(RunConfig(**{**config.__dict__, "ratios": (0.3, 0.5)}))
    timings = second.manifest["timings"]
    assert "decompose:svdllm_w" not in timings and "factors:svdllm_w" in timings
    assert not any(label.startswith("statistics:") for label in timings)
    assert "reload_model" not in timings  # statistics read from the store need no dense model
    assert {r["ratio"] for r in second.records} == {0.0, 0.3, 0.5}


def test_the_dense_model_is_released_and_read_back_on_demand(checkpoint_dir):
    registry = load_registry()
    workspace = Workspace(RunConfig(model=str(checkpoint_dir), methods=("svd",), **SMALL), registry)
    weight = workspace.model.get_submodule("model.layers.0.mlp.up_proj").weight.detach().clone()
    target = workspace.targets[0]
    workspace.release_model()
    assert workspace.loaded.model is None
    assert torch.equal(workspace.weight(workspace.targets[5]), weight) or workspace.targets[5].name != \
        "model.layers.0.mlp.up_proj"
    assert workspace.loaded.model is None  # one matrix is read from the checkpoint, not the whole model
    context = workspace.context(workspace.create("svd"))
    assert torch.equal(context.model.get_submodule("model.layers.0.mlp.up_proj").weight, weight)
    assert workspace.loaded.model is not None and target in workspace.targets


def test_cache_command_lists_sizes_and_clears(checkpoint_dir, tmp_path, capsys):
    run(RunConfig(model=str(checkpoint_dir), methods=("svdllm_w",), ratios=(0.3,), out=str(tmp_path / "run"), **SMALL))
    capsys.readouterr()
    assert main(["cache", "list"]) == 0
    listed = capsys.readouterr().out
    assert "factors" in listed and "methods.svdllm.SVDLLMWhitening" in listed and "gram" in listed
    assert main(["cache", "clear", "--kind", "factors"]) == 0
    assert "cleared factors" in capsys.readouterr().out
    assert main(["cache", "size", "--kind", "factors"]) == 0
    assert "0.0 MiB" in capsys.readouterr().out
    assert main(["cache", "size", "--kind", "nope"]) == 2


def test_failed_decompositions_leave_no_entry(checkpoint_dir, tmp_path):
    config = RunConfig(model=str(checkpoint_dir), methods=("svd",), ratios=(0.3,), out=str(tmp_path / "run"), **SMALL)
    run(config)
    root = tmp_path / "svdbench-cache" / "factors"
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no partial entry left behind
    manifests = [json.loads((p / "manifest.json").read_text()) for p in root.iterdir()]
    assert len(manifests) == 1 and manifests[0]["meta"]["method"] == "svd"


def test_an_offloaded_model_computes_the_same_and_streams_the_same_statistics(tmp_path):
    """Models larger than the GPU run with their weights offloaded (accelerate's hooks); checked here on the CPU."""
    from bench.engine.calibration import StatisticsStore, collect_statistics
    from bench.model.loading import offload
    from bench.model.targets import execution_device
    from methods.statistics import Gram

    model = tiny_model("llama")
    ids = torch.randint(0, 512, (2, 16))
    expected = model(ids).logits
    plain = collect_statistics(model, "m", find_targets(model), ids, CalibrationConfig(samples=2, seqlen=16), [Gram()],
                               cache=StatisticsStore(tmp_path / "a"))
    gram = {k: v.clone() for k, v in plain.values["gram"].items()}
    offloaded = offload(tiny_model("llama"), "cpu")
    assert next(offloaded.parameters()).device.type == "meta" and execution_device(offloaded).type == "cpu"
    assert torch.equal(offloaded(ids).logits, expected)
    streamed = collect_statistics(offloaded, "m", find_targets(offloaded), ids, CalibrationConfig(samples=2, seqlen=16),
                                  [Gram()], cache=StatisticsStore(tmp_path / "b"))
    assert all(torch.equal(streamed.values["gram"][k], v) for k, v in gram.items())


def test_bfloat16_weights_with_float64_statistics_and_factors(checkpoint_dir, tmp_path):
    registry = load_registry()
    config = RunConfig(model=str(checkpoint_dir), methods=("svdllm_w",), ratios=(0.3,), dtype="bfloat16", **SMALL)
    workspace = Workspace(config, registry)
    assert workspace.model.dtype == torch.bfloat16
    method, compressed = workspace.compress("svdllm_w", 0.3)
    assert workspace.statistics(("gram",)).get("gram", workspace.targets[0].name).dtype == torch.float64
    factorization = workspace.factorizations(method)[workspace.targets[0].name]
    assert factorization.s.dtype == torch.float64 and factorization.u.dtype == torch.float64
    assert {p.dtype for p in compressed.model.parameters()} == {torch.bfloat16}
    assert compressed.summary["bytes"] < compressed.summary["dense_bytes"] and workspace.loaded.model is None


def test_a_group_runs_in_another_process_from_its_serialized_plan(checkpoint_dir, tmp_path):
    """What a remote worker does: load the model by its spec, execute one group, return plain records."""
    import subprocess
    import sys

    from bench.engine.plan import make_plan

    config = RunConfig(model=str(checkpoint_dir), methods=("svd", "svdllm_w"), ratios=(0.3,),
                       out=str(tmp_path / "local"), **SMALL)
    local = values(run(config))
    workspace = Workspace(config, load_registry())
    plan = make_plan(config, workspace.registry, workspace.loaded.identity, workspace.dense_footprint["bytes"])
    (tmp_path / "plan.json").write_text(json.dumps(plan.to_dict()))
    remote = {}
    for index in range(len(plan.groups)):
        script = ("import json, sys; from bench.engine.groups import execute_group; "
                  f"print(json.dumps(execute_group(json.loads(open(sys.argv[1]).read()), {index})))")
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "plan.json")], capture_output=True,
                             text=True, check=True)
        produced = json.loads(out.stdout.strip().splitlines()[-1])
        assert produced["failures"] == []
        remote.update({(r["method"], r["ratio"], r["task"]): r["value"] for r in produced["records"]})
    assert remote == local
