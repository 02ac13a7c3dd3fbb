"""Result tables of a run directory: their names, summaries, JSON records and the retention plot.

The table files themselves (append row by row with flush + fsync, resume after a kill, read back
exactly) are ``harness.tables``; its names are re-exported here.

Tables of a run directory:
  * ``cases.csv``: one row per case and evaluation point (``point`` = ``edit`` or ``retention``);
  * ``summary.csv``: per phase and metric: the metric's protocol version, direction (↑ higher is
    better, ↓ lower) and unit from its ``MetricInfo``, then mean, standard error, count
    (``harness.probes.summarize``);
  * ``retention.csv`` (sequential runs): one row per retention point.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.tables import ResumeError, RowTable, read_frame, read_rows, write_csv, write_frame

__all__ = ["CASES", "RETENTION", "SUMMARY", "ResumeError", "RowTable", "as_float", "format_table", "metric_meta",
           "metric_rows", "plot_retention", "read_frame", "read_json", "read_rows", "seconds_per_edit", "summarize_phases",
           "summary_table", "write_csv", "write_frame", "write_json", "write_summary"]

log = logging.getLogger(__name__)

CASES = "cases.csv"
SUMMARY = "summary.csv"
RETENTION = "retention.csv"


# ------------------------------------------------------------------------------------------------
# cells back to numbers


def as_float(cell: str | None) -> float:
    """A CSV cell as a float; empty or unparsable cells are NaN."""
    if cell is None or cell == "":
        return math.nan
    try:
        return float(cell)
    except ValueError:
        return math.nan


def metric_rows(rows: Iterable[Mapping[str, str]], prefix: str, metrics: Sequence[str]) -> list[dict[str, float]]:
    """Per-case metric dicts (``{metric: value}``) from the ``<prefix>_<metric>`` cells of rows; empty or
    non-finite cells are NaN (``summarize`` counts them as excluded)."""
    return [{m: as_float(row.get(f"{prefix}_{m}")) for m in metrics} for row in rows]


# ------------------------------------------------------------------------------------------------
# summary


def metric_meta(metric: str) -> dict[str, Any]:
    """``direction`` (↑/↓) and ``unit`` of a registered metric, from its ``MetricInfo`` (empty strings
    for a column no registered probe family declares, e.g. a plugin that is not installed)."""
    from harness.probes import METRICS

    info = METRICS.get(metric)
    return {"direction": info.direction if info else "", "unit": info.unit if info else ""}


def summarize_phases(rows: Sequence[Mapping[str, str]], metrics: Sequence[str]) -> dict[str, dict[str, dict]]:
    """Per phase: ``harness.probes.summarize`` of the rows' metric values.

    Phases: ``pre`` and ``post`` (edit rows; ``post`` only of successful cases), and in sequential
    runs ``retention@<n_edits>`` for each retention point plus ``final`` for the last one.
    """
    from harness.probes import summarize

    edits = [r for r in rows if r.get("point") == "edit"]
    ok = [r for r in edits if r.get("status") in ("ok", "nonfinite")]  # nonfinite: counted as excluded
    phases: dict[str, dict[str, dict]] = {}
    if edits:
        phases["pre"] = summarize(metric_rows(edits, "pre", metrics))
    if ok:
        phases["post"] = summarize(metric_rows(ok, "post", metrics))
    by_step: dict[int, list[Mapping[str, str]]] = {}
    for r in rows:
        if r.get("point") == "retention":
            by_step.setdefault(int(r["step"]), []).append(r)
    for step in sorted(by_step):
        group = by_step[step]
        phases[f"retention@{group[0]['n_edits']}"] = summarize(metric_rows(group, "post", metrics))
    if by_step:
        phases["final"] = phases[f"retention@{by_step[max(by_step)][0]['n_edits']}"]
    return phases


def seconds_per_edit(rows: Sequence[Mapping[str, str]]) -> float:
    """Mean edit seconds per request over successful edit rows (cells are per-request amortized)."""
    vals = [as_float(r.get("edit_s")) for r in rows if r.get("point") == "edit" and r.get("status") == "ok"]
    vals = [v for v in vals if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def write_summary(path: str | Path, rows: Sequence[Mapping[str, str]], metrics: Sequence[str],
                  ident: Mapping[str, Any], versions: Mapping[str, int]) -> list[dict[str, Any]]:
    """Write ``summary.csv`` (atomically: temp file, fsync, rename) and return its rows.

    Args:
        rows: the cases table's rows.
        metrics: the per-case metric names.
        ident: columns repeated on every summary row (run_id, model, algorithm, overrides ...).
        versions: protocol version of each metric (reported beside it).

    Returns:
        One dict per (phase, metric): ``ident``, ``phase``, ``metric``, ``version``, ``direction``,
        ``unit``, ``mean``, ``sem``, ``count``, ``excluded`` and the run's counts and timing.
    """
    edits = [r for r in rows if r.get("point") == "edit"]
    extra = {"n_cases": len(edits), "n_errors": sum(r.get("status") == "error" for r in edits),
             "n_nonfinite": sum(r.get("status") == "nonfinite" for r in edits),
             "seconds_per_edit": seconds_per_edit(rows)}
    out: list[dict[str, Any]] = []
    for phase, table in summarize_phases(rows, metrics).items():
        for metric, st in table.items():
            out.append({**ident, "phase": phase, "metric": metric, "version": versions.get(metric, ""),
                        **metric_meta(metric), "mean": st["mean"], "sem": st.get("sem", st.get("stderr")),
                        "count": st["count"], "excluded": st.get("excluded", 0), **extra})
    columns = list(ident) + ["phase", "metric", "version", "direction", "unit", "mean", "sem", "count", "excluded",
                             *extra]
    write_csv(path, columns, out)
    return out


def summary_table(summary: Sequence[Mapping[str, Any]], phases: Sequence[str] = ("pre", "post", "final")) -> str:
    """Metrics as rows (with direction and unit), the phases present as ``mean ± sem`` columns.

    Args:
        summary: rows as ``write_summary`` returns them.
        phases: the phases to show, in this order, when present.
    """
    shown = [p for p in phases if any(r["phase"] == p for r in summary)]
    table: dict[str, dict[str, str]] = {}
    for r in summary:
        if r["phase"] not in shown:
            continue
        sem = r["sem"]
        cell = f"{r['mean']:.3f}" + (f" ± {sem:.3f}" if isinstance(sem, float) and not math.isnan(sem) else "")
        meta = metric_meta(r["metric"])
        row = table.setdefault(r["metric"], {"metric": f"{r['metric']} {meta['direction']}".rstrip(),
                                             "unit": meta["unit"], "n": str(r["count"])})
        row[r["phase"]] = cell
    return format_table(list(table.values()), ["metric", "unit", *shown, "n"])


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], floatfmt: str = "{:.3f}") -> str:
    """A plain fixed-width text table (for the CLI's final print and ``harness.collect``)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else floatfmt.format(v)
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    numeric = [all(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in rows if r.get(c)
                   is not None) for c in columns]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(columns, widths, numeric)).rstrip()]
    lines += ["  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(row, widths, numeric)).rstrip()
              for row in cells]
    return "\n".join(lines)


def read_json(path: str | Path) -> Any:
    """Read a JSON file, or None when it does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plot_retention(path: str | Path, retention: Sequence[Mapping[str, str]], steps: Sequence[tuple[int, float, bool]],
                   metrics: Sequence[str]) -> None:
    """Draw ``retention.png``: metric means over earlier edits vs. edit count, and per-step norms.

    Args:
        retention: rows of ``retention.csv``.
        steps: (step, weight-change norm, outlier) of every successful edit call.
        metrics: metric columns of ``retention.csv`` to draw.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from harness.probes import METRICS

    xs = [as_float(r["n_edits"]) for r in retention]
    curves = {m: [as_float(r.get(m)) for r in retention] for m in metrics}
    curves = {m: ys for m, ys in curves.items() if any(not math.isnan(y) for y in ys)}
    # Bounded metrics (fractions, probability differences) share one axis; every unit of unbounded
    # ones (e.g. entropy in bits) gets its own panel.
    unbounded: dict[str, list[str]] = {}
    for m in curves:
        info = METRICS.get(m)
        if info is not None and info.bounds is None:
            unbounded.setdefault(info.unit, []).append(m)
    panel = {m: 1 + i for i, ms in enumerate(unbounded.values()) for m in ms}
    n = 2 + len(unbounded)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4))
    ax1, ax2 = axes[0], axes[-1]
    for m, ys in curves.items():
        axes[panel.get(m, 0)].plot(xs, ys, marker="o", label=m)
    ax1.set_xlabel("edits so far")
    ax1.set_ylabel("mean over all earlier edits")
    ax1.set_title("retention")
    ax1.legend(fontsize=7)
    for i, (unit, ms) in enumerate(unbounded.items(), start=1):
        axes[i].set_xlabel("edits so far")
        axes[i].set_ylabel(unit)
        axes[i].set_title(", ".join(ms))
    if steps:
        ax2.plot([s for s, _, _ in steps], [n for _, n, _ in steps], lw=1)
        out = [(s, n) for s, n, o in steps if o]
        if out:
            ax2.scatter([s for s, _ in out], [n for _, n in out], color="red", zorder=3, label="outlier")
            ax2.legend(fontsize=7)
        if all(n > 0 for _, n, _ in steps):
            ax2.set_yscale("log")
    ax2.set_xlabel("edit call")
    ax2.set_ylabel("weight-change norm")
    ax2.set_title("per-step weight change")
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
