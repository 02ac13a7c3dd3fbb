"""Seconds of the target optimisation's prefix pass on SmolLM2-135M (CPU): with and without logits.

``target_rows.split_at_subject`` runs the rows' prefixes (everything before the subject's last token)
once into a KV cache. Only the cache is read; the plain forward also projected every prefix position
onto the 49,152-token vocabulary. This times that plain forward ("before") against
``replay.prefix_cache`` ("after", transformers' ``logits_to_keep`` with an empty index) on the same
prefixes, checks that both caches are equal bit for bit, and prints the median of ``--repeats`` runs,
the two alternating (wall and process CPU seconds; on a busy machine CPU seconds are the stable
measure).

Settings: ROME's rows (one request, 21 context templates ``[[5, 10], [10, 10]]`` + the KL row) and
MEMIT's batch of ``--batch`` requests with the same templates.

Usage: OMP_NUM_THREADS=1 python bench/bench_prefix.py [--repeats 5] [--batch 10]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from _common import SHARED_DATA

from harness.algorithms.hooks import model_device
from harness.algorithms.locate import TemplateCache
from harness.algorithms.replay import prefix_cache
from harness.algorithms.target_rows import build_rows
from harness.data import load_requests
from harness.models import load_model, output_cache
from harness.tokens import pad_batch, pad_id


def timed(fns: Sequence[Callable[[], Any]], repeats: int) -> list[tuple[float, float, Any]]:
    """Per function: (median wall s, median CPU s, its last result) over ``repeats`` rounds after one
    warm-up round; the functions alternate within each round, so a change of load hits them alike."""
    last = [fn() for fn in fns]
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t, c = time.perf_counter(), time.process_time()
            last[k] = fn()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return [(statistics.median(w), statistics.median(c), out) for w, c, out in zip(wall, cpu, last)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=10, help="requests in the MEMIT-like batch")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model, tok = load_model("smollm2", device="cpu", dtype="float32")
    templates = TemplateCache().get(model, tok, [[5, 10], [10, 10]], 0)
    requests = list(load_requests("counterfact", path=str(SHARED_DATA / "counterfact-train.json"), limit=args.batch))
    pad = pad_id(tok)
    print(f"SmolLM2-135M fp32 CPU, torch threads={torch.get_num_threads()}, {len(templates)} templates, "
          f"vocab {model.config.vocab_size}, median of {args.repeats}")
    for label, reqs in (("ROME (1 request)", requests[:1]), (f"MEMIT ({len(requests)} requests)", requests)):
        b = build_rows(tok, reqs, templates, model_device(model))
        pre, attn = pad_batch([r[:s] for r, s in zip(b.ids.tolist(), b.sub.tolist())], pad, side="left")
        kw = dict(input_ids=pre, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0))

        @torch.no_grad()
        def before() -> Any:
            return output_cache(model(**kw, use_cache=True))

        (w0, c0, ref), (w1, c1, got) = timed([before, lambda: prefix_cache(model, **kw)], args.repeats)
        same = all(torch.equal(a.keys, b_.keys) and torch.equal(a.values, b_.values)
                   for a, b_ in zip(got.layers, ref.layers))
        print(f"{label}: prefixes {tuple(pre.shape)}; with logits {w0:.3f} s ({c0:.3f} s CPU), "
              f"without {w1:.3f} s ({c1:.3f} s CPU): {w0 / w1:.2f}x; caches equal: {same}")


if __name__ == "__main__":
    main()
