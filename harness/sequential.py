"""Sequential editing runs: edits accumulate in batches, with retention points and checkpoints.

The protocol of the sequential-editing ablations (MEMIT, Meng et al. 2023; AlphaEdit, Fang et al.
2025): requests are applied in fixed batches of ``batch_size`` without restoring. After each batch
the batch itself is probed (``point=edit`` rows). At every ``eval.retention_at`` edit count and at the
end, every edit made so far is re-evaluated against its own pre-edit measurement (``point=retention``
rows), ``retention.csv``/``retention.png`` are updated, and the Editor is checkpointed.

Each step's weight change ``||W_after - W_before||`` (over the step's targets) is measured from the
Editor's snapshot and flagged as an outlier when it exceeds ``eval.outlier_factor`` times the
running median of the earlier steps' norms (the "disabling edits" of Gupta et al. 2024).

Resume: the checkpoint directory is replaced atomically (written as ``checkpoint.tmp``, then swapped
in; the previous one stays as ``checkpoint.old``), holds the Editor's checkpoint plus ``runner.json``
(batches done, edited case ids, step norms), and is loaded onto the freshly loaded base model after
the pre-edit measurements were taken and the algorithm was prepared on it (so templates, key
statistics and projectors come from the base model, exactly as in an uninterrupted run). A corrupt
latest checkpoint falls back to the previous one.
Steps between the checkpoint and a kill are redone; their rows are already on disk and are not
written twice (the edits are deterministic: each call reseeds torch with its step).
"""
from __future__ import annotations

import logging
import shutil
import statistics
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from harness.cases import CaseLog
from harness.editor import RestoreError
from harness.memory import PeakMemory, model_devices
from harness.premeasure import PreMeasurements, chunks
from harness.probes import Measurement, summarize
from harness.plots import plot_retention
from harness.results import RETENTION, ResumeError, RowTable, read_json, write_json
from harness.runsetup import RunSetup, seed_step
from harness.snapshot import SnapshotError

log = logging.getLogger(__name__)


@torch.no_grad()
def _norm(params: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    """sqrt(sum ||params[n] - base[n]||^2) over the names of ``base``, in float32."""
    total = 0.0
    for name, b in base.items():
        p = params[name]
        total += float(torch.linalg.vector_norm(p.float() - b.to(p.device).float()) ** 2)
    return total ** 0.5


class Sequential:
    """One sequential run: its batches, position, retention table and checkpoints.

    The peer of ``harness.single.run_single``; both use the run's ``RunSetup``, ``CaseLog`` and
    ``PreMeasurements``.
    """

    def __init__(self, setup: RunSetup, cases: CaseLog, pre: PreMeasurements, progress: bool = True) -> None:
        self.setup, self.cases, self.pre, self.progress = setup, cases, pre, progress
        self.cfg, self.editor = setup.cfg, setup.editor
        self.by_id = {r.case_id: r for r in setup.requests}
        self.ckpt = setup.out / "checkpoint"
        aggregates = [i.name for i in setup.probes.infos() if i.name not in cases.metrics]
        self.ret_metrics = cases.metrics + aggregates
        columns = ["step", "n_edits", *self.ret_metrics, "step_norm", "max_step_norm", "total_norm", "outlier",
                   "n_outliers"]
        self.ret = RowTable(setup.out / RETENTION, columns, ["step"])
        self.batches = list(chunks(setup.requests, self.cfg.batch_size))
        self.position = 0  # batches done
        self.edited: list[str] = []  # case ids successfully edited, in order
        self.steps: list[tuple[int, float, bool]] = []  # (step, norm, outlier) of successful steps

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Write ``checkpoint/`` atomically; the one before it stays as ``checkpoint.old`` (fallback)."""
        tmp, old = self.ckpt.with_name("checkpoint.tmp"), self.ckpt.with_name("checkpoint.old")
        shutil.rmtree(tmp, ignore_errors=True)
        self.editor.save_checkpoint(tmp)
        write_json(tmp / "runner.json", {"position": self.position, "n_edits": self.editor.n_edits,
                                         "edited": self.edited, "steps": self.steps,
                                         "batches": [[r.case_id for r in b] for b in self.batches[:self.position]]})
        if self.ckpt.exists():
            shutil.rmtree(old, ignore_errors=True)
            self.ckpt.rename(old)
        tmp.rename(self.ckpt)

    def load_checkpoint(self) -> None:
        """Put the last good checkpoint (if any) onto the base model and restore the loop's state.

        The algorithm is prepared on the base model first (``Editor.load_checkpoint``). A corrupt
        latest checkpoint falls back to the previous one (the steps after it are redone, their rows
        are already on disk); when none can be read the run is refused.

        Raises:
            ResumeError: every checkpoint present is unreadable, or was made with other batches.
        """
        found = [d for d in (self.ckpt, self.ckpt.with_name("checkpoint.old")) if d.exists()]
        problems = []
        for src in found:
            try:
                state = read_json(src / "runner.json")
                if state is None:
                    raise FileNotFoundError(f"{src / 'runner.json'} is missing")
                done = [[r.case_id for r in b] for b in self.batches[:state["position"]]]
                if done != state["batches"]:
                    raise ResumeError(f"{src}: the checkpoint was made with other batches of requests")
                self.editor.load_checkpoint(src)
            except ResumeError:
                raise
            except (OSError, ValueError, KeyError, TypeError, SnapshotError) as exc:
                problems.append(f"{src}: {exc}")
                log.warning("cannot resume from %s (%s)%s", src, exc,
                            "; trying the previous checkpoint" if src != found[-1] else "")
                continue
            if self.editor.n_edits != state["n_edits"]:
                raise ResumeError(
                    f"{src}: the editor holds {self.editor.n_edits} edits, runner.json says {state['n_edits']}")
            self.position, self.edited = state["position"], list(state["edited"])
            self.steps = [(int(s), float(n), bool(o)) for s, n, o in state["steps"]]
            log.info("resumed from %s: %d batch(es), %d edit(s) done", src, self.position, len(self.edited))
            return
        if problems:
            raise ResumeError("no usable checkpoint: " + "; ".join(problems) +
                              "; move the run directory aside to start again")

    # -- the loop --------------------------------------------------------------------------------
    def points_crossed(self, before: int, after: int) -> bool:
        return any(before < p <= after for p in self.cfg.eval.retention_at)

    def outlier(self, norm: float) -> bool:
        earlier = [n for _, n, _ in self.steps]
        if not earlier:
            return False
        med = statistics.median(earlier)
        return med > 0 and norm > self.cfg.eval.outlier_factor * med

    def step(self, index: int) -> None:
        """Apply batch ``index`` (step ``index + 1``) and write its rows."""
        editor, cases, step = self.editor, self.cases, index + 1
        batch, failed = self.pre.split(self.batches[index])
        for r in failed:
            cases.write(cases.row(r, "edit", step, editor.n_edits, error=self.pre.failed[r.case_id]))
        if not batch:
            return
        seed_step(self.cfg, step)
        try:
            with PeakMemory(model_devices(self.setup.model)) as mem:
                out = editor.edit(batch, pre=self.pre.of(batch))
        except (KeyboardInterrupt, RestoreError):
            raise
        except Exception as exc:  # the Editor rolled this step back; record and go on
            cases.error_rows(batch, step, editor.n_edits, exc, self.pre)
            return
        with editor.detached():  # parameter names as the base's, whatever wrappers the memory holds
            norm = _norm(dict(self.setup.model.named_parameters()), editor.weights_copy.tensors)
        flag = self.outlier(norm)
        if flag:
            log.warning("step %d: weight change %.3g is an outlier (> %.0fx the running median)", step, norm,
                        self.cfg.eval.outlier_factor)
        self.steps.append((step, norm, flag))
        self.edited += [r.case_id for r in batch]
        cases.outcome_rows(batch, out, step, editor.n_edits, self.pre, delta_norm=norm, outlier=flag,
                           **mem.peak.cells())

    def retention(self, step: int) -> None:
        """Re-evaluate every edit so far against its pre measurement; rows, retention.csv, plot."""
        if self.ret.has({"step": step}):
            return  # written before an interruption; the redone edits are bit-identical
        requests = [self.by_id[c] for c in self.edited]
        t0 = time.perf_counter()
        with PeakMemory(model_devices(self.setup.model)) as mem:
            post = Measurement.concat([self.editor.evaluate(part, reference=self.pre.of(part))
                                       for part in chunks(requests, 16)])
        dt = round(time.perf_counter() - t0, 4)
        n_edits = self.editor.n_edits
        for r, values, extra in zip(requests, post.metrics, post.extras):
            self.cases.write(self.cases.row(r, "retention", step, n_edits, pre=self.pre.metrics_of(r), post=values,
                                            nonfinite=bool(extra.get("nonfinite")), time_probe_s=dt,
                                            batch_size=len(requests), **mem.peak.cells()))
        last = max((int(x["step"]) for x in self.ret.rows), default=0)
        recent = [(n, o) for s, n, o in self.steps if last < s <= step]
        means = {m: st["mean"] for m, st in summarize(post.metrics).items() if m in self.ret_metrics}
        with self.editor.detached():
            total = _norm(dict(self.setup.model.named_parameters()), self.editor.originals.tensors)
        row: dict[str, Any] = {"step": step, "n_edits": n_edits, **means,
                               "step_norm": self.steps[-1][1] if self.steps and self.steps[-1][0] == step else None,
                               "max_step_norm": max((n for n, _ in recent), default=None),
                               "total_norm": total,
                               "outlier": any(o for _, o in recent), "n_outliers": sum(o for _, o in recent)}
        self.ret.append(row)
        plot_retention(self.setup.out / "retention.png", self.ret.rows, self.steps, self.ret_metrics,
                       title=retention_title(self.setup))
        log.info("retention after %d edit(s): %s", n_edits,
                 ", ".join(f"{m}={v:.3f}" for m, v in means.items() if isinstance(v, float)))

    def execute(self) -> None:
        """Run the remaining batches (after the last checkpoint), then restore the base model."""
        self.pre.ensure(self.setup.requests)  # on the base model, before any checkpoint is loaded
        self.editor.prepare()  # likewise (setup_run has done it already; free then)
        self.load_checkpoint()
        try:
            bar = tqdm(range(self.position, len(self.batches)), desc="sequential edits", initial=self.position,
                       total=len(self.batches), disable=not self.progress)
            for index in bar:
                before = self.editor.n_edits
                self.step(index)
                self.position = index + 1
                last = index == len(self.batches) - 1
                if last or self.points_crossed(before, self.editor.n_edits):
                    self.retention(index + 1)
                    self.save_checkpoint()
            if self.batches and not self.ret.has({"step": len(self.batches)}):
                self.retention(len(self.batches))  # a complete run resumed after its last checkpoint
            self.setup.save_model()
        finally:
            self.editor.restore()  # the cached model goes back to base for the next job


def retention_title(setup: RunSetup) -> str:
    """The run, as the retention plot names it: model, algorithm, batch size."""
    cfg = setup.cfg
    return f"{cfg.model.name or cfg.model.source} · {cfg.algorithm.name} · batches of {cfg.batch_size}"
