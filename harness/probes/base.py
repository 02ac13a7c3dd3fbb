"""The probe contract: what a metric declares, what a probe family implements, what a suite returns.

A *probe family* is a group of metrics computed together (``counterfact``, ``easyedit``,
``fluency``, or a plugin's). It declares its metrics (``MetricInfo``: protocol, version, unit,
direction, aggregation) and implements up to three steps, which a suite runs for a batch of requests:

1. ``pairs(request)``: the (prompt, target) pairs it needs teacher-forced. The suite gathers the
   pairs of every family and scores them in one batched ``score_pairs`` call, so a pair two
   families need (the rewrite pair of ``efficacy_score`` and ``rewrite_acc``) is scored once.
2. ``generate(model, tok, requests)``: its own batched work with the model, when it needs any
   (fluency samples text); one result per request.
3. ``compute(request, scores, generated, reference)``: the request's per-case metric values (and
   extras that a later comparison needs), from the shared scores, its own result and the request's
   extras of a reference measurement (the pre-edit one).

A suite measures a batch of requests:

    pre  = suite.measure(model, tok, requests)                 # unedited model
    post = suite.measure(model, tok, requests, reference=pre)  # edited model; agreement metrics use pre

``Measurement.metrics[i]`` holds request i's metric values by metric name (the names users see:
``efficacy_score``, ``rewrite_acc``, ...). ``Measurement.extras[i]`` holds what agreement metrics
need from the reference (e.g. the pre-edit argmax tokens for ``locality_acc``).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, ClassVar, Protocol, Sequence

from torch import nn

from harness.probes.scorer import Pair, PairScore
from harness.types import EditRequest

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
AGGREGATES = ("mean", "hmean")


@dataclass(frozen=True)
class MetricInfo:
    """Description of a metric, reported next to its values.

    Attributes:
        name: the column name users see (lowercase snake case; unique across families).
        protocol: the evaluation protocol it follows, e.g. ``counterfact`` (probability protocol of
            the ROME paper), ``easyedit`` (teacher-forced token accuracy), ``generation``.
        version: bumped whenever the computation changes; reported in every row and summary.
        unit: what the values count, e.g. ``fraction`` (in [0, 1]), ``probability`` (differences of
            probabilities), ``bits``.
        higher_is_better: direction of improvement (tables show it as ↑ or ↓).
        aggregate: how a summary combines cases: ``mean`` (mean of the per-case values) or
            ``hmean`` (harmonic mean of the means of ``inputs``; no per-case value exists).
        inputs: the per-case metrics of the same family an ``hmean`` aggregate is computed from.
        bounds: (low, high) every value lies in, or None when unbounded (plots give unbounded
            metrics their own axis; the probe contract test checks values against the bounds).
        headline: shown in compact comparisons (``harness.collect``); False for detail metrics.

    Raises:
        ValueError: a malformed field (the message names the metric and the field).
    """

    name: str
    protocol: str
    version: int
    _: KW_ONLY
    unit: str
    higher_is_better: bool = True
    aggregate: str = "mean"
    inputs: tuple[str, ...] = ()
    bounds: tuple[float, float] | None = None
    headline: bool = True

    def __post_init__(self) -> None:
        where = f"metric {self.name!r}"
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            raise ValueError(f"{where}: name must be lowercase snake case ([a-z][a-z0-9_]*)")
        if not isinstance(self.protocol, str) or not self.protocol:
            raise ValueError(f"{where}: protocol must be a non-empty string, got {self.protocol!r}")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise ValueError(f"{where}: version must be an int >= 1, got {self.version!r}")
        if not isinstance(self.unit, str) or not self.unit:
            raise ValueError(f"{where}: unit must be a non-empty string, got {self.unit!r}")
        if not isinstance(self.higher_is_better, bool):
            raise ValueError(f"{where}: higher_is_better must be a bool, got {self.higher_is_better!r}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"{where}: aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        if (self.aggregate == "hmean") != bool(self.inputs):
            raise ValueError(f"{where}: an hmean aggregate needs inputs, a mean metric has none "
                             f"(aggregate={self.aggregate!r}, inputs={self.inputs!r})")
        if self.bounds is not None and not (len(self.bounds) == 2 and self.bounds[0] < self.bounds[1]):
            raise ValueError(f"{where}: bounds must be (low, high) with low < high, got {self.bounds!r}")
        object.__setattr__(self, "inputs", tuple(self.inputs))

    @property
    def direction(self) -> str:
        """``↑`` when higher is better, else ``↓``."""
        return "↑" if self.higher_is_better else "↓"

    @property
    def per_case(self) -> bool:
        """True when every case has a value (``mean``); aggregates exist only in summaries."""
        return self.aggregate == "mean"


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
    """Anything with ``measure`` and ``infos`` can serve as the Editor's probes. ``context`` (a prompt ->
    prompt transform) is passed only when the edit algorithm declares one."""

    def measure(self, model: Any, tok: Any, requests: Sequence[EditRequest],
                reference: Measurement | None = None, context: Any = None) -> Measurement: ...

    def infos(self) -> list[MetricInfo]: ...


@dataclass
class NoSettings:
    """For probe families without settings."""


def make_settings(cls: type, values: Any, where: str) -> Any:
    """An instance of the settings dataclass ``cls`` from None, an instance or a mapping.

    Raises:
        TypeError: an unknown key (named, with the known ones) or a value of another class.
    """
    if values is None:
        return cls()
    if isinstance(values, cls):
        return values
    if not isinstance(values, Mapping):
        raise TypeError(f"{where}: settings must be a mapping or {cls.__name__}, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
    return cls(**dict(values))


class ProbeFamily:
    """Base class of a probe family. Subclasses set ``METRICS`` (and ``Settings``), and implement
    ``compute`` plus ``pairs`` and/or ``generate``; ``@register_probe("name")`` makes them known.

    Class attributes:
        name: the registered name (set by ``register_probe``; equals its config name).
        METRICS: the metrics it declares, in the order tables show them.
        Settings: a dataclass of its settings (``NoSettings`` when it has none).
        default: measured when a config names no family (False for slow or plugin families).
        batch_invariant: a request's values do not depend on which other requests are measured with
            it. False for families that sample (one random stream per call).

    Args:
        metrics: the declared metrics to report (None: all of them). Aggregates bring their inputs
            into ``wanted``.
        settings: ``Settings`` instance or mapping (None: defaults).
        batch_size: prompts per batch of the family's own model work.
        seed: seed of any sampling (the same for every call, so pre and post sample alike).

    Raises:
        ValueError: a metric the family does not declare.
        TypeError: unknown settings.
    """

    name: ClassVar[str] = ""
    METRICS: ClassVar[tuple[MetricInfo, ...]] = ()
    Settings: ClassVar[type] = NoSettings
    default: ClassVar[bool] = False
    batch_invariant: ClassVar[bool] = True

    def __init__(self, metrics: Iterable[str] | None = None, settings: Any = None, *, batch_size: int = 32,
                 seed: int = 0) -> None:
        declared = self.declared()
        chosen = list(declared) if metrics is None else list(dict.fromkeys(metrics))
        unknown = [m for m in chosen if m not in declared]
        if unknown:
            raise ValueError(f"probe family {self.name!r} has no metric(s) {unknown}; it declares {list(declared)}")
        wanted: set[str] = set()
        for m in chosen:
            wanted |= {m} if declared[m].per_case else set(declared[m].inputs)
        self.chosen = tuple(chosen)
        self.wanted = frozenset(wanted)
        self.settings = make_settings(self.Settings, settings, where=f"probe family {self.name!r}")
        self.batch_size, self.seed = batch_size, seed

    @classmethod
    def declared(cls) -> dict[str, MetricInfo]:
        """The declared metrics by name, in declaration order."""
        return {m.name: m for m in cls.METRICS}

    def infos(self) -> list[MetricInfo]:
        """The chosen metrics' descriptions, in the order they were chosen."""
        declared = self.declared()
        return [declared[m] for m in self.chosen]

    def row_metrics(self) -> list[str]:
        """The per-case metrics this instance fills, in declaration order."""
        return [m.name for m in self.METRICS if m.name in self.wanted]

    # -- the three steps ---------------------------------------------------------------------
    def pairs(self, request: EditRequest) -> list[Pair]:
        """The (prompt, target) pairs the wanted metrics of ``request`` need scored. None by default."""
        return []

    def generate(self, model: nn.Module, tok: Any, requests: Sequence[EditRequest]) -> Sequence[Any] | None:
        """The family's own batched work with the model: one result per request, or None (default)."""
        return None

    def compute(self, request: EditRequest, scores: Mapping[Pair, PairScore], generated: Any,
                reference: Mapping[str, Any] | None) -> tuple[dict[str, float], dict[str, Any]]:
        """The wanted per-case metrics of ``request``, and extras for a later comparison.

        Args:
            request: the request.
            scores: the shared scorer's results, holding at least ``pairs(request)``.
            generated: this request's item of ``generate``'s result (None when it returned None).
            reference: the request's extras from the reference measurement, or None.

        Returns:
            (metrics, extras): metric values by name (exactly ``wanted``; NaN for missing inputs)
            and JSON-able extras (keys unique across families).
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(metrics={list(self.chosen)}, settings={self.settings})"
