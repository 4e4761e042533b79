"""kill -9 at N seeded random moments of a small run, resuming after each: is anything lost?

    python benchmarks/faults.py --points 100

Builds a tiny random Llama checkpoint in a temporary directory, runs the real
``svdbench run`` CLI once uninterrupted (two methods - svd and svdllm_w, which
needs calibration statistics - at two ratios, plus the dense model) for the
reference values and its duration T, then starts runs on one output
directory and SIGKILLs each after a delay drawn uniformly from [0, 1.1 T]
(seeded); every run resumes the directory the previous one left. A run that
finishes is compared with the reference and the next one starts afresh
(every other time with an empty cache too). After every run it counts
finished cells lost, computed again, present twice, and corrupt files
(results.json, journal lines, cache entries; temporaries after a finished
run), and prints::

    lost 0, recomputed 0, duplicated 0, corrupt 0

It exits 1 when any count is not 0 or a finished run's values differ from
the uninterrupted run's. The test suite runs the same sweep with 6 points
(``tests/faults/test_interruptions.py``; 30 under ``-m slow``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "faults"))

from harness import kill_sweep, make_tiny_checkpoint  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=100, help="number of kill -9 moments (default 100)")
    parser.add_argument("--seed", type=int, default=16, help="seed of the moments (default 16)")
    parser.add_argument("--keep", help="work in this directory and keep it (default: a temporary one)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the result")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="svdbench-faults-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = make_tiny_checkpoint(work / "model")
        report = kill_sweep(model, work, args.points, args.seed, progress=(lambda line: None) if args.quiet else
                            (lambda line: print(line, flush=True)))
    print(f"{report.points} points ({report.kills} killed, {report.completed} runs finished and matched the "
          f"uninterrupted run's values: {'yes' if report.wrong_values == 0 else 'NO'}), "
          f"{time.perf_counter() - start:.0f} s")
    for problem in report.problems[:20]:
        print("  ", problem)
    print(report.line())
    clean = report.line() == "lost 0, recomputed 0, duplicated 0, corrupt 0" and report.wrong_values == 0
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
