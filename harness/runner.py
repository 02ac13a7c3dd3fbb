"""The run loop behind ``python -m harness``: load (or reuse) the model, edit case by case, write rows.

Single-edit mode (``keep_original_weight=True``) edits each batch of requests, probes it and lets the
Editor restore the weights; sequential mode (``keep_original_weight=False``, the protocol of
AlphaEdit, Fang et al. 2025, and of MEMIT's mass-editing ablations) lets the edits accumulate and,
at each retention point, re-evaluates every earlier edit against its own pre-edit measurement,
writes ``retention.csv``/``retention.png`` and checkpoints the Editor so an interrupted run resumes
where its last checkpoint left it (``harness.sequential``).

Rows go to ``cases.csv`` as each case finishes (``harness.results.RowTable``: fsynced, resumable, never
duplicated). A case that raises becomes an ``error`` row and the run goes on; a ``RestoreError`` (the
model is not what it should be) or Ctrl-C ends the run after the Editor restored the weights.

Two explicit caches make sweeps cheap inside one worker process: ``MODEL_CACHE`` (the one
module-level cache: the loaded model, keyed by the model config, checked against its load-time
fingerprint before each job) and the ``PreCache`` it owns (pre-edit measurements keyed by weights
digest, data identity, case id and probe config). No Hydra here: ``harness.cli`` passes a ``Config``.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from harness.algorithms import get_algorithm
from harness.config import Config, validate
from harness.editor import Editor, RestoreError
from harness.models import load_configured
from harness.probes import METRICS, Measurement, build_probes
from harness.results import CASES, SUMMARY, ResumeError, RowTable, read_json, write_json, write_summary
from harness.snapshot import model_digest
from harness.types import EditRequest

log = logging.getLogger(__name__)

CASE_COLUMNS = ["case_id", "point", "step", "n_edits", "status", "error", "pre_s", "edit_s", "probe_s",
                "restore_s", "verify_s", "snapshot_bytes", "n_targets", "delta_norm", "outlier", "probe_versions"]
CASE_KEY = ["case_id", "point", "step"]


class PreCache:
    """Pre-edit measurements, one request each, keyed by (weights digest, data id, case id, probe id)."""

    def __init__(self) -> None:
        self._items: dict[tuple[str, str, str, str], tuple[EditRequest, Measurement]] = {}

    def get(self, key: tuple[str, str, str, str], request: EditRequest) -> Measurement | None:
        """The cached measurement, or None (also when the case id now names a different request)."""
        hit = self._items.get(key)
        return hit[1] if hit is not None and hit[0] == request else None

    def put(self, key: tuple[str, str, str, str], request: EditRequest, measurement: Measurement) -> None:
        self._items[key] = (request, measurement)

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class LoadedModel:
    """A model as loaded, its load-time weights digest, and the pre-edit measurements made on it."""

    model: torch.nn.Module
    tok: Any
    digest: str
    pre: PreCache = field(default_factory=PreCache)


class ModelCache:
    """Holds the last loaded model of this process (one at a time), for reuse by the next job."""

    def __init__(self) -> None:
        self._key: str | None = None
        self._entry: LoadedModel | None = None

    @staticmethod
    def key(cfg: Config) -> str:
        m = cfg.model
        return json.dumps([m.source, m.cache_dir, m.trust_remote_code, m.spec, m.tiny, m.weights, m.weights_strict,
                           cfg.device, cfg.dtype], sort_keys=True, default=str)

    def get(self, cfg: Config) -> LoadedModel:
        """The model of ``cfg``: reused when cached and still bit-identical to its load, else loaded."""
        key = self.key(cfg)
        if self._entry is not None and self._key == key:
            if model_digest(self._entry.model) == self._entry.digest:
                log.info("reusing the loaded model %s", cfg.model.name or cfg.model.source)
                return self._entry
            log.warning("the cached model no longer matches its load-time fingerprint; reloading")
        self.clear()
        t0 = time.perf_counter()
        model, tok = load_configured(cfg.model, device=cfg.device, dtype=cfg.dtype)
        self._entry, self._key = LoadedModel(model, tok, model_digest(model)), key
        log.info("loaded %s in %.1fs", cfg.model.name or cfg.model.source, time.perf_counter() - t0)
        return self._entry

    @property
    def current(self) -> LoadedModel | None:
        """The model held now, if any."""
        return self._entry

    def clear(self) -> None:
        """Drop the held model."""
        self._entry = self._key = None
        gc.collect()


MODEL_CACHE = ModelCache()


@dataclass
class RunResult:
    """What a run left behind: where, how many cases, and the summary rows."""

    out_dir: Path
    n_cases: int
    n_errors: int
    n_written: int
    summary: list[dict[str, Any]]


def chunks(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive slices of ``size`` (the last one shorter)."""
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


NOT_IDENTITY = {"threads"}


def parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """``["algorithm=rome", "+x.y=1"]`` -> ``{"override.algorithm": "rome", "override.x.y": "1"}``."""
    out = {}
    for ov in overrides:
        key, _, value = ov.partition("=")
        key = key.lstrip("+~")
        if key in NOT_IDENTITY or key.startswith("hydra"):
            continue  # how a run is executed, not what it computes: no column (a resume may change it)
        out["override." + key] = value
    return out


def case_metrics(probes) -> list[str]:
    """Metric names with a per-case value (aggregates contribute their inputs), in ``METRICS`` order."""
    names: set[str] = set()
    for info in probes.infos():
        names |= {info.name} if info.aggregate == "mean" else set(info.inputs)
    return [m for m in METRICS if m in names]


class Run:
    """One run: its config, output directory, model, Editor and tables. ``execute`` does the work."""

    def __init__(self, cfg: Config, out_dir: str | Path, overrides: Sequence[str] = (),
                 cache: ModelCache | None = None, progress: bool = True) -> None:
        self.cfg, self.out, self.progress = cfg, Path(out_dir), progress
        self.out.mkdir(parents=True, exist_ok=True)
        hparams = validate(cfg)  # before loading anything: unknown algorithm / bad hparams fail now
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self._check_config(overrides)
        self.loaded = (cache or MODEL_CACHE).get(cfg)
        self.model, self.tok = self.loaded.model, self.loaded.tok
        self.algorithm = get_algorithm(cfg.algorithm.name)(hparams)
        p = cfg.probes
        self.probes = build_probes(metrics=p.metrics, batch_size=p.batch_size, fluency=p.fluency,
                                   fluency_max_new_tokens=p.fluency_max_new_tokens, seed=p.seed,
                                   fluency_max_prompts=p.fluency_max_prompts)
        self.metrics = case_metrics(self.probes)
        names = self.metrics + [i.name for i in self.probes.infos() if i.name not in self.metrics]
        self.versions = {m: METRICS[m].version for m in names}
        self.ident = {"run_id": cfg.run_id or f"{self.out.parent.name}/{self.out.name}",
                      "model": cfg.model.name or cfg.model.source, "algorithm": cfg.algorithm.name,
                      **parse_overrides(overrides)}
        columns = [*self.ident, *CASE_COLUMNS, *(f"pre_{m}" for m in self.metrics),
                   *(f"post_{m}" for m in self.metrics), "report"]
        self.table = RowTable(self.out / CASES, columns, CASE_KEY)
        self.requests = self._load_requests()
        self.by_id = {r.case_id: r for r in self.requests}
        if len(self.by_id) != len(self.requests):
            raise ValueError("the data has duplicate case ids; rows could not be told apart")
        self.editor = Editor(self.model, self.tok, self.algorithm, self.probes,
                             keep_original_weight=cfg.keep_original_weight,
                             offload_snapshot=cfg.offload_snapshot, verify_untouched=cfg.verify_untouched)
        self.pre: dict[str, Measurement] = {}
        self.pre_s: dict[str, float] = {}
        self.n_written = 0

    # -- setup -----------------------------------------------------------------------------------
    def _check_config(self, overrides: Sequence[str]) -> None:
        """Record the config in ``run.json``; refuse to resume a run of a different config."""
        conf = dataclasses.asdict(self.cfg)
        conf["data"].pop("limit")  # extending a run with a larger limit is allowed
        conf.pop("threads")  # how fast, not what: a run may resume with another thread count
        conf = json.loads(json.dumps(conf, sort_keys=True, default=str))
        old = read_json(self.out / "run.json")
        if old is not None and old["config"] != conf:
            raise ResumeError(f"{self.out} holds a run of a different configuration (see its run.json); "
                              "rerun with the same settings or choose a fresh hydra.run.dir")
        if old is None:
            write_json(self.out / "run.json", {"config": conf, "overrides": list(overrides)})

    def _load_requests(self) -> list[EditRequest]:
        from harness.data import load_requests

        d = self.cfg.data
        loaded = load_requests(d.kind, d.path, limit=d.limit, offset=d.offset, skip_invalid=d.skip_invalid)
        if loaded.skipped:
            log.warning("skipped %d invalid record(s) of %s", len(loaded.skipped), d.path or d.kind)
        log.info("%d request(s) from %s", len(loaded.requests), d.path or f"the shipped {d.kind} sample")
        return list(loaded.requests)

    def _pre_key(self, request: EditRequest) -> tuple[str, str, str, str]:
        d = self.cfg.data
        data_id = f"{d.kind}:{Path(d.path).resolve() if d.path else 'sample'}:{d.skip_invalid}"
        probe_id = json.dumps(dataclasses.asdict(self.cfg.probes), sort_keys=True)
        return (self.loaded.digest, data_id, request.case_id, probe_id)

    # -- pre-edit measurements -------------------------------------------------------------------
    def ensure_pre(self, requests: Sequence[EditRequest], chunk: int = 8) -> None:
        """Measure (on the model as it stands, which must be the base) the pre of requests lacking one."""
        todo = []
        for r in requests:
            if r.case_id in self.pre:
                continue
            hit = self.loaded.pre.get(self._pre_key(r), r)
            if hit is not None:
                self.pre[r.case_id], self.pre_s[r.case_id] = hit, 0.0
            else:
                todo.append(r)
        for part in chunks(todo, chunk):
            t0 = time.perf_counter()
            m = self.editor.evaluate(part)
            dt = (time.perf_counter() - t0) / len(part)
            for i, r in enumerate(part):
                one = m.subset([i])
                self.pre[r.case_id], self.pre_s[r.case_id] = one, dt
                self.loaded.pre.put(self._pre_key(r), r, one)

    def pre_of(self, batch: Sequence[EditRequest]) -> Measurement:
        return Measurement.concat([self.pre[r.case_id] for r in batch])

    # -- rows ------------------------------------------------------------------------------------
    def row(self, r: EditRequest, point: str, step: int, n_edits: int, *, pre: dict | None = None,
            post: dict | None = None, error: str | None = None, **cells: Any) -> dict[str, Any]:
        """A ``cases.csv`` row (identity, case, status, metric cells); ``cells`` fill the rest."""
        row: dict[str, Any] = {**self.ident, "case_id": r.case_id, "point": point, "step": step, "n_edits": n_edits,
                               "status": "error" if error else "ok", "error": error,
                               "probe_versions": " ".join(f"{m}={v}" for m, v in self.versions.items()), **cells}
        for prefix, values in (("pre", pre), ("post", post)):
            for m in self.metrics:
                row[f"{prefix}_{m}"] = (values or {}).get(m)
        return row

    def write(self, row: dict[str, Any]) -> None:
        self.n_written += self.table.append(row)

    def seed(self, step: int) -> None:
        """Seed torch for edit call ``step`` (the same on a resumed run)."""
        torch.manual_seed(self.cfg.seed * 1_000_003 + step)

    def outcome_cells(self, out, n: int) -> dict[str, Any]:
        """Per-request (amortized) timings and what the outcome says about the edit."""
        t = out.timings
        info = {"losses": out.report.losses, "info": out.report.info}
        return {"edit_s": t.get("edit", 0.0) / n, "probe_s": t.get("probe", 0.0) / n,
                "restore_s": t.get("restore", 0.0) / n, "verify_s": t.get("verify", 0.0) / n,
                "snapshot_bytes": out.snapshot_bytes, "n_targets": len(out.targets),
                "report": json.dumps(info, sort_keys=True, default=str) if any(info.values()) else None}

    @staticmethod
    def error_text(exc: BaseException) -> str:
        return f"{type(exc).__name__}: {exc}"[:2000]

    # -- the loops -------------------------------------------------------------------------------
    def execute(self) -> RunResult:
        """Run every case not yet recorded, then write the summary and (optionally) the model."""
        if self.table.rows:
            log.info("resuming: %d row(s) already in %s", len(self.table.rows), self.table.path)
        if self.cfg.keep_original_weight:
            self.single()
            self.save_model()
        else:
            from harness.sequential import run_sequential

            run_sequential(self)
        return self.finish()

    def single(self) -> None:
        """Single-edit evaluation: each batch is edited, probed and restored."""
        pending = [r for r in self.requests if not self.table.has({"case_id": r.case_id, "point": "edit", "step": 1})]
        if len(pending) < len(self.requests):
            log.info("%d case(s) already recorded, %d to run", len(self.requests) - len(pending), len(pending))
        bs = self.cfg.batch_size
        for i, batch in enumerate(tqdm(list(chunks(pending, bs)), desc="edits", disable=not self.progress)):
            self.ensure_pre(pending[i * bs:(i + 1) * bs + max(8 - bs, 0)])
            self.seed(0)
            n = len(batch)
            try:
                out = self.editor.edit(batch, pre=self.pre_of(batch))
            except (KeyboardInterrupt, RestoreError):
                raise
            except Exception as exc:  # recorded as an error row; the Editor has restored the model
                log.error("case(s) %s failed: %s", [r.case_id for r in batch], self.error_text(exc))
                for r in batch:
                    self.write(self.row(r, "edit", 1, n, pre=self.pre[r.case_id].metrics[0],
                                        error=self.error_text(exc), pre_s=self.pre_s[r.case_id]))
                continue
            norms = out.report.delta_norms
            norm = math.sqrt(sum(v * v for v in norms.values())) if norms or not out.targets else None
            for j, r in enumerate(batch):
                self.write(self.row(r, "edit", 1, n, pre=out.pre.metrics[j], post=out.post.metrics[j],
                                    pre_s=self.pre_s[r.case_id], delta_norm=norm, **self.outcome_cells(out, n)))

    def save_model(self) -> None:
        """With ``save_model``: the model as it stands (safetensors) + tokenizer, and the accumulated delta."""
        if not self.cfg.save_model:
            return
        d = self.out / "model"
        self.model.save_pretrained(d, safe_serialization=True)
        self.tok.save_pretrained(d)
        names = self.editor.save_delta(self.out / "delta.safetensors")
        log.info("saved the model to %s and the delta (%d tensors) beside it", d, len(names))

    def finish(self) -> RunResult:
        rows = self.table.rows
        summary = write_summary(self.out / SUMMARY, rows, self.metrics, self.ident, self.versions)
        edits = [r for r in rows if r["point"] == "edit"]
        errors = sum(r["status"] != "ok" for r in edits)
        return RunResult(self.out, len(edits), errors, self.n_written, summary)


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
        ResumeError: ``out_dir`` holds a run of another configuration.
        RestoreError: the model could not be put back; the run stops.
        KeyboardInterrupt: after the Editor restored the model and every finished row is on disk.
    """
    return Run(cfg, out_dir, overrides, cache, progress).execute()
