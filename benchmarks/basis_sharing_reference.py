"""The authors' Basis Sharing core, transplanted, run on SmolLM2-135M for the fidelity check of ``basis_sharing``.

Source: github.com/TUDa-HWAI/Basis_Sharing at 8fa941e (no license file; the
functions below are short transplants for a comparison, kept beside their
origin): calib.py ``Hook``, ``Calib.get_calib_data``, ``Calib.get_s_inv_s``;
group.py ``Group._init_basis_coefficient``, ``Group._get_coefficient_split``,
``change_model``, ``update_model``; utils.py ``compute_num_basis``;
model_factory.py ``create_model`` (the groups and ranks). Adaptations, each
forced by transformers 5 / the CPU / this harness:

1. No modeling classes: the code subclasses ``LlamaSdpaAttention`` (gone in
   transformers 5) to run ``Coefficient(Basis(x))``. The compressed weights are
   written back as dense ``W_i' = Coefficient_i.weight @ Basis.weight`` (float32)
   into the ordinary model - same function, one matmul instead of two.
2. Shapes come from the model's linears, not ``ShareConfig.weight_info``
   (keyed by model name; no SmolLM2 entry): ``nx = in_features``, ``nf =
   out_features``; module paths ``self_attn.*`` / ``mlp.*`` as its llama2 yaml.
3. Calibration: svdbench's windows (``calibration_batches``: WikiText-2
   validation, 32 x 512, seed 3) instead of 256 x 2048 of train (seed 2023),
   in batches of 16 as ``calib_batch_size``; grams in memory, not pickles.
4. The update's statistics come from the dense-reconstructed model's linear
   inputs, which are the basis inputs of the code's compressed model (x feeds
   the basis; the reconstruction differs from ``C (B x)`` by float rounding).
   The code hooks a shared basis once per layer index, so each pooled gram is
   counted twice; the update is invariant to that scale.
5. CPU, float32 model; ``torch.svd`` as the code (it is ``linalg.svd`` inside).

Run (svdbench's perplexity, the same settings as the svdbench run)::

    python benchmarks/basis_sharing_reference.py --ratios 0.2,0.4 --out /tmp/bs_ref [--update]

It writes ``OUT/ratio{r}[_update]`` Hugging Face directories and prints their
WikiText-2 perplexity at ``--limit 8 --seqlen 2048`` (and JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SHARE_PART = ("v", "k", "q", "up", "gate")  # the llama2 yaml's share_part
PRIVATE_PART = ("down", "o")
NAMES = {"k": "self_attn.k_proj", "q": "self_attn.q_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "up": "mlp.up_proj", "gate": "mlp.gate_proj", "down": "mlp.down_proj"}


# ----------------------------------------------------------------- calib.py
class Hook:
    """calib.py: accumulates ``inp.T @ inp`` in float32 per batch (as the code)."""

    def __init__(self, module):
        self.calib = None
        self.hook = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module, input, output):
        with torch.no_grad():
            inp = input[0].detach().float()
            inp = inp.flatten(start_dim=0, end_dim=-2)
            if self.calib is None:
                self.calib = (inp.T @ inp).cpu()
            else:
                self.calib += (inp.T @ inp).cpu()

    def close(self):
        self.hook.remove()


def get_calib_data(calib: dict, group, name):
    """calib.py Calib.get_calib_data: q, v read k's gram and gate reads up's (same input); summed over the group."""
    if name == "mlp.gate_proj":
        name = "mlp.up_proj"
    if name == "self_attn.q_proj" or name == "self_attn.v_proj":
        name = "self_attn.k_proj"
    data = None
    for item in group:
        tmp = calib[name][item]
        data = tmp.clone() if data is None else data + tmp
    return data


def get_s_inv_s(calib: dict, group, name):
    """calib.py Calib.get_s_inv_s (from SVD-LLM): upper Cholesky factor, shift -lambda_min + 7e-6 on failure."""
    data = get_calib_data(calib, group, name).double()
    try:
        scaling_diag_matrix = torch.linalg.cholesky(data).T
    except Exception:
        print("Warning: eigen scaling_diag_matrix is not positive!")
        eigenvalues = torch.linalg.eigvalsh(data)
        data += (- eigenvalues[0] + 7e-6) * torch.eye(data.shape[0]).to(data.device)
        scaling_diag_matrix = torch.linalg.cholesky(data).T
    invs = torch.linalg.inv(scaling_diag_matrix)
    return scaling_diag_matrix, invs


def build_calibration_dataset(model, windows, names, batch_size=16):
    """calib.py Calib.build_calibration_dataset: hooks on each layer's ``names``, one pass over the batches."""
    layers = model.model.layers
    hooks = {name: [Hook(layer.get_submodule(name)) for layer in layers] for name in names}
    model.eval()
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            model(input_ids=windows[start:start + batch_size], use_cache=False)
    out = {}
    for name in names:
        out[name] = [hook.calib for hook in hooks[name]]
        for hook in hooks[name]:
            hook.close()
    return out


# ----------------------------------------------------------------- utils.py
def compute_num_basis(nx, nf, group_strategy, compression_ratio):
    compression_ratio = 1 - compression_ratio / 100
    total = nx * nf * group_strategy
    num_basis = (total * compression_ratio) // (nx + nf * group_strategy)
    return int(num_basis)


# ----------------------------------------------------------------- group.py
def init_basis_coefficient(model, members, name, s, invs):
    """group.py Group._init_basis_coefficient (llama2): SVD of S^T [W_1^T .. W_g^T]."""
    w = [model.model.layers[layer].get_submodule(name).weight.data.T for layer in members]
    w = torch.cat(w, -1).double()
    w = s @ w
    u, sigma, v = torch.svd(w)
    basis = torch.matmul(invs @ u, torch.diag(sigma)).float()
    coefficient = v.T.float()
    return basis, coefficient


def change_model(std_model, calib, groups, name, step, num_basis):
    """group.py change_model: per group the basis (n x k, Basis.weight = its transpose) and coefficients."""
    out = {}
    for group in groups:
        s, inv_s = get_s_inv_s(calib, group, name)
        basis, coefficient = init_basis_coefficient(std_model, group, name, s, inv_s)
        basis_weight = basis[:, :num_basis].T.contiguous()  # Basis.set_weight
        for i, layer in enumerate(group):
            co = coefficient[:, step * i:step * i + step][:num_basis, :]  # _get_coefficient_split
            out[layer] = (co.T.contiguous(), basis_weight)  # Coefficient.set_weight
    return out


def update_model(std_model, factors, update_calib, groups, name, step):
    """group.py update_model: basis fixed, ``vt = W^T X X^T u (u^T X X^T u)^-1`` on the compressed model's grams."""
    for group in groups:
        w = [std_model.model.layers[layer_idx].get_submodule(name).weight.data.T for layer_idx in group]
        u = factors[group[0]][1].T.double()  # the basis' weight, transposed back (n x k)
        w = torch.cat(w, -1).double()
        xtx = get_calib_data(update_calib, group, name).double()
        inv = torch.inverse(u.T @ xtx @ u)
        vt = w.T @ xtx @ u @ inv
        v = vt.T
        for i, layer_idx in enumerate(group):
            factors[layer_idx] = (v[:, i * step:(i + 1) * step].T.float().contiguous(), factors[layer_idx][1])
    return factors


# ----------------------------------------------------------------- model_factory.py (groups and ranks)
def groups_and_ranks(model, ratio_percent: float, group_size: int = 2):
    layers = len(model.model.layers)
    plan = {}
    for part in SHARE_PART:
        linear = model.model.layers[0].get_submodule(NAMES[part])
        nx, nf = linear.in_features, linear.out_features
        num_group, rest = layers // group_size, layers % group_size
        group = [[group_size * i + j for j in range(group_size)] for i in range(num_group)]
        if rest != 0:
            group += [[num_group * group_size + i for i in range(rest)]]
        plan[part] = (group, compute_num_basis(nx, nf, group_size, ratio_percent), nf)
    for part in PRIVATE_PART:
        linear = model.model.layers[0].get_submodule(NAMES[part])
        nx, nf = linear.in_features, linear.out_features
        plan[part] = ([[i] for i in range(layers)], compute_num_basis(nx, nf, 1, ratio_percent), nf)
    return plan


def compress(std_model, compressed, calib, ratio: float, update: bool, windows) -> dict:
    """create_model + (do_update_model): the compressed weights written densely into ``compressed``."""
    plan = groups_and_ranks(std_model, ratio * 100)
    factors = {part: change_model(std_model, calib, group, NAMES[part], step, k)
               for part, (group, k, step) in plan.items()}
    write_dense(compressed, factors)
    if update:
        update_calib = build_calibration_dataset(compressed, windows, [NAMES[p] for p in ("k", "o", "up", "down")])
        for part, (group, _, step) in plan.items():
            factors[part] = update_model(std_model, factors[part], update_calib, group, NAMES[part], step)
        write_dense(compressed, factors)
    return {part: {"groups": len(group), "num_basis": k} for part, (group, k, _) in plan.items()}


def write_dense(model, factors) -> None:
    with torch.no_grad():
        for part, per_layer in factors.items():
            for layer, (coefficient, basis) in per_layer.items():
                model.model.layers[layer].get_submodule(NAMES[part]).weight.copy_(coefficient @ basis)


def save_dense(model, tokenizer, out: Path) -> None:
    """A plain Hugging Face directory (safetensors; the GGUF-converted source's quantization_config dropped:
    ``save_pretrained`` refuses a model loaded from GGUF)."""
    import copy

    from safetensors.torch import save_model

    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})  # tied embeddings once
    tokenizer.save_pretrained(out)


def main() -> None:
    import copy

    from bench.api.task import EvalSettings
    from bench.engine.calibration import calibration_batches
    from bench.engine.config import CalibrationConfig
    from bench.engine.plugins import load_registry
    from bench.model.loading import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.4")
    parser.add_argument("--update", action="store_true", help="also run group.py:update_model (test.py does not)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    loaded = load_model(args.model)
    std = loaded.model.eval()
    windows = calibration_batches(loaded.tokenizer, CalibrationConfig(samples=32, seqlen=512, seed=3))
    calib = build_calibration_dataset(std, windows, [NAMES[p] for p in ("k", "o", "up", "down")])
    task = load_registry().get("task", "wikitext2")
    settings = EvalSettings(seqlen=args.seqlen, limit=args.limit)
    results = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for update in ([False, True] if args.update else [False]):
            model = copy.deepcopy(std)
            plan = compress(std, model, calib, ratio, update, windows)
            out = Path(args.out) / f"ratio{ratio:g}{'_update' if update else ''}"
            save_dense(model, loaded.tokenizer, out)
            ppl = {m.metric: m.value for m in task.evaluate(model, loaded.tokenizer, settings)}
            results.append({"ratio": ratio, "update": update, "dir": str(out), "plan": plan, **ppl})
            print(json.dumps(results[-1]), flush=True)
            del model
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
