"""Dobi-SVD (``dobi_svd``, Wang Q. et al., ICLR 2025): trained truncation, IPCA weight update, remapped storage.

**Training** (``allocate``; authors' ``svd_trainer.py``, ``modules/stable_svd.py``).
Every target linear's output on a window, ``A`` (``T x m``), is replaced by
``U diag(s_i t_i) V^T`` with ``U, s, V = svd_lowrank(A, q = int(gamma) + 5,
niter = 2)`` (``q`` at most ``min(T, m)``), ``t_i = 0.5 tanh(beta (g - i)) +
0.5`` for ``i = 1..q``, ``g = gamma`` clamped to ``[1, q]``, ``beta = 10``.
Only the ``gamma`` (one per matrix) train. The SVD's backward is the
authors' (:class:`StableLowRankSVD`): ``F_ij = 1/(s_j^2 - s_i^2)``, for
``|s_i - s_j| <= 1e-10`` the Taylor sum ``s^-2 sum_{p<=10} (s_j/s_i)^2p``,
plus the terms of a truncated SVD (exact when ``A`` has rank ``q``; for a
longer spectrum they leave out the discarded components, as the code does).
Loss per window ``exp(CE) + lambda |kept
- target| + sum relu(-gamma)^2 + relu(gamma - T)^2`` with ``kept = sum
min(mn, c k)/sum mn``, ``k = gamma min(m, n)/min(T, m, n)`` (the issue's
shape fix of the code's ``int(min(m, n)/T)``, 0 on SmolLM2), ``c = max(m,
n)`` with remapping, ``m + n`` without. Adam (lr 5), the scheduler the code
installs (``CosineAnnealingLR``, ``T_max`` = optimizer steps per epoch,
``eta_min = 4``, stepped every step), gradient norm clipped to 1 (the HF
Trainer's default), batch 1, windows shuffled every epoch. The gammas kept
are the authors' ``best_gamma.json``: those of the lowest total loss seen at
every ``save_every``-th loss evaluation, before that step's update
(``select=last``: the final ones).

**Checkpoints.** After every optimizer step the training state (gammas, Adam
moments and step, the RNG state, the best so far) is written to
``cache_dir/dobi_svd/<key>`` as safetensors + JSON; a rerun with the same
model, windows, ratio and settings resumes from that step (logged), and a
finished training is reused.

**Weight update** (``refine``; authors' ``weight_updater.py``). ``update=ipca``
(default, the code): the truncated forward again, with ``q = ceil(gamma)``;
every ``max(1, int(min(m, n)/min(T, m, n)))`` windows the right singular
vectors ``V`` (``m x q`` each) of the layer's activations go into an
incremental PCA (mean-centred, ``k = min(m, n, cut ceil(gamma))`` components
``P``, a port of the authors' ``IncrementalPCAonGPU``); ``W' = P diag(t) P^T W``
with ``t`` the mask at ``cut gamma``. ``update=eig``: the pooled optimum,
``P`` = the top-``k`` eigenvectors of ``W G W^T`` (``G`` the input gram),
``W' = P P^T W``: its loss ``tr((W - W') G (W - W')^T)`` is svdllm_w's at rank
``k`` (the IPCA of unweighted, sign-ambiguous singular vectors is not).

**Storage.** ``remap=true`` (default): rank ``k = int(cut gamma)`` (up to
``min(m, n)``) stored as :class:`bench.RemappedLinear` (8-bit ``min(m, n)``
rows, per-vector absmax, 16-bit rest: ``2 k max(m, n) + 4 k`` bytes).
``remap=false``: rank ``int(cut ceil(gamma))``, two linears of the model's
dtype (``sqrt(Sigma)`` split), dense where that saves nothing.

**Ratio convention.** svdbench's ``--ratio rho`` is the fraction removed;
Dobi's ratio is the fraction kept, so the training target is ``1 - rho``:
without remapping of the targets' parameters (svdbench's own convention),
with remapping of their 16-bit bytes. The record has both:
``dobi_ratio_kept`` (Dobi's unit) and the logical parameters removed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench import (
    Allocation,
    LowRankLinear,
    Method,
    PaperNotes,
    RemappedLinear,
    UsageError,
    atomic_write_text,
    config_dict,
    factorize,
    hookimpl,
    json_key,
    set_module,
)

log = logging.getLogger(__name__)

# modules/stable_svd.py
VAL_EPSILON, GRAD_EPSILON, DIFF_EPSILON, N_TAYLOR = 1e-10, 1e2, 1e-10, 11
STATE = ("gamma", "exp_avg", "exp_avg_sq", "best_gamma", "rng")


@dataclass(frozen=True)
class DobiConfig:
    epochs: int = 1  # the paper's CLI: 20 (256 x 2048 windows); a CPU run here: 1
    train_samples: int | None = 8  # the first N calibration windows train and update (None: all; the paper 256)
    lambda_reg: float = 200.0  # the CLI's default; the released runs: 400
    lr: float = 5.0
    min_lr: float = 4.0
    beta: float = 10.0
    accumulation: int = 1  # the CLI's default; the released runs: 8
    max_grad_norm: float = 1.0  # the HF Trainer's default clipping
    remap: bool = True
    update: str = "ipca"  # "ipca" (the authors' code) or "eig" (the pooled optimum of W G W^T)
    select: str = "best"  # "best": the authors' best_gamma.json (checked every save_every steps); "last"
    save_every: int = 8  # the authors' save_epoch_num
    seed: int = 0

    def __post_init__(self):
        if self.update not in ("ipca", "eig"):
            raise UsageError(f"dobi_svd.update={self.update!r} is unknown; use ipca or eig")
        if self.select not in ("best", "last"):
            raise UsageError(f"dobi_svd.select={self.select!r} is unknown; use best or last")
        if self.epochs < 0 or self.accumulation < 1 or self.save_every < 1:
            raise UsageError("dobi_svd needs epochs >= 0, accumulation >= 1 and save_every >= 1")


# --------------------------------------------------------------------------- the SVD and its backward

def svd_backward(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, g_u: torch.Tensor, g_s: torch.Tensor,
                 g_v: torch.Tensor) -> torch.Tensor:
    """The authors' ``stable_lowrank_SVD.backward``: ``dL/dA`` of a (truncated) SVD ``A ~ U diag(s) V^T``."""
    q = s.shape[0]
    eye = torch.eye(q, dtype=torch.bool, device=s.device)
    lower = torch.tril(torch.ones(q, q, dtype=torch.bool, device=s.device)) & ~eye
    clamped = s.clamp_min(VAL_EPSILON)
    s_i = clamped[None, :].expand(q, q)  # column's value
    s_j = clamped[:, None].expand(q, q)  # row's value
    ratio = s_j / s_i
    e = torch.ones(q, q, dtype=s.dtype, device=s.device)
    tiny = lower & (ratio == 1) & (s_i == VAL_EPSILON)
    e[tiny] = GRAD_EPSILON
    normal = lower & ~tiny
    diff = (s_i - s_j).abs()
    equal = normal & (diff == 0)
    e[equal] = N_TAYLOR / s_i[equal] ** 2
    close = normal & (diff <= DIFF_EPSILON) & (diff > 0)
    q2 = ratio[close] ** 2
    e[close] = (1 - q2 ** N_TAYLOR) / (1 - q2) / s_i[close] ** 2
    other = normal & (diff > DIFF_EPSILON)
    e[other] = 1 / ((s_i[other] - s_j[other]) * (s_i[other] + s_j[other]))
    upper = ~eye & ~torch.tril(torch.ones(q, q, dtype=torch.bool, device=s.device))
    e[upper] = -e.T[upper]

    def skew(x):
        return x - x.T

    vh, g_vh = v.T, g_v.T
    core = skew(u.T @ g_u) * e @ torch.diag(s) + torch.diag(s) @ (skew(vh @ g_vh.T) * e) + torch.diag(g_s)
    grad = u @ core @ vh
    g_u_sinv = g_u / clamped[None, :]
    grad = grad + (g_u_sinv - u @ (u.T @ g_u_sinv)) @ vh
    sinv_g_vh = g_vh / clamped[:, None]
    return grad + u @ (sinv_g_vh - (sinv_g_vh @ vh.T) @ vh)


class StableLowRankSVD(torch.autograd.Function):
    """``torch.svd_lowrank(x, q, niter)`` with the authors' stable backward (:func:`svd_backward`)."""

    @staticmethod
    def forward(ctx, x, q: int, niter: int = 2):
        u, s, v = torch.svd_lowrank(x, q=q, niter=niter)
        ctx.save_for_backward(u, s, v)
        return u, s, v

    @staticmethod
    def backward(ctx, g_u, g_s, g_v):
        u, s, v = ctx.saved_tensors
        return svd_backward(u, s, v, g_u, g_s, g_v), None, None


def mask(gamma: torch.Tensor | float, count: int, beta: float) -> torch.Tensor:
    """``t_i = 0.5 tanh(beta (gamma - i)) + 0.5``, ``i = 1..count``."""
    gamma = torch.as_tensor(gamma, dtype=torch.float32)
    return 0.5 * torch.tanh(beta * (gamma - torch.arange(1, count + 1, dtype=gamma.dtype))) + 0.5


def truncate_activation(a: torch.Tensor, gamma: torch.Tensor, beta: float) -> torch.Tensor:
    """The training forward of one activation ``A`` (``T x m``, float32): ``U diag(s t) V^T``."""
    q = min(min(a.shape), max(1, int(gamma.detach()) + 5))
    u, s, v = StableLowRankSVD.apply(a, q)
    g = gamma.clamp(1, s.shape[0])  # the code's min(len(S), max(1, gamma)): no gradient outside
    return (u * (s * mask(g, s.shape[0], beta))[None, :]) @ v.T


# --------------------------------------------------------------------------- shapes and the budget

def cut_of(target, seqlen: int) -> float:
    """``min(m, n) / min(T, m, n)``: weight rank per unit of gamma (the shape fix of ``int(min(m, n)/T)``)."""
    m, n = target.out_features, target.in_features
    return min(m, n) / min(seqlen, m, n)


def gamma_start(target, seqlen: int, kept: float, remap: bool) -> float:
    m, n = target.out_features, target.in_features
    size = min(m, n) if remap else m * n / (m + n)
    return kept * size / cut_of(target, seqlen)


def kept_ratio(targets, gammas: torch.Tensor, seqlen: int, remap: bool) -> torch.Tensor:
    """``sum min(mn, c k) / sum mn``, ``k = cut gamma``, ``c = max(m, n)`` (remap) or ``m + n``."""
    size, total = gammas.new_zeros(()), 0
    for target, gamma in zip(targets, gammas):
        m, n = target.out_features, target.in_features
        c = max(m, n) if remap else m + n
        size = size + torch.clamp(c * gamma * cut_of(target, seqlen), max=float(m * n))
        total += m * n
    return size / total


def training_loss(ce: torch.Tensor, targets, gammas: torch.Tensor, seqlen: int, target_kept: float,
                  config: DobiConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``exp(CE) + lambda |kept - target| + sum relu(-gamma)^2 + relu(gamma - T)^2``, and ``kept``."""
    kept = kept_ratio(targets, gammas, seqlen, config.remap)
    penalty = (torch.relu(-gammas) ** 2 + torch.relu(gammas - seqlen) ** 2).sum()
    return torch.exp(ce) + config.lambda_reg * (kept - target_kept).abs() + penalty, kept


# --------------------------------------------------------------------------- hooks on the original model

class Hooks:
    """Forward hooks replacing each target's output by ``forward(index, target, A)`` (batch 1)."""

    def __init__(self, model: nn.Module, targets, forward):
        self.handles = []
        for index, target in enumerate(targets):
            def hook(_module, _args, output, index=index, target=target):
                out = forward(index, target, output[0].float())
                return out.to(output.dtype)[None]
            self.handles.append(model.get_submodule(target.name).register_forward_hook(hook))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


class frozen:
    """Every parameter of ``model`` without gradient for the block, restored after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = {name: p.requires_grad for name, p in self.model.named_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for name, p in self.model.named_parameters():
            p.requires_grad_(self.flags[name])


# --------------------------------------------------------------------------- training with checkpoints

def training_dir(context, ratio: float, config: DobiConfig, windows: torch.Tensor) -> Path:
    """Where one training's checkpoints live: keyed by model, windows, ratio, the settings training reads."""
    fields = {k: v for k, v in config_dict(config).items() if k != "update"}
    key = json_key({"model": context.model_identity, "windows": json_key({"w": windows.tolist()}),
                    "ratio": round(ratio, 6), "config": fields, "targets": [t.name for t in context.targets],
                    "format": 2})
    return Path(context.cache_dir) / "dobi_svd" / key


def _save_state(directory: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "state.safetensors.partial"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, directory / "state.safetensors")
    atomic_write_text(directory / "state.json", json.dumps(meta, indent=1))  # written last: names the step


def _load_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    from safetensors.torch import load_file

    if not (directory / "state.json").is_file() or not (directory / "state.safetensors").is_file():
        return None
    try:
        meta = json.loads((directory / "state.json").read_text())
        tensors = load_file(str(directory / "state.safetensors"))
    except (OSError, ValueError) as error:
        log.warning("dobi_svd: ignoring the unreadable checkpoint in %s (%s)", directory, error)
        return None
    if set(tensors) != set(STATE) or tensors["gamma"].shape[0] != meta.get("targets") or tensors["rng"].dtype != torch.uint8:
        log.warning("dobi_svd: ignoring the checkpoint in %s: it does not fit this training", directory)
        return None
    return tensors, meta


def train_gammas(model: nn.Module, targets, windows: torch.Tensor, ratio: float, config: DobiConfig,
                 directory: Path, on_step=None) -> dict:
    """Train one gamma per target for kept fraction ``1 - ratio``; resumes from ``directory``'s checkpoint.

    ``on_step(step)`` is called after each optimizer step has been checkpointed (tests interrupt there).
    Returns the gammas kept (``select``) and what the training found.
    """
    seqlen, count = windows.shape[1], windows.shape[0]
    target_kept = 1.0 - ratio
    per_epoch = math.ceil(count / config.accumulation)
    total_steps = config.epochs * per_epoch
    gammas = torch.tensor([gamma_start(t, seqlen, target_kept, config.remap) for t in targets], dtype=torch.float32,
                          requires_grad=True)
    optimizer = torch.optim.Adam([gammas], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=per_epoch, eta_min=config.min_lr)
    torch.manual_seed(config.seed)
    meta = {"step": 0, "targets": len(targets), "best_loss": math.inf, "best_step": None, "history": [],
            "seconds": 0.0}
    best = gammas.detach().clone()
    resumed_from = None
    found = _load_state(directory)
    if found is not None:
        tensors, meta = found
        resumed_from = meta["step"]
        with torch.no_grad():
            gammas.copy_(tensors["gamma"])
        best = tensors["best_gamma"].clone()
        if meta["step"] > 0:
            optimizer.state[gammas] = {"step": torch.tensor(float(meta["step"])), "exp_avg": tensors["exp_avg"].clone(),
                                       "exp_avg_sq": tensors["exp_avg_sq"].clone()}
        for _ in range(meta["step"]):
            optimizer.step()  # no gradient: only the lr schedule advances
            scheduler.step()
        torch.set_rng_state(tensors["rng"])
        log.info("dobi_svd: resuming the training from step %d of %d (%s)", resumed_from, total_steps, directory)

    def forward(index, target, a):
        return truncate_activation(a, gammas[index], config.beta)

    step = meta["step"]
    started = time.perf_counter()
    with frozen(model), Hooks(model, targets, forward), torch.enable_grad():
        while step < total_steps:
            epoch, within = divmod(step, per_epoch)
            order = torch.randperm(count, generator=torch.Generator().manual_seed(config.seed + epoch))
            batch = order[within * config.accumulation:(within + 1) * config.accumulation]
            optimizer.zero_grad()
            loss_sum, ce_sum = 0.0, 0.0
            for i in batch.tolist():
                window = windows[i][None]
                ce = model(window, labels=window, use_cache=False).loss
                loss, kept = training_loss(ce, targets, gammas, seqlen, target_kept, config)
                meta["calls"] = meta.get("calls", 0) + 1  # the code's epoch_cnt: one per compute_loss call
                if meta["calls"] % config.save_every == 0 and float(loss.detach()) < meta["best_loss"]:
                    # the authors' best_gamma.json: this window's total loss, the gammas it was computed with
                    meta["best_loss"], meta["best_step"] = float(loss.detach()), step + 1
                    best = gammas.detach().clone()
                (loss / len(batch)).backward()
                loss_sum += float(loss.detach()) / len(batch)
                ce_sum += float(ce.detach()) / len(batch)
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([gammas], config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            meta["history"].append({"step": step, "loss": loss_sum, "ce": ce_sum, "kept": float(kept.detach()),
                                    "lr": optimizer.param_groups[0]["lr"]})
            meta["step"] = step
            meta["seconds"] += time.perf_counter() - started
            started = time.perf_counter()
            state = optimizer.state[gammas]
            _save_state(directory, {"gamma": gammas.detach(), "exp_avg": state["exp_avg"],
                                    "exp_avg_sq": state["exp_avg_sq"], "best_gamma": best,
                                    "rng": torch.get_rng_state()}, meta)
            log.info("dobi_svd: step %d/%d loss %.4g (CE %.4g) kept %.4f", step, total_steps, loss_sum, ce_sum,
                     float(kept.detach()))
            if on_step is not None:
                on_step(step)
    final = gammas.detach().clone()
    chosen = best if config.select == "best" and meta["best_step"] is not None else final
    kept_final = float(kept_ratio(targets, chosen, seqlen, config.remap))
    return {"gammas": chosen, "steps": step, "resumed_from": resumed_from, "seconds": meta["seconds"],
            "seconds_per_epoch": meta["seconds"] / config.epochs if config.epochs else 0.0,
            "best_step": meta["best_step"], "kept": kept_final, "target_kept": target_kept,
            "history": meta["history"]}


# --------------------------------------------------------------------------- the weight update

class IncrementalPCA:
    """A port of the authors' ``IncrementalPCAonGPU.partial_fit`` (components and singular values only)."""

    def __init__(self, n_components: int):
        self.n_components = n_components
        self.mean, self.seen, self.components, self.singular = None, 0, None, None

    def partial_fit(self, x: torch.Tensor) -> None:
        x = x.clone()
        n = x.shape[0]
        batch_mean = x.mean(0)
        total = self.seen + n
        mean = batch_mean if self.mean is None else (self.seen * self.mean + n * batch_mean) / total
        if self.seen == 0:
            x -= mean
        else:
            x -= batch_mean
            correction = math.sqrt(self.seen / total * n) * (self.mean - batch_mean)
            x = torch.vstack([self.singular[:, None] * self.components, x, correction[None]])
        _, s, vt = torch.linalg.svd(x, full_matrices=False)
        signs = torch.sign(vt[torch.arange(vt.shape[0]), vt.abs().argmax(1)])  # _svd_flip(u_based_decision=False)
        vt = vt * signs[:, None]
        self.seen, self.mean = total, mean
        self.components, self.singular = vt[:self.n_components], s[:self.n_components]


def ipca_bases(model: nn.Module, targets, windows: torch.Tensor, gammas: torch.Tensor, beta: float) -> dict:
    """The authors' ``weight_updater.py`` pass: truncated forward, IPCA of the activations' right singular vectors."""
    seqlen = windows.shape[1]
    pcas, pending, every = {}, {}, {}
    for target, gamma in zip(targets, gammas.tolist()):
        m, n = target.out_features, target.in_features
        cut = cut_of(target, seqlen)
        every[target.name] = max(1, int(cut))  # the code's int(cut): 0 when min(m, n) < T
        components = min(m, n, max(1, cut * math.ceil(gamma))) if cut > 1 else min(m, n, max(1, math.ceil(gamma)))
        pcas[target.name], pending[target.name] = IncrementalPCA(int(components)), []

    def forward(index, target, a):
        q = min(a.shape[0], a.shape[1], max(1, math.ceil(float(gammas[index]))))
        u, s, v = torch.svd_lowrank(a, q=q, niter=2)
        pending[target.name].append(v)
        if len(pending[target.name]) == every[target.name]:
            pcas[target.name].partial_fit(torch.cat(pending[target.name], dim=1).T.double())
            pending[target.name] = []
        return (u * (s * mask(float(q), s.shape[0], beta))[None, :]) @ v.T

    with torch.no_grad(), Hooks(model, targets, forward):
        for window in windows:
            model(window[None], use_cache=False)
    for name, pca in pcas.items():  # fewer windows than one IPCA batch (the code then never fits): fit what came
        if pca.components is None and pending[name]:
            pca.partial_fit(torch.cat(pending[name], dim=1).T.double())
    return {name: pca.components.T for name, pca in pcas.items()}  # m x k


def ipca_update(weight: torch.Tensor, basis: torch.Tensor, gamma_eff: float, beta: float) -> torch.Tensor:
    """``W' = P diag(t) P^T W`` (``P``: ``m x k``), ``t`` the mask at ``min(m, n, max(1, gamma_eff))``."""
    m, n = weight.shape
    t = mask(min(m, n, max(1.0, gamma_eff)), basis.shape[1], beta).double()
    p = basis.double()
    return p @ (t[:, None] * (p.T @ weight.double()))


def pooled_update(weight: torch.Tensor, gram: torch.Tensor, rank: int) -> torch.Tensor:
    """``W' = P P^T W`` with ``P`` the top-``rank`` eigenvectors of ``W G W^T``: svdllm_w's loss at ``rank``."""
    w = weight.double()
    values, vectors = torch.linalg.eigh(w @ gram.double() @ w.T)
    p = vectors[:, values.argsort(descending=True)[:rank]]
    return p @ (p.T @ w)


def final_rank(target, gamma: float, seqlen: int, remap: bool) -> int:
    """The stored rank: ``int(cut gamma)`` remapped (``DOBI_quantize``), ``int(cut ceil(gamma))`` otherwise."""
    cut = cut_of(target, seqlen)
    k = int(cut * gamma) if remap else int(cut * math.ceil(gamma))
    return max(1, min(k, min(target.out_features, target.in_features)))


# --------------------------------------------------------------------------- the method

# Measured 2026-12-03 on SmolLM2-135M (2 shared CPU cores under a load of ~14; wall times are that machine's):
#   svdbench --plugins-dir DIR compress --model smollm2-135m --method dobi_svd --ratio 0.4 --out OUT
#     --tasks wikitext2 --limit 8 --seqlen 2048 --calib-samples 8 --calib-seqlen 128
#     --method-option dobi_svd.train_samples=2
#   python benchmarks/dobi_svd_reference.py --ratios 0.4 --epochs 1 --samples 8 --seqlen 128 --train-samples 2
# Training: the per-step total loss and kept ratio are identical in both (4 digits): steps 1-2 115.3 / 63.54,
# kept 0.6000 / 0.5998 (2 x 128 windows); with 8 x 128 windows steps 1-2 67.84 / 112.8 in both, the
# reference's step 3 47.34. A step took 264 s wall here at T = 128 (8 windows).
FIDELITY = ("training losses identical to the authors' code step by step on SmolLM2-135M (2 and 8 windows of "
            "128 tokens, 40%); end-to-end perplexity comparison not finished (see the report)")


class DobiSVD(Method):
    name = "dobi_svd"
    description = "Dobi-SVD: trained truncation of activations, IPCA weight update, remapped 8/16-bit factors"
    config_class = DobiConfig
    needs_calibration_data = True
    concurrent_decompose = True
    components = {"transform": "none", "update": "yes"}
    notes = PaperNotes(
        paper="Wang Q., Ke, Zhang, Wang, Chen, Xu, Li: Dobi-SVD: Differentiable SVD for LLM Compression and Some "
              "New Perspectives, ICLR 2025 (arXiv 2502.02723; code wangqinsi1/Dobi-SVD)",
        paper_defaults="256 x 2048 WikiText-2 training windows, 20 epochs (CLI; released runs 50 epochs, "
                       "gradient accumulation 8, lambda 400), lambda 200, beta 10, Adam lr 5 with cosine to 4, batch 1, "
                       "fp16 model, fp32 SVD; IPCA update on the training windows; remapped 8-bit storage; ratio = "
                       "fraction of (16-bit) bytes kept",
        deviations=(
            "shape fix (the issue's): k = gamma min(m, n)/min(T, m, n) everywhere the code has min(m, n)/T "
            "(int(min(m, n)/T) is 0 on SmolLM2: a division by zero; weight_updater's IPCA batch count int(cut) "
            "likewise, clamped to 1); remapping's cut is min(m, n)/2048 hard-coded in the code, the same fix",
            "epochs 1 and train_samples 8 by default on the CPU (the paper's 20 epochs of 256 x 2048 windows: "
            "--method-option dobi_svd.epochs=20 --method-option dobi_svd.train_samples=none with --calib-samples "
            "256 --calib-seqlen 2048); the windows are the first calibration windows (WikiText-2), the same for the "
            "training and the IPCA update, as in the code",
            "float32 model on the CPU (the authors' float16 on CUDA); the final SVD of W' exact in float64 "
            "(the authors' svd_lowrank with niter 10); IPCA in float64 (theirs float32)",
            "ratio: svdbench's fraction removed rho trains Dobi's kept fraction 1 - rho (of 16-bit bytes with "
            "remap, of parameters without); both are recorded",
            "update=eig (pooled optimum of W G W^T, G = the input gram of the original model) is an option; "
            "the default is the code's IPCA",
            "the code's evaluation pass also counts towards its every-8th-step best_gamma check; here only "
            "training steps are checked",
            "fidelity: " + FIDELITY,
        ),
    )

    def required_statistics(self) -> tuple[str, ...]:
        return ("gram",) if self.config.update == "eig" else ()

    def decomposition_statistics(self) -> tuple[str, ...]:
        return ()

    def decomposition_key(self, config) -> str:
        return f"{type(self).__module__}.{type(self).__qualname__} plain"  # decompose reads no setting

    def decompose(self, target, weight, context, config):
        return factorize(weight)  # the harness's placeholder factors; refine replaces every target

    def windows(self, context, config) -> torch.Tensor:
        windows = context.calibration
        if windows is None:
            raise UsageError("dobi_svd trains on calibration windows; none were given")
        return windows[:config.train_samples] if config.train_samples else windows

    def trained(self, context, ratio: float, config) -> dict:
        """The training for ``ratio``: from its finished record, else trained (resuming a checkpoint)."""
        windows = self.windows(context, config)
        directory = training_dir(context, ratio, config, windows)
        done = directory / "trained.json"
        if done.is_file():
            record = json.loads(done.read_text())
            log.info("dobi_svd: the training for ratio %.3g is complete (%s), reused", ratio, directory)
            return {**record, "gammas": torch.tensor(record["gammas"], dtype=torch.float32), "reused": True}
        found = train_gammas(context.model, context.targets, windows, ratio, config, directory)
        record = {**found, "gammas": found["gammas"].tolist()}
        atomic_write_text(done, json.dumps(record, indent=1))
        return {**found, "reused": False}

    def allocate(self, ratio, factorizations, context, config):
        found = self.trained(context, ratio, config)
        seqlen = self.windows(context, config).shape[1]
        ranks = {t.name: final_rank(t, g, seqlen, config.remap) for t, g in zip(context.targets, found["gammas"].tolist())}
        facts = {"dobi_ratio_kept": found["kept"], "target_kept": found["target_kept"], "steps": found["steps"],
                 "resumed_from_step": found["resumed_from"], "reused": found["reused"],
                 "training_seconds": found["seconds"], "seconds_per_epoch": found["seconds_per_epoch"],
                 "epochs": config.epochs, "windows": int(self.windows(context, config).shape[0]), "seqlen": seqlen,
                 "best_step": found["best_step"],
                 "gammas": {t.name: round(g, 4) for t, g in zip(context.targets, found["gammas"].tolist())}}
        return Allocation(ranks, facts)

    def refine(self, model, ratio, context, config):
        found = self.trained(context, ratio, config)
        windows = self.windows(context, config)
        seqlen = windows.shape[1]
        gammas = found["gammas"]
        started = time.perf_counter()
        bases = ipca_bases(context.model, context.targets, windows, gammas, config.beta) if config.update == "ipca" else {}
        stored, dense, kept_bytes, dense_bytes, logical = {}, 0, 0, 0, 0
        for target, gamma in zip(context.targets, gammas.tolist()):
            weight = context.weight(target).to("cpu", torch.float64)
            m, n = weight.shape
            rank = final_rank(target, gamma, seqlen, config.remap)
            if config.update == "ipca":
                updated = ipca_update(weight, bases[target.name], cut_of(target, seqlen) * gamma, config.beta)
            else:
                updated = pooled_update(weight, context.stats.get("gram", target.name), rank)
            bias = context.model.get_submodule(target.name).bias
            bias = bias.detach() if bias is not None else None
            dtype = context.weight(target).dtype
            u, s, vt = torch.linalg.svd(updated, full_matrices=False)
            u, s, vt = u[:, :rank], s[:rank], vt[:rank]
            if config.remap:
                layer = RemappedLinear.from_svd(u, s, vt, bias, compute_dtype=dtype)
                logical += rank * (m + n)
            elif rank * (m + n) < m * n:
                root = s.sqrt()
                layer = LowRankLinear.from_factors((u * root).to(dtype), (root[:, None] * vt).to(dtype), bias)
                logical += rank * (m + n)
            else:
                layer = nn.Linear(n, m, bias=bias is not None, dtype=dtype)
                with torch.no_grad():
                    layer.weight.copy_(updated.to(dtype))
                    if bias is not None:
                        layer.bias.copy_(bias)
                dense += 1
                logical += m * n
            set_module(model, target.name, layer.to(context.device))
            stored[target.name] = rank
            kept_bytes += 2 * rank * max(m, n) if config.remap else 2 * min(rank * (m + n), m * n)
            dense_bytes += 2 * m * n
        total = sum(t.out_features * t.in_features for t in context.targets)
        return {"update": config.update, "remap": config.remap, "seconds": time.perf_counter() - started,
                "ranks": stored, "dense_matrices": dense,
                "dobi_ratio_kept": kept_bytes / dense_bytes,  # of 16-bit bytes, the factors' stored values
                "target_params_removed": 1 - logical / total,
                "ratio_convention": "svdbench ratio rho = fraction removed; Dobi trains kept = 1 - rho "
                                    + ("of the targets' 16-bit bytes (remapped)" if config.remap else "of parameters")}


@hookimpl
def register_methods(register):
    register(DobiSVD())
