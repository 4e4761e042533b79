"""Loads saved models the way a user outside svdbench would, in a fresh process, and reports what they compute.

``python tests/hf_probe.py registered DIR...``: ``import bench.interop.hf`` (the one registration line), then
``AutoModelForCausalLM.from_pretrained(DIR)`` for each directory; prints one JSON line per directory with its
perplexity on fixed token windows and 20 greedy tokens (:func:`measure`, which the tests also run on svdbench's
own load), and saves it again with ``save_pretrained`` into ``DIR-resaved`` and measures that too.

``python tests/hf_probe.py hidden DIR...``: svdbench is made unimportable (an import blocker for ``bench``,
``methods``, ``tasks`` and ``reports``, as in an environment without it); prints what ``from_pretrained`` does.
"""

from __future__ import annotations

import json
import sys

HIDDEN = ("bench", "methods", "tasks", "reports")


class Hide:
    """A meta-path finder that makes svdbench's packages unimportable."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None


def windows(vocab: int):
    import torch

    return torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(0))


def measure(model) -> dict:
    """Perplexity on fixed random windows and the first 20 greedy tokens from a fixed prompt."""
    import torch

    ids = windows(model.config.vocab_size)
    with torch.no_grad():
        logits = model(ids).logits.double()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        out = model.generate(ids[:1, :8], max_new_tokens=20, do_sample=False, min_new_tokens=20,
                             pad_token_id=model.config.eos_token_id)
    return {"perplexity": float(loss.exp()), "greedy": out[0, 8:].tolist()}


def main(mode: str, directories: list[str]) -> None:
    if mode == "hidden":
        sys.meta_path.insert(0, Hide())
    else:
        import bench.interop.hf  # noqa: F401  (the one line that registers svdbench's quantization method)
    from transformers import AutoModelForCausalLM

    for directory in directories:
        try:
            model = AutoModelForCausalLM.from_pretrained(directory)
        except Exception as error:  # what the user sees
            print(json.dumps({"dir": directory, "error": f"{type(error).__name__}: {error}"}), flush=True)
            continue
        kinds = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("bench.")})
        result = {"dir": directory, "kinds": kinds, **measure(model)}
        if mode == "registered":
            model.save_pretrained(directory + "-resaved")
            again = AutoModelForCausalLM.from_pretrained(directory + "-resaved")
            result["resaved"] = measure(again)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
