"""The model card (``README.md``) of a saved model, rendered from its manifest.

Hugging Face's model-card convention: YAML metadata (base model, library, tags) then prose. Everything in it
comes from the manifest ``svdbench compress`` writes (method, ratio, ranks, bytes, what was measured), so the
card cannot disagree with the weights.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

CARD = "README.md"
HUB_NAMES = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # svdbench's built-in model specs


def _mib(value) -> str:
    return f"{value / 2**20:,.1f} MiB" if isinstance(value, (int, float)) else "unknown"


def _ranks(ranks: dict[str, int]) -> list[str]:
    if not ranks:
        return ["No matrix is low-rank (the model is quantized only)."]
    by_kind: dict[str, list[int]] = defaultdict(list)
    for name, rank in ranks.items():
        by_kind[name.rsplit(".", 1)[-1]].append(rank)
    lines = [f"{len(ranks)} low-rank matrices; ranks by kind (min / median / max):", "",
             "| matrix | count | min | median | max |", "|---|---:|---:|---:|---:|"]
    for kind, values in sorted(by_kind.items()):
        lines.append(f"| {kind} | {len(values)} | {min(values)} | {statistics.median(values):g} | {max(values)} |")
    return lines


def _quantized(quantized: dict[str, dict]) -> list[str]:
    if not quantized:
        return []
    kinds = sorted({(e["quantizer"], e.get("nbits"), e.get("group_size")) for e in quantized.values()})
    return ["", f"{len(quantized)} quantized linears: " + ", ".join(
        f"{q.upper()} {bits}-bit, groups of {group}" if bits is not None else f"{q} ({quantized_packing(quantized, q)})"
        for q, bits, group in kinds) + "."]


def quantized_packing(quantized: dict[str, dict], quantizer: str) -> str:
    return next(e.get("packing", "") for e in quantized.values() if e["quantizer"] == quantizer)


def render_card(manifest: dict) -> str:
    """The model card of the saved model ``manifest`` describes."""
    source = manifest.get("source_model") or {}
    spec = source.get("spec") or source.get("name") or "unknown"
    base = HUB_NAMES.get(spec)
    method, ratio = manifest.get("method", "unknown"), manifest.get("ratio")
    accounting = manifest.get("accounting") or {}
    front = ["---", "library_name: transformers", *([f"base_model: {base}"] if base else []),
             "tags:", "- svdbench", "- low-rank", f"- {method}", "---", ""]
    ratio_text = f"{ratio:g}" if isinstance(ratio, (int, float)) else "unknown"
    body = [f"# {method} at ratio {ratio_text} of {base or spec}", "",
            f"Compressed by svdbench {manifest.get('svdbench_version', 'unknown')} with `{method}` at ratio "
            f"{ratio_text} (the {manifest.get('ratio_definition') or 'fraction of parameters removed'}).", "",
            "## Model", "",
            f"- base model: {base or spec} (svdbench spec `{spec}`, identity `{str(source.get('identity', ''))[:16]}`)",
            f"- method: `{method}`, settings `{manifest.get('config')}`",
            f"- calibration: {manifest.get('calibration') or 'none (the method reads no calibration data)'}",
            f"- parameters: {accounting.get('params', 'unknown'):,} (dense {accounting.get('dense_params', 'unknown'):,})"
            if isinstance(accounting.get("params"), int) else "- parameters: unknown",
            f"- bytes: {_mib(accounting.get('bytes'))} (dense {_mib(accounting.get('dense_bytes'))}), the whole "
            "model with embeddings and head",
            f"- weights dtype: {manifest.get('dtype', 'unknown')}", "", "## Ranks", "",
            *_ranks(manifest.get("ranks") or {}), *_quantized(manifest.get("quantized") or {}), "",
            "## Measured", ""]
    evaluations = manifest.get("evaluations") or []
    if evaluations:
        body += ["| task | metric | value | settings |", "|---|---|---:|---|"]
        body += [f"| {e['task']} | {e['metric']} | {e['value']:.4g} | {e.get('settings', '')} |" for e in evaluations]
    else:
        body += ["Nothing was measured when this model was saved; measure it with",
                 "`svdbench run --model DIR --methods none --tasks wikitext2`."]
    body += ["", "## How to load", "",
             "With svdbench installed (`pip install 'svdbench[quant]'`), in plain transformers - one import "
             "registers svdbench's quantization method; never `trust_remote_code`:", "", "```python",
             "import bench.interop.hf  # noqa: F401", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "", 'model = AutoModelForCausalLM.from_pretrained("DIR")', 'tokenizer = AutoTokenizer.from_pretrained("DIR")',
             "```", "", "Without svdbench, `from_pretrained` refuses the directory (it never fills the compressed "
             "layers with random weights). Evaluate it with lm-eval's own CLI:", "", "```bash",
             "python -m bench.interop.lm_eval --model hf --model_args pretrained=DIR --tasks svdbench_piqa",
             "```", "", "or with svdbench itself: `svdbench run --model DIR --methods none --tasks wikitext2`.", ""]
    return "\n".join(front + body)
