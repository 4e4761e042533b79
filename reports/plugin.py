"""The reports plugin: renders report.md and adds ``compare``, ``check`` and ``baseline`` to the command line.

It is registered through the ``svdbench`` entry point like every other
plugin, and reads nothing of the engine: only results.json (and the
baseline files it writes).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench import Command, UsageError, hookimpl, load_results
from reports import stats
from reports.regression import (
    check,
    compare,
    format_config_diffs,
    format_rows,
    make_baseline,
    parse_overrides,
    run_differences,
)
from reports.report import write_report as write_run_report

EXIT_FAILURES = 1
TOLERANCE_HELP = ("relative for perplexity-like metrics, absolute for accuracies (0.02 = 2%% of the perplexity "
                  "or 2 accuracy points)")


def _tolerance_flags(parser, default) -> None:
    parser.add_argument("--tolerance", type=float, default=default,
                        help=f"flag rows changed beyond this; {TOLERANCE_HELP}")
    parser.add_argument("--metric-tolerance", action="append", default=[], metavar="[TASK.]METRIC=VALUE",
                        help="tolerance for one metric, e.g. perplexity=0.05 or piqa.acc=0.05 (repeatable)")


class CompareCommand(Command):
    name = "compare"
    help = "head-to-head table of two runs' shared rows"

    def configure(self, parser) -> None:
        parser.add_argument("dir_a")
        parser.add_argument("dir_b")
        _tolerance_flags(parser, 0.02)
        parser.add_argument("--flagged", action="store_true", help="print only the rows beyond tolerance")

    def run(self, args, invoke) -> int:
        data_a, data_b = load_results(args.dir_a), load_results(args.dir_b)
        rows = compare(data_a, data_b, args.tolerance, parse_overrides(args.metric_tolerance))
        if not rows:
            raise UsageError(f"{args.dir_a} and {args.dir_b} share no (model, method, ratio, task, metric) row")
        flagged = [row for row in rows if row.flagged]
        print(format_rows(flagged if args.flagged else rows, "A", "B"))
        counts = {status: sum(row.status == status for row in rows)
                  for status in ("better", "worse", "changed", "non-finite")}
        noise = sum(row.status == "noise" for row in rows)
        print(f"\nA = {args.dir_a}, B = {args.dir_b}; diff = B - A, rel = diff / |A|; {len(rows)} shared rows, "
              + ", ".join(f"{n} {status}" for status, n in counts.items()) + " beyond tolerance and noise"
              + f", {noise} beyond tolerance but not significant (status noise)")
        print(f"95% interval of diff: {stats.method_text()} (unpaired: the runs evaluated different windows/examples, "
              "each resampled on its own); significant: the interval excludes 0; '-': a row without per-item data")
        diffs = run_differences(data_a, data_b)
        if diffs:
            print("settings differ between the runs, so not every difference is the methods':\n"
                  + "\n".join(f"  {name}: A {a!r}, B {b!r}" for name, a, b in diffs))
        return 0


class CheckCommand(Command):
    name = "check"
    help = "exit non-zero when a run's metrics leave a baseline's tolerance"

    def configure(self, parser) -> None:
        parser.add_argument("dir")
        parser.add_argument("--baseline", required=True, help="a baseline file written by `svdbench baseline`")
        _tolerance_flags(parser, None)

    def run(self, args, invoke) -> int:
        try:
            baseline = json.loads(Path(args.baseline).read_text())
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot read baseline {args.baseline} ({error}); regenerate it with `svdbench baseline`") from None
        result = check(load_results(args.dir), baseline, args.tolerance, parse_overrides(args.metric_tolerance))
        if result.ok:
            noise = sum(row.status == "noise" for row in result.rows)
            judged = sum(row.noise is not None for row in result.rows)
            print(f"check passed: {len(result.rows)} rows of {args.baseline} within tolerance"
                  + (f" or within the baseline's noise ({noise} beyond tolerance only)" if noise else "")
                  + f"; {judged} of them judged with their 95% interval, the others by tolerance alone")
            return 0
        if result.config_diffs:
            print(f"check FAILED: the run's settings differ from the baseline's:\n{format_config_diffs(result.config_diffs)}")
        if result.failures:
            print(f"check FAILED: {len(result.failures)} of {len(result.rows)} rows outside tolerance and noise, or missing "
                  f"(baseline = {args.baseline}, run = {args.dir}):\n")
            print(format_rows(result.failures, "baseline", "run"))
        print("\nIf the change is intended, regenerate the baseline with `svdbench baseline`.")
        return EXIT_FAILURES


class BaselineCommand(Command):
    name = "baseline"
    help = "run a profile (ci) and write its regression baseline"

    def configure(self, parser) -> None:
        parser.add_argument("--profile", default="ci", help="the run profile the baseline records (default ci)")
        parser.add_argument("--out", default="tests/baselines/ci.json", help="baseline file to write")
        parser.add_argument("--run-dir", default="runs/baseline-ci", help="where the run's results go")
        parser.add_argument("--from", dest="from_dir", default=None,
                            help="make the baseline from this finished run instead of running the profile")

    def run(self, args, invoke) -> int:
        start = time.perf_counter()
        run_dir = args.from_dir
        if run_dir is None:
            if invoke(["run", "--profile", args.profile, "--out", args.run_dir]) != 0:
                raise UsageError(f"the {args.profile} run did not finish cleanly (see {args.run_dir}/report.md); "
                                 "fix it before writing a baseline")
            run_dir = args.run_dir
        wall = round(time.perf_counter() - start, 1)
        data = load_results(run_dir)
        if args.from_dir is None:
            command = f"svdbench baseline --profile {args.profile} --out {args.out}"
        else:  # how the run itself was made, and its own wall time
            command = f"{(data.get('manifest') or {}).get('svdbench_command')}; svdbench baseline --from {run_dir}"
            wall = ((data.get("manifest") or {}).get("timings") or {}).get("total")
        baseline = make_baseline(data, args.profile, command, wall)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(baseline, indent=1) + "\n")
        print(f"wrote {out} ({len(baseline['records'])} rows) in {wall} s")
        return 0


@hookimpl
def register_commands(register):
    for command in (CompareCommand(), CheckCommand(), BaselineCommand()):
        register(command)


@hookimpl
def write_report(results: dict, out_dir: Path, with_published: bool) -> list[Path]:
    return write_run_report(results, out_dir, with_published=with_published)
