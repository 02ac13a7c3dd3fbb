"""The batched probe suite: CounterFact (Meng et al. 2022) and EasyEdit (Wang et al. 2024) metrics
from the same forward passes, plus optional generation fluency.

One ``measure`` call collects the (prompt, target) pairs that every wanted metric of every request
needs, scores them in a single ``score_pairs`` call (duplicates, e.g. the rewrite pair that both
``efficacy_score`` and ``rewrite_acc`` use, are scored once), and hands the results to each metric
family. Fluency, when asked for, adds one batched generation.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from harness.probes import counterfact, easyedit, fluency
from harness.probes.base import Measurement, MetricInfo
from harness.probes.scorer import score_pairs
from harness.types import EditRequest

log = logging.getLogger(__name__)

METRICS: dict[str, MetricInfo] = {**counterfact.INFOS, **easyedit.INFOS, **fluency.INFOS}
DEFAULT_METRICS = tuple(name for name in METRICS if name != "fluency")


class BatchedProbes:
    """A ``ProbeSuite`` computing the chosen metrics with batched scoring.

    Args:
        metrics: metric names (keys of ``METRICS``).
        batch_size: rows per forward pass of the scorer, prompts per generation batch.
        fluency_max_new_tokens: tokens generated per fluency prompt.
        fluency_max_prompts: generation prompts used per request (None: all).
        seed: sampling seed of the fluency generations (the same for every call, so pre and post
            sample alike).

    Raises:
        ValueError: an unknown metric name, or ``batch_size < 1``.
    """

    def __init__(self, metrics: Sequence[str], batch_size: int = 32, fluency_max_new_tokens: int = 32,
                 fluency_max_prompts: int | None = 2, seed: int = 0) -> None:
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.metrics = tuple(dict.fromkeys(metrics))
        self.batch_size = batch_size
        self.fluency_max_new_tokens = fluency_max_new_tokens
        self.fluency_max_prompts = fluency_max_prompts
        self.seed = seed
        wanted = set(self.metrics)
        for name in self.metrics:  # an aggregate needs its inputs per case
            wanted |= set(METRICS[name].inputs)
        self._rows = {m for m in wanted if METRICS[m].aggregate == "mean"}

    def infos(self) -> list[MetricInfo]:
        """The chosen metrics' descriptions, in the order they were asked for."""
        return [METRICS[m] for m in self.metrics]

    def measure(self, model: nn.Module, tok, requests: Sequence[EditRequest],
                reference: Measurement | None = None) -> Measurement:
        """Score ``requests`` on ``model``.

        Args:
            model, tok: the causal LM and its tokenizer.
            requests: the requests to evaluate.
            reference: an earlier measurement of the same requests (the pre-edit one); agreement
                metrics (``locality_acc``) compare with its extras. None compares with itself.

        Returns:
            A ``Measurement``: per request the per-case metric values (``score`` is an aggregate and
            absent from rows; see ``summarize``), and extras with ``case_id`` and what a later
            ``measure(..., reference=this)`` needs.

        Raises:
            ValueError: a reference of a different length or for different cases.
        """
        requests = list(requests)
        if reference is not None and len(reference.extras) != len(requests):
            raise ValueError(f"reference has {len(reference.extras)} extras for {len(requests)} requests")
        wanted = self._rows
        needed = [counterfact.pairs(r, wanted) + easyedit.pairs(r, wanted) for r in requests]
        pairs = [p for ps in needed for p in ps]
        scores = dict(zip(pairs, score_pairs(model, tok, pairs, batch_size=self.batch_size)))
        gen = (fluency.measure(model, tok, requests, self.fluency_max_new_tokens, self.batch_size, self.seed,
                               self.fluency_max_prompts) if "fluency" in wanted else None)
        rows: list[dict[str, float]] = []
        extras: list[dict[str, Any]] = []
        for i, r in enumerate(requests):
            ref = reference.extras[i] if reference is not None else None
            if ref is not None and ref.get("case_id", r.case_id) != r.case_id:
                raise ValueError(f"reference {i} is case {ref.get('case_id')!r}, request is {r.case_id!r}")
            row = counterfact.compute(r, scores, wanted)
            acc, extra = easyedit.compute(r, scores, wanted, ref)
            row.update(acc)
            if gen is not None:
                row["fluency"] = gen[i]
            merges = sum(scores[p].boundary_merge for p in set(needed[i]))
            # Non-finite logits would read as scores of 0.0 (NaN comparisons are false): the case's
            # metrics become NaN and the case is flagged, so tables show it instead of a failed edit.
            nonfinite = not all(math.isfinite(x) for p in needed[i] for x in scores[p].logprobs)
            rows.append({m: math.nan if nonfinite else row.get(m, math.nan) for m in METRICS if m in wanted})
            extras.append({"case_id": r.case_id, "boundary_merges": merges, "nonfinite": nonfinite, **extra})
        return Measurement(rows, extras)


def build_probes(metrics: list[str] | None = None, batch_size: int = 32, fluency: bool = False,
                 fluency_max_new_tokens: int = 32, seed: int = 0, fluency_max_prompts: int | None = 2
                 ) -> BatchedProbes:
    """The probe suite for ``metrics``.

    Args:
        metrics: names from ``METRICS``; None means all but ``fluency``.
        batch_size: rows per scorer forward pass (and prompts per generation batch).
        fluency: add the ``fluency`` metric (generation; off by default because it is the slow one).
        fluency_max_new_tokens: tokens generated per prompt for ``fluency``.
        seed: the generation seed.
        fluency_max_prompts: generation prompts per request (None: all of them).

    Returns:
        A ``BatchedProbes`` (``measure`` and ``infos``).

    Raises:
        ValueError: an unknown metric name (the message lists the known ones).
    """
    names = list(DEFAULT_METRICS if metrics is None else metrics)
    if fluency and "fluency" not in names:
        names.append("fluency")
    return BatchedProbes(names, batch_size, fluency_max_new_tokens, fluency_max_prompts, seed)
