"""Diagnose single WISE edits on SmolLM2: does the edit fail in training or in routing?

For each record (a fresh memory each time) prints the training's final NLL and scores, the
threshold ε, the running-mean activation score the side memory reaches at the evaluation's
target-predicting positions (rewrite, first paraphrase) and at the record's locality prompt, and
the rewrite/rephrase accuracy routed as usual and with the side memory forced on (ε = 0). Low
accuracy with the memory forced on is a training problem; high forced but low routed is routing.

Usage: python bench/diagnose_wise.py [--n 10] [--data PATH --offset 0] [--set "num_steps=50;lr=2.0"]
"""
from __future__ import annotations

import argparse
import logging

import torch

from harness.algorithms.wise import Wise
from harness.algorithms.wise_memory import running_mean, side_delta, token_scores
from harness.algorithms.wise_train import projection
from harness.data import load_requests
from harness.models import load_model
from harness.probes import build_probes
from harness.tokens import encode_pairs

from tune_wise import parse  # the same key=value parsing (bench/ is on sys.path when run as a script)


def eval_scores(model, tok, algo: Wise, pairs) -> list[float]:
    """Per (prompt, target): the smallest running-mean score over the positions predicting target tokens."""
    module, _, transposed = projection(model, algo.hparams.layer)
    delta = algo.memory.memories()[0].delta
    out = []
    for item in encode_pairs(tok, pairs):
        seen = []
        h = module.register_forward_hook(lambda m, a, o: seen.append(a[0]))
        try:
            with torch.no_grad():
                model(torch.tensor([list(item.ids)]))
        finally:
            h.remove()
        rm = running_mean(token_scores(side_delta(seen[0], delta, transposed)))[0]
        n = len(item.prompt_ids)
        out.append(float(rm[n - 1:n - 1 + len(item.target_ids)].min()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--data", default=None)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--set", default="")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    model, tok = load_model("smollm2", device="cpu", dtype="float32")
    reqs = list(load_requests("zsre", args.data, limit=args.n, offset=args.offset).requests)
    probes = build_probes(["rewrite_acc", "rephrase_acc"])
    over = parse([s for s in args.set.split(";") if s])
    tot = {"routed": 0.0, "forced": 0.0, "reph_r": 0.0, "reph_f": 0.0}
    for i, r in enumerate(reqs):
        algo = Wise(over)
        rep = algo.apply(model, tok, [r])
        eps = rep.info["threshold"]
        pairs = [(r.rewrite_prompt, r.target_new)] + [(p, r.target_new) for p in r.paraphrase_prompts[:1]]
        pairs += [(qa.prompt, qa.answer) for qa in r.neighborhood[:1]]
        sc = eval_scores(model, tok, algo, pairs)
        routed = probes.measure(model, tok, [r]).metrics[0]
        mem = algo.memory.memories()[0]
        keep, mem.min_score = mem.min_score, 0.0
        forced = probes.measure(model, tok, [r]).metrics[0]
        mem.min_score = keep
        algo.detach(model)
        tot["routed"] += routed["rewrite_acc"]; tot["forced"] += forced["rewrite_acc"]
        tot["reph_r"] += routed["rephrase_acc"]; tot["reph_f"] += forced["rephrase_acc"]
        print(f"{i}: steps {rep.info['steps']:.0f} nll {rep.losses['nll_final']:.3f} loss {rep.losses['loss_final']:.2f} "
              f"edit_min {rep.info['edit_score_min']:.1f} irr_max {rep.info['irrelevant_score_max']:.1f} eps {eps:.1f} | "
              f"eval scores rw/reph/loc {' '.join(f'{s:.1f}' for s in sc)} | rewrite routed {routed['rewrite_acc']:.2f} "
              f"forced {forced['rewrite_acc']:.2f} rephrase {routed['rephrase_acc']:.2f}/{forced['rephrase_acc']:.2f} "
              f"| {rep.seconds:.1f}s", flush=True)
    n = len(reqs)
    print(f"mean rewrite routed {tot['routed'] / n:.3f} forced {tot['forced'] / n:.3f}; rephrase routed "
          f"{tot['reph_r'] / n:.3f} forced {tot['reph_f'] / n:.3f}", flush=True)


if __name__ == "__main__":
    main()
