"""Head-to-head comparison of two runs and the regression check against a baseline.

A row is one (model, method, variant, ratio, task, metric) of a results.json
(``variant`` tells budget, bit-width and throughput-grid rows apart, see
``bench.Record.variant``). Tolerances are relative for perplexity-like
metrics and absolute for accuracies (a fraction in 0-1): ``0.02`` means 2%
of the perplexity or two accuracy points. ``overrides`` set a tolerance per
metric (``perplexity=0.05``) or per task and metric (``wikitext2.perplexity=0.05``).

Where both sides kept their per-window NLL sums or per-example correctness
(:mod:`reports.stats`), every difference carries its 95% bootstrap interval
(paired when both were measured on the same windows/examples), and a change
beyond tolerance counts only when it is also beyond that noise - its interval
excludes zero; otherwise its status is ``noise``. Rows without per-item data
are judged by the tolerance alone.

``check`` is strict both ways: a row better than the baseline beyond
tolerance and noise fails too (the baseline is stale: regenerate it with
``svdbench baseline``), and a baseline row the run lacks is a failure.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field

from bench import UsageError
from reports import stats

BASELINE_FORMAT = "svdbench-baseline/3"  # 2: rows carry their metric kind; 3: and their per-window/example data
READABLE_FORMATS = ("svdbench-baseline/2", BASELINE_FORMAT)  # a /2 baseline is judged by tolerance alone
SAMPLE_FIELDS = ("window_nll", "window_tokens", "correct")  # what stats.evidence reads from a record's extra
DEFAULT_TOLERANCE = 0.02
# Metric kinds whose values go into a baseline: timings and memory vary with the machine.
BASELINE_KINDS = ("perplexity", "accuracy", "other")
# Manifest config fields that change the values; a baseline's must match the run's.
CONFIG_FIELDS = ("model", "seqlen", "limit", "dtype", "batch_size", "calibration")

RowKey = tuple  # (model, method, variant, ratio, task, metric)


def _ratio(record: dict) -> float | None:
    """The ratio part of a row key; None for a budget row (the budget names it, the ratio found may move)."""
    return None if record.get("budget") is not None or record.get("ratio") is None else round(float(record["ratio"]), 6)


def row_key(record: dict) -> RowKey:
    return (record["model"], record["method"], record.get("variant", ""), _ratio(record), record["task"],
            record["metric"])


def comparable_rows(records: list[dict]) -> dict[RowKey, dict]:
    """Each row's value, direction and kind; a duplicated row keeps its last record."""
    return {row_key(r): {"value": r["value"], "higher_is_better": r.get("higher_is_better"),
                         "kind": r.get("kind", "other"), "evidence": stats.evidence(r)} for r in records}


def parse_overrides(pairs: list[str] | None) -> dict[str, float]:
    """``["perplexity=0.05", "piqa.acc=0.1"]`` -> ``{"perplexity": 0.05, "piqa.acc": 0.1}``."""
    overrides = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        try:
            overrides[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip() or overrides[name.strip()] < 0:
            raise UsageError(f"--metric-tolerance {pair!r} must look like METRIC=VALUE or TASK.METRIC=VALUE with "
                             "VALUE >= 0, e.g. perplexity=0.05 or piqa.acc=0.03")
    return overrides


def tolerance_for(task: str, metric: str, kind: str, tolerance: float, overrides: dict[str, float]) -> tuple[float, str]:
    """(tolerance, 'relative' | 'absolute') for one row: absolute for accuracies, relative otherwise."""
    mode = "absolute" if kind == "accuracy" else "relative"
    for name in (f"{task}.{metric}", metric):
        if name in overrides:
            return overrides[name], mode
    return tolerance, mode


@dataclass
class Row:
    """One compared row: A (reference/baseline) against B (new run)."""

    key: RowKey
    a: float | None
    b: float | None
    higher_is_better: bool | None
    tolerance: float
    mode: str
    status: str = "ok"  # ok | noise | better | worse | changed | missing | non-finite
    noise: stats.Difference | None = None  # B - A with its 95% interval, where both kept per-item data

    @property
    def diff(self) -> float | None:
        return self.b - self.a if self.a is not None and self.b is not None else None

    @property
    def relative(self) -> float | None:
        if self.diff is None or not self.a or not math.isfinite(self.a):
            return None
        return self.diff / abs(self.a)

    @property
    def flagged(self) -> bool:
        return self.status not in ("ok", "noise")


def judge(a: float, b: float, higher_is_better: bool | None, tolerance: float, mode: str) -> str:
    """'ok' within tolerance, else 'better' / 'worse' (by the metric's direction) or 'changed'."""
    a_finite, b_finite = math.isfinite(a), math.isfinite(b)
    if not (a_finite and b_finite):
        same = (math.isnan(a) and math.isnan(b)) or a == b
        return "ok" if same else "non-finite"
    allowed = tolerance if mode == "absolute" else tolerance * abs(a)
    if abs(b - a) <= allowed + 1e-12:
        return "ok"
    if higher_is_better is None:
        return "changed"
    return "better" if (b > a) == higher_is_better else "worse"


def compare_rows(rows_a: dict[RowKey, dict], rows_b: dict[RowKey, dict], tolerance: float = DEFAULT_TOLERANCE,
                 overrides: dict[str, float] | None = None, missing_in_b: bool = False) -> list[Row]:
    """Every row of A that B shares (and, with ``missing_in_b``, those B lacks, as 'missing')."""
    overrides = overrides or {}
    out = []
    for key in sorted(rows_a, key=_sort_key):
        task, metric = key[4], key[5]
        a = rows_a[key]
        tol, mode = tolerance_for(task, metric, a.get("kind", "other"), tolerance, overrides)
        if key not in rows_b:
            if missing_in_b:
                out.append(Row(key, a["value"], None, a["higher_is_better"], tol, mode, "missing"))
            continue
        b = rows_b[key]
        hib = a["higher_is_better"] if a["higher_is_better"] is not None else b["higher_is_better"]
        status = judge(a["value"], b["value"], hib, tol, mode)
        noise = None
        if a.get("evidence") is not None and b.get("evidence") is not None and a["evidence"].kind == b["evidence"].kind:
            noise = stats.difference(a["evidence"], b["evidence"])
            if status in ("better", "worse", "changed") and not noise.significant:
                status = "noise"  # beyond tolerance, but not beyond the windows'/examples' own noise
        out.append(Row(key, a["value"], b["value"], hib, tol, mode, status, noise))
    return out


def _sort_key(key: RowKey) -> tuple:
    return (key[0], key[4], key[5], -1.0 if key[3] is None else key[3], key[1], key[2])


def compare(data_a: dict, data_b: dict, tolerance: float = DEFAULT_TOLERANCE,
            overrides: dict[str, float] | None = None) -> list[Row]:
    """Head to head: every (model, method, variant, ratio, task, metric) both runs hold."""
    return compare_rows(comparable_rows(data_a["records"]), comparable_rows(data_b["records"]), tolerance, overrides)


# ---------------------------------------------------------------- baselines
def run_config(manifest: dict) -> dict:
    """The value-determining settings of a run: config fields, model identity, method configs."""
    config = manifest.get("config", {})
    out = {name: config.get(name) for name in CONFIG_FIELDS}
    out["model_identity"] = (manifest.get("model") or {}).get("identity")
    out["method_configs"] = manifest.get("method_configs", {})
    return out


def make_baseline(data: dict, profile: str | None = None, command: str | None = None,
                  wall_s: float | None = None) -> dict:
    """The comparable part of a run: its settings and its quality rows (no timings or memory)."""
    manifest = data.get("manifest", {})
    records = [{"model": r["model"], "method": r["method"], "variant": r.get("variant", ""), "ratio": _ratio(r),
                "task": r["task"], "metric": r["metric"], "value": r["value"],
                "higher_is_better": r.get("higher_is_better"), "kind": r.get("kind", "other"),
                "samples": {k: v for k, v in (r.get("extra") or {}).items() if k in SAMPLE_FIELDS}}
               for r in data["records"] if r.get("kind", "other") in BASELINE_KINDS]
    if not records:
        raise UsageError("the run has no perplexity or accuracy records to make a baseline of")
    config = manifest.get("config", {})
    items: dict[str, int] = {}
    for r in data["records"]:
        found = stats.evidence(r)
        if found is not None and r.get("kind", "other") in BASELINE_KINDS:
            items[r["task"]] = found.items
    return {
        "format": BASELINE_FORMAT,
        "profile": profile,
        "config": run_config(manifest),
        "run": {"methods": config.get("methods"), "ratios": config.get("ratios"), "tasks": config.get("tasks"),
                "device": config.get("device")},
        "generated": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "command": command, "wall_s": wall_s, "git_revision": manifest.get("git_revision"),
                      "versions": manifest.get("versions")},
        "measured": {"items_per_task": items, "seqlen": config.get("seqlen"), "limit": config.get("limit"),
                     "noise": "a row fails when it moves beyond the tolerance and the 95% interval of its change "
                              f"excludes zero ({stats.method_text()})"},
        "tolerance": DEFAULT_TOLERANCE,
        "records": records,
    }


def baseline_rows(baseline: dict) -> dict[RowKey, dict]:
    if baseline.get("format") not in READABLE_FORMATS:
        raise UsageError(f"not an svdbench baseline (format {baseline.get('format')!r}, expected {BASELINE_FORMAT!r}); "
                         "regenerate it with `svdbench baseline`")
    return {(r["model"], r["method"], r["variant"], _ratio(r), r["task"], r["metric"]):
            {"value": r["value"], "higher_is_better": r.get("higher_is_better"), "kind": r["kind"],
             "evidence": stats.evidence({"extra": r.get("samples") or {}})} for r in baseline["records"]}


def config_differences(baseline: dict, manifest: dict) -> list[tuple[str, object, object]]:
    """(setting, baseline value, run value) for every value-determining setting that differs."""
    expected, actual = baseline.get("config", {}), run_config(manifest)
    diffs = []
    for name in (*CONFIG_FIELDS, "model_identity"):
        if expected.get(name) != actual.get(name):
            diffs.append((name, expected.get(name), actual.get(name)))
    methods = {r["method"] for r in baseline.get("records", [])}
    for method in sorted(methods & set(expected.get("method_configs", {}))):
        want, got = expected["method_configs"][method], actual["method_configs"].get(method)
        if got is not None and want != got:
            diffs.append((f"method_configs.{method}", want, got))
    return diffs


@dataclass
class CheckResult:
    rows: list[Row]
    config_diffs: list[tuple[str, object, object]] = field(default_factory=list)

    @property
    def failures(self) -> list[Row]:
        return [row for row in self.rows if row.flagged]

    @property
    def ok(self) -> bool:
        return not self.failures and not self.config_diffs


def check(data: dict, baseline: dict, tolerance: float | None = None,
          overrides: dict[str, float] | None = None) -> CheckResult:
    """Every baseline row against the run: within tolerance, or a failure (missing rows included)."""
    tolerance = baseline.get("tolerance", DEFAULT_TOLERANCE) if tolerance is None else tolerance
    rows = compare_rows(baseline_rows(baseline), comparable_rows(data["records"]), tolerance, overrides,
                        missing_in_b=True)
    return CheckResult(rows, config_differences(baseline, data.get("manifest", {})))


# ---------------------------------------------------------------- text output
def _num(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    if percent:
        return f"{value:+.2%}"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.6g}"


def format_rows(rows: list[Row], label_a: str = "A", label_b: str = "B") -> str:
    """A fixed-width text table: the row, both values, difference, relative change, tolerance, status."""
    header = ["model", "method", "variant", "ratio", "task", "metric", label_a, label_b, "diff", "95% interval",
              "significant", "rel", "tolerance", "status"]
    lines = [header]
    for row in rows:
        model, method, var, ratio, task, metric = row.key
        arrow = {True: " ↑", False: " ↓"}.get(row.higher_is_better, "")
        tol = f"{row.tolerance:.3g} {'rel' if row.mode == 'relative' else 'abs'}"
        noise = row.noise
        significant = "-" if noise is None else ("yes" if noise.significant else "no") + ("" if noise.paired else
                                                                                          " (unpaired)")
        lines.append([model, method, var or "-", "-" if ratio is None else f"{ratio:.0%}", task, metric + arrow,
                      _num(row.a), _num(row.b), _num(row.diff), "-" if noise is None else noise.text(),
                      significant, _num(row.relative, percent=True), tol,
                      row.status.upper() if row.flagged else row.status])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    text = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(text)


def run_differences(data_a: dict, data_b: dict) -> list[tuple[str, object, object]]:
    """(setting, value in A, value in B) for every value-determining setting two runs do not share."""
    as_baseline = {"config": run_config(data_a.get("manifest", {})), "records": data_a.get("records", [])}
    diffs = []
    for name, a, b in config_differences(as_baseline, data_b.get("manifest", {})):
        if isinstance(a, dict) and isinstance(b, dict):  # only the fields that differ
            fields = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            a, b = {k: a.get(k) for k in fields}, {k: b.get(k) for k in fields}
        diffs.append((name, a, b))
    return diffs


def format_config_diffs(diffs: list[tuple[str, object, object]]) -> str:
    return "\n".join(f"  {name}: baseline {want!r}, run {got!r}" for name, want, got in diffs)
