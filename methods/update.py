"""SVD-LLM's sequential low-rank update, a refinement any factorized model can use.

After truncation every compressed matrix is a :class:`bench.LowRankLinear`
(``down`` = ``W_v``, ``up`` = ``W_u``). The update (SVD-LLM, METHODS.md) trains
LoRA adapters with peft in two phases and merges after each one:

1. LoRA on every ``up`` (``W_u``) with everything else frozen, merge;
2. LoRA on every ``down`` (``W_v``) with everything else frozen, merge.

``order="vu"`` runs the phases the other way round (the paper's Table 5 finds
little difference). Because each adapter is merged into the linear it wraps,
the model keeps exactly its ``LowRankLinear`` structure and parameter count.

Data: the vendored 5,000-example Alpaca subset, each example formatted with
the Alpaca prompt (instruction, optional input, response) and cut at 256
tokens; the loss covers the whole text, as the reference alpaca-lora script
does by default (``train_on_inputs``). The reference trains for epochs on the
full 52k set on a GPU; here the budget is explicit (``update_steps`` per phase
times ``batch_size`` examples) and defaults to what finishes in minutes on two
CPU cores for SmolLM2-135M. A fixed held-out set of Alpaca examples (never
trained on) gives the loss before and after each phase.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from bench import LowRankLinear, NoConfig, UsageError, data_file

log = logging.getLogger(__name__)

ALPACA_FILE = "alpaca/alpaca_5000.json"

# What the update's paper did and how this one differs: the method notes of every method that uses it.
UPDATE_PAPER_DEFAULTS = ("sequential LoRA on W_u then W_v (merged after each) on Alpaca (52k examples, epochs on a "
                         "GPU), LoRA r 8, alpha 16, lr 1e-4, cutoff 256 tokens")
UPDATE_DEVIATIONS = (
    "the update's budget is explicit: update_steps (24) x batch_size (4) examples per phase from a vendored "
    "5,000-example Alpaca subset, not epochs over 52k (sized for two CPU cores; the default profile runs 2 steps)",
    "loss over the whole example (alpaca-lora's train_on_inputs default)",
)
ORDERS = ("uv", "vu")
PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{output}")


@dataclass(frozen=True)
class UpdateConfig:
    """The update's settings and budget (recorded with every result).

    ``update_steps`` is the number of optimizer steps *per phase*; each step
    sees ``batch_size`` examples. ``update_steps=0`` disables the update.
    """

    update_steps: int = 24
    batch_size: int = 4
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lr: float = 1e-4
    cutoff: int = 256
    order: str = "uv"
    eval_examples: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.order not in ORDERS:
            raise UsageError(f"update order {self.order!r} is unknown; use 'uv' (W_u first, the default) or 'vu'")
        if self.update_steps < 0 or self.batch_size < 1 or self.lora_r < 1 or self.cutoff < 2 or self.eval_examples < 1:
            raise UsageError("update needs update_steps >= 0, batch_size >= 1, lora_r >= 1, cutoff >= 2 and eval_examples >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"update lr must be a positive number, got {self.lr}")


def format_example(example: dict) -> str:
    """The Alpaca prompt of one example, response included."""
    template = PROMPT_WITH_INPUT if example.get("input", "").strip() else PROMPT_NO_INPUT
    return template.format(instruction=example["instruction"], input=example.get("input", ""), output=example["output"])


_TOKENIZED: dict[tuple[int, int], list[torch.Tensor]] = {}


def alpaca_token_ids(tokenizer, cutoff: int) -> list[torch.Tensor]:
    """Every vendored Alpaca example as token ids (EOS appended), cut at ``cutoff`` tokens (memoized per tokenizer)."""
    key = (id(tokenizer), cutoff)
    if key not in _TOKENIZED:
        _TOKENIZED.clear()
        _TOKENIZED[key] = _tokenize_alpaca(tokenizer, cutoff)
    return _TOKENIZED[key]


def _tokenize_alpaca(tokenizer, cutoff: int) -> list[torch.Tensor]:
    examples = json.loads(data_file(ALPACA_FILE).read_text())
    eos = tokenizer.eos_token_id
    out = []
    for example in examples:
        ids = tokenizer(format_example(example), add_special_tokens=False).input_ids
        if eos is not None:
            ids = ids + [eos]
        out.append(torch.tensor(ids[:cutoff], dtype=torch.long))
    return out


def collate(sequences: list[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding is masked out of attention and loss."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, :len(seq)] = seq
        mask[row, :len(seq)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def factor_names(model: nn.Module, which: str) -> list[str]:
    """Full names of the ``up`` (``which="u"``) or ``down`` (``"v"``) linears of every LowRankLinear."""
    child = {"u": "up", "v": "down"}[which]
    return [f"{name}.{child}" for name, module in model.named_modules() if isinstance(module, LowRankLinear)]


@torch.no_grad()
def mean_loss(model: nn.Module, sequences: list[torch.Tensor], pad_id: int, batch_size: int, device) -> float:
    """Token-weighted mean LM loss over ``sequences``."""
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        batch = {k: v.to(device) for k, v in collate(sequences[start:start + batch_size], pad_id).items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        loss = model(**batch).loss
        total += float(loss) * n
        tokens += n
    return total / max(tokens, 1)


def _train_phase(model: nn.Module, targets: list[str], train: list[torch.Tensor], order: torch.Tensor,
                 config: UpdateConfig, pad_id: int, device) -> tuple[nn.Module, list[float]]:
    """LoRA on ``targets`` only, trained for ``update_steps`` and merged. Returns the model and step losses."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, bias="none")
    peft_model = get_peft_model(model, lora)  # freezes every non-LoRA parameter
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    peft_model.train()
    losses = []
    for step in range(config.update_steps):
        picks = order[(step * config.batch_size + torch.arange(config.batch_size)) % len(order)]
        batch = {k: v.to(device) for k, v in collate([train[int(i)] for i in picks], pad_id).items()}
        loss = peft_model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {step} of the LoRA update on {len(targets)} factors")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        log.debug("update step %d: loss %.4f", step, losses[-1])
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged, losses


def sequential_update(model: nn.Module, tokenizer, config: UpdateConfig, device: str | torch.device = "cpu") -> dict:
    """Run the two-phase update on ``model`` in place; return facts for the record.

    Raises ``UsageError`` when the model holds no LowRankLinear (nothing to update).
    """
    names = {"u": factor_names(model, "u"), "v": factor_names(model, "v")}
    if not names["u"]:
        raise UsageError("the low-rank update needs a factorized model, but it holds no LowRankLinear layer")
    if config.update_steps == 0:
        return {"update": "skipped (update_steps=0)", "config": asdict(config)}
    start = time.perf_counter()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    sequences = alpaca_token_ids(tokenizer, config.cutoff)
    held_out, train = sequences[-config.eval_examples:], sequences[:-config.eval_examples]
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # LoRA initialization and dropout
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    params_before = sum(p.numel() for p in model.parameters())
    structure_before = [(n, type(m).__name__) for n, m in model.named_modules()]

    facts = {"config": asdict(config), "train_examples": len(train), "held_out_examples": len(held_out),
             "held_out_loss": {"before": mean_loss(model, held_out, pad_id, config.batch_size, device)}, "phases": []}
    for which in config.order:
        order = torch.randperm(len(train), generator=generator)
        phase_start = time.perf_counter()
        merged, losses = _train_phase(model, names[which], train, order, config, pad_id, device)
        if merged is not model:
            raise RuntimeError("peft returned a different model object after merging; the update must work in place")
        loss_after = mean_loss(model, held_out, pad_id, config.batch_size, device)
        facts["held_out_loss"][f"after_{which}"] = loss_after
        facts["phases"].append({"factor": "W_u" if which == "u" else "W_v", "modules": len(names[which]),
                                "steps": config.update_steps, "examples": config.update_steps * config.batch_size,
                                "train_loss_first": losses[0], "train_loss_last": losses[-1],
                                "seconds": round(time.perf_counter() - phase_start, 2)})
        log.info("update %s: %d steps, held-out loss %.4f", facts["phases"][-1]["factor"], config.update_steps, loss_after)

    for name, p in model.named_parameters():
        p.requires_grad_(requires_grad.get(name, True))
    if [(n, type(m).__name__) for n, m in model.named_modules()] != structure_before or \
            sum(p.numel() for p in model.parameters()) != params_before:
        raise RuntimeError("merging the LoRA adapters changed the model's structure or parameter count")
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise FloatingPointError(f"non-finite values in {name} after the LoRA update")
    facts["held_out_loss"]["after"] = facts["held_out_loss"][f"after_{config.order[-1]}"]
    facts["steps"] = 2 * config.update_steps
    facts["seconds"] = round(time.perf_counter() - start, 2)
    return facts


class WithUpdate:
    """Mixin adding the sequential update to a factorized method's ``refine``.

    ``class MyMethodU(WithUpdate, MyMethod)`` with a new ``name`` gives the
    method followed by the update; its config is :class:`UpdateConfig` (so the
    base method must not have settings of its own). The base's ``refine``
    runs first and its facts are kept beside the update's.
    """

    config_class = UpdateConfig
    packages = {"peft": "pip install 'svdbench[update]'"}

    def decomposition_key(self, config: UpdateConfig) -> str:
        # the update only refines: the base's decomposition, which has no settings
        return super().decomposition_key(NoConfig())

    def refine(self, model: nn.Module, ratio: float, context, config: UpdateConfig) -> dict:
        facts = dict(super().refine(model, ratio, context, config))
        facts["update"] = sequential_update(model, context.tokenizer, config, context.device)
        return facts
