"""The authors' Dobi-SVD (wangqinsi1/Dobi-SVD) - training, weight update, remapping - on svdbench's windows.

Transplanted function by function (names kept): ``modules/stable_svd.py``
(``stable_lowrank_SVD`` verbatim, ``SVDTransformLayer``),
``svd_trainer.py`` (``calculate_compression_loss``, ``Wrong_value_loss``,
``SVDTrainer.compute_loss`` with its every-``save_epoch_num`` best-gamma
record, ``create_optimizer`` / ``create_scheduler``), ``weight_updater.py``
(``svd_forward``, ``process_batch``, ``change_weight``, the remapping loop),
``modules/IncrementalPCA.py:IncrementalPCAonGPU.partial_fit`` and
``modules/remapping.py:DOBI_quantize`` / ``DOBI_dequantize``.

Adaptations (only what transformers 5, the CPU or SmolLM2's shapes force):

1. shape fix: every ``min(m, n)/SEQ_LEN`` (``RANK_RATIO``, ``cut``) is
   ``min(m, n)/min(SEQ_LEN, m, n)``; the code's ``int(...)`` of it is 0 on
   SmolLM2 (a division by zero in ``gamma_init``, an IPCA that never fits)
   and its remapping's hard-coded ``/2048`` is the same ratio;
2. CPU and float32: the model is svdbench's SmolLM2-135M in float32 (the
   authors: float16 on CUDA; float16 matmuls on the CPU are unusably slow),
   the SVD in float32 as theirs; ``.cuda()`` / devices dropped;
3. no HF ``Trainer`` / ``accelerate``: the loop does what ``Trainer.train``
   does with the code's settings - batch 1, windows shuffled each epoch
   (``torch.randperm`` from the seed, as its ``RandomSampler``), loss
   ``exp(CE) + reg + penalty``, gradient accumulation, clipping to norm 1
   (the Trainer's ``max_grad_norm``), the code's Adam (lr 5) and
   ``CosineAnnealingLR(T_max = steps per epoch, eta_min = 4)`` stepped every
   optimizer step; the evaluation pass (which in the code also advances the
   best-gamma counter) is not run;
4. bitsandbytes (CUDA only) replaced by the same 8-bit dynamic map and
   nearest-value quantization in torch (``bench.model.remapped``'s
   ``dynamic_map``, the same formula as ``create_dynamic_map``);
5. windows: svdbench's calibration windows (``calibration_batches``, 32 x 512,
   seed 3, WikiText-2; the first ``--train-samples``, as dobi_svd takes them)
   instead of ``prepare_train_loaders``; the training and the weight update
   use the same windows, as the code does;
6. the remapped factors are dequantized (as ``DOBI_dequantize`` does, to
   float16) and their product written back into the dense ``nn.Linear`` so
   that svdbench evaluates the model as a plain Hugging Face directory;
7. with fewer windows than one IPCA batch (``Ngamma`` sequences) the code
   never fits the IPCA (a KeyError in ``change_weight``): the windows that
   came are fitted once at the end (as dobi_svd does).

Usage: ``python benchmarks/dobi_svd_reference.py --ratios 0.2,0.4 --epochs 1 --train-samples 8 --out /tmp/dobi_ref``, then
``svdbench run --model /tmp/dobi_ref/r20 --methods none --tasks wikitext2 --limit 8 --seqlen 2048``.
Measured numbers: see ``methods/dobi_svd.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn as nn
from reference_io import save

from bench.engine.calibration import calibration_batches
from bench.engine.config import CalibrationConfig
from bench.model.loading import load_model
from bench.model.remapped import dynamic_map

computeSVD_dtype = torch.float32
model_load_dtype = torch.float32  # adaptation 2 (the code: float16)
val_epsilon = 1e-10
grad_epsilon = 1e2
K = 10
diff_epsilon = 1e-10
nTaylor = K + 1


class stable_lowrank_SVD(torch.autograd.Function):  # modules/stable_svd.py, verbatim but for devices
    @staticmethod
    def forward(ctx, x, rank):
        U, S, V = torch.svd_lowrank(x, q=rank, niter=2)
        ctx.save_for_backward(U, S, V)
        return U, S, V

    @staticmethod
    def backward(ctx, gU, gS, gV):
        U, S, V = ctx.saved_tensors
        Vh = V.T
        gVh = gV.T
        I = torch.eye(S.shape[0])  # noqa: E741 (the authors' name)
        mask_no_I = ~I.bool()
        mask_lower_tri = torch.tril(torch.ones(S.size(0), S.size(0), dtype=torch.bool))
        mask_init = mask_no_I & mask_lower_tri
        S_clamp = torch.clamp(S, min=val_epsilon)
        lambda_i = S_clamp.unsqueeze(0)
        lambda_j = S_clamp.unsqueeze(1)
        ratio = lambda_j / lambda_i
        E = torch.ones_like(ratio)
        mask_too_small = mask_init & (ratio == 1) & (lambda_i == val_epsilon)
        E[mask_too_small] = grad_epsilon
        mask_normal = mask_init & (~mask_too_small)
        diff = torch.abs(lambda_i - lambda_j)
        mask_normal_and_equal = mask_normal & (diff == 0)
        i_mtrx = S_clamp.repeat(S_clamp.shape[0], 1)
        E[mask_normal_and_equal] = (1 / (i_mtrx[mask_normal_and_equal].pow(2))) * nTaylor
        mask_normal_and_close = mask_normal & (diff <= diff_epsilon) & (diff > 0)
        q_2 = ratio[mask_normal_and_close].pow(2)
        E[mask_normal_and_close] = (1 / (i_mtrx[mask_normal_and_close].pow(2))) * ((1 - q_2 ** nTaylor) / (1 - q_2))
        mask_other = mask_normal & (diff > diff_epsilon)
        j_mtrx = i_mtrx.t()
        E[mask_other] = 1 / ((i_mtrx[mask_other] - j_mtrx[mask_other]) * (i_mtrx[mask_other] + j_mtrx[mask_other]))
        mask_pad = mask_no_I & (~mask_lower_tri)
        E[mask_pad] = -1. * (E.t()[mask_pad])

        def skew(X):
            return X - X.T

        UhgU_skew = skew(U.T @ gU) * E
        VhgV_skew = skew(Vh @ gVh.T) * E
        gA_core = U @ (UhgU_skew @ S.diag_embed() + S.diag_embed() @ VhgV_skew + torch.diag_embed(gS)) @ Vh
        gUSinv = gU / S_clamp.unsqueeze(-2)
        additional_term1 = (gUSinv - U @ (U.T @ gUSinv)) @ Vh
        SinvgVh = gVh / S_clamp.unsqueeze(-1)
        additional_term2 = U @ (SinvgVh - (SinvgVh @ Vh.T) @ Vh)
        gA_core += additional_term1 + additional_term2
        return gA_core, None


class SVDTransformLayer(nn.Module):  # modules/stable_svd.py
    def __init__(self, gamma, SEQ_LEN, beta, ori: nn.Linear, name):
        super().__init__()
        self.gamma = nn.Parameter(torch.tensor(gamma, dtype=computeSVD_dtype))
        self.ori = ori
        self.name = name
        self.ori_weight_size = torch.tensor(ori.in_features * ori.out_features)
        self.beta = beta

    def forward(self, x):
        x = self.ori(x).to(computeSVD_dtype)
        squeeze_need = x.dim() == 3
        if squeeze_need:
            x = x.squeeze(0)
        m, n = x.shape
        full_rank = min(m, n)
        gamma_range = int(self.gamma.detach().int() + 5)
        gamma_range = min(full_rank, max(1, gamma_range))
        U, S, V = stable_lowrank_SVD.apply(x, gamma_range)
        sequence = torch.arange(1, len(S) + 1)
        real_gamma = min(len(S), max(1, self.gamma))
        Trunc = (0.5 * torch.tanh(self.beta * (real_gamma - sequence)) + 0.5)
        x_transformed = torch.matmul(torch.matmul(U, torch.diag_embed(S * Trunc)), V.T)
        real_x = x_transformed.to(model_load_dtype)
        return real_x.unsqueeze(0) if squeeze_need else real_x


def rank_ratio(in_features, out_features, seq_len):
    return min(in_features, out_features) / min(seq_len, in_features, out_features)  # adaptation 1


def linears(model):
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and "lm_head" not in name]


def set_child(model, name, module):
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def train(model, windows, target_compression_ratio, args):
    """svd_trainer.py: the transformed model, the loss, the optimizer and scheduler, the best-gamma record."""
    SEQ_LEN = windows.shape[1]
    remapping = not args.no_remapping
    layers = []
    for name, module in linears(model):
        RANK_RATIO = rank_ratio(module.in_features, module.out_features, SEQ_LEN)
        if remapping:
            gamma_init = (1 / RANK_RATIO) * target_compression_ratio * min(module.in_features, module.out_features)
        else:
            gamma_init = (1 / RANK_RATIO) * target_compression_ratio * module.in_features * module.out_features / (
                module.in_features + module.out_features)
        layer = SVDTransformLayer(gamma_init, SEQ_LEN, args.beta, module, name)
        set_child(model, name, layer)
        layers.append(layer)
    ori_weight_size = sum(int(layer.ori_weight_size) for layer in layers)
    for p in model.parameters():
        p.requires_grad = False
    for layer in layers:
        layer.gamma.requires_grad = True

    def calculate_compression_loss():
        size_new = torch.tensor(0.)
        for module in layers:
            RANK_RATIO = rank_ratio(module.ori.in_features, module.ori.out_features, SEQ_LEN)
            if remapping:
                size_now = max(module.ori.in_features, module.ori.out_features) * module.gamma * RANK_RATIO
            else:
                size_now = module.ori.in_features * module.gamma * RANK_RATIO + module.ori.out_features * module.gamma * RANK_RATIO
            size_ori = module.ori_weight_size
            size_new = torch.where(size_now < size_ori, size_now, size_ori) + size_new
        compression_ratio = size_new / ori_weight_size
        return args.lambda_reg * abs(compression_ratio - target_compression_ratio), compression_ratio

    def Wrong_value_loss():
        penalty = torch.tensor(0.)
        for module in layers:
            penalty += torch.relu(-module.gamma) ** 2 + torch.relu(module.gamma - SEQ_LEN) ** 2
        return penalty

    params = [layer.gamma for layer in layers]
    optimizer = torch.optim.Adam(params, lr=args.lr)
    steps_per_epoch = math.ceil(windows.shape[0] / args.accumulation)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps_per_epoch, eta_min=args.min_lr)
    torch.manual_seed(args.seed)
    sampler = torch.Generator().manual_seed(args.seed)
    epoch_cnt, best_loss, best = 0, float("inf"), None
    started = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(windows.shape[0], generator=sampler).tolist()
        for start in range(0, len(order), args.accumulation):
            batch = order[start:start + args.accumulation]
            optimizer.zero_grad()
            for i in batch:
                ids = windows[i][None]
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                ppl = torch.exp(loss)
                reg_loss, compression_ratio = calculate_compression_loss()
                total_loss = ppl + reg_loss + Wrong_value_loss()
                epoch_cnt += 1
                if epoch_cnt % args.save_epoch_num == 0:
                    if total_loss.item() < best_loss:
                        best_loss = total_loss.item()
                        best = {layer.name: layer.gamma.detach().item() for layer in layers}
                (total_loss / len(batch)).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            print(f"step loss {total_loss.item():.4g} ratio {float(compression_ratio):.4f}", flush=True)
    seconds = time.perf_counter() - started
    final = {layer.name: layer.gamma.detach().item() for layer in layers}
    for layer in layers:
        set_child(model, layer.name, layer.ori)
    return (best or final), final, seconds


class IncrementalPCAonGPU:  # modules/IncrementalPCA.py, partial_fit
    def __init__(self, n_components=None):
        self.n_components = n_components
        self.n_components_ = n_components
        self.mean_ = None
        self.var_ = None
        self.n_samples_seen_ = 0

    @staticmethod
    def _incremental_mean_and_var(X, last_mean, last_variance, last_sample_count):
        if last_mean is None:
            last_mean = torch.zeros(X.shape[1])
        if last_variance is None:
            last_variance = torch.zeros(X.shape[1])
        new_sample_count = X.shape[0]
        new_mean = torch.mean(X, dim=0)
        new_sum_square = torch.sum((X - new_mean) ** 2, dim=0)
        updated_sample_count = last_sample_count + new_sample_count
        updated_mean = (last_sample_count * last_mean + new_sample_count * new_mean) / updated_sample_count
        updated_variance = (last_variance * (last_sample_count + new_sample_count * last_mean ** 2) + new_sum_square
                            + new_sample_count * new_mean ** 2) / updated_sample_count - updated_mean ** 2
        return updated_mean, updated_variance, updated_sample_count

    def partial_fit(self, X):
        first_pass = not hasattr(self, "components_")
        X = X.clone()
        n_samples, n_features = X.shape
        if first_pass:
            self.components_ = None
        col_mean, col_var, n_total_samples = self._incremental_mean_and_var(
            X, self.mean_, self.var_, torch.tensor([self.n_samples_seen_]))
        if self.n_samples_seen_ == 0:
            X -= col_mean
        else:
            col_batch_mean = torch.mean(X, dim=0)
            X -= col_batch_mean
            mean_correction_factor = torch.sqrt(torch.tensor((self.n_samples_seen_ / n_total_samples.item()) * n_samples))
            mean_correction = mean_correction_factor * (self.mean_ - col_batch_mean)
            if self.singular_values_ is not None and self.components_ is not None:
                X = torch.vstack((self.singular_values_.view((-1, 1)) * self.components_, X, mean_correction))
        U, S, Vt = torch.linalg.svd(X, full_matrices=False)
        max_abs_rows = torch.argmax(torch.abs(Vt), dim=1)  # _svd_flip(u_based_decision=False)
        signs = torch.sign(Vt[range(Vt.shape[0]), max_abs_rows])
        Vt *= signs[:, None]
        self.n_samples_seen_ = n_total_samples.item()
        self.components_ = Vt[: self.n_components_]
        self.singular_values_ = S[: self.n_components_]
        self.mean_ = col_mean
        self.var_ = col_var
        return self


CODE = dynamic_map()  # adaptation 4


def bnb_quantize(A, code):
    absmax = torch.abs(A).max()
    normed = A / absmax
    return torch.argmin((normed[:, None] - code[None, :]).abs(), dim=1).to(torch.uint8), (absmax, code)


def DOBI_quantize(Matrix, k, code=CODE):  # modules/remapping.py
    U, S, V = torch.svd(Matrix.float())
    V_T = V.T
    us_absmax, us_quan, vt_absmax, vt_quan = [], [], [], []
    tuple_info = None
    if U.shape[0] > V.shape[0]:
        limit_posi = V.shape[0]
        us_orig_part = []
        for i in range(k):
            s = S[i]
            quan_u, (absmax, _) = bnb_quantize(U[:limit_posi, i] * s, code)
            us_absmax.append(absmax)
            us_quan.append(quan_u)
            us_orig_part.append(U[limit_posi:, i] * s)
            quan_vt, (absmax, _) = bnb_quantize(V_T[i], code)
            vt_absmax.append(absmax)
            vt_quan.append(quan_vt)
        tuple_info = ("us", torch.stack(us_orig_part, dim=0).T.to(torch.float16))
    elif U.shape[0] < V.shape[0]:
        limit_posi = U.shape[0]
        vt_orig_part = []
        for i in range(k):
            s = S[i]
            quan_u, (absmax, _) = bnb_quantize(U[:, i], code)
            us_absmax.append(absmax)
            us_quan.append(quan_u)
            quan_vt, (absmax, _) = bnb_quantize(V_T[i, :limit_posi] * s, code)
            vt_absmax.append(absmax)
            vt_quan.append(quan_vt)
            vt_orig_part.append(V_T[i, limit_posi:] * s)
        tuple_info = ("vt", torch.stack(vt_orig_part, dim=0).to(torch.float16))
    else:
        for i in range(k):
            s = S[i]
            quan_us, (absmax, _) = bnb_quantize(U[:, i] * s, code)
            us_absmax.append(absmax)
            us_quan.append(quan_us)
            quan_vt, (absmax, _) = bnb_quantize(V_T[i], code)
            vt_absmax.append(absmax)
            vt_quan.append(quan_vt)
    return (torch.stack(us_quan), torch.stack(vt_quan), torch.stack(us_absmax).to(torch.float16),
            torch.stack(vt_absmax).to(torch.float16), tuple_info)


def DOBI_dequantize(us_quan, vt_quan, us_absmax, vt_absmax, tuple_info, code=CODE):
    dequan_us = code[us_quan.long()].T * us_absmax.to(torch.float32)
    dequan_vt = torch.diag(vt_absmax.to(torch.float32)) @ code[vt_quan.long()]
    if tuple_info is not None:
        if tuple_info[0] == "us":
            dequan_us = torch.cat((dequan_us, tuple_info[1].float()), dim=0)
        else:
            dequan_vt = torch.cat((dequan_vt, tuple_info[1].float()), dim=1)
    return dequan_us.to(torch.float16), dequan_vt.to(torch.float16)


def update_and_remap(model, windows, gamma_json, beta):
    """weight_updater.py: IPCA over the truncated forward, change_weight, then the remapping of every linear."""
    SEQ_LEN = windows.shape[1]
    V_PCA_dict, PCA_tensor_dict, V_accu_list_dict, hooks = {}, {}, {}, []

    def svd_forward(module, x):
        A = x.squeeze(0).to(computeSVD_dtype) @ module.weight.to(computeSVD_dtype).T
        gamma_range = math.ceil(module.gamma)
        real_gamma = min(A.shape[0], A.shape[1], max(1, gamma_range))
        Uf, Sf, Vf = torch.svd_lowrank(A, q=int(real_gamma), niter=2)
        sequence = torch.arange(1, len(Sf) + 1, dtype=A.dtype)
        Trunc = (0.5 * torch.tanh(beta * (real_gamma - sequence)) + 0.5)
        x_transformed = (Uf @ torch.diag_embed(Sf * Trunc) @ Vf.T).to(model_load_dtype)
        V_accu_list_dict[module.name].append(Vf.detach())
        if len(V_accu_list_dict[module.name]) == module.Ngamma:
            Vf_full = torch.concatenate(V_accu_list_dict[module.name][:module.Ngamma], axis=1)
            V_PCA_dict[module.name].partial_fit(Vf_full.T)
            PCA_tensor_dict[module.name] = V_PCA_dict[module.name].components_
            V_accu_list_dict[module.name] = []
        return x_transformed.unsqueeze(0)

    for name, module in linears(model):
        module.gamma = gamma_json[name]
        m, n = module.weight.shape
        cut = rank_ratio(module.in_features, module.out_features, SEQ_LEN)
        module.Ngamma = max(1, int(cut))  # adaptation 1
        real_gamma = min(m, n, max(1, cut * math.ceil(module.gamma))) if cut > 1 else min(m, n, max(1, math.ceil(module.gamma)))
        V_PCA_dict[name] = IncrementalPCAonGPU(n_components=int(real_gamma))
        V_accu_list_dict[name] = []
        module.name = name
        hooks.append(module.register_forward_hook(lambda mod, args, out: svd_forward(mod, args[0])))
    with torch.no_grad():
        for window in windows:
            model(window[None], use_cache=False)
    for h in hooks:
        h.remove()
    for name, pending in V_accu_list_dict.items():  # adaptation 7: fewer windows than one IPCA batch
        if name not in PCA_tensor_dict and pending:
            V_PCA_dict[name].partial_fit(torch.concatenate(pending, axis=1).T)
            PCA_tensor_dict[name] = V_PCA_dict[name].components_

    weights = {}
    for name, module in linears(model):
        cut = rank_ratio(module.in_features, module.out_features, SEQ_LEN)
        gamma = cut * gamma_json[name] if cut > 1 else gamma_json[name]
        W = module.weight.data.detach().to(computeSVD_dtype)
        V_pca = PCA_tensor_dict[name].T.to(computeSVD_dtype)  # change_weight
        sequence = torch.arange(1, V_pca.shape[1] + 1)
        m, n = W.shape
        real_gamma = min(m, n, max(1, gamma))
        G = torch.diag(0.5 * torch.tanh(beta * (real_gamma - sequence)) + 0.5)
        W_new = (W.T @ V_pca @ G @ V_pca.T).T.to(model_load_dtype)
        us, vt = DOBI_dequantize(*DOBI_quantize(W_new, int(gamma)))  # the remapping loop
        weights[name] = us.float() @ vt.float()
    return weights




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.2,0.4", help="svdbench ratios (fraction removed): Dobi's 1 - rho")
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--samples", type=int, default=32, help="calibration windows drawn (svdbench's --calib-samples)")
    parser.add_argument("--train-samples", dest="train_samples", type=int, default=8,
                        help="the first N of them train and update (dobi_svd's train_samples)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lambda-reg", dest="lambda_reg", type=float, default=200)
    parser.add_argument("--lr", type=float, default=5)
    parser.add_argument("--min-lr", dest="min_lr", type=float, default=4)
    parser.add_argument("--beta", type=float, default=10)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--save-epoch-num", dest="save_epoch_num", type=int, default=8)
    parser.add_argument("--no-remapping", action="store_true")
    args = parser.parse_args()
    loaded = load_model("smollm2-135m")
    windows = calibration_batches(loaded.tokenizer, CalibrationConfig(samples=args.samples, seqlen=args.seqlen, seed=3))
    windows = windows[:args.train_samples]
    for ratio in (float(r) for r in args.ratios.split(",")):
        best, final, seconds = train(loaded.model, windows, 1 - ratio, args)
        weights = update_and_remap(loaded.model, windows, best, args.beta)
        out = f"{args.out}/r{round(ratio * 100)}"
        save(loaded.model, loaded.tokenizer, weights, out)
        with open(f"{out}/dobi_gammas.json", "w") as f:
            json.dump({"best": best, "final": final, "training_seconds": seconds}, f, indent=1)
        print(f"ratio {ratio}: trained {seconds:.0f} s ({args.epochs} epochs), saved {out}", flush=True)


if __name__ == "__main__":
    main()
