"""The batched probe suite: registered probe families composed by name, measured together.

One ``measure`` call asks every family for the (prompt, target) pairs it needs, scores them all in a
single ``score_pairs`` call (duplicates, e.g. the rewrite pair that both ``efficacy_score`` and
``rewrite_acc`` use, are scored once), lets families that need their own model work (generation)
do it batched, and hands each family the results to compute its per-case metrics. The suite names
no family and no metric: what it measures comes from the registry (``harness.probes.registry``).

Families run in registration order whatever order they are asked in, so a pair's place in the
scorer's batches (and so its last bits) does not depend on how a config lists them.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from harness.algorithms.memory import Context, with_context
from harness.probes.base import Measurement, MetricInfo, ProbeFamily
from harness.probes.registry import METRICS, available, get_probe
from harness.probes.scorer import score_pairs
from harness.types import EditRequest

log = logging.getLogger(__name__)

# Extras keys the suite writes itself; a family's extras may not use them.
RESERVED_EXTRAS = ("case_id", "boundary_merges", "nonfinite")


class BatchedProbes:
    """A ``ProbeSuite`` over probe family instances, sharing one batched scorer call.

    Args:
        families: the family instances (at most one per family).
        order: the reported metrics in the order ``infos`` lists them (None: the families' chosen
            metrics, family by family).
        batch_size: rows per forward pass of the scorer.

    Raises:
        ValueError: two instances of one family, ``batch_size < 1``, or an ``order`` naming a metric
            no family reports.
    """

    def __init__(self, families: Sequence[ProbeFamily], order: Sequence[str] | None = None,
                 batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        names = [f.name for f in families]
        if len(set(names)) != len(names):
            raise ValueError(f"a probe family is given twice: {names}")
        rank = {name: i for i, name in enumerate(available())}
        self.families = sorted(families, key=lambda f: rank.get(f.name, len(rank)))
        self.batch_size = batch_size
        infos = {i.name: i for f in self.families for i in f.infos()}
        order = list(infos) if order is None else list(dict.fromkeys(order))
        missing = [m for m in order if m not in infos]
        if missing:
            raise ValueError(f"metric(s) {missing} are not reported by the families {names}")
        self._infos = [infos[m] for m in order]
        self.metrics = tuple(order)  # the reported metric names, as asked

    def infos(self) -> list[MetricInfo]:
        """The reported metrics' descriptions, in the order they were asked for."""
        return list(self._infos)

    def row_metrics(self) -> list[str]:
        """The per-case metric names each row holds (aggregates contribute their inputs)."""
        return [m for f in self.families for m in f.row_metrics()]

    def measure(self, model: nn.Module, tok, requests: Sequence[EditRequest],
                reference: Measurement | None = None, context: Context | None = None) -> Measurement:
        """Score ``requests`` on ``model``.

        Args:
            model, tok: the causal LM and its tokenizer.
            requests: the requests to evaluate.
            reference: an earlier measurement of the same requests (the pre-edit one); agreement
                metrics (``locality_acc``) compare with its extras. None compares with itself.
            context: a prompt transform (an edit algorithm's, e.g. IKE's demonstrations) applied to
                every prompt of every request before any family sees it
                (``harness.algorithms.memory.with_context``), so every family scores and generates
                from the prompts with their context.

        Returns:
            A ``Measurement``: per request the per-case metric values (aggregates such as ``score``
            are absent from rows; see ``summarize``), and extras with ``case_id``,
            ``boundary_merges``, ``nonfinite`` and what a later ``measure(..., reference=this)`` needs.
            When a scored log-prob is not finite, every metric of the case is NaN and ``nonfinite``
            is True.

        Raises:
            ValueError: a reference of a different length or for different cases; a family that
                returns metrics it was not asked for or extras keys another family (or the suite) uses.
        """
        requests = [with_context(r, context) for r in requests]
        if reference is not None and len(reference.extras) != len(requests):
            raise ValueError(f"reference has {len(reference.extras)} extras for {len(requests)} requests")
        needed = [[p for f in self.families for p in f.pairs(r)] for r in requests]
        pairs = [p for ps in needed for p in ps]
        scores = dict(zip(pairs, score_pairs(model, tok, pairs, batch_size=self.batch_size)))
        shared: dict = {}  # work one family leaves for another in this call (``ProbeFamily.uses_shared``)
        generated = [f.generate(model, tok, requests, shared=shared) if f.uses_shared
                     else f.generate(model, tok, requests) for f in self.families]
        columns = self.row_metrics()
        rows: list[dict[str, float]] = []
        extras: list[dict[str, Any]] = []
        for i, r in enumerate(requests):
            ref = reference.extras[i] if reference is not None else None
            if ref is not None and ref.get("case_id", r.case_id) != r.case_id:
                raise ValueError(f"reference {i} is case {ref.get('case_id')!r}, request is {r.case_id!r}")
            row: dict[str, float] = {}
            extra: dict[str, Any] = {}
            for f, gen in zip(self.families, generated):
                values, more = f.compute(r, scores, gen[i] if gen is not None else None, ref)
                stray = sorted(set(values) - f.wanted)
                if stray:
                    raise ValueError(f"probe family {f.name!r} returned metric(s) {stray} it was not asked for "
                                     f"(wanted: {sorted(f.wanted)})")
                taken = sorted(set(more) & (set(extra) | set(RESERVED_EXTRAS)))
                if taken:
                    raise ValueError(f"probe family {f.name!r} returned extras {taken} that are already used")
                row.update(values)
                extra.update(more)
            merges = sum(scores[p].boundary_merge for p in set(needed[i]))
            # Non-finite logits would read as scores of 0.0 (NaN comparisons are false): the case's
            # metrics become NaN and the case is flagged, so tables show it instead of a failed edit.
            nonfinite = not all(math.isfinite(x) for p in needed[i] for x in scores[p].logprobs)
            rows.append({m: math.nan if nonfinite else row.get(m, math.nan) for m in columns})
            extras.append({"case_id": r.case_id, "boundary_merges": merges, "nonfinite": nonfinite, **extra})
        return Measurement(rows, extras)


# ----------------------------------------------------------------------------------------------
# building a suite from names


def _select(names: Sequence[str] | None) -> dict[str, list[str] | None]:
    """Family name -> chosen metrics (None: all) for a list of family and metric names."""
    if names is None:
        return {n: None for n in available() if get_probe(n).default}
    chosen: dict[str, list[str] | None] = {}
    unknown = []
    for name in names:
        if name in available():
            chosen[name] = None
            continue
        family = next((n for n in available() if name in get_probe(n).declared()), None)
        if family is None:
            unknown.append(name)
        elif chosen.get(family, []) is not None:
            chosen.setdefault(family, []).append(name)
    if unknown:
        raise ValueError(f"unknown probe family or metric {unknown}; families: {available()}; "
                         f"metrics: {list(METRICS)}")
    return chosen


def _flat_settings(flat: Mapping[str, Any]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Families switched on and settings from flat keywords: ``<family>=True`` adds a family and
    ``<family>_<setting>=value`` sets one of its settings (the spelling of ``ProbesConfig``'s keys)."""
    on: list[str] = []
    settings: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if key in available():
            if not isinstance(value, bool):
                raise TypeError(f"probes: {key}= switches the {key!r} family on or off and must be a bool, "
                                f"got {value!r}")
            if value:
                on.append(key)
            continue
        for family in sorted(available(), key=len, reverse=True):
            cls = get_probe(family)
            field = key[len(family) + 1:] if key.startswith(family + "_") else None
            if field and dataclasses.is_dataclass(cls.Settings) and \
                    field in {f.name for f in dataclasses.fields(cls.Settings)}:
                settings.setdefault(family, {})[field] = value
                break
        else:
            raise TypeError(f"build_probes() got an unexpected keyword {key!r}: not a probe family "
                            f"({available()}) nor <family>_<setting>")
    return on, settings


def build_probes(metrics: Sequence[str] | None = None, batch_size: int = 32, seed: int = 0,
                 settings: Mapping[str, Mapping[str, Any]] | None = None, **flat: Any) -> BatchedProbes:
    """The probe suite for a list of families and metrics.

    Args:
        metrics: registered family names (all their metrics) and/or metric names (from any family),
            in the order ``infos`` reports them; None: every family registered as ``default``
            (``counterfact`` and ``easyedit``).
        batch_size: rows per scorer forward pass (and prompts per generation batch).
        seed: the seed of sampling families (``fluency``).
        settings: family name -> its settings (mapping or its ``Settings`` dataclass).
        **flat: ``<family>=True`` adds a family (e.g. ``fluency=True``); ``<family>_<setting>=value``
            sets a setting (e.g. ``fluency_max_length=64``). Settings of a family that is not
            measured are ignored.

    Returns:
        A ``BatchedProbes`` (``measure`` and ``infos``).

    Raises:
        ValueError: an unknown family or metric name (the message lists the known ones).
        TypeError: an unknown keyword or setting.
    """
    on, flat_settings = _flat_settings(flat)
    chosen = _select(metrics)
    names = list(chosen) if metrics is None else [n for n in metrics]
    for name in on:
        if name not in chosen:
            chosen[name] = None
            names.append(name)
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(available()))
    if unknown:
        raise ValueError(f"settings for unknown probe family {unknown}; registered: {available()}")
    families = []
    for name, subset in chosen.items():
        given = settings.get(name)
        if name in flat_settings:
            given = {**(dataclasses.asdict(given) if dataclasses.is_dataclass(given) else dict(given or {})),
                     **flat_settings[name]}
        families.append(get_probe(name)(subset, given, batch_size=batch_size, seed=seed))
    # A family named as a whole reports what its instance chose (settings may leave metrics out,
    # e.g. ``wild``'s judge metrics without a judge).
    by_name = {f.name: f for f in families}
    order = [m for name in names for m in (by_name[name].chosen if name in by_name and name in available()
                                            else [name])]
    return BatchedProbes(families, order, batch_size)


def probes_from_config(config: Any) -> BatchedProbes:
    """``build_probes`` from a ``ProbesConfig`` (or any dataclass or mapping with its keys)."""
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return build_probes(**values)
