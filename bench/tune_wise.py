"""Tune WISE on SmolLM2: T sequential edits, then rewrite/rephrase/locality accuracy of all T.

Runs the algorithm directly (the side-memory hook installed for the evaluation), so one process can
try several settings on the same records. Tune on the shipped zsRE sample (the default), report on
other records. Irrelevant samples: ``--irrelevant`` (a zsRE file; records from ``--irr-offset`` on).

Usage: python bench/tune_wise.py [--n 100] [--data PATH --offset 0] [--threads 1]
       [--set key=value ...]   (hyperparameters, e.g. --set layer=20 --set lr=2.0; repeat --trial to compare)
"""
from __future__ import annotations

import argparse
import ast
import logging
import time

import torch

from harness.algorithms.wise import Wise
from harness.data import load_requests
from harness.models import load_model
from harness.probes import build_probes, summarize


def parse(sets: list[str]) -> dict:
    out: dict = {}
    for s in sets:
        key, _, value = s.partition("=")
        try:
            v = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            v = value
        node = out
        *head, last = key.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--data", default=None)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--at", default="1,10,100")
    ap.add_argument("--trial", action="append", default=[], help="';'-separated key=value list, one per trial")
    ap.add_argument("--verbose", action="store_true", help="one line per edit (losses, scores, threshold)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2", device="cpu", dtype="float32")
    reqs = list(load_requests("zsre", args.data, limit=args.n, offset=args.offset).requests)
    probes = build_probes(["rewrite_acc", "rephrase_acc", "locality_acc"])
    pre = probes.measure(model, tok, reqs)
    points = [int(x) for x in args.at.split(",")]
    for trial in args.trial or [""]:
        algo = Wise(parse([s for s in trial.split(";") if s]))
        algo.prepare(model, tok)
        t0, seconds = time.perf_counter(), 0.0
        for i, r in enumerate(reqs, 1):
            rep = algo.apply(model, tok, [r])
            seconds += rep.seconds
            if args.verbose:
                print(f"  edit {i}: loss {rep.losses['loss_first']:.2f} -> {rep.losses['loss_final']:.2f} nll "
                      f"{rep.losses['nll_final']:.3f} edit_min {rep.info['edit_score_min']:.1f} irr_max "
                      f"{rep.info['irrelevant_score_max']:.1f} eps {rep.info['threshold']:.1f} {rep.seconds:.1f}s",
                      flush=True)
            if i in points:
                post = probes.measure(model, tok, reqs[:i], reference=pre.subset(range(i)))  # apply left it attached
                s = summarize(post.metrics)
                print(f"{trial or 'defaults'} T={i}: rewrite {s['rewrite_acc']['mean']:.3f} rephrase "
                      f"{s['rephrase_acc']['mean']:.3f} locality {s['locality_acc']['mean']:.3f} | "
                      f"{seconds / i:.1f} s/edit, last: steps {rep.info['steps']:.0f} loss {rep.losses['loss_final']:.3f} "
                      f"nll {rep.losses['nll_final']:.3f} edit_min {rep.info['edit_score_min']:.2f} "
                      f"irr_max {rep.info['irrelevant_score_max']:.2f} eps {rep.info['threshold']:.2f}", flush=True)
        algo.detach(model)
        print(f"  total {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
