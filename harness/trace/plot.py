"""Heatmaps of causal tracing in the style of ROME's figure (Meng et al. 2022, Fig. 1/2).

One picture per kind: token groups as rows (first subject token at the top, last token at the
bottom), layers as columns, the average indirect effect as colour (purple for the residual stream,
green for MLP outputs, red for attention outputs, as ROME draws them). The peak at the last
subject token is outlined. The colour scale starts at zero (white): negative averages, which are
noise, show as no effect; the tables keep their values.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: ROME's colour map per kind.
CMAPS = {"residual": "Purples", "mlp": "Greens", "attn": "Reds"}
TITLES = {"residual": "the residual stream", "mlp": "MLP", "attn": "attention"}


def effect_grid(summary: Sequence[Mapping[str, Any]], kind: str, groups: Sequence[str],
                n_layers: int) -> list[list[float]]:
    """``[group][layer]`` mean effects of ``kind``; NaN where no record had the group."""
    grid = [[math.nan] * n_layers for _ in groups]
    index = {g: i for i, g in enumerate(groups)}
    for r in summary:
        if r["kind"] == kind and r["token_group"] in index:
            grid[index[r["token_group"]]][int(r["layer"])] = float(r["effect"])
    return grid


def plot_trace(path: str | Path, summary: Sequence[Mapping[str, Any]], kind: str, groups: Sequence[str],
               labels: Mapping[str, str], n_layers: int, *, window: int = 1, answer: str = "true object",
               n: int = 0) -> None:
    """Draw ``path`` (PNG, written atomically) for one kind from the rows of ``trace_summary.csv``.

    Args:
        groups: token-group names, top row first; ``labels`` maps them to tick labels.
        window: layers restored around each column's centre (1 for the residual stream).
        answer: what the probability is of, for the colour-bar label.
        n: number of records averaged, for the title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib import pyplot as plt
    from matplotlib.patches import Rectangle

    grid = np.ma.masked_invalid(np.array(effect_grid(summary, kind, groups, n_layers), dtype=float))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.22 * n_layers + 2.5), 2.8), dpi=120)
    # white is "no effect": negative averages (noise) are drawn as zero, as ROME's figure draws
    # probabilities below the corrupted run's
    top = max(float(grid.max()), 1e-9) if grid.count() else 1.0
    image = ax.pcolormesh(grid, cmap=CMAPS.get(kind, "viridis"), vmin=0.0, vmax=top)
    ax.invert_yaxis()
    ax.set_yticks([i + 0.5 for i in range(len(groups))])
    ax.set_yticklabels([labels.get(g, g) for g in groups], fontsize=8)
    step = 5 if n_layers > 12 else 1
    ax.set_xticks([i + 0.5 for i in range(0, n_layers, step)])
    ax.set_xticklabels([str(i) for i in range(0, n_layers, step)], fontsize=8)
    if "last_subject" in groups:
        row = list(groups).index("last_subject")
        values = grid[row]
        if values.count():
            col = int(values.argmax())
            ax.add_patch(Rectangle((col, row), 1, 1, fill=False, edgecolor="black", lw=1.2))
    what = TITLES.get(kind, kind)
    records = f" ({n} record{'s' if n != 1 else ''})" if n else ""
    ax.set_title(f"Average indirect effect of restoring {what}{records}", fontsize=9)
    ax.set_xlabel("single restored layer" if window == 1 else f"centre of {window} restored {what} layers",
                  fontsize=8)
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(f"AIE on p({answer})", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
