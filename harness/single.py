"""Single-edit evaluation: each batch of requests is edited, probed and restored (``keep_original_weight=True``).

The peer of ``harness.sequential``: both take a run's ``RunSetup``, ``CaseLog`` and
``PreMeasurements``. Each edit call starts from the base model (the Editor restores and verifies
after every call) and is seeded the same way, so a resumed run gives the rows an uninterrupted one
would. Cases already in ``cases.csv`` are skipped; a case that raises becomes an error row.
"""
from __future__ import annotations

import logging

from tqdm.auto import tqdm

from harness.cases import CaseLog
from harness.editor import RestoreError
from harness.memory import PeakMemory, model_devices
from harness.premeasure import PreMeasurements, chunks
from harness.runsetup import RunSetup, seed_step

log = logging.getLogger(__name__)


def run_single(setup: RunSetup, cases: CaseLog, pre: PreMeasurements, progress: bool = True) -> None:
    """Edit, probe and restore every request not yet recorded, ``batch_size`` requests per call."""
    pending = [r for r in setup.requests if not cases.has(r.case_id, "edit", 1)]
    if len(pending) < len(setup.requests):
        log.info("%d case(s) already recorded, %d to run", len(setup.requests) - len(pending), len(pending))
    bs = setup.cfg.batch_size
    devices = model_devices(setup.model)
    for i, batch in enumerate(tqdm(list(chunks(pending, bs)), desc="edits", disable=not progress)):
        pre.ensure(pending[i * bs:(i + 1) * bs + max(pre.chunk - bs, 0)])
        batch, failed = pre.split(batch)
        for r in failed:
            cases.write(cases.row(r, "edit", 1, 0, error=pre.failed[r.case_id]))
        if not batch:
            continue
        seed_step(setup.cfg, 0)
        try:
            with PeakMemory(devices) as mem:
                out = setup.editor.edit(batch, pre=pre.of(batch))
        except (KeyboardInterrupt, RestoreError):
            raise
        except Exception as exc:  # recorded as error rows; the Editor has restored the model
            cases.error_rows(batch, 1, len(batch), exc, pre)
            continue
        cases.outcome_rows(batch, out, 1, len(batch), pre, **mem.peak.cells())
