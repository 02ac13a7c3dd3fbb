"""Summaries of per-case metric rows: mean, standard error and count per metric, and the aggregates
the metric metadata declares (``MetricInfo.aggregate == "hmean"``: the harmonic mean of the means
of its inputs, as the CounterFact ``score`` of ROME's ``experiments/summarize.py``, Meng et al. 2022).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from harness.probes.base import MetricInfo
from harness.probes.registry import METRICS

NAN = float("nan")


def harmonic_mean(values: list[float]) -> float:
    """Harmonic mean; 0 when any value is 0, NaN when any is NaN or the list is empty."""
    if not values or any(math.isnan(v) for v in values):
        return NAN
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def _stats(values: list[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n if n else math.nan
    if n < 2:
        return {"mean": mean, "stderr": math.nan, "count": n}
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return {"mean": mean, "stderr": math.sqrt(var / n), "count": n}


def summarize(rows: Sequence[dict[str, float]], infos: Iterable[MetricInfo] | None = None) -> dict[str, dict]:
    """Per-metric mean, standard error of the mean (sample std / sqrt(n)) and count over cases.

    Non-finite values (missing inputs, non-finite logits) are left out of their metric's statistics
    and counted in ``excluded``. Every numeric key of the rows is summarised (booleans excluded).
    Aggregate metrics (``hmean``) are computed from the means of their inputs when all of them are
    present: ``mean`` is the harmonic mean, ``stderr`` NaN, ``count`` the smallest input count,
    ``excluded`` the largest.

    Args:
        rows: per-case metric dicts, e.g. ``Measurement.metrics``.
        infos: the metric descriptions whose aggregates to compute (None: every registered metric).

    Returns:
        ``{metric: {"mean": float, "stderr": float, "count": int, "excluded": int}}``, metrics in
        first-seen order, aggregates last.
    """
    if infos is None:
        infos = METRICS.values()
    values: dict[str, list[float]] = {}
    excluded: dict[str, int] = {}
    for row in rows:
        for key, v in row.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            bucket = values.setdefault(key, [])
            if math.isfinite(v):
                bucket.append(float(v))
            else:
                excluded[key] = excluded.get(key, 0) + 1
    out = {key: {**_stats(vs), "excluded": excluded.get(key, 0)} for key, vs in values.items()}
    for info in infos:
        if info.aggregate != "hmean" or not all(i in out for i in info.inputs):
            continue
        parts = [out[i] for i in info.inputs]
        out[info.name] = {"mean": harmonic_mean([p["mean"] for p in parts]), "stderr": math.nan,
                          "count": min(p["count"] for p in parts), "excluded": max(p["excluded"] for p in parts)}
    return out
