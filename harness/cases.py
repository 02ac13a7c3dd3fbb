"""Per-case bookkeeping of a run: the ``cases.csv`` layout, the row built from an edit's outcome or
error, writing rows as cases finish, and what a resume still has to do.

One row per case and evaluation point, keyed by ``(case_id, point, step)``: ``point=edit`` when the
case was edited (single-edit runs: step 1; sequential runs: the edit call's number) and
``point=retention`` when a sequential run re-evaluated it after ``n_edits`` edits. A row can be read
alone: it names its run (identity columns), its request (subject, prompt, targets), its status
(``ok``, ``error`` with the error text, or ``nonfinite`` when the model's logits were not finite: its
metrics are then empty, never 0), the pre- and post-edit metrics, and what it cost. Timing columns
start with ``time_`` so that no metric prefix catches them; each holds the seconds of the call that
handled the case, and ``batch_size`` / ``pre_batch_size`` say how many cases shared that call.
``time_prepare_s`` is the algorithm's one-off preparation, on the first row written after it.
Memory columns (``harness.memory``) give the peak of the same call: ``mem_kind`` (``cuda``: the
allocator's peak; ``rss``: the process's resident-set high-water mark during the call),
``mem_peak_mb`` and ``mem_increase_mb`` (the peak less the memory at the call's start), in MiB.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import Any

from harness.editor import EditOutcome
from harness.probes import METRICS
from harness.results import CASES, RowTable, write_csv
from harness.runsetup import RunSetup, parse_overrides
from harness.types import EditRequest

log = logging.getLogger(__name__)

REQUEST_COLUMNS = ["subject", "prompt", "target_new", "target_true"]
CASE_COLUMNS = ["case_id", *REQUEST_COLUMNS, "point", "step", "n_edits", "status", "error", "batch_size",
                "pre_batch_size", "time_prepare_s", "time_pre_s", "time_edit_s", "time_probe_s", "time_restore_s",
                "time_verify_s", "mem_kind", "mem_peak_mb", "mem_increase_mb", "snapshot_bytes", "n_targets", "delta_norm", "outlier", "probe_versions"]
CASE_KEY = ["case_id", "point", "step"]
METRIC_DIGITS = 10  # significant digits written for metric values
TIME_DECIMALS = 4  # seconds written to 0.1 ms


def _metric(value: Any) -> Any:
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.{METRIC_DIGITS}g}")
    return value


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, TIME_DECIMALS)


class CaseLog:
    """The ``cases.csv`` table of one run: its columns, its rows, and the rows still to write.

    Args:
        setup: the run's ``RunSetup`` (config, output directory, probes).
    """

    def __init__(self, setup: RunSetup) -> None:
        cfg = setup.cfg
        self.metrics = setup.probes.row_metrics()
        names = self.metrics + [i.name for i in setup.probes.infos() if i.name not in self.metrics]
        self.versions = {m: METRICS[m].version for m in names}
        self.ident = {"run_id": cfg.run_id or f"{setup.out.parent.name}/{setup.out.name}",
                      "model": cfg.model.name or cfg.model.source, "algorithm": cfg.algorithm.name,
                      **parse_overrides(setup.overrides)}
        columns = [*self.ident, *CASE_COLUMNS, *(f"pre_{m}" for m in self.metrics),
                   *(f"post_{m}" for m in self.metrics), "report"]
        self.table = RowTable(setup.out / CASES, columns, CASE_KEY)
        self.n_written = 0
        self._prepare_s = setup.prepare_seconds  # reported once, on the next row written
        if self.table.rows:
            log.info("resuming: %d row(s) already in %s", len(self.table.rows), self.table.path)

    @property
    def rows(self) -> list[dict[str, str]]:
        return self.table.rows

    def has(self, case_id: str, point: str, step: int) -> bool:
        return self.table.has({"case_id": case_id, "point": point, "step": step})

    # -- rows ------------------------------------------------------------------------------------
    def row(self, r: EditRequest, point: str, step: int, n_edits: int, *, pre: dict | None = None,
            post: dict | None = None, error: str | None = None, nonfinite: bool = False,
            **cells: Any) -> dict[str, Any]:
        """A row for request ``r`` (identity, request, status, metric cells); ``cells`` fill the rest.

        ``status`` is ``error`` (with the error text), ``nonfinite`` (the model's logits were not
        finite for this case) or ``ok``.
        """
        status = "error" if error else "nonfinite" if nonfinite else "ok"
        row: dict[str, Any] = {**self.ident, "case_id": r.case_id, "subject": r.subject, "prompt": r.prompt,
                               "target_new": r.target_new, "target_true": r.target_true, "point": point,
                               "step": step, "n_edits": n_edits, "status": status, "error": error,
                               "probe_versions": " ".join(f"{m}={v}" for m, v in self.versions.items()), **cells}
        for prefix, values in (("pre", pre), ("post", post)):
            for m in self.metrics:
                row[f"{prefix}_{m}"] = _metric((values or {}).get(m))
        return row

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row`` (flushed, fsynced) unless its key is recorded already."""
        if self._prepare_s and "time_prepare_s" not in row:
            row["time_prepare_s"] = _seconds(self._prepare_s)
        wrote = self.table.append(row)
        if wrote and row.get("time_prepare_s"):
            self._prepare_s = 0.0
        self.n_written += wrote

    def error_rows(self, batch: Sequence[EditRequest], step: int, n_edits: int, exc: BaseException,
                   pre: Any) -> None:
        """One error row per request of a failed edit call (the Editor has rolled the call back)."""
        log.error("step %d (case(s) %s) failed: %s", step, [r.case_id for r in batch], error_text(exc))
        for r in batch:
            self.write(self.row(r, "edit", step, n_edits, pre=pre.metrics_of(r), error=error_text(exc),
                                batch_size=len(batch), **pre.cells_of(r)))

    def outcome_rows(self, batch: Sequence[EditRequest], out: EditOutcome, step: int, n_edits: int, pre: Any,
                     **cells: Any) -> None:
        """One row per request of a successful edit call."""
        if "delta_norm" not in cells:
            norms = out.report.delta_norms
            cells["delta_norm"] = math.sqrt(sum(v * v for v in norms.values())) if norms or not out.targets else None
        for j, r in enumerate(batch):
            bad = bool(out.pre.extras[j].get("nonfinite") or out.post.extras[j].get("nonfinite"))
            self.write(self.row(r, "edit", step, n_edits, pre=out.pre.metrics[j], post=out.post.metrics[j],
                                nonfinite=bad, **pre.cells_of(r), **cells, **outcome_cells(out)))

    # -- resume ----------------------------------------------------------------------------------
    def drop_error_rows(self) -> None:
        """``retry_errors``: remove the error rows so that those cases run again."""
        rows = self.table.rows
        keep = [r for r in rows if r["status"] != "error"]
        if len(keep) == len(rows):
            return
        write_csv(self.table.path, self.table.columns, keep)
        self.table = RowTable(self.table.path, self.table.columns, self.table.key)
        log.info("retry_errors: %d error row(s) removed; those cases run again", len(rows) - len(keep))


def outcome_cells(out: EditOutcome) -> dict[str, Any]:
    """The cells an edit outcome fills: the call's timings and what it says about the edit."""
    t = out.timings
    info = {"losses": out.report.losses, "info": out.report.info}
    return {"batch_size": len(out.requests), "time_edit_s": _seconds(t.get("edit", 0.0)),
            "time_probe_s": _seconds(t.get("probe", 0.0)), "time_restore_s": _seconds(t.get("restore", 0.0)),
            "time_verify_s": _seconds(t.get("verify", 0.0)), "snapshot_bytes": out.snapshot_bytes,
            "n_targets": len(out.targets),
            "report": json.dumps(info, sort_keys=True, default=str) if any(info.values()) else None}


def error_text(exc: BaseException) -> str:
    """``Type: message``, at most 2000 characters (a cell of the error column)."""
    return f"{type(exc).__name__}: {exc}"[:2000]
