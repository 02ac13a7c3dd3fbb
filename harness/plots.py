"""The retention plot of a sequential run: one panel per kind of metric, and the per-step weight change.

Panels keep unlike numbers off a shared axis: one per unit the probes declare (fractions such as
``*_score`` and accuracies, probability gaps such as ``*_magnitude``, bits of n-gram entropy for
``fluency``, and whatever a plugin probe declares).
The title names the run (model, algorithm, batch size); edit counts are integers; legends sit
outside the data.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from harness.results import as_float

UNIT_LABELS = {"fraction": "mean over earlier edits (0-1)", "probability": "mean P(new) - P(old)",
               "bits": "n-gram entropy (bits)"}


def metric_kind(name: str) -> str:
    """The panel a metric goes on: the unit its probe declares (``unknown`` for a column no probe declares)."""
    from harness.probes import METRICS

    info = METRICS.get(name)
    return info.unit if info is not None else "unknown"


def plot_retention(path: str | Path, retention: Sequence[Mapping[str, str]], steps: Sequence[tuple[int, float, bool]],
                   metrics: Sequence[str], title: str = "") -> None:
    """Draw ``retention.png``: metric means over all earlier edits vs. edit count, and per-step norms.

    Args:
        retention: rows of ``retention.csv``.
        steps: (step, weight-change norm, outlier) of every successful edit call.
        metrics: metric columns of ``retention.csv`` to draw.
        title: the run, e.g. ``"smollm2 · memit · batches of 50"``.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    xs = [as_float(r["n_edits"]) for r in retention]
    curves = {m: [as_float(r.get(m)) for r in retention] for m in metrics}
    curves = {m: ys for m, ys in curves.items() if any(not math.isnan(y) for y in ys)}
    kinds: dict[str, list[str]] = {}
    for m in curves:
        kinds.setdefault(metric_kind(m), []).append(m)
    n = len(kinds) + 1
    fig, axes = plt.subplots(1, n, figsize=(5.0 * n, 4.2), squeeze=False)
    for ax, (kind, names) in zip(axes[0], kinds.items()):
        for m in names:
            ax.plot(xs, curves[m], marker="o", label=m)
        ax.set_xlabel("edits so far")
        ax.set_ylabel(UNIT_LABELS.get(kind, kind))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    ax = axes[0][-1]
    if steps:
        ax.plot([s for s, _, _ in steps], [v for _, v, _ in steps], lw=1, label="step norm")
        out = [(s, v) for s, v, o in steps if o]
        if out:
            ax.scatter([s for s, _ in out], [v for _, v in out], color="red", zorder=3, label="outlier")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
        if all(v > 0 for _, v, _ in steps):
            ax.set_yscale("log")
    ax.set_xlabel("edit call")
    ax.set_ylabel("||W_after - W_before||")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("per-step weight change", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
