"""Summaries of per-case metric rows: mean, standard error and count per metric, and the
CounterFact ``score`` as the harmonic mean of the efficacy, paraphrase and neighbourhood score
means (ROME ``experiments/summarize.py``, Meng et al. 2022).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from harness.probes.counterfact import harmonic_mean
from harness.probes.suite import METRICS


def _stats(values: list[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n if n else math.nan
    if n < 2:
        return {"mean": mean, "stderr": math.nan, "count": n}
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return {"mean": mean, "stderr": math.sqrt(var / n), "count": n}


def summarize(rows: Sequence[dict[str, float]]) -> dict[str, dict]:
    """Per-metric mean, standard error of the mean (sample std / sqrt(n)) and count over cases.

    Non-finite values (missing inputs, non-finite logits) are left out of their metric's statistics
    and counted in ``excluded``. Every numeric key of the
    rows is summarised (booleans excluded). Aggregate metrics (``MetricInfo.aggregate == "hmean"``,
    i.e. ``score``) are computed from the means of their inputs when all of them are present:
    ``mean`` is the harmonic mean, ``stderr`` NaN, ``count`` the smallest input count.

    Args:
        rows: per-case metric dicts, e.g. ``Measurement.metrics``.

    Returns:
        ``{metric: {"mean": float, "stderr": float, "count": int, "excluded": int}}``, metrics in first-seen order,
        aggregates last.
    """
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
    for name, info in METRICS.items():
        if info.aggregate != "hmean" or not all(i in out for i in info.inputs):
            continue
        parts = [out[i] for i in info.inputs]
        out[name] = {"mean": harmonic_mean([p["mean"] for p in parts]), "stderr": math.nan,
                     "count": min(p["count"] for p in parts), "excluded": max(p["excluded"] for p in parts)}
    return out
