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

__all__ = ["CASES", "RETENTION", "SUMMARY", "ResumeError", "RowTable", "as_float", "cost_summary", "format_table",
           "metric_meta",
           "metric_rows", "read_frame", "read_json", "read_rows", "seconds_per_edit", "summarize_phases",
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
    """Mean edit seconds per request over successful edit rows (each row holds its call's seconds
    and the call's ``batch_size``)."""
    vals = []
    for r in rows:
        if r.get("point") == "edit" and r.get("status") != "error":
            t, n = as_float(r.get("time_edit_s")), as_float(r.get("batch_size"))
            if not (math.isnan(t) or math.isnan(n) or n <= 0):
                vals.append(t / n)
    return sum(vals) / len(vals) if vals else math.nan


PHASES = ("pre", "edit", "probe", "restore", "verify")  # the time_<phase>_s columns of an edit row


def cost_summary(rows: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    """What a run cost, from its rows (docs/results.md, "Cost columns").

    Each edit row holds its call's seconds and the call's size (``batch_size``; ``pre_batch_size``
    for ``time_pre_s``), so a call's seconds count once: Σ seconds / size over the rows. A retention
    row holds its pass's ``time_probe_s`` and the pass's size likewise.

    Returns:
        ``<phase>_s_total`` and ``<phase>_s_per_edit`` for pre, edit, probe, restore and verify
        (per edit: over the edit rows that did not fail), ``retention_s_total``, ``total_s`` (those,
        plus the preparation) and ``total_s_per_edit``; ``mem_kind``, ``mem_peak_mb`` (the highest
        peak of any call) and ``mem_increase_mb_max`` (the largest rise within one call).
    """
    def call_share(r: Mapping[str, str], col: str, size_col: str) -> float:
        t, n = as_float(r.get(col)), as_float(r.get(size_col))
        return 0.0 if math.isnan(t) else t / (n if n > 0 else 1.0)

    edits = [r for r in rows if r.get("point") == "edit"]
    done = [r for r in edits if r.get("status") != "error"]
    out: dict[str, Any] = {}
    for phase in PHASES:
        size = "pre_batch_size" if phase == "pre" else "batch_size"
        out[f"{phase}_s_total"] = sum(call_share(r, f"time_{phase}_s", size) for r in edits)
    out["retention_s_total"] = sum(call_share(r, "time_probe_s", "batch_size") for r in rows
                                   if r.get("point") == "retention")
    out["total_s"] = sum(out[f"{p}_s_total"] for p in PHASES) + out["retention_s_total"] + prepare_seconds(rows)
    n = len(done)
    for phase in PHASES:
        out[f"{phase}_s_per_edit"] = out[f"{phase}_s_total"] / n if n else math.nan
    out["total_s_per_edit"] = out["total_s"] / n if n else math.nan
    peaks = [v for v in (as_float(r.get("mem_peak_mb")) for r in rows) if not math.isnan(v)]
    rises = [v for v in (as_float(r.get("mem_increase_mb")) for r in rows) if not math.isnan(v)]
    out["mem_kind"] = " ".join(sorted({r["mem_kind"] for r in rows if r.get("mem_kind")}))
    out["mem_peak_mb"] = max(peaks) if peaks else math.nan
    out["mem_increase_mb_max"] = max(rises) if rises else math.nan
    return out


def prepare_seconds(rows: Sequence[Mapping[str, str]]) -> float:
    """Total seconds the algorithm's preparation took over the run's processes."""
    return sum(v for v in (as_float(r.get("time_prepare_s")) for r in rows) if not math.isnan(v))


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
        ``unit``, ``mean``, ``sem``, ``count``, ``excluded`` and the run's counts and cost
        (``cost_summary``).
    """
    edits = [r for r in rows if r.get("point") == "edit"]
    extra = {"n_cases": len(edits), "n_errors": sum(r.get("status") == "error" for r in edits),
             "n_nonfinite": sum(r.get("status") == "nonfinite" for r in edits),
             "seconds_per_edit": seconds_per_edit(rows), "prepare_s": prepare_seconds(rows), **cost_summary(rows)}
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
