"""The unofficial MoDeGPT (cbacary/MoDeGPT, commit 2a76ae8) on svdbench's calibration windows, scale bug fixed.

Transplanted from that code, function by function (names kept):
``src/calibration.py:__calibrate_model`` with ``LlamaAdapter.register_hooks``
(``C_z`` = ``down_proj`` input gram, ``C_q``/``C_k`` = per-head grams of the
``q_proj``/``k_proj`` outputs before RoPE, ``C_x`` = ``input_layernorm`` output
gram, all divided by the token count; BI = mean ``1 - cos`` of consecutive
``hidden_states``), ``src/compression_utils.py:sqrt_M`` and
``allocate_global_sparsity`` (``smoothing`` 0.15, ``max_sparsity`` 0.8, its cap
loop as written), ``src/compression/compress_mlp.py:get_ridge_scores`` /
``compress_weights`` (``nystrom_ridge`` 1e-2, ``rank = int(D_int keep)``),
``src/compression/compress_qk.py:compress_qk`` / ``compress_head_llama_grouped``
(``ridge_qk`` 1e-6, rank ``int(d_h keep)`` rounded down to even) and
``src/compression/compress_vo.py:compress_vo`` / ``compress_head_grouped``
(``ridge_vo`` 1e-4, rank ``int(d_h keep)`` rounded down to even), with the
defaults of ``src/adapters/CompressionConfig.py``, in the order mlp, qk, vo, on
statistics of the original model (``run_modegpt.main``).

Adaptations (every one):

- the **scale bug** is fixed: the code's ``LlamaRebuild`` attention uses
  ``k^-1/2`` for the reduced query/key dim ``k``; here the compressed weights
  are written back into the *dense* layout of the Hugging Face model (removed
  query/key channels, value rows, output columns and MLP neurons as zeros:
  the same function as the sliced model, since zeroed q/k channel pairs add
  nothing to the scores, zero value rows and output columns nothing to the
  output, and a zero gate/up neuron gives ``silu(0) * 0 = 0``), so attention
  runs with the original ``d_h^-1/2``;
- the value-output weights are placed in rows ``[g d_h, g d_h + k)`` of
  ``v_proj`` (the code's own ``slice_dims=False`` branch copies them into
  ``W_v[:, ...]`` columns, a second bug; its default sliced path is what this
  reproduces);
- svdbench's SmolLM2-135M in float32 on the CPU instead of CUDA/bfloat16
  (statistics stay float64 as in the code; compressed weights stay float32
  instead of the code's bfloat16 cast); svdbench's calibration windows
  (``calibration_batches``, 32 x 512, seed 3, WikiText-2 validation) instead
  of ``load_calibration_texts``, so ``total_tokens`` is samples x 512 (the
  code hard-codes 2048);
- no per-layer temporary files, no optuna, no logging; the model is saved as
  an ordinary Hugging Face directory for svdbench's dense evaluation.

Usage: ``python benchmarks/modegpt_reference.py --ratios 0.2,0.4 --out /tmp/modegpt_ref`` then
``svdbench run --model /tmp/modegpt_ref/r20 --methods none --tasks wikitext2 --limit 8 --seqlen 2048``.
Measured numbers and the differences: see ``methods/modegpt.py``.
"""

from __future__ import annotations

import argparse
import json

import torch
from reference_io import save
from torch.nn.functional import softmax

from bench.engine.calibration import calibration_batches
from bench.engine.config import CalibrationConfig
from bench.model.loading import load_model

dtype_p = torch.float64


def sqrt_M(M, ridge_lambda=1e-4):
    eigenvalues, eigenvectors = torch.linalg.eigh(M)
    eigenvalues = eigenvalues + ridge_lambda
    return eigenvectors @ torch.diag(torch.sqrt(eigenvalues.clamp(min=0))) @ eigenvectors.T


@torch.no_grad()
def calibrate_model(model, windows):
    layers = model.model.layers
    cfg = model.config
    n_heads, n_kv, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    n = len(layers)
    cov_mlp = [torch.zeros(cfg.intermediate_size, cfg.intermediate_size, dtype=dtype_p) for _ in range(n)]
    cov_q = [torch.zeros(n_heads, head_dim, head_dim, dtype=dtype_p) for _ in range(n)]
    cov_k = [torch.zeros(n_kv, head_dim, head_dim, dtype=dtype_p) for _ in range(n)]
    cov_x = [torch.zeros(cfg.hidden_size, cfg.hidden_size, dtype=dtype_p) for _ in range(n)]
    handles = []

    def proj_hook(i, store, heads):
        def hook(module, inp, out):
            proj = out.detach().to(dtype_p).view(-1, heads, head_dim).permute(1, 0, 2)
            store[i] += torch.bmm(proj.transpose(1, 2), proj)
        return hook

    def pre_gate_hook(i):
        def hook(module, inp):
            h = inp[0].detach().to(dtype_p).view(-1, inp[0].size(-1))
            cov_mlp[i] += h.T @ h
        return hook

    def input_hook(i):
        def hook(module, inp, out):
            o = out.detach().to(dtype_p)
            cov_x[i] += torch.sum(o.mT @ o, dim=0)
        return hook

    for i, block in enumerate(layers):
        handles.append(block.mlp.down_proj.register_forward_pre_hook(pre_gate_hook(i)))
        handles.append(block.input_layernorm.register_forward_hook(input_hook(i)))
        handles.append(block.self_attn.k_proj.register_forward_hook(proj_hook(i, cov_k, n_kv)))
        handles.append(block.self_attn.q_proj.register_forward_hook(proj_hook(i, cov_q, n_heads)))
    bi = [0.0] * n
    n_texts = 0
    for batch in windows.split(4):
        n_texts += len(batch)
        hidden = model(batch, output_hidden_states=True, use_cache=False).hidden_states
        for i in range(n):
            x_in, x_out = hidden[i].to(dtype_p), hidden[i + 1].to(dtype_p)
            bi[i] += torch.sum(1 - torch.cosine_similarity(x_in, x_out, dim=2), dim=0).mean().item()
    for h in handles:
        h.remove()
    bi = [b / n_texts for b in bi]
    tokens = n_texts * windows.shape[1]
    for lst in (cov_mlp, cov_x, cov_k, cov_q):
        for i in range(n):
            lst[i] /= tokens
    return cov_mlp, cov_q, cov_k, cov_x, bi


def allocate_global_sparsity(bi_scores, compression_ratio, smoothing=0.15, max_sparsity=0.8):
    n_layers = len(bi_scores)
    s = torch.tensor(bi_scores).to(dtype_p)
    softmax_weights = softmax(-s / smoothing, dim=0)
    sparsities = softmax_weights * (n_layers * compression_ratio)
    while True:
        clamped = sparsities > max_sparsity
        if not clamped.any():
            break
        excess = (sparsities[clamped] - max_sparsity).sum()
        sparsities[clamped] = max_sparsity
        free = ~clamped
        if free.any():
            sparsities[free] += excess * (softmax_weights[free] / softmax_weights[free].sum())
    return (1 - sparsities).tolist()


def get_ridge_scores(C, ridge_lambda=1e-2):
    C_ridge = C + ridge_lambda * torch.eye(C.shape[0], dtype=C.dtype)
    return torch.diag(torch.cholesky_inverse(torch.linalg.cholesky(C_ridge)))


def compress_weights(mlp, C, keep_ratio, ridge_lambda):
    inv_diag = get_ridge_scores(C, ridge_lambda)
    rank = int(C.shape[0] * keep_ratio)
    W_u, W_g, W_d = (m.weight.to(dtype_p) for m in (mlp.up_proj, mlp.gate_proj, mlp.down_proj))
    topk, _ = torch.sort(torch.topk(inv_diag, k=rank, largest=False, dim=0).indices)
    C_reduced = C[topk][:, topk]
    down_cross_term = C[topk, :] @ W_d.T
    L_red = torch.linalg.cholesky(C_reduced + 1e-6 * torch.eye(rank, dtype=dtype_p))
    W_d_proj = torch.cholesky_solve(down_cross_term, L_red)
    return topk, W_u[topk], W_g[topk], W_d_proj.T


def compress_head_llama_grouped(kv_head_idx, kv_head_ratio, cov_q_layer, cov_k_layer, Wk_heads, rank, ridge_lambda):
    q_head_idx = kv_head_idx * kv_head_ratio
    head_dims = Wk_heads.shape[1]
    group_score = torch.zeros(head_dims // 2, dtype=dtype_p)
    sqrt_C_k = sqrt_M(cov_k_layer[kv_head_idx], ridge_lambda=ridge_lambda)
    for cov_q_h in cov_q_layer[q_head_idx:q_head_idx + kv_head_ratio]:
        sqrt_C_q = sqrt_M(cov_q_h)
        nq1 = torch.norm(sqrt_C_q[..., :head_dims // 2], dim=0)
        nq2 = torch.norm(sqrt_C_q[..., head_dims // 2:], dim=0)
        nk1 = torch.norm(sqrt_C_k[..., :head_dims // 2], dim=0)
        nk2 = torch.norm(sqrt_C_k[..., head_dims // 2:], dim=0)
        group_score += nq1 ** 2 * nk1 ** 2 + nq2 ** 2 * nk2 ** 2
    group_score = torch.sqrt(group_score)
    topk = torch.topk(group_score, k=rank // 2).indices
    return torch.cat((topk, topk + head_dims // 2))


def compress_head_grouped(kv_head_idx, kv_head_ratio, head_dim, rank, W_v, W_o, sqrt_C, inv_sqrt_C):
    V_head = W_v[kv_head_idx * head_dim:(kv_head_idx + 1) * head_dim].to(dtype_p)
    U, _S, V = torch.linalg.svd(sqrt_C @ V_head.T, full_matrices=False)
    S = torch.diag(_S)
    compressed_v = inv_sqrt_C @ U[:, :rank]
    new_o = []
    for j in range(kv_head_ratio):
        h = kv_head_idx * kv_head_ratio + j
        O_head = W_o[:, h * head_dim:(h + 1) * head_dim].to(dtype_p)
        new_o.append((S[:rank, :rank] @ V[:rank, :] @ O_head.T).T)
    return compressed_v.T, new_o


@torch.no_grad()
def compress(model, stats, ratio: float, smoothing=0.15, max_sparsity=0.8, nystrom_ridge=1e-2, ridge_qk=1e-6,
             ridge_vo=1e-4) -> dict:
    """The compressed weights in the dense layout (zeros where removed) and the dims kept per layer."""
    cov_mlp, cov_q, cov_k, cov_x, bi = stats
    cfg = model.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // n_heads
    group = n_heads // n_kv
    keep = allocate_global_sparsity(bi, ratio, smoothing, max_sparsity)
    weights, dims = {}, []
    for i, block in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        mlp, attn = block.mlp, block.self_attn
        topk, w_u, w_g, w_d = compress_weights(mlp, cov_mlp[i], keep[i], nystrom_ridge)
        for name, w, rows in (("up_proj", w_u, True), ("gate_proj", w_g, True), ("down_proj", w_d, False)):
            full = torch.zeros_like(getattr(mlp, name).weight, dtype=dtype_p)
            if rows:
                full[topk] = w
            else:
                full[:, topk] = w
            weights[f"{p}.mlp.{name}"] = full
        rank_qk = max(2, min(int(head_dim * keep[i]) - int(head_dim * keep[i]) % 2, head_dim))
        wq = attn.q_proj.weight.to(dtype_p).clone().view(n_heads, head_dim, -1)
        wk = attn.k_proj.weight.to(dtype_p).clone().view(n_kv, head_dim, -1)
        q_new, k_new = torch.zeros_like(wq), torch.zeros_like(wk)
        for g in range(n_kv):
            mask = compress_head_llama_grouped(g, group, cov_q[i], cov_k[i], wk, rank_qk, ridge_qk)
            k_new[g, mask] = wk[g, mask]
            for j in range(group):
                q_new[g * group + j, mask] = wq[g * group + j, mask]
        weights[f"{p}.self_attn.q_proj"] = q_new.view(n_heads * head_dim, -1)
        weights[f"{p}.self_attn.k_proj"] = k_new.view(n_kv * head_dim, -1)
        rank_vo = max(2, int(head_dim * keep[i]) - int(head_dim * keep[i]) % 2)
        sqrt_C = sqrt_M(cov_x[i], ridge_lambda=ridge_vo)
        inv_sqrt_C = torch.linalg.inv(sqrt_C)
        v_full = torch.zeros_like(attn.v_proj.weight, dtype=dtype_p)
        o_full = torch.zeros_like(attn.o_proj.weight, dtype=dtype_p)
        for g in range(n_kv):
            v, os_ = compress_head_grouped(g, group, head_dim, rank_vo, attn.v_proj.weight, attn.o_proj.weight,
                                           sqrt_C, inv_sqrt_C)
            v_full[g * head_dim:g * head_dim + rank_vo] = v
            for j, o in enumerate(os_):
                h = g * group + j
                o_full[:, h * head_dim:h * head_dim + rank_vo] = o
        weights[f"{p}.self_attn.v_proj"] = v_full
        weights[f"{p}.self_attn.o_proj"] = o_full
        dims.append({"keep": keep[i], "intermediate": len(topk), "qk_dim": rank_qk, "vo_dim": rank_vo})
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    dense = len(dims) * (hidden * head_dim * (n_heads + n_kv) * 2 + 3 * hidden * inter)
    kept = sum(hidden * (n_heads + n_kv) * (d["qk_dim"] + d["vo_dim"]) + 3 * hidden * d["intermediate"] for d in dims)
    return {"weights": weights, "dims": dims, "bi": bi, "block_params_dense": dense, "block_params": kept}




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.2,0.4")
    parser.add_argument("--out", required=True, help="a directory per ratio is written under it: r20, r40, ...")
    args = parser.parse_args()
    loaded = load_model("smollm2-135m")
    windows = calibration_batches(loaded.tokenizer, CalibrationConfig(samples=32, seqlen=512, seed=3))
    stats = calibrate_model(loaded.model, windows)
    for ratio in (float(r) for r in args.ratios.split(",")):
        result = compress(loaded.model, stats, ratio)
        out = f"{args.out}/r{round(ratio * 100)}"
        save(loaded.model, loaded.tokenizer, result["weights"], out)
        with open(f"{out}/modegpt_dims.json", "w") as f:
            json.dump({"dims": result["dims"], "bi": result["bi"]}, f, indent=1)
        removed = 1 - result["block_params"] / result["block_params_dense"]
        print(f"ratio {ratio}: block linears {result['block_params']:,} of {result['block_params_dense']:,} "
              f"({removed:.4f} removed); dims {[(d['qk_dim'], d['vo_dim'], d['intermediate']) for d in result['dims']]}",
              flush=True)


if __name__ == "__main__":
    main()
