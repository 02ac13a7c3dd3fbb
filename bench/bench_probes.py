"""Batched vs one-pair-at-a-time scoring of CounterFact probe pairs on the real SmolLM2-135M.

Scores the (prompt, target) pairs that ``build_probes().measure`` needs for N CounterFact records
(CounterFact and EasyEdit metrics together), three ways, in one run:
  single   one forward per pair (batch of one, no sharing): the classic per-prompt evaluation loop;
  padded   padded batches, one pair per row;
  batched  the probes' path: padded batches, targets sharing a prompt read it once (tree mask).
Prints throughputs (pairs/s), the speed-up over ``single`` and the largest absolute log-prob
difference from ``single``; then the wall time of one full ``measure`` call.

Usage: python bench/bench_probes.py [--n 40] [--batch-size 32]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from _common import SHARED_DATA

from harness.models import load_model
from harness.probes import build_probes, score_pairs
from harness.probes import counterfact, easyedit
from harness.types import QA, EditRequest

FALLBACK = SHARED_DATA / "counterfact-train.json"  # development copy, used only without harness.data


def _requests(n: int) -> tuple[list[EditRequest], str]:
    try:
        from harness.data import load_requests

        return list(load_requests("counterfact", limit=n)), "harness.data.load_requests('counterfact')"
    except ImportError:
        out = []
        for rec in json.loads(FALLBACK.read_text())[:n]:
            out.append(EditRequest(str(rec["case_id"]), rec["prompt"].replace(rec["subject"], "{}", 1), rec["subject"],
                                   rec["target_new"], rec["ground_truth"], (rec["rephrase_prompt"],),
                                   (QA(rec["locality_prompt"], rec["locality_ground_truth"]),)))
        return out, f"{FALLBACK} (fallback: harness.data not importable)"


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40, help="CounterFact records")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model("smollm2", device="cpu", dtype="float32")
    requests, source = _requests(args.n)
    wanted = set(build_probes().metrics) | set(counterfact.COMPONENTS)
    all_pairs = [p for r in requests for p in counterfact.pairs(r, wanted) + easyedit.pairs(r, wanted)]
    pairs = list(dict.fromkeys(all_pairs))
    print(f"model SmolLM2-135M-Instruct fp32, {torch.get_num_threads()} threads; {len(requests)} records from {source}")
    print(f"{len(all_pairs)} pairs needed by measure(), {len(pairs)} unique, "
          f"{len({p for p, _ in pairs})} distinct prompts; batch size {args.batch_size}")
    score_pairs(model, tok, pairs[:4], batch_size=4)  # warm-up (first-call allocations)

    single, t_single = _timed(lambda: [score_pairs(model, tok, [p], batch_size=1, share_prompts=False)[0] for p in pairs])
    padded, t_padded = _timed(lambda: score_pairs(model, tok, pairs, args.batch_size, share_prompts=False))
    batched, t_batched = _timed(lambda: score_pairs(model, tok, pairs, args.batch_size, share_prompts=True))

    def diff(res):
        return max(abs(a - b) for r, s in zip(res, single) for a, b in zip(r.logprobs, s.logprobs))

    def same_argmax(res):
        return all(r.argmax == s.argmax and r.target_ids == s.target_ids for r, s in zip(res, single))

    print(f"{'mode':8s} {'seconds':>8s} {'pairs/s':>8s} {'speed-up':>8s} {'max|dlogp|':>11s} argmax==single")
    for name, res, t in (("single", single, t_single), ("padded", padded, t_padded), ("batched", batched, t_batched)):
        print(f"{name:8s} {t:8.2f} {len(pairs) / t:8.1f} {t_single / t:7.2f}x {diff(res):11.2e} {same_argmax(res)}")
    # the numbers users see: per-case metrics computed from each mode's scores
    def metrics(res):
        table = dict(zip(pairs, res))
        rows = []
        for r in requests:
            row = counterfact.compute(r, table, wanted)
            row.update(easyedit.compute(r, table, wanted)[0])
            rows.append(row)
        return rows

    def metric_diff(a, b):
        return max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in x if x[k] == x[k] and y[k] == y[k])

    ref = metrics(single)
    print(f"largest metric difference from single (probabilities, magnitudes, accuracies): "
          f"padded {metric_diff(metrics(padded), ref):.2e}, batched {metric_diff(metrics(batched), ref):.2e}")
    merges = sum(s.boundary_merge for s in batched)
    print(f"boundary merges (fallback tokenization): {merges}")

    probes = build_probes(batch_size=args.batch_size)
    pre, t_measure = _timed(lambda: probes.measure(model, tok, requests))
    print(f"full measure() of {len(requests)} requests (all CounterFact + EasyEdit metrics): {t_measure:.2f} s "
          f"({t_measure / len(requests) * 1e3:.0f} ms per request)")


if __name__ == "__main__":
    main()
