"""The ``svdbench`` argument parser: the host's commands and their flags (plugins add their own commands)."""

from __future__ import annotations

import argparse

from bench.errors import UsageError

SUPPRESS = argparse.SUPPRESS


def method_options(pairs: list[str]) -> dict[str, dict[str, str]]:
    """``["asvd.alpha=0.5", "svdllm_quant.quantizer=gptq"]`` -> ``{"asvd": {"alpha": "0.5"}, ...}``."""
    options: dict[str, dict[str, str]] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        method, dot, option = key.partition(".")
        if not sep or not dot or not method or not option:
            raise UsageError(f"--method-option {pair!r} must look like METHOD.OPTION=VALUE, e.g. asvd.alpha=0.5")
        options.setdefault(method, {})[option] = value
    return options


def calibration_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calib-dataset", dest="calibration.dataset", default=SUPPRESS,
                        help="wikitext2 (validation split, the default) or c4")
    parser.add_argument("--calib-samples", dest="calibration.samples", default=SUPPRESS,
                        help="number of calibration windows (default 32; papers: 256)")
    parser.add_argument("--calib-seqlen", dest="calibration.seqlen", default=SUPPRESS,
                        help="tokens per calibration window (default 512; papers: 2048)")
    parser.add_argument("--seed", dest="calibration.seed", default=SUPPRESS,
                        help="seed of the calibration window choice (default 3)")
    parser.add_argument("--method-option", dest="method_options", action="append", default=SUPPRESS,
                        metavar="METHOD.OPTION=VALUE", help="set a method's config field, e.g. asvd.alpha=0.5 "
                        "(repeatable; nested settings with dots: svdllm_quant.gptq.damp=0.01)")
    parser.add_argument("--device", default=SUPPRESS, help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--dtype", default=SUPPRESS, help="float32 (default), bfloat16 or float16")


def build_parser(commands: dict) -> argparse.ArgumentParser:
    """The parser of every command; ``run`` and ``compress`` flags default to "not given" (the config decides)."""
    parser = argparse.ArgumentParser(prog="svdbench", description="Compare SVD compression methods for LLMs.")
    parser.add_argument("--plugins-dir", action="append", default=[], help="load every .py file in this directory as a plugin")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--threads", default=None, help="torch threads, before the command: svdbench --threads 2 run "
                        "... (default: the CPUs this process may use; see bench/threads.py)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="compress a model with several methods and ratios and evaluate every result")
    run.add_argument("--model", default=SUPPRESS, help="smollm2-135m (default), a Hugging Face model directory or a .gguf file")
    run.add_argument("--methods", default=SUPPRESS,
                     help="comma-separated method names, 'all' for every registered method, 'none' for only the dense model")
    run.add_argument("--ratios", default=SUPPRESS,
                     help="fractions of parameters removed, e.g. 0.2,0.4,0.6 (default; none when --budgets is given)")
    run.add_argument("--kv-ratios", dest="kv_ratios", default=SUPPRESS,
                     help="fractions of KV-cache bytes removed, e.g. 0.3,0.5, for methods that compress the KV cache "
                          "(palu); weight methods use --ratios (none by default when only --kv-ratios is given)")
    run.add_argument("--budgets", default=SUPPRESS,
                     help="memory budgets: bytes (300MB, 250MiB, 3.1e8B) or fractions of the dense bytes (0.9,0.75); "
                          "each method is compressed at the smallest ratio that fits")
    run.add_argument("--tasks", default=SUPPRESS, help="comma-separated task names (default wikitext2)")
    run.add_argument("--limit", default=SUPPRESS, help="evaluate only the first N windows/examples of each task")
    run.add_argument("--seqlen", default=SUPPRESS, help="perplexity window length in tokens (default 2048)")
    run.add_argument("--batch-size", dest="batch_size", default=SUPPRESS, help="evaluation batch size (default 1)")
    calibration_flags(run)
    run.add_argument("--out", default=SUPPRESS, help="output directory (default runs/latest); re-running with the same --out resumes")
    run.add_argument("--profile", default=None,
                     help="default (the main job), paper (the papers' full protocol, for a GPU), ci (the regression "
                          "baseline's settings) or a JSON file of run settings; flags given explicitly override it")
    run.add_argument("--with-published", action="store_true",
                     help="print the papers' LLaMA-7B numbers beside the measured tables")
    run.add_argument("--executor", dest="executor.kind", default=SUPPRESS,
                     help="local (default: the groups one after the other in this process) or ray (each group a Ray "
                          "task, in parallel as resources allow; pip install \"svdbench[ray]\")")
    run.add_argument("--ray-address", dest="executor.ray_address", default=SUPPRESS,
                     help="Ray cluster to use: left out, start or join a local instance; 'auto' joins the running "
                          "cluster (`ray start --head`); or HOST:PORT")
    run.add_argument("--ray-cpus-per-task", dest="executor.cpus_per_task", default=SUPPRESS,
                     help="CPUs each group's task asks for (default 1; torch in the task uses that many threads)")
    run.add_argument("--ray-gpus-per-task", dest="executor.gpus_per_task", default=SUPPRESS,
                     help="GPUs each group's task asks for (default 1 with --device cuda, else 0)")
    run.add_argument("--ray-max-retries", dest="executor.max_retries", default=SUPPRESS,
                     help="times a group is run again when its worker dies (default 2); then it is a failure")

    compress = sub.add_parser("compress", help="compress a model with one method at one ratio and save it "
                                               "(safetensors + svdbench.json)")
    compress.add_argument("--model", default=SUPPRESS, help="smollm2-135m (default), a Hugging Face model directory or a .gguf file")
    compress.add_argument("--method", required=True, help="a method name (see svdbench plugins)")
    compress.add_argument("--ratio", default=None, help="fraction of parameters removed, e.g. 0.4 (for a KV method such "
                          "as palu: of KV-cache bytes; not for a quantize-only method such as hqq or gptq)")
    compress.add_argument("--out", required=True, help="directory to write (new or empty); load it back with --model DIR")
    compress.add_argument("--force", action="store_true",
                          help="replace --out when it already holds a model saved by svdbench")
    compress.add_argument("--tasks", default=SUPPRESS, help="evaluate these tasks on the compressed model before "
                          "saving it (e.g. wikitext2); the numbers go into the manifest and the model card")
    compress.add_argument("--limit", default=SUPPRESS, help="with --tasks: the first N windows/examples of each task")
    compress.add_argument("--seqlen", default=SUPPRESS, help="with --tasks: perplexity window length (default 2048)")
    calibration_flags(compress)

    sub.add_parser("plugins", help="print the loaded plugins, their hooks and versions as JSON")

    cache = sub.add_parser("cache", help="list, size or clear the caches and stores (statistics, factorizations, models)")
    cache.add_argument("action", choices=["list", "size", "clear"])
    cache.add_argument("--kind", default="all", help="stats, factors, models, asvd_sensitivity, ... or all (default)")

    report = sub.add_parser("report", help="re-render report.md, the CSV files and plots from a run's results.json")
    report.add_argument("dir")
    report.add_argument("--with-published", action="store_true",
                        help="print the papers' LLaMA-7B numbers beside the measured tables")

    for name, command in commands.items():
        command.configure(sub.add_parser(name, help=command.help))
    return parser
