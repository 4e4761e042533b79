"""The authors' ZS-SVD (mint-vu/Zero-Sum-SVD, commit 37e73f6), one-shot, on svdbench's calibration windows.

Transplanted from the authors' code, function by function (names kept):
``compression/profiling.py:profle_svdllm_shared`` (shared whitening, its
``_build_factor``: ``cov = G/T + 1e-4 I``, Cholesky, eigen fallback),
``compression/gradient.py:compute_average_gradients`` (mean CE gradient of
the first ``nsamples_gradient_subset = 1`` window),
``compression/importance.py:compute_importance_for_layer_fast``,
``compression/planning.py:build_module_states`` / ``stage_plan``
(``selection_mode = zero_sum``) / ``compute_revert_info``,
``utils/correction_utils.py:ModulePruneState`` (the parts zero_sum uses),
``CandidateQueues``, ``break_even_rank``, ``compute_dense_params`` and
``factorize_linear`` (the non-remap path), as ``scripts/run_one_shot.sh``
runs them (one stage, ``keep_rank_ratio`` 0 below 60%, 0.3 at 60%, no
correction). The compressed weights ``W' = U_r S_r V_r^T L^-1`` are written
back into the dense linears and the model is saved as a Hugging Face
directory for svdbench's dense evaluation.

Adaptations (only what transformers 5 or the CPU force): the model is
svdbench's SmolLM2-135M loaded in float32 on the CPU (the authors load
float16 and run autocast on CUDA; ``torch.cuda.amp.autocast`` does nothing
here); calibration windows are svdbench's (``calibration_batches``, 32 x 512,
seed 3, WikiText-2 validation) instead of ``get_calib_train_data``; no
gradient checkpointing (135M fits); the authors' ``LowRankLinear`` modeling
class and checkpoint saving are replaced by writing the product back into
``nn.Linear`` weights; progress bars and logging dropped.

Usage: ``python benchmarks/zs_svd_reference.py --ratios 0.2,0.4 --out /tmp/zs_ref``
then ``svdbench run --model /tmp/zs_ref/r20 --methods none --tasks wikitext2
--limit 8 --seqlen 2048``. Measured numbers: see ``methods/zs_svd.py``.
"""

from __future__ import annotations

import argparse
import heapq
import math

import torch
import torch.nn.functional as F
from reference_io import save
from torch import nn

from bench.engine.calibration import calibration_batches
from bench.engine.config import CalibrationConfig
from bench.model.loading import load_model

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def find_target_modules_in_layer(layer):
    return {name: mod for name, mod in layer.named_modules()
            if isinstance(mod, nn.Linear) and name.split(".")[-1] in TARGETS}


@torch.no_grad()
def profle_svdllm_shared(layers, model, calib_loader, eps: float = 1e-4):
    """Shared whitening factors: input_layernorm output (q/k/v), o_proj input, post-attention norm (gate/up),
    down_proj input; grams in float32, ``cov = G/T + eps I``, Cholesky (eigen fallback)."""
    C = {"in": {}, "attn": {}, "mlp_in": {}, "h": {}}
    N = {k: {} for k in C}
    handles = []

    def acc(kind, li, tensor):
        if tensor.dim() == 2:
            tensor = tensor.unsqueeze(0)
        B, T, D = tensor.shape
        flat = tensor.reshape(B * T, D).to(dtype=torch.float32)
        gram = flat.transpose(0, 1) @ flat
        if li in C[kind]:
            C[kind][li].add_(gram)
            N[kind][li] += B * T
        else:
            C[kind][li], N[kind][li] = gram, B * T

    for li, layer in enumerate(layers):
        handles.append(layer.input_layernorm.register_forward_hook(lambda m, i, o, li=li: acc("in", li, o)))
        handles.append(layer.post_attention_layernorm.register_forward_hook(
            lambda m, i, o, li=li: acc("mlp_in", li, o)))
        handles.append(layer.self_attn.o_proj.register_forward_hook(lambda m, i, o, li=li: acc("attn", li, i[0])))
        handles.append(layer.mlp.down_proj.register_forward_hook(lambda m, i, o, li=li: acc("h", li, i[0])))
    for batch in calib_loader:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in handles:
        h.remove()

    def build_factor(gram, n):
        cov = gram.float() / max(1, n)
        cov = 0.5 * (cov + cov.transpose(0, 1))
        cov = cov + eps * torch.eye(cov.shape[0], dtype=cov.dtype)
        try:
            return torch.linalg.cholesky(cov)
        except Exception:
            evals, Q = torch.linalg.eigh(cov)
            return Q * torch.sqrt(torch.clamp(evals, min=eps)).unsqueeze(0)

    L = {k: {li: build_factor(C[k][li], N[k][li]) for li in C[k]} for k in C}
    profiling = {}
    for li, layer in enumerate(layers):
        profiling[li] = {}
        for name in find_target_modules_in_layer(layer):
            kind = ("in" if any(k in name for k in ("q_proj", "k_proj", "v_proj")) else "attn" if "o_proj" in name
                    else "mlp_in" if any(k in name for k in ("gate_proj", "up_proj")) else "h")
            profiling[li][name] = L[kind][li]
    return profiling


def compute_average_gradients(model, cali_data, layers, max_grad_samples: int = 1):
    """Mean over the first ``max_grad_samples`` windows of d(mean shifted CE)/dW, float32 sums."""
    model.train()
    model.config.use_cache = False
    params, keys, sums = [], [], {}
    for i, layer in enumerate(layers):
        sums[i] = {}
        for name, mod in find_target_modules_in_layer(layer).items():
            params.append(mod.weight)
            keys.append((i, name))
            sums[i][name] = torch.zeros_like(mod.weight, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    count = 0
    for batch in cali_data[:max_grad_samples]:
        ids, am = batch["input_ids"], batch["attention_mask"]
        logits = model(input_ids=ids, attention_mask=am).logits
        per_tok = F.cross_entropy(logits[..., :-1, :].reshape(-1, logits.size(-1)), ids[..., 1:].reshape(-1),
                                  reduction="none").view(ids.size(0), -1)
        loss = per_tok[am[..., 1:].bool()].mean()
        grads = torch.autograd.grad(loss, params)
        for (i, name), g in zip(keys, grads):
            sums[i][name] += g.detach().float()
        count += 1
    model.eval()
    return {i: {n: g / max(count, 1) for n, g in d.items()} for i, d in sums.items()}


@torch.no_grad()
def compute_importance_for_layer_fast(W, G, L):
    """``A = W L = U S V^T``, ``H = G L^-T``, ``grad_sigma = diag(U^T H V)`` (use_triangular_solve = False)."""
    A = W @ L
    H = G @ torch.linalg.inv(L).transpose(0, 1)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    idx = torch.argsort(S, descending=True)
    S, U, Vh = S[idx], U[:, idx], Vh[idx, :]
    grad_sigma = torch.diagonal(U.transpose(0, 1) @ H @ Vh.transpose(0, 1)).contiguous()
    return S, grad_sigma, U, Vh


def break_even_rank(m: int, n: int) -> int:
    return max(1, (m * n - 1) // (m + n))


class ModulePruneState:
    def __init__(self, key, shape, sigma, grad_sigma, max_svs, r_star):
        self.key, self.shape, self.sigma, self.grad_sigma = key, shape, sigma, grad_sigma
        self.max_svs, self.r_star, self.consumed, self.version = max_svs, r_star, 0, 0
        self.cost = shape[0] + shape[1]

    def current_rank(self):
        return max(0, self.sigma.numel() - self.consumed)

    def has_candidate(self):
        return self.max_svs - self.consumed > 0 and self.sigma.numel() - 1 - self.consumed >= 0

    def peek_delta(self):
        if not self.has_candidate():
            return None
        idx = self.sigma.numel() - 1 - self.consumed
        return -self.sigma[idx].item() * self.grad_sigma[idx].item()

    def effective_dense_delta_if_drop(self):  # never low rank at stage 1: the authors' dense branch
        m, n = self.shape
        r_now = self.current_rank()
        if r_now > self.r_star:
            return 0
        if r_now == self.r_star:
            return m * n - self.r_star * (m + n)
        return self.cost

    def accept(self):
        self.consumed += 1
        self.version += 1


class CandidateQueues:
    def __init__(self):
        self.pos, self.neg, self.counter = [], [], 0

    def push(self, state, delta):
        entry = (abs(delta), self.counter, state.key, delta, state.version)
        self.counter += 1
        heapq.heappush(self.pos if delta >= 0 else self.neg, entry)

    def pop_prefer_then_any(self, prefer_positive):
        first, other = (self.pos, self.neg) if prefer_positive else (self.neg, self.pos)
        for heap in (first, other):
            if heap:
                priority, _, key, delta, version = heapq.heappop(heap)
                return priority, key, delta, version
        return None

    def empty(self):
        return not self.pos and not self.neg


def stage_plan(states, stage_budget):
    """The zero_sum walk: pop Q+ when the running sum is <= 0, else Q-; stop once the budget is removed."""
    queues = CandidateQueues()
    for state in states.values():
        delta = state.peek_delta()
        if delta is not None:
            queues.push(state, delta)
    running_sum, removed, counts = 0.0, 0, {}
    while removed < stage_budget and not queues.empty():
        entry = queues.pop_prefer_then_any(running_sum <= 0.0)
        _, key, delta, version = entry
        st = states[key]
        if st.version != version or not st.has_candidate():
            continue
        saved = st.effective_dense_delta_if_drop()
        st.accept()
        running_sum += delta
        removed += saved
        counts[key] = counts.get(key, 0) + 1
        if st.has_candidate():
            queues.push(st, st.peek_delta())
    return counts, running_sum, removed


def importance(model, windows: torch.Tensor, eps: float = 1e-4) -> dict:
    """Whitening, gradients and per-component importance of every target, on the original model (the
    authors' ``recompute_importance``; computed once, shared by the ratios)."""
    layers = model.model.layers
    calib = [{"input_ids": w[None], "attention_mask": torch.ones_like(w[None])} for w in windows]
    profiling = profle_svdllm_shared(layers, model, calib, eps=eps)
    grads = compute_average_gradients(model, calib, layers, max_grad_samples=1)
    found = {}
    for li, layer in enumerate(layers):
        for name, mod in find_target_modules_in_layer(layer).items():
            W = mod.weight.detach().float()
            S, grad_sigma, U, Vh = compute_importance_for_layer_fast(W, grads[li][name], profiling[li][name])
            found[f"model.layers.{li}.{name}"] = (tuple(W.shape), mod.bias, S, grad_sigma, U, Vh, profiling[li][name])
    return found


def compress(found: dict, ratio: float, keep_rank_ratio: float) -> dict:
    """One stage of zero-sum truncation at ``ratio``: the ranks and the new weights (None: stays dense)."""
    states, dense_total = {}, 0
    for key, (shape, bias, S, grad_sigma, _U, _Vh, _L) in found.items():
        m, n = shape
        dense_total += m * n + (bias.numel() if bias is not None else 0)  # compute_dense_params
        r_star = break_even_rank(m, n)
        min_rank = max(1, int(math.ceil(keep_rank_ratio * r_star)))
        allowed = max(0, min(m, n) - min_rank)
        if allowed > 0:
            states[key] = ModulePruneState(key, (m, n), S, grad_sigma, allowed, min(r_star, min(m, n)))
    counts, running_sum, removed = stage_plan(states, int(dense_total * ratio))
    ranks, weights = {}, {}
    with torch.no_grad():
        for key in sorted(counts):
            st = states[key]
            rank = st.current_rank()
            if rank > st.r_star:  # compute_revert_info: above r*, back to full rank (dense)
                ranks[key] = None
                continue
            _, _, S, _, U, Vh, L = found[key]  # factorize_linear, use_triangular_solve = False
            root = torch.diag(torch.sqrt(S[:rank]))
            weights[key] = (U[:, :rank] @ root) @ (root @ (Vh[:rank] @ torch.linalg.inv(L)))
            ranks[key] = rank
    kept = sum(st.shape[0] * st.shape[1] if ranks.get(k) is None else ranks[k] * st.cost for k, st in states.items())
    return {"ranks": ranks, "weights": weights, "running_sum": running_sum, "credited_removed": removed,
            "kept_params": kept, "dense_params": dense_total}




def main() -> None:
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.2,0.4")
    parser.add_argument("--out", required=True, help="a directory per ratio is written under it: r20, r40, ...")
    parser.add_argument("--eps", type=float, default=1e-4, help="the ridge on G/T (authors': 1e-4; a diagnosis knob)")
    args = parser.parse_args()
    loaded = load_model("smollm2-135m")
    windows = calibration_batches(loaded.tokenizer, CalibrationConfig(samples=32, seqlen=512, seed=3))
    found = importance(loaded.model, windows, args.eps)
    for ratio in (float(r) for r in args.ratios.split(",")):
        result = compress(found, ratio, 0.3 if ratio >= 0.6 else 0.0)
        out = f"{args.out}/r{round(ratio * 100)}"
        save(loaded.model, loaded.tokenizer, result["weights"], out)
        with open(f"{out}/zs_ranks.json", "w") as f:
            json.dump(result["ranks"], f, indent=1)
        dense = sum(r is None for r in result["ranks"].values())
        print(f"ratio {ratio}: kept {result['kept_params']:,} of {result['dense_params']:,} target params "
              f"({1 - result['kept_params'] / result['dense_params']:.4f} removed), {dense} dense of the "
              f"{len(result['ranks'])} touched, running sum {result['running_sum']:.3g}", flush=True)


if __name__ == "__main__":
    main()
