"""Pre-edit measurements of a run's requests, each case isolated from the others.

Every case is measured once on the unedited model, in small batches, and kept for its rows (and,
through the model cache's ``PreCache``, for the next job of a sweep on the same model). A case that
cannot be measured (a text longer than the model's context or ``max_prompt_tokens``, or a probe that
raises on it) is recorded as failed with the reason; it becomes an error row and the run goes on.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from harness.editor import RestoreError
from harness.probes import Measurement
from harness.runsetup import RunSetup
from harness.types import EditRequest

log = logging.getLogger(__name__)


def chunks(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive slices of ``size`` (the last one shorter)."""
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


class PreMeasurements:
    """The pre-edit measurement of each case of a run (or why it failed), measured on demand.

    Args:
        setup: the run's ``RunSetup``; its model must be the base model whenever ``ensure`` measures.
        chunk: cases measured together.
    """

    def __init__(self, setup: RunSetup, chunk: int = 8) -> None:
        self.setup, self.chunk = setup, chunk
        self.measured: dict[str, Measurement] = {}
        self.seconds: dict[str, float] = {}  # case id -> seconds of the call that measured it (0: cached)
        self.batch: dict[str, int] = {}  # case id -> cases measured in that call
        self.failed: dict[str, str] = {}  # case id -> why its measurement failed
        d, probes = setup.cfg.data, setup.cfg.probes
        self._data_id = f"{d.kind}:{Path(d.path).resolve() if d.path else 'sample'}:{d.skip_invalid}"
        self._probe_id = json.dumps(dataclasses.asdict(probes), sort_keys=True)

    def _key(self, r: EditRequest) -> tuple[str, str, str, str]:
        return (self.setup.loaded.digest, self._data_id, r.case_id, self._probe_id)

    def ensure(self, requests: Sequence[EditRequest]) -> None:
        """Measure the requests that have neither a measurement nor a recorded failure."""
        cache = self.setup.loaded.pre
        todo = []
        for r in requests:
            if r.case_id in self.measured or r.case_id in self.failed:
                continue
            hit = cache.get(self._key(r), r)
            if hit is not None:
                self.measured[r.case_id], self.seconds[r.case_id], self.batch[r.case_id] = hit, 0.0, 0
                continue
            too_long = self.too_long(r)
            if too_long:
                self.failed[r.case_id] = too_long
            else:
                todo.append(r)
        for part in chunks(todo, self.chunk):
            try:
                self._measure(part)
            except (KeyboardInterrupt, RestoreError):
                raise
            except Exception:  # find the culprit(s): measure one by one
                for r in part:
                    try:
                        self._measure([r])
                    except (KeyboardInterrupt, RestoreError):
                        raise
                    except Exception as exc:
                        self.failed[r.case_id] = f"pre-edit measurement failed: {type(exc).__name__}: {exc}"[:2000]
                        log.error("case %s: %s", r.case_id, self.failed[r.case_id])

    def _measure(self, part: Sequence[EditRequest]) -> None:
        t0 = time.perf_counter()
        m = self.setup.editor.evaluate(part)
        dt = time.perf_counter() - t0
        for i, r in enumerate(part):
            one = m.subset([i])
            self.measured[r.case_id], self.seconds[r.case_id], self.batch[r.case_id] = one, dt, len(part)
            self.setup.loaded.pre.put(self._key(r), r, one)

    def too_long(self, r: EditRequest) -> str | None:
        """Why ``r`` cannot run on this model (a text over the token limit), or None."""
        limit = self.setup.max_tokens
        if not limit:
            return None
        for name, text in r.texts():
            n = len(self.setup.tok(text)["input_ids"])
            if n > limit:
                source = "max_prompt_tokens" if self.setup.cfg.max_prompt_tokens else "the model's context length"
                return f"case {r.case_id}: field {name!r} is {n} tokens, over the limit of {limit} ({source})"
        return None

    # -- reading ---------------------------------------------------------------------------------
    def of(self, batch: Sequence[EditRequest]) -> Measurement:
        """The measurements of ``batch``, in order (all must be measured)."""
        return Measurement.concat([self.measured[r.case_id] for r in batch])

    def metrics_of(self, r: EditRequest) -> dict[str, float] | None:
        m = self.measured.get(r.case_id)
        return m.metrics[0] if m is not None else None

    def cells_of(self, r: EditRequest) -> dict[str, Any]:
        """The row cells of ``r``'s measurement: its call's seconds and size."""
        if r.case_id not in self.seconds:
            return {}
        return {"time_pre_s": round(self.seconds[r.case_id], 4), "pre_batch_size": self.batch[r.case_id]}

    def split(self, batch: Sequence[EditRequest]) -> tuple[list[EditRequest], list[EditRequest]]:
        """(requests of ``batch`` that were measured, those whose measurement failed)."""
        good = [r for r in batch if r.case_id not in self.failed]
        return good, [r for r in batch if r.case_id in self.failed]
