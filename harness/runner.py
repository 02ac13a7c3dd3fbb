"""The run behind ``python -m harness``: set up, edit case by case, write rows and the summary.

``run`` takes the run directory's lock (one writer per directory), checks and builds everything
(``harness.runsetup``: config, data, model, algorithm prepared on the base model; any impossible
setting is one ``SetupError`` before a row is written), then hands over to one of two peer loops:

* ``harness.single``: single-edit evaluation (``keep_original_weight=True``), each batch edited,
  probed and restored;
* ``harness.sequential``: sequential editing (``keep_original_weight=False``, the protocol of
  AlphaEdit, Fang et al. 2025, and of MEMIT's mass-editing ablations), edits accumulating, with
  retention points and checkpoints.

Both write through ``harness.cases.CaseLog`` (rows flushed as each case finishes, resumable, never
duplicated) and read pre-edit measurements from ``harness.premeasure.PreMeasurements``. A case
that raises becomes an ``error`` row and the run goes on; a ``RestoreError`` (the model is not what
it should be) or Ctrl-C ends the run after the Editor restored the weights. No Hydra here:
``harness.cli`` passes a ``Config``.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.cases import CaseLog
from harness.config import Config
from harness.modelcache import MODEL_CACHE, ModelCache
from harness.premeasure import PreMeasurements
from harness.results import SUMMARY, read_json, write_json, write_summary
from harness.runlock import RunLock
from harness.runsetup import SetupError, setup_run
from harness.sequential import Sequential
from harness.single import run_single

log = logging.getLogger(__name__)

__all__ = ["MODEL_CACHE", "ModelCache", "RunResult", "SetupError", "run"]


@dataclass
class RunResult:
    """What a run left behind: where, how many cases, and the summary rows."""

    out_dir: Path
    n_cases: int
    n_errors: int
    n_written: int
    summary: list[dict[str, Any]]


def run(cfg: Config, out_dir: str | Path, overrides: Sequence[str] = (), cache: ModelCache | None = None,
        progress: bool = True) -> RunResult:
    """Run ``cfg`` into ``out_dir`` (resuming what is there). See the module docstring.

    Args:
        cfg: the typed config (``OmegaConf.to_object`` of the composed one).
        out_dir: the run directory (Hydra's output dir).
        overrides: the task overrides, written as ``override.<key>`` columns.
        cache: the model cache (default: this process's ``MODEL_CACHE``).
        progress: show tqdm bars.

    Raises:
        SetupError: the run cannot start (nothing was written).
        ResumeError: ``out_dir`` holds a run of another configuration.
        RunLockedError: another process is running in ``out_dir``.
        RestoreError: the model could not be put back; the run stops.
        KeyboardInterrupt: after the Editor restored the model and every finished row is on disk.
    """
    out = Path(out_dir)
    with RunLock(out):  # one writer per run directory: taken before anything is written there
        setup = setup_run(cfg, out, overrides, cache)
        cases = CaseLog(setup)
        if cfg.retry_errors:
            cases.drop_error_rows()
        pre = PreMeasurements(setup)
        if cfg.keep_original_weight:
            run_single(setup, cases, pre, progress)
            setup.save_model()
        else:
            Sequential(setup, cases, pre, progress).execute()
        record_provenance(setup.out, cases.rows, setup.algorithm.provenance_prefixes)
        return finish(cases, setup.out)


def provenance(rows: Sequence[Mapping[str, Any]], prefixes: Sequence[str]) -> dict[str, Any]:
    """The ``EditReport.info`` keys starting with ``prefixes``, from the rows' ``report`` cells (the
    last written value of each key: the same in every row when the inputs did not change)."""
    out: dict[str, Any] = {}
    for row in rows:
        cell = row.get("report")
        if not isinstance(cell, str) or not cell or not prefixes:
            continue
        info = json.loads(cell).get("info", {})
        out.update({k: v for k, v in info.items() if k.startswith(tuple(prefixes))})
    return dict(sorted(out.items()))


def record_provenance(out: Path, rows: Sequence[Mapping[str, Any]], prefixes: Sequence[str]) -> None:
    """Put ``provenance(rows, prefixes)`` into ``run.json`` (key ``provenance``; ``{}`` when the
    algorithm reports none), beside the config that ``run.json`` already holds."""
    record = read_json(out / "run.json")
    if record is None:
        return
    record["provenance"] = provenance(rows, prefixes)
    write_json(out / "run.json", record)


def finish(cases: CaseLog, out: Path) -> RunResult:
    """Write ``summary.csv`` from the cases table and count what happened."""
    rows = cases.rows
    summary = write_summary(out / SUMMARY, rows, cases.metrics, cases.ident, cases.versions)
    edits = [r for r in rows if r["point"] == "edit"]
    errors = sum(r["status"] == "error" for r in edits)
    return RunResult(out, len(edits), errors, cases.n_written, summary)
