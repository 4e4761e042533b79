"""The ``svdbench`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from bench.errors import UsageError

EXIT_USAGE = 2
EXIT_FAILURES = 1


def _csv(kind):
    def parse(text: str):
        items = [item.strip() for item in text.split(",") if item.strip()]
        try:
            return [kind(item) for item in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}") from None
    return parse


def _method_options(pairs: list[str]) -> dict[str, dict[str, str]]:
    options: dict[str, dict[str, str]] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        method, dot, option = key.partition(".")
        if not sep or not dot:
            raise UsageError(f"--method-option {pair!r} must look like METHOD.OPTION=VALUE, e.g. asvd.alpha=0.5")
        options.setdefault(method, {})[option] = value
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svdbench", description="Compare SVD compression methods for LLMs.")
    parser.add_argument("--plugins-dir", action="append", default=[], help="load every .py file in this directory as a plugin")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="compress a model with several methods and ratios and evaluate every result")
    run.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), a Hugging Face model directory or a .gguf file")
    run.add_argument("--methods", default="svd", help="comma-separated method names, 'all' for every registered method, 'none' for only the dense model")
    run.add_argument("--ratios", type=_csv(float), default=[0.2, 0.4, 0.6], help="fractions of parameters removed, e.g. 0.2,0.4,0.6")
    run.add_argument("--tasks", type=_csv(str), default=["wikitext2"], help="comma-separated task names")
    run.add_argument("--limit", type=int, default=None, help="evaluate only the first N windows/examples of each task")
    run.add_argument("--seqlen", type=int, default=2048, help="perplexity window length in tokens (default 2048)")
    run.add_argument("--batch-size", type=int, default=1)
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    run.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    run.add_argument("--calib-dataset", default="wikitext2", help="wikitext2 (validation split) or c4")
    run.add_argument("--calib-samples", type=int, default=32, help="number of calibration windows (papers: 256)")
    run.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window (papers: 2048)")
    run.add_argument("--seed", type=int, default=3, help="seed of the calibration window choice")
    run.add_argument("--method-option", action="append", default=[], metavar="METHOD.OPTION=VALUE",
                     help="set a method's config field, e.g. asvd.alpha=0.5 (repeatable)")
    run.add_argument("--out", default="runs/latest", help="output directory; re-running with the same --out resumes")

    sub.add_parser("plugins", help="print the loaded plugins, their hooks and versions as JSON")

    report = sub.add_parser("report", help="re-render report.md and CSV from a finished run's results.json")
    report.add_argument("dir")
    return parser


def _run(args) -> int:
    from bench.calibration import CalibrationConfig
    from bench.plugins import load_registry
    from bench.runner import RunConfig, Runner
    from reports.tables import write_report

    registry = load_registry(args.plugins_dir)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if methods == ["all"]:
        methods = list(registry.methods)
    elif methods == ["none"]:
        methods = []
    config = RunConfig(model=args.model, methods=methods, ratios=args.ratios, tasks=args.tasks, seqlen=args.seqlen,
                       limit=args.limit, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                       calibration=CalibrationConfig(args.calib_dataset, args.calib_samples, args.calib_seqlen, args.seed),
                       method_options=_method_options(args.method_option), plugins_dirs=args.plugins_dir, out=args.out)
    results = Runner(config, registry).run()
    paths = write_report(results.data, args.out)
    print(open(paths[0]).read())
    print("wrote", ", ".join(str(p) for p in [results.path, *paths]))
    return EXIT_FAILURES if results.data["failures"] else 0


def _plugins(args) -> int:
    from bench.plugins import load_registry

    print(json.dumps(load_registry(args.plugins_dir).describe(), indent=2))
    return 0


def _report(args) -> int:
    from bench.results import load_results
    from reports.tables import write_report

    for path in write_report(load_results(args.dir), args.dir):
        print("wrote", path)
    return 0


COMMANDS = {"run": _run, "plugins": _plugins, "report": _report}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        return COMMANDS[args.command](args)
    except UsageError as error:
        print(f"svdbench: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
