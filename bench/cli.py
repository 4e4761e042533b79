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
    run.add_argument("--ratios", type=_csv(float), default=None,
                     help="fractions of parameters removed, e.g. 0.2,0.4,0.6 (default; none when --budgets is given)")
    run.add_argument("--budgets", type=_csv(str), default=[],
                     help="memory budgets: bytes (300MB, 250MiB, 3.1e8) or fractions of the dense bytes (0.9,0.75); "
                          "each method is compressed at the smallest ratio that fits")
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
    run.add_argument("--profile", default=None,
                     help="default (the main job), paper (the papers' full protocol, for a GPU), ci (the regression "
                          "baseline's settings) or a JSON file of run options; flags given explicitly override it")
    run.add_argument("--with-published", action="store_true",
                     help="print the papers' LLaMA-7B numbers beside the measured tables")

    sub.add_parser("plugins", help="print the loaded plugins, their hooks and versions as JSON")

    report = sub.add_parser("report", help="re-render report.md and CSV from a finished run's results.json")
    report.add_argument("dir")
    report.add_argument("--with-published", action="store_true",
                        help="print the papers' LLaMA-7B numbers beside the measured tables")

    tolerance_help = ("relative for perplexity-like metrics, absolute for accuracies (0.02 = 2%% of the perplexity "
                      "or 2 accuracy points)")
    compare = sub.add_parser("compare", help="head-to-head table of two runs' shared rows")
    compare.add_argument("dir_a")
    compare.add_argument("dir_b")
    compare.add_argument("--tolerance", type=float, default=0.02, help=f"flag rows changed beyond this; {tolerance_help}")
    compare.add_argument("--metric-tolerance", action="append", default=[], metavar="[TASK.]METRIC=VALUE",
                         help="tolerance for one metric, e.g. perplexity=0.05 or piqa.acc=0.05 (repeatable)")
    compare.add_argument("--flagged", action="store_true", help="print only the rows beyond tolerance")

    check = sub.add_parser("check", help="exit non-zero when a run's metrics leave a baseline's tolerance")
    check.add_argument("dir")
    check.add_argument("--baseline", required=True, help="a baseline file written by `svdbench baseline`")
    check.add_argument("--tolerance", type=float, default=None,
                       help=f"default: the baseline's own (0.02); {tolerance_help}")
    check.add_argument("--metric-tolerance", action="append", default=[], metavar="[TASK.]METRIC=VALUE",
                       help="tolerance for one metric, e.g. perplexity=0.05 or piqa.acc=0.05 (repeatable)")

    baseline = sub.add_parser("baseline", help="run a profile (ci) and write its regression baseline")
    baseline.add_argument("--profile", default="ci", help="the run profile the baseline records (default ci)")
    baseline.add_argument("--out", default="tests/baselines/ci.json", help="baseline file to write")
    baseline.add_argument("--run-dir", default="runs/baseline-ci", help="where the run's results go")
    baseline.add_argument("--from", dest="from_dir", default=None,
                          help="make the baseline from this finished run instead of running the profile")
    compress = sub.add_parser("compress", help="compress a model with one method at one ratio and save it (safetensors + svdbench.json)")
    compress.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), a Hugging Face model directory or a .gguf file")
    compress.add_argument("--method", required=True, help="a method name (see svdbench plugins)")
    compress.add_argument("--ratio", type=float, required=True, help="fraction of parameters removed, e.g. 0.4")
    compress.add_argument("--out", required=True, help="directory to write; load it back with --model DIR")
    compress.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    compress.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    compress.add_argument("--calib-dataset", default="wikitext2", help="wikitext2 (validation split) or c4")
    compress.add_argument("--calib-samples", type=int, default=32, help="number of calibration windows (papers: 256)")
    compress.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window (papers: 2048)")
    compress.add_argument("--seed", type=int, default=3, help="seed of the calibration window choice")
    compress.add_argument("--method-option", action="append", default=[], metavar="METHOD.OPTION=VALUE",
                          help="set a method's config field, e.g. svdllm.update_steps=8 (repeatable)")
    return parser


def _run(args) -> int:
    from bench.calibration import CalibrationConfig
    from bench.plugins import load_registry
    from bench.runner import RunConfig, Runner
    from bench.profiles import apply_profile
    from reports.tables import write_report

    applied = apply_profile(args, getattr(args, "explicit_options", set()))
    if applied:
        logging.getLogger("svdbench").info("profile %s: %s", args.profile,
                                           ", ".join(f"{k}={v}" for k, v in applied.items()))
    registry = load_registry(args.plugins_dir)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if methods == ["all"]:
        methods = list(registry.methods)
    elif methods == ["none"]:
        methods = []
    ratios = args.ratios if args.ratios is not None else ([] if args.budgets else [0.2, 0.4, 0.6])
    config = RunConfig(model=args.model, methods=methods, ratios=ratios, budgets=args.budgets, tasks=args.tasks,
                       seqlen=args.seqlen, limit=args.limit, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                       calibration=CalibrationConfig(args.calib_dataset, args.calib_samples, args.calib_seqlen, args.seed),
                       method_options=_method_options(args.method_option), plugins_dirs=args.plugins_dir, out=args.out)
    results = Runner(config, registry).run()
    paths = write_report(results.data, args.out, with_published=args.with_published)
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

    for path in write_report(load_results(args.dir), args.dir, with_published=args.with_published):
        print("wrote", path)
    return 0


def _compare(args) -> int:
    from bench.regression import compare, format_rows, parse_overrides, run_differences
    from bench.results import load_results

    data_a, data_b = load_results(args.dir_a), load_results(args.dir_b)
    rows = compare(data_a, data_b, args.tolerance, parse_overrides(args.metric_tolerance))
    if not rows:
        raise UsageError(f"{args.dir_a} and {args.dir_b} share no (model, method, ratio, task, metric) row")
    flagged = [row for row in rows if row.flagged]
    print(format_rows(flagged if args.flagged else rows, "A", "B"))
    counts = {status: sum(row.status == status for row in rows) for status in ("better", "worse", "changed", "non-finite")}
    print(f"\nA = {args.dir_a}, B = {args.dir_b}; diff = B - A, rel = diff / |A|; {len(rows)} shared rows, "
          + ", ".join(f"{n} {status}" for status, n in counts.items()) + " beyond tolerance")
    diffs = run_differences(data_a, data_b)
    if diffs:
        print("settings differ between the runs, so not every difference is the methods':\n"
              + "\n".join(f"  {name}: A {a!r}, B {b!r}" for name, a, b in diffs))
    return 0


def _check(args) -> int:
    from bench.regression import check, format_config_diffs, format_rows, parse_overrides
    from bench.results import load_results

    try:
        baseline = json.loads(open(args.baseline).read())
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read baseline {args.baseline} ({error}); regenerate it with `svdbench baseline`") from None
    result = check(load_results(args.dir), baseline, args.tolerance, parse_overrides(args.metric_tolerance))
    if result.ok:
        print(f"check passed: {len(result.rows)} rows of {args.baseline} within tolerance")
        return 0
    if result.config_diffs:
        print(f"check FAILED: the run's settings differ from the baseline's:\n{format_config_diffs(result.config_diffs)}")
    if result.failures:
        print(f"check FAILED: {len(result.failures)} of {len(result.rows)} rows outside tolerance or missing "
              f"(baseline = {args.baseline}, run = {args.dir}):\n")
        print(format_rows(result.failures, "baseline", "run"))
    print("\nIf the change is intended, regenerate the baseline with `svdbench baseline`.")
    return EXIT_FAILURES


def _baseline(args) -> int:
    import time
    from pathlib import Path

    from bench.profiles import explicit_options
    from bench.regression import make_baseline
    from bench.results import load_results

    start = time.perf_counter()
    run_dir = args.from_dir
    if run_dir is None:
        argv = ["run", "--profile", args.profile, "--out", args.run_dir]
        run_args = build_parser().parse_args(argv)
        run_args.plugins_dir = args.plugins_dir
        run_args.explicit_options = explicit_options(build_parser(), argv)
        if _run(run_args) != 0:
            raise UsageError(f"the {args.profile} run recorded failures (see {args.run_dir}/report.md); "
                             "fix them before writing a baseline")
        run_dir = args.run_dir
    wall = round(time.perf_counter() - start, 1)
    command = f"svdbench baseline --profile {args.profile} --out {args.out}"
    baseline = make_baseline(load_results(run_dir), args.profile, command, wall if args.from_dir is None else None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(baseline, indent=1) + "\n")
    print(f"wrote {out} ({len(baseline['records'])} rows) in {wall} s")
    return 0


def _compress(args) -> int:
    import dataclasses

    from bench.calibration import CalibrationConfig
    from bench.compress import accounting
    from bench.plugins import load_registry
    from bench.runner import RunConfig, Runner, package_versions
    from bench.saving import save_compressed

    registry = load_registry(args.plugins_dir)
    config = RunConfig(model=args.model, methods=[args.method], ratios=[args.ratio], tasks=[], device=args.device,
                       dtype=args.dtype,
                       calibration=CalibrationConfig(args.calib_dataset, args.calib_samples, args.calib_seqlen, args.seed),
                       method_options=_method_options(args.method_option), plugins_dirs=args.plugins_dir, out=args.out)
    runner = Runner(config, registry)
    model, layers, refined = runner.compress_one(args.method, args.ratio)
    method = registry.get("method", args.method)
    loaded = runner.loaded
    summary = accounting(model, layers, runner.dense_footprint)
    manifest = {"method": args.method, "ratio": args.ratio, "config": dataclasses.asdict(runner.method_config(method)),
                "calibration": dataclasses.asdict(config.calibration) if runner.uses_calibration(method) else None,
                "source_model": {"spec": args.model, "name": loaded.name, "source": loaded.source,
                                 "identity": loaded.identity, **loaded.info},
                "ratio_definition": "fraction of each compressed matrix's parameters removed: rank = floor(m*n*(1-ratio)/(m+n))",
                "accounting": summary, "layers": layers, "refine": refined, "versions": package_versions(),
                "timings": runner.timings}
    out = save_compressed(model, loaded.tokenizer, args.out, manifest)
    print(f"wrote {out}: {args.method} at ratio {args.ratio}, {summary['params']} parameters, {summary['bytes']} bytes "
          f"(dense {summary['dense_params']} / {summary['dense_bytes']})")
    return 0


COMMANDS = {"run": _run, "compress": _compress, "plugins": _plugins, "report": _report, "compare": _compare, "check": _check,
            "baseline": _baseline}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        if args.command == "run":
            from bench.profiles import explicit_options

            args.explicit_options = explicit_options(build_parser(), argv)
        return COMMANDS[args.command](args)
    except UsageError as error:
        print(f"svdbench: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
