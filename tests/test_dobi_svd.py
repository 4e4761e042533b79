"""Dobi-SVD (methods/dobi_svd.py, bench/model/remapped.py): the stable SVD backward against autograd, the budget,
the pooled optimum against svdllm_w, resuming an interrupted training, remapped storage, and a saved model."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import methods.dobi_svd as dobi
from bench import Context, RemappedLinear, cholesky_whitening, factorize
from bench.api.task import EvalSettings
from bench.engine.config import CalibrationConfig, RunConfig
from bench.engine.plugins import load_registry
from bench.engine.workspace import Workspace
from bench.model.loaded import LoadedModel
from bench.model.manifest import MANIFEST, WEIGHTS
from bench.model.reload import load_compressed
from bench.model.remapped import CODE, dequantize_rows, quantize_rows
from bench.model.saving import save_compressed
from bench.model.targets import find_targets

SETTINGS = EvalSettings(seqlen=64, limit=2)


def spectrum_matrix(rows: int, cols: int, values: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(rows, len(values), generator=g, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(cols, len(values), generator=g, dtype=torch.float64))[0]
    return left @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ right.T


# --------------------------------------------------------------------------- the SVD backward

LOSS_WEIGHTS = torch.randn(20, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def top_q_loss(u, s, v):
    """A function of the top-q SVD, invariant under flipping the signs of u_i and v_i together."""
    scale = torch.linspace(1.0, 0.1, s.shape[0], dtype=torch.float64)
    return ((u * (s * scale + s ** 2 * 0.1)[None, :]) @ v.T * LOSS_WEIGHTS).sum() + ((u ** 3).sum(0) * (v ** 3).sum(0)).sum()


def custom_gradient(a, q):
    u, s, vh = (t.detach() for t in torch.linalg.svd(a, full_matrices=False))
    u, s, v = u[:, :q].requires_grad_(), s[:q].requires_grad_(), vh[:q].T.requires_grad_()
    top_q_loss(u, s, v).backward()
    return dobi.svd_backward(u.detach(), s.detach(), v.detach(), u.grad, s.grad, v.grad)


def test_stable_backward_equals_autograd_on_well_separated_spectra():
    a = spectrum_matrix(20, 8, [9.0, 7.5, 6.0, 4.2, 3.1, 2.0, 1.1, 0.4])
    x = a.clone().requires_grad_(True)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    top_q_loss(u, s, vh.T).backward()
    assert x.grad.abs().max() > 1e-3
    assert torch.allclose(custom_gradient(a, 8), x.grad, rtol=1e-8, atol=1e-10)


def test_truncated_backward_is_exact_on_a_matrix_of_that_rank():
    """With q below the rank the extra terms assume the discarded singular values are 0: exact at rank q
    (checked against central differences of the top-q SVD; autograd's full SVD divides by 0 there)."""
    a = spectrum_matrix(20, 8, [9.0, 7.5, 6.0, 4.2, 3.1])
    got = custom_gradient(a, 5)
    step, numeric = 1e-6, torch.zeros_like(a)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            values = []
            for sign in (1, -1):
                moved = a.clone()
                moved[i, j] += sign * step
                u, s, vh = torch.linalg.svd(moved, full_matrices=False)
                values.append(float(top_q_loss(u[:, :5], s[:5], vh[:5].T)))
            numeric[i, j] = (values[0] - values[1]) / (2 * step)
    assert torch.allclose(got, numeric, rtol=1e-5, atol=1e-6)


def test_autograd_function_matches_autograd_through_the_masked_reconstruction():
    """``truncate_activation``'s gradients (in A and gamma) through StableLowRankSVD equal torch's linalg.svd's
    (q = min(T, m): svd_lowrank is then exact)."""
    a = spectrum_matrix(24, 6, [5.0, 4.0, 3.0, 2.0, 1.0, 0.5]).float()
    weights = torch.randn(24, 6, generator=torch.Generator().manual_seed(3))
    x1, g1 = a.clone().requires_grad_(True), torch.tensor(3.4, requires_grad=True)
    torch.manual_seed(0)
    (dobi.truncate_activation(x1, g1, 10.0) * weights).sum().backward()
    x2, g2 = a.clone().requires_grad_(True), torch.tensor(3.4, requires_grad=True)
    u, s, vh = torch.linalg.svd(x2, full_matrices=False)
    t = dobi.mask(g2.clamp(1, 6), 6, 10.0)
    ((u * (s * t)[None, :]) @ vh * weights).sum().backward()
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-3, atol=1e-4)
    assert g1.grad.abs() > 1e-3 and torch.allclose(g1.grad, g2.grad, rtol=1e-3, atol=1e-5)


def test_equal_singular_values_take_the_taylor_fallback_and_stay_finite():
    u = torch.linalg.qr(torch.randn(10, 4, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(6, 4, dtype=torch.float64))[0]
    s = torch.tensor([3.0, 2.0, 2.0, 2.0 - 1e-11], dtype=torch.float64)
    g = dobi.svd_backward(u, s, v, torch.randn(10, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64),
                          torch.randn(6, 4, dtype=torch.float64))
    assert torch.isfinite(g).all()


# --------------------------------------------------------------------------- the budget and the update

@pytest.mark.parametrize("remap", [True, False])
def test_initial_gammas_meet_the_target_with_the_shape_fix(remap):
    targets = find_targets(tiny_model("llama"))
    for seqlen in (16, 48, 512):  # below, between and above the matrices' min(m, n) (64, 128)
        gammas = torch.tensor([dobi.gamma_start(t, seqlen, 0.6, remap) for t in targets])
        assert float(dobi.kept_ratio(targets, gammas, seqlen, remap)) == pytest.approx(0.6, rel=1e-6)
        assert all(0 < g <= min(seqlen, t.out_features, t.in_features) for g, t in zip(gammas, targets))


def test_pooled_optimum_reaches_svdllm_w_loss():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(12, 9, generator=g, dtype=torch.float64)
    x = torch.randn(9, 9, generator=g, dtype=torch.float64) @ torch.randn(9, 50, generator=g, dtype=torch.float64)
    gram = x @ x.T
    for rank in (2, 5):
        updated = dobi.pooled_update(w, gram, rank)
        mine = float(torch.trace((w - updated) @ gram @ (w - updated).T))
        u, vt = factorize(w, cholesky_whitening(gram)[0]).factors(rank, dtype=torch.float64)
        theirs = float(torch.trace((w - u @ vt) @ gram @ (w - u @ vt).T))
        assert torch.linalg.matrix_rank(updated) == rank
        assert mine == pytest.approx(theirs, rel=1e-8)


# --------------------------------------------------------------------------- remapped storage

@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (30, 30)])
def test_remapped_layer_holds_dobi_bytes_and_its_values(shape):
    m, n = shape
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    u, s, vt = torch.linalg.svd(w, full_matrices=False)
    k = 12
    layer = RemappedLinear.from_svd(u[:, :k], s[:k], vt[:k], None)
    assert layer.storage_bytes() == 2 * k * max(m, n) + 4 * k
    w_u, w_v = layer.factors()
    exact = (u[:, :k] * s[:k]) @ vt[:k]
    assert torch.allclose(w_u.double() @ w_v.double(), exact, atol=0.05 * float(exact.abs().max()))
    assert CODE.numel() == 256 and CODE.max() == 1.0 and bool((CODE[1:] >= CODE[:-1]).all())
    rows = torch.randn(4, 30)
    index, absmax = quantize_rows(rows)
    back = dequantize_rows(index, absmax)
    nearest = (CODE[None, None, :] * absmax.float()[:, None, None] - rows[:, :, None]).abs().min(-1).values
    assert torch.allclose((back - rows).abs(), nearest, atol=2e-3 * float(rows.abs().max()))


# --------------------------------------------------------------------------- training, resume

def tiny_context(tmp_path, samples=3, seqlen=24):
    model = tiny_model("llama", layers=2)
    targets = find_targets(model)
    windows = torch.randint(0, 256, (samples, seqlen), generator=torch.Generator().manual_seed(0))
    return Context(model=model, tokenizer=None, targets=targets, stats=None, calibration=windows, device="cpu",
                   cache_dir=tmp_path, model_identity="tiny-dobi")


class Interrupted(Exception):
    pass


def test_an_interrupted_training_resumes_from_its_checkpointed_step(tmp_path, caplog):
    context = tiny_context(tmp_path / "a")
    config = dobi.DobiSVD().make_config({"epochs": "2", "save_every": "2"})
    windows = context.calibration
    full = dobi.train_gammas(context.model, context.targets, windows, 0.4, config, tmp_path / "full")
    assert full["steps"] == 6 and full["resumed_from"] is None
    assert not torch.equal(full["gammas"], torch.tensor([dobi.gamma_start(t, 24, 0.6, True) for t in context.targets]))

    def stop(step):
        if step == 4:
            raise Interrupted

    directory = tmp_path / "interrupted"
    with pytest.raises(Interrupted):
        dobi.train_gammas(context.model, context.targets, windows, 0.4, config, directory, on_step=stop)
    assert json.loads((directory / "state.json").read_text())["step"] == 4
    with caplog.at_level(logging.INFO, logger="methods.dobi_svd"):
        resumed = dobi.train_gammas(context.model, context.targets, windows, 0.4, config, directory)
    assert resumed["resumed_from"] == 4 and resumed["steps"] == 6
    assert "resuming the training from step 4 of 6" in caplog.text
    assert torch.allclose(resumed["gammas"], full["gammas"], rtol=0, atol=1e-5)  # the same training, continued
    assert [h["step"] for h in resumed["history"]] == list(range(1, 7))
    assert all(p.requires_grad for p in context.model.parameters())  # the original model's flags restored


# --------------------------------------------------------------------------- the whole method, saved and reloaded

def _workspace(tokenizer, tmp_path, options):
    registry = load_registry() if "dobi_svd" in load_registry().methods else load_registry(extra=[("dobi_svd", dobi)])
    loaded = LoadedModel(model=tiny_model("llama", vocab_size=len(tokenizer), layers=2), tokenizer=tokenizer,
                         name="tiny-llama-dobi", source="code")
    config = RunConfig(model="tiny", methods=("dobi_svd",), ratios=(0.4,), out=str(tmp_path / "run"),
                       calibration=CalibrationConfig(samples=3, seqlen=48), method_options={"dobi_svd": options})
    return Workspace(config, registry, loaded)


def _perplexity(model, tokenizer):
    task = load_registry().get("task", "wikitext2")
    return {m.metric: m.value for m in task.evaluate(model, tokenizer, SETTINGS)}


@pytest.mark.parametrize("options", [{"epochs": "1"}, {"epochs": "1", "remap": "false", "update": "eig"}])
def test_saved_model_reloads_with_the_same_perplexity_and_its_bytes(tokenizer, tmp_path, options):
    _, compressed = _workspace(tokenizer, tmp_path, options).compress("dobi_svd", 0.4)
    facts = compressed.facts
    assert facts["allocation"]["steps"] == 3 and facts["refine"]["update"] == options.get("update", "ipca")
    remapped = [m for m in compressed.model.modules() if isinstance(m, RemappedLinear)]
    assert len(remapped) == (14 if options.get("remap", "true") == "true" else 0)
    out = save_compressed(compressed.model, tokenizer, tmp_path / "saved", {"method": "dobi_svd", "ratio": 0.4})
    size = (out / WEIGHTS).stat().st_size
    with open(out / WEIGHTS, "rb") as handle:  # safetensors: 8-byte header length, JSON header, the tensors
        header = 8 + int.from_bytes(handle.read(8), "little")
    assert size - header == compressed.summary["bytes"]  # the file holds exactly the bytes reported
    manifest = json.loads((out / MANIFEST).read_text())
    if remapped:
        assert {e["quantizer"] for e in manifest["quantized"].values()} == {"dobi_remap"}
    reloaded = load_compressed(out).model
    ids = torch.arange(40).reshape(2, 20) % 200
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, compressed.model(ids).logits)
    expected = _perplexity(compressed.model, tokenizer)
    assert all(math.isfinite(v) for v in expected.values())
    assert _perplexity(reloaded, tokenizer) == expected


def test_a_finished_training_is_reused(tokenizer, tmp_path, caplog):
    workspace = _workspace(tokenizer, tmp_path, {"epochs": "1"})
    workspace.compress("dobi_svd", 0.4)
    with caplog.at_level(logging.INFO, logger="methods.dobi_svd"):
        _, again = workspace.compress("dobi_svd", 0.4)
    assert again.facts["allocation"]["reused"] is True and "is complete" in caplog.text


def test_cache_dirs_differ_by_ratio_and_settings(tmp_path):
    context = tiny_context(tmp_path)
    method = dobi.DobiSVD()
    a = dobi.training_dir(context, 0.4, method.make_config({}), context.calibration)
    assert a == dobi.training_dir(context, 0.4, method.make_config({"update": "eig"}), context.calibration)
    assert a != dobi.training_dir(context, 0.2, method.make_config({}), context.calibration)
    assert a != dobi.training_dir(context, 0.4, method.make_config({"epochs": "2"}), context.calibration)
    assert Path(a).parent == tmp_path / "dobi_svd"
