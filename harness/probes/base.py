"""What every probe suite returns, and the description each metric carries.

A probe suite measures a model on a batch of requests:

    pre  = suite.measure(model, tok, requests)             # unedited model
    post = suite.measure(model, tok, requests, reference=pre)  # edited model; agreement metrics use pre

``Measurement.metrics[i]`` holds request i's metric values by metric name (the names users see:
``efficacy_score``, ``rewrite_acc``, ...). ``Measurement.extras[i]`` holds what agreement metrics
need from the reference (e.g. the pre-edit argmax tokens for ``locality_acc``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from harness.types import EditRequest


@dataclass(frozen=True)
class MetricInfo:
    """Description of a metric, reported next to its values.

    Attributes:
        name: the column name users see.
        protocol: ``counterfact`` (probability protocol of the ROME paper) or ``easyedit``
            (teacher-forced token accuracy) or ``generation``.
        version: bumped whenever the computation changes; reported in every row.
        higher_is_better: direction of improvement.
        aggregate: how a summary combines cases: ``mean`` (mean of the per-case values) or
            ``hmean`` (harmonic mean of the means of ``inputs``; no per-case value exists).
        inputs: the metrics an ``hmean`` aggregate is computed from.
    """

    name: str
    protocol: str
    version: int
    higher_is_better: bool = True
    aggregate: str = "mean"
    inputs: tuple[str, ...] = ()


@dataclass
class Measurement:
    """Per-request metric values of one evaluation, and what agreement metrics need later."""

    metrics: list[dict[str, float]]
    extras: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.metrics)

    def subset(self, indices: Sequence[int]) -> "Measurement":
        """The measurement restricted to some requests, in the given order."""
        extras = [self.extras[i] for i in indices] if self.extras else []
        return Measurement([self.metrics[i] for i in indices], extras)

    @staticmethod
    def concat(parts: Sequence["Measurement"]) -> "Measurement":
        """Join measurements of consecutive request batches."""
        metrics, extras = [], []
        for p in parts:
            metrics += p.metrics
            extras += p.extras if p.extras else [{} for _ in p.metrics]
        return Measurement(metrics, extras)


class ProbeSuite(Protocol):
    """Anything with ``measure`` and ``infos`` can serve as the Editor's probes."""

    def measure(self, model: Any, tok: Any, requests: Sequence[EditRequest],
                reference: Measurement | None = None) -> Measurement: ...

    def infos(self) -> list[MetricInfo]: ...
