"""Trace WISE's routing scores through a sequential run on SmolLM2 (issue 13's diagnosis).

After each edit, one line: ε, the new edit's score (at its edit), the CURRENT running-mean scores of
every earlier edit's prompt and rephrase (min / median over edits; per text the smallest score over
its target-predicting positions, which must all exceed ε to be routed), the fraction of them routed,
the scores of a fixed set of unrelated texts (the locality prompt + answer of the first ``--n-loc``
records; per text the largest score over its answer-predicting positions, any one of which routes
that position; max / median) and the fraction that fire, and the forced-Δ target NLL of the earlier
edits (Δ added everywhere: forgetting inside Δ, apart from routing).

The layer's input A(x) never depends on the side memory (it sits below it), so each text's
activations are read once and every score afterwards is ``running_mean(||A Δᵀ||)`` on them.

Usage: PYTHONPATH=. python bench/trace_wise.py --n 40 [--every 1] [--trial "k=v;k=v"] [--data PATH --offset 0]
(PYTHONPATH=.: this tree's harness, not the one ``pip install -e`` points at.)
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from harness.algorithms.batches import target_batch, target_nll
from harness.algorithms.hooks import Hooks
from harness.algorithms.wise import Wise
from harness.algorithms.wise_memory import running_mean, side_delta, token_scores
from harness.algorithms.wise_train import projection
from harness.data import load_requests
from harness.models import load_model
from harness.tokens import encode_pairs, pad_id

from tune_wise import parse


@torch.no_grad()
def activations(model, tok, module, pairs):
    """Per (prompt, answer) pair: the projection's input [L, d_in] and the answer-predicting positions."""
    items = encode_pairs(tok, pairs)
    batch = target_batch(items, pad_id(tok), torch.device("cpu"))
    seen = []
    with Hooks() as hooks:
        hooks.input(module, lambda _m, args, kwargs: seen.append(args[0]))
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    out = []
    for i, it in enumerate(items):
        n = len(it.ids)
        decide = torch.zeros(n, dtype=torch.bool)
        decide[len(it.prompt_ids) - 1:n - 1] = True
        out.append((seen[0][i, :n].clone(), decide))
    return out, batch


def scores(acts, delta, transposed, reduce):
    return [float(reduce(running_mean(token_scores(side_delta(a, delta, transposed)))[d])) for a, d in acts]


@torch.no_grad()
def forced_nll(model, module, batch, delta, transposed):
    def add(_m, args, out):
        return out + side_delta(args[0], delta, transposed).to(out.dtype)
    with Hooks() as hooks:
        hooks.output(module, add)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return target_nll(logits, batch)


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--n-loc", type=int, default=20)
    ap.add_argument("--data", default=None)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--trial", default="")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    model, tok = load_model("smollm2", device="cpu", dtype="float32")
    reqs = list(load_requests("zsre", args.data, limit=max(args.n, args.n_loc), offset=args.offset).requests)
    algo = Wise(parse([s for s in args.trial.split(";") if s]))
    algo.prepare(model, tok)
    module, _, transposed = projection(model, algo.hparams.layer)
    rw, rw_batch = activations(model, tok, module, [(r.rewrite_prompt, r.target_new) for r in reqs[:args.n]])
    rp, _ = activations(model, tok, module, [(r.paraphrase_prompts[0], r.target_new) for r in reqs[:args.n]])
    loc, _ = activations(model, tok, module, [(r.neighborhood[0].prompt, r.neighborhood[0].answer)
                                               for r in reqs[:args.n_loc]])
    print("T eps new | rw_min rw_med rw_routed | rp_min rp_med rp_routed | loc_max loc_med loc_fire | "
          "forced_nll_med forced_nll_max | s", flush=True)
    for t, r in enumerate(reqs[:args.n], 1):
        rep = algo.apply(model, tok, [r])
        algo.detach(model)  # scores are computed here; the forced NLL adds Δ itself
        if t % args.every and t != args.n:
            continue
        mems = algo.memory.memories()
        delta = mems[-1].delta
        eps = rep.info["threshold"]
        a = scores(rw[:t], delta, transposed, torch.min)
        b = scores(rp[:t], delta, transposed, torch.min)
        c = scores(loc, delta, transposed, torch.max)
        sub = type(rw_batch)(rw_batch.input_ids[:t], rw_batch.attention_mask[:t], rw_batch.label_mask[:t])
        nll = forced_nll(model, module, sub, delta, transposed).tolist() if len(mems) == 1 else [float("nan")]
        print(f"{t} {eps:.1f} {rep.info['edit_score_min']:.1f} | {min(a):.1f} {med(a):.1f} "
              f"{sum(x > eps for x in a) / t:.2f} | {min(b):.1f} {med(b):.1f} {sum(x > eps for x in b) / t:.2f} | "
              f"{max(c):.1f} {med(c):.1f} {sum(x > eps for x in c) / len(c):.2f} | {med(nll):.3f} {max(nll):.3f} | "
              f"{rep.seconds:.1f}", flush=True)


if __name__ == "__main__":
    main()
