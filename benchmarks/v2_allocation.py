"""SVD-LLM V2's allocation rules side by side: perplexity and summed normalized loss at equal parameters.

One run evaluates one rule (a method has one config per run), so each rule
runs into its own ``--out``; this script merges the runs' records and renders
the report's allocation table from them. The runs of the issue-14 ablation
(seqlen 2048, 8 windows of WikiText-2 test, calibration 32 x 512 tokens)::

    for rule in paper uniform power greedy; do
      svdbench run --model smollm2-135m --methods svdllm_w,svdllm_v2 --ratios 0.2,0.4 --tasks wikitext2 \\
          --limit 8 --method-option svdllm_v2.allocation=$rule --out runs/v2-$rule
    done
    python benchmarks/v2_allocation.py runs/v2-paper runs/v2-uniform runs/v2-power runs/v2-greedy

(Copying the first run's results.json into the others' directories before
running them reuses its dense and svdllm_w records: they resume.) The runs
must share the model, the evaluation and the calibration settings; the
script refuses runs that do not.
"""

from __future__ import annotations

import argparse
import sys

from bench import UsageError, load_results
from reports.format import Table
from reports.records import frame
from reports.tables import allocation_rules, allocation_table, main_table

SHARED = ("model", "seqlen", "limit", "dtype", "calibration", "tasks")


def merged(paths: list[str]) -> dict:
    """One results dictionary holding every run's records and compressions (the first run's manifest)."""
    runs = [load_results(path) for path in paths]
    first = runs[0]["manifest"].get("config", {})
    for path, data in zip(paths[1:], runs[1:]):
        config = data["manifest"].get("config", {})
        differ = [k for k in SHARED if config.get(k) != first.get(k)]
        if differ:
            raise UsageError(f"{path} differs from {paths[0]} in {', '.join(differ)}; merge runs of one setting")
    data = {"manifest": dict(runs[0]["manifest"]), "records": [], "compressions": {}}
    seen = set()
    for run in runs:
        data["compressions"].update(run.get("compressions") or {})
        for record in run["records"]:
            if record["key"] not in seen:
                seen.add(record["key"])
                data["records"].append(record)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (results.json), one per allocation rule")
    args = parser.parse_args(argv)
    try:
        data = merged(args.runs)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    table = allocation_table(data, frame(data))
    if table is None:
        print("error: no run holds allocation facts (run svdllm_v2)", file=sys.stderr)
        return 2
    print(table.markdown())
    reference = main_table(data, frame(data))
    if reference is not None:  # the other methods of the same runs (dense, svdllm_w) for reference
        rows = [row for row in reference.rows if not any(key[0] == row[0] for key in allocation_rules(data)[0])]
        print("\n" + Table("reference", "The runs' other rows", reference.header, rows).markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
