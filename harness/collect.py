"""``python -m harness.collect DIR``: gather every run under a sweep directory into one table.

Each run directory (one with ``cases.csv``) contributes one row per phase and metric to
``DIR/collected.csv``: run directory, run id, model, algorithm, the run's overrides (from Hydra's
``.hydra/overrides.yaml``, as ``override.<key>`` columns), metric, phase, protocol version,
direction (↑ higher is better, ↓ lower) and unit, mean, standard error, count, seconds per edit,
and whether the run finished (``summary.csv`` present). Versions, directions, units and which metrics
the compact tables show (``MetricInfo.headline``) come from the registered probe families' metadata.
Statistics are recomputed from ``cases.csv``, so interrupted runs are included with what they have.
Tables are read with ``harness.results.read_rows``/``read_frame`` (the reader that resumes runs: any
text in a cell reads back exactly, a torn last row is left out, a repeated case counts once) and
written with ``write_frame`` (the same quoting).
A compact comparison (runs as rows, headline metrics as columns, ↑/↓ in the headers, units below)
is printed.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd
import yaml

from harness.probes import METRICS
from harness.cases import CASE_KEY
from harness.results import (CASES, RETENTION, SUMMARY, cost_summary, format_table, metric_meta, read_frame,
                             read_rows, seconds_per_edit, summarize_phases, write_frame)
from harness.runsetup import parse_overrides

log = logging.getLogger(__name__)

FIXED = ("run_dir", "run_id", "model", "algorithm")


def headline_metrics(present: Iterable[str]) -> list[str]:
    """The metrics of ``present`` that compact tables show: registered ``headline`` metrics, in
    registry order."""
    present = set(present)
    return [m for m, info in METRICS.items() if info.headline and m in present]


def header(metric: str) -> str:
    """A column header: the metric and its direction arrow (``efficacy_score ↑``)."""
    return f"{metric} {metric_meta(metric)['direction']}".rstrip()


def units_line(metrics: Sequence[str]) -> str:
    """``units: <unit>: m1, m2; ...`` for the registered metrics among ``metrics``."""
    by_unit: dict[str, list[str]] = {}
    for m in metrics:
        unit = metric_meta(m)["unit"]
        if unit:
            by_unit.setdefault(unit, []).append(m)
    return "units: " + "; ".join(f"{u}: {', '.join(ms)}" for u, ms in by_unit.items()) if by_unit else ""


def _overrides(run_dir: Path) -> dict[str, str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    items = yaml.safe_load(path.read_text()) if path.exists() else []
    return parse_overrides([str(ov) for ov in items or []])


def collect_run(run_dir: Path, root: Path) -> list[dict[str, Any]]:
    """The long-table rows (one per phase and metric) of one run directory."""
    rows = read_rows(run_dir / CASES, key=CASE_KEY)
    if not rows:
        return []
    metrics = [c[len("post_"):] for c in rows[0] if c.startswith("post_")]
    first = rows[0]
    edits = [r for r in rows if r.get("point") == "edit"]
    base = {"run_dir": str(run_dir.relative_to(root)), "run_id": first.get("run_id"),
            "model": first.get("model"), "algorithm": first.get("algorithm"), **_overrides(run_dir),
            "complete": (run_dir / SUMMARY).exists(),
            "n_cases": len(edits), "n_errors": sum(r.get("status") != "ok" for r in edits),
            "seconds_per_edit": seconds_per_edit(rows), **cost_summary(rows)}
    out = []
    for phase, table in summarize_phases(rows, metrics).items():
        for metric, st in table.items():
            out.append({**base, "phase": phase, "metric": metric,
                        "version": METRICS[metric].version if metric in METRICS else None, **metric_meta(metric),
                        "mean": st["mean"], "sem": st.get("sem", st.get("stderr")), "count": st["count"]})
    return out


def collect(root: str | Path) -> pd.DataFrame:
    """All runs under ``root`` as one long table; also written to ``root/collected.csv``."""
    root = Path(root)
    rows: list[dict[str, Any]] = []
    for cases in sorted(root.rglob(CASES), key=lambda p: str(p)):
        rows += collect_run(cases.parent, root)
    df = pd.DataFrame(rows)
    if not df.empty:
        ovs = sorted(c for c in df.columns if c.startswith("override."))
        rest = [c for c in df.columns if c not in FIXED and c not in ovs]
        df = df[[*FIXED, *ovs, *rest]]
    write_frame(root / "collected.csv", df)
    return df


def compare(df: pd.DataFrame) -> str:
    """Runs as rows, headline metrics (phase ``final`` for sequential runs, else ``post``) as columns
    headed with their direction, and a line of units."""
    if df.empty:
        return "(no runs)"
    shown = headline_metrics(df["metric"])
    ovs = [c for c in df.columns if c.startswith("override.")]
    varying = [c for c in ovs if df[c].astype(str).nunique() > 1] or ovs
    runs = []
    for run_dir, g in df.groupby("run_dir", sort=False):
        phase = "final" if (g["phase"] == "final").any() else "post"
        first = g.iloc[0]
        row: dict[str, Any] = {"run": run_dir, **{c.removeprefix("override."): first[c] for c in varying},
                               "cases": int(first["n_cases"]), "errors": int(first["n_errors"]), "phase": phase}
        sub = g[g["phase"] == phase].set_index("metric")["mean"]
        for m in shown:
            if m in sub.index:
                row[header(m)] = float(sub[m])
        spe = float(first["seconds_per_edit"])
        row["s/edit"] = spe if not math.isnan(spe) else None
        runs.append(row)
    columns = list(dict.fromkeys(k for r in runs for k in r))
    return "\n".join(filter(None, [format_table(runs, columns), units_line(shown)]))


def retention_metrics(df: pd.DataFrame) -> list[str]:
    """The headline metrics with at least one value among the columns of a retention table."""
    return [m for m in headline_metrics(df.columns) if df[m].notna().any()]


def collect_retention(root: Path) -> pd.DataFrame:
    """Every sequential run's ``retention.csv`` under ``root``, with its run and algorithm, plus the
    unedited model's level of each metric (``base_<metric>``: the mean ``pre_<metric>`` over the
    run's edit rows). Written to ``root/retention_collected.csv``; empty when no run is sequential."""
    frames = []
    for path in sorted(root.rglob(RETENTION), key=str):
        ret = read_frame(path, key=["step"])
        if ret.empty:
            continue
        cases = read_frame(path.parent / CASES, key=CASE_KEY)
        edits = cases[cases["point"] == "edit"]
        ret.insert(0, "algorithm", cases["algorithm"].iloc[0] if len(cases) else None)
        ret.insert(0, "run_dir", str(path.parent.relative_to(root)))
        for m in headline_metrics(ret.columns):
            # a column of only "nan" cells reads back as text: numbers (NaN) here
            ret[m] = pd.to_numeric(ret[m], errors="coerce")
            pre = pd.to_numeric(edits[f"pre_{m}"], errors="coerce") if f"pre_{m}" in edits else None
            ret[f"base_{m}"] = float(pre.mean()) if pre is not None and pre.notna().any() else math.nan
        frames.append(ret)
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if not df.empty:
        write_frame(root / "retention_collected.csv", df)
    return df


def plot_retention_comparison(df: pd.DataFrame, path: Path) -> Path | None:
    """One panel per retention metric: each run's curve over edits so far, and the unedited level
    (dashed). Returns the PNG path, or None when there is nothing to draw."""
    metrics = retention_metrics(df) if not df.empty else []
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    ncols = min(4, len(metrics))
    nrows = -(-len(metrics) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, m in zip(axes.flat, metrics):
        for run_dir, g in df.groupby("run_dir", sort=False):
            line, = ax.plot(g["n_edits"], g[m], marker="o", label=f"{g['algorithm'].iloc[0]} ({run_dir})")
        base = df[f"base_{m}"].dropna()
        if len(base):
            ax.axhline(float(base.mean()), color="gray", ls="--", lw=1, label="unedited")
        unit = metric_meta(m)["unit"]
        ax.set_title(header(m))
        ax.set_xlabel("edits so far")
        ax.set_ylabel(f"mean over all earlier edits ({unit})" if unit else "mean over all earlier edits")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def retention_table(df: pd.DataFrame) -> str:
    """Sequential runs: rows (run, edits so far) with the headline metrics (↑/↓ in the headers, units
    below), step norms, outliers flagged."""
    metrics = retention_metrics(df)
    cols = [c for c in ("algorithm", "n_edits", *metrics, "max_step_norm", "n_outliers") if c in df]
    rows = [{(header(k) if k in metrics else k): v for k, v in r.items()} for r in df[cols].to_dict("records")]
    return "\n".join(filter(None, [format_table(rows, [header(c) if c in metrics else c for c in cols]),
                                    units_line(metrics)]))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m harness.collect", description=__doc__.splitlines()[0])
    ap.add_argument("dir", help="a sweep directory (e.g. runs/multirun/<date>/<time>) or any folder of runs")
    args = ap.parse_args(argv)
    root = Path(args.dir)
    if not root.is_dir():
        print(f"{root} is not a directory", file=sys.stderr)
        return 2
    df = collect(root)
    print(compare(df))
    print(f"\n{df['run_dir'].nunique() if not df.empty else 0} run(s) -> {root / 'collected.csv'}")
    ret = collect_retention(root)
    if not ret.empty:
        print("\nretention of all earlier edits (sequential runs):")
        print(retention_table(ret))
        png = plot_retention_comparison(ret, root / "retention_compare.png")
        print(f"-> {root / 'retention_collected.csv'}" + (f"  {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
