"""Tune one hyperparameter of a MEMIT-family algorithm (memit, emmet, pmet, alphaedit) on one batch edit.

The targets (z) depend only on the unedited model and the last edit layer, so they are optimised
once per (algorithm, layers, target settings) and reused for every value of the swept parameter;
each value then costs only the layer spread and the probes. Default records: the first ``--n`` of
the shipped CounterFact sample (the held-out CF-50 records are for reporting, not for tuning).

Usage: python bench/tune_spread.py --algorithm emmet --param emmet_lambda --values 0.1,10,100
                                   [--layers 3,4,5,6,7] [--n 50] [--data FILE] [--threads 1]
                                   [--set key=value ...]   (other hyperparameters, YAML values;
                                                            target.lr=0.2 for a nested block)
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import yaml
from _common import configured, smollm2_and_requests

from harness.editor import Editor
from harness.models import model_spec
from harness.probes import build_probes, summarize


def nested(pairs: list[str]) -> dict:
    """``["target.lr=0.2", "mom2_update_weight=5"]`` -> ``{"target": {"lr": 0.2}, "mom2_update_weight": 5}``."""
    out: dict = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        *blocks, last = key.split(".")
        node = out
        for b in blocks:
            node = node.setdefault(b, {})
        node[last] = yaml.safe_load(raw)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--algorithm", default="emmet")
    ap.add_argument("--param", default="emmet_lambda", help="a top-level numeric hyperparameter")
    ap.add_argument("--values", default="0.1,10,100")
    ap.add_argument("--layers", default=None, help="comma-separated; default: the algorithm's")
    ap.add_argument("--data", default=None, help="default: the shipped CounterFact sample")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], help="other hyperparameters, key=value")
    args = ap.parse_args()
    model, tok, reqs = smollm2_and_requests(args.n, args.data, args.threads)
    changes = nested(args.set)
    if args.layers:
        changes["layers"] = [int(x) for x in args.layers.split(",")]
    algo = configured(args.algorithm, **changes)  # the shipped config, so the cached C is the runs'
    layers = algo.hparams.layers
    probes = build_probes()
    pre = probes.measure(model, tok, reqs)
    t0 = time.perf_counter()
    z, losses = algo._optimize_z(model, tok, model_spec(model), reqs, algo._context_templates(model, tok))
    t_z = time.perf_counter() - t0
    algo.prepare(model, tok)  # C after the targets: a run elsewhere may have cached it meanwhile
    z_info = dict(getattr(algo, "_z_info", {}))  # PMET: the mean norms of δ_attn and δ_mlp
    algo._optimize_z = lambda *a, **k: (z, losses)  # the same targets for every value
    print(f"{args.algorithm}: {len(reqs)} records of {args.data or 'the shipped sample'}; layers {layers}; {changes}; "
          f"targets in {t_z:.0f}s ({t_z / len(reqs):.1f}s per request), loss {losses['z_loss_start']:.2f} -> "
          f"{losses['z_loss_end']:.3f} {z_info or ''}")
    base = summarize(pre.metrics)
    print(f"{args.param:>12} {'ES':>6} {'PS':>6} {'NS':>6} {'S':>6} {'rw_acc':>7} {'rph_acc':>7} {'loc_acc':>7} "
          f"{'gap end/start':>14}")
    print(f"{'unedited':>12} {base['efficacy_score']['mean']:6.3f} {base['paraphrase_score']['mean']:6.3f} "
          f"{base['neighborhood_score']['mean']:6.3f} {base['score']['mean']:6.3f} {base['rewrite_acc']['mean']:7.3f} "
          f"{base['rephrase_acc']['mean']:7.3f} {base['locality_acc']['mean']:7.3f}")
    for value in [float(x) for x in args.values.split(",")]:
        algo.hparams = dataclasses.replace(algo.hparams, **{args.param: value})
        out = Editor(model, tok, algo, probes).edit(reqs, pre=pre)
        s = summarize(out.post.metrics)
        info = out.report.info
        print(f"{value:12g} {s['efficacy_score']['mean']:6.3f} {s['paraphrase_score']['mean']:6.3f} "
              f"{s['neighborhood_score']['mean']:6.3f} {s['score']['mean']:6.3f} {s['rewrite_acc']['mean']:7.3f} "
              f"{s['rephrase_acc']['mean']:7.3f} {s['locality_acc']['mean']:7.3f} "
              f"{info['z_error.final'] / info[f'z_error.{layers[0]}']:14.3f}", flush=True)


if __name__ == "__main__":
    main()
