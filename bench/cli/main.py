"""The ``svdbench`` command line.

``run``, ``compress``, ``report`` and ``plugins`` are the host's own
commands; plugins add more through the ``register_commands`` hook (the
reports plugin adds ``compare``, ``check`` and ``baseline``). Bad input - and
a full disk, an I/O error, an unreadable file, an ``--out`` in use by another
run - ends in one line on stderr and exit status 2; a run in which a method
failed exits with 1; Ctrl-C ends in one line and exit status 130 (finished
cells are kept: the same command resumes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from bench.errors import UsageError
from bench.interrupts import install as install_interrupt_handler
from bench.memory import reuse_freed_memory
from bench.threads import configure as configure_threads

EXIT_USAGE = 2
EXIT_FAILURES = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
SUPPRESS = argparse.SUPPRESS


def _method_options(pairs: list[str]) -> dict[str, dict[str, str]]:
    """``["asvd.alpha=0.5", "svdllm_quant.quantizer=gptq"]`` -> ``{"asvd": {"alpha": "0.5"}, ...}``."""
    options: dict[str, dict[str, str]] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        method, dot, option = key.partition(".")
        if not sep or not dot or not method or not option:
            raise UsageError(f"--method-option {pair!r} must look like METHOD.OPTION=VALUE, e.g. asvd.alpha=0.5")
        options.setdefault(method, {})[option] = value
    return options


def _calibration_flags(parser: argparse.ArgumentParser) -> None:
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
    _calibration_flags(run)
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
    _calibration_flags(compress)

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


def _explicit(args: argparse.Namespace) -> dict:
    """The run settings given on the command line, nested like :class:`RunConfig`."""
    explicit: dict = {}
    for dest, value in vars(args).items():
        if dest in ("command", "plugins_dir", "verbose", "profile", "with_published", "method", "ratio", "force", "threads"):
            continue
        if dest == "method_options":
            value = _method_options(value)
        head, dot, rest = dest.partition(".")
        if dot:
            explicit.setdefault(head, {})[rest] = value
        else:
            explicit[dest] = value
    if args.plugins_dir:
        explicit["plugins_dirs"] = list(args.plugins_dir)
    return explicit


def _write_report(registry, data: dict, out_dir: Path, with_published: bool) -> list[Path]:
    from bench.storage import guarded

    with guarded(out_dir / "report.md"):
        written = [path for paths in registry.hook.write_report(results=data, out_dir=out_dir,
                                                                with_published=with_published) for path in paths]
    if not written:
        raise UsageError("no report plugin is installed; reinstall svdbench (its reports plugin renders report.md)")
    return written


def _run(args, registry) -> int:
    from bench.api.configs import build_config
    from bench.engine.config import ExecutorConfig, resolve_config
    from bench.engine.executor import output_lock, run

    explicit = _explicit(args)
    executor = build_config(ExecutorConfig, explicit.pop("executor", {}), "executor")
    config = resolve_config(args.profile, explicit)
    if args.profile:
        logging.getLogger("svdbench").info("profile %s", args.profile)
    from bench.engine.plan import left_out_line

    skipped = left_out_line(config, registry)
    if skipped:
        print(f"svdbench: {skipped}", file=sys.stderr)
    if executor.kind == "ray":
        from bench.engine.distributed import import_ray

        import_ray()  # a missing extra fails before anything is written
    with output_lock(config.out).acquire(wait=False):  # held through the report too: one writer per --out
        results = run(config, registry, executor=executor)
        paths = _write_report(registry, results.data, Path(config.out), args.with_published)
    print(paths[0].read_text())
    print("wrote", ", ".join(str(p) for p in [results.path, *paths]))
    from bench.engine.budget import unreachable_line

    unreachable = unreachable_line(results.data["failures"])  # bad input, found once the factorizations were made
    if unreachable:
        return _error(unreachable)
    return EXIT_FAILURES if results.data["failures"] else 0


def _compress(args, registry) -> int:
    from bench.cli.refusals import compress_ratio
    from bench.engine.config import resolve_config
    from bench.engine.executor import Workspace, check_model_fits
    from bench.engine.plan import RATIO_DEFINITION, validate
    from bench.engine.provenance import package_versions
    from bench.model.devices import check_device
    from bench.model.loading import model_directory
    from bench.model.saving import check_output_directory, save_compressed
    from bench.pathnames import check_path_name

    ratio = compress_ratio(registry, args.method, args.ratio)
    # a quantize-only method (ratio 0) reads no ratio from the config: any valid one stands in
    config = resolve_config(None, {**_explicit(args), "methods": [args.method], "ratios": [ratio or 0.5]})
    validate(config, registry)
    check_device(config.device)
    check_path_name(args.out, "--out")
    check_output_directory(args.out, args.force, model_directory(config.model))  # before minutes of work
    workspace = Workspace(config, registry)
    check_model_fits(config, workspace.loaded, registry, evaluate=False)
    method, compressed = workspace.compress(args.method, ratio)
    loaded = workspace.loaded
    summary = compressed.summary
    manifest = {"method": args.method, "ratio": ratio, "config": method.settings(),
                "calibration": config.to_dict()["calibration"] if method.uses_calibration() else None,
                "source_model": {"spec": config.model, "name": loaded.name, "source": loaded.source,
                                 "identity": loaded.identity, **loaded.info},
                "ratio_definition": RATIO_DEFINITION, "accounting": summary, "layers": compressed.layers,
                "facts": compressed.facts, "versions": package_versions(), "timings": workspace.timings}
    if "tasks" in vars(args):  # measured before saving, so the model card can show it
        manifest["evaluations"] = [
            {"task": name, "metric": m.metric, "value": m.value,
             "settings": {"limit": workspace.settings.limit, "seqlen": workspace.settings.seqlen}}
            for name in config.tasks for m in registry.get("task", name).evaluate(
                compressed.model, loaded.tokenizer, workspace.settings)]
    out = save_compressed(compressed.model, loaded.tokenizer, args.out, manifest, force=args.force)
    print(f"wrote {out}: {args.method} at ratio {ratio}, {summary['params']} parameters, {summary['bytes']} bytes "
          f"(dense {summary['dense_params']} / {summary['dense_bytes']}); load it with --model {out}, or in "
          "transformers after `import bench.interop.hf` (see its README.md)")
    return 0


def _plugins(args, registry) -> int:
    print(json.dumps(registry.describe(), indent=2))
    return 0


def _report(args, registry) -> int:
    from bench.engine.results import load_rendered

    for path in _write_report(registry, load_rendered(args.dir), Path(args.dir), args.with_published):
        print("wrote", path)
    return 0


def _cache(args, registry) -> int:
    import shutil

    from bench.engine.stores import KINDS, list_entries, store_root
    from bench.storage import cache_root

    root = cache_root()
    places = {kind: store_root(kind) for kind in KINDS}
    places.update({p.name: p for p in sorted(root.iterdir()) if p.is_dir() and p.name not in places} if root.is_dir() else {})
    if args.kind != "all" and args.kind not in places:
        raise UsageError(f"unknown cache kind '{args.kind}'; use one of: {', '.join(places)} or all")
    chosen = places if args.kind == "all" else {args.kind: places[args.kind]}

    def size(path: Path) -> int:
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0

    if args.action == "list":
        for kind in (k for k in chosen if k in KINDS):
            for row in list_entries(kind):
                fields = row["fields"]
                what = fields.get("statistic") or fields.get("decomposition") or "incomplete"
                print(f"{kind:8} {row['key'][:12]}  {row['bytes'] / 2**20:10.1f} MiB  model {str(fields.get('model'))[:12]}"
                      f"  {what}")
    if args.action in ("list", "size"):
        for kind, path in chosen.items():
            print(f"{kind:18} {size(path) / 2**20:10.1f} MiB  {path}")
    if args.action == "clear":
        for kind, path in chosen.items():
            freed = size(path)
            shutil.rmtree(path, ignore_errors=True)
            print(f"cleared {kind}: {freed / 2**20:.1f} MiB ({path})")
    return 0


HOST_COMMANDS = {"run": _run, "compress": _compress, "plugins": _plugins, "report": _report, "cache": _cache}


def _plugins_dirs(argv: list[str]) -> list[str]:
    """``--plugins-dir`` values, read before the full parser exists (plugins add commands to it)."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--plugins-dir", action="append", default=[])
    known, _ = early.parse_known_args(argv)
    return known.plugins_dir


def _threads(argv: list[str]) -> str | None:
    """``--threads``, read before anything imports torch (the thread policy must be set first)."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--threads", default=None)
    return early.parse_known_args(argv)[0].threads


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    install_interrupt_handler()  # Ctrl-C is never swallowed by a finalizer
    try:
        configure_threads(_threads(argv))  # before anything imports torch
        reuse_freed_memory()
        from bench.engine.plugins import load_registry

        plugins_dirs = _plugins_dirs(argv)
        registry = load_registry(plugins_dirs)
        clash = sorted(set(registry.commands) & set(HOST_COMMANDS))
        if clash:
            raise UsageError(f"plugin command '{clash[0]}' clashes with svdbench's own; rename it in its plugin")
        args = build_parser(registry.commands).parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        if args.command in HOST_COMMANDS:
            return HOST_COMMANDS[args.command](args, registry)
        prefix = [f"--plugins-dir={d}" for d in plugins_dirs]
        return registry.commands[args.command].run(args, lambda more: main(prefix + list(more)))
    except UsageError as error:
        return _error(str(error))
    except KeyboardInterrupt:
        print("svdbench: interrupted; what was finished is kept - run the same command again to go on",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # a disk error no write guard caught: still one line, naming the path
        from bench.storage import cache_root, disk_error, is_disk_error

        if not is_disk_error(error):
            raise
        return _error(str(disk_error(error, getattr(error, "filename", None) or cache_root())))


def _error(message: str) -> int:
    """One line on stderr (a message's own line breaks folded), exit status 2."""
    print("svdbench: error: " + " ".join(message.split()), file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
