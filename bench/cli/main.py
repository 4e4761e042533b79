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

from bench.cli.parser import build_parser, method_options
from bench.errors import UsageError
from bench.interrupts import install as install_interrupt_handler
from bench.memory import reuse_freed_memory
from bench.threads import configure as configure_threads

EXIT_USAGE = 2
EXIT_FAILURES = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
def _explicit(args: argparse.Namespace) -> dict:
    """The run settings given on the command line, nested like :class:`RunConfig`."""
    explicit: dict = {}
    for dest, value in vars(args).items():
        if dest in ("command", "plugins_dir", "verbose", "profile", "with_published", "method", "ratio", "force", "threads"):
            continue
        if dest == "method_options":
            value = method_options(value)
        head, dot, rest = dest.partition(".")
        if dot:
            explicit.setdefault(head, {})[rest] = value
        else:
            explicit[dest] = value
    if args.plugins_dir:
        explicit["plugins_dirs"] = list(args.plugins_dir)
    return explicit


def _write_report(registry, data: dict, out_dir: Path, with_published: bool) -> list[Path]:
    from bench.disk import guarded

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
    from bench.engine.plan import RATIO_DEFINITION, check_model_fits, validate
    from bench.engine.provenance import package_versions
    from bench.engine.workspace import Workspace
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
        from bench.disk import disk_error, is_disk_error
        from bench.storage import cache_root

        if not is_disk_error(error):
            raise
        return _error(str(disk_error(error, getattr(error, "filename", None) or cache_root())))


def _error(message: str) -> int:
    """One line on stderr (a message's own line breaks folded), exit status 2."""
    print("svdbench: error: " + " ".join(message.split()), file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
