"""How long SVD-LLM's sequential update takes with its default budget.

Compresses SmolLM2-135M (or ``--model``) with vanilla SVD at ``--ratio`` (the
update's cost hardly depends on how the factors were found), then runs
:func:`methods.update.sequential_update` with the default
:class:`~methods.update.UpdateConfig` (or ``--steps`` / ``--batch-size``)
and prints the wall-clock and CPU seconds of each phase and the held-out
loss before and after. CPU seconds divided by the thread count estimate the
wall time on an otherwise idle machine when the CPU is shared.

    python benchmarks/lora_update_budget.py [--steps 24 --batch-size 4 --ratio 0.6]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench import factorize, uniform_ranks
from bench.engine.compress import compress_model
from bench.model.loading import load_model
from bench.model.targets import find_targets
from methods.update import UpdateConfig, sequential_update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--steps", type=int, default=UpdateConfig.update_steps)
    parser.add_argument("--batch-size", type=int, default=UpdateConfig.batch_size)
    args = parser.parse_args()

    loaded = load_model(args.model)
    targets = find_targets(loaded.model)
    factorizations = {t.name: factorize(loaded.model.get_submodule(t.name).weight) for t in targets}
    model, _ = compress_model(loaded.model, targets, factorizations, uniform_ranks(targets, args.ratio))
    config = UpdateConfig(update_steps=args.steps, batch_size=args.batch_size)
    wall, cpu = time.perf_counter(), time.process_time()
    facts = sequential_update(model, loaded.tokenizer, config)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    threads = torch.get_num_threads()
    print(json.dumps({"config": facts["config"], "held_out_loss": facts["held_out_loss"], "phases": facts["phases"]}, indent=1))
    print(f"update: {2 * args.steps} steps x {args.batch_size} examples: {wall:.1f} s wall, {cpu:.1f} s CPU "
          f"on {threads} threads (~{cpu / threads:.1f} s wall on an idle machine); "
          f"{wall / (2 * args.steps):.2f} s wall per step")


if __name__ == "__main__":
    main()
