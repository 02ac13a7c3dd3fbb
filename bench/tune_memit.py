"""Choose MEMIT's λ (mom2_update_weight) on held-out records: one batch edit per λ, z computed once.

MEMIT's targets z depend only on the unedited model (docs/algorithms/memit.md), so they are optimised
once and reused for every λ; each λ then costs only the layer spread and the probes. Records come
from a file other than the shipped sample (default: CounterFact val, offset 0), so nothing is tuned
on the sample the results are reported on.

Usage: python bench/tune_memit.py [--data ../shared/data/counterfact-val.json] [--n 50]
                                  [--lambdas 15000,5000,2000,1000,500] [--threads 1]
"""
from __future__ import annotations

import argparse
import dataclasses
import time

from _common import configured, shared_file, smollm2_and_requests

from harness.editor import Editor
from harness.probes import build_probes, summarize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=None, help="default: ../shared/data/counterfact-val.json beside the repository")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--lambdas", default="15000,5000,2000,1000,500")
    ap.add_argument("--layers", default="3,4,5,6,7")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    data = args.data or str(shared_file("counterfact-val.json"))
    model, tok, reqs = smollm2_and_requests(args.n, data, args.threads)
    layers = [int(x) for x in args.layers.split(",")]
    algo = configured("memit", layers=layers)  # conf/algorithm/memit.yaml, so the cached C is the run's
    probes = build_probes()
    pre = probes.measure(model, tok, reqs)
    t0 = time.perf_counter()
    algo.prepare(model, tok)
    from harness.models import model_spec

    z, losses = algo._optimize_z(model, tok, model_spec(model), reqs, algo._context_templates(model, tok))
    t_z = time.perf_counter() - t0
    algo._optimize_z = lambda *a, **k: (z, losses)  # the same targets for every λ
    print(f"{len(reqs)} records of {args.data}; layers {layers}; z for all in {t_z:.0f}s "
          f"({t_z / len(reqs):.1f}s per request), z loss {losses['z_loss_start']:.2f} -> {losses['z_loss_end']:.3f}")
    base = summarize(pre.metrics)
    print(f"{'lambda':>8} {'ES':>6} {'PS':>6} {'NS':>6} {'S':>6} {'rw_acc':>7} {'loc_acc':>7} {'|Z-H| end/start':>16}")
    print(f"{'unedited':>8} {base['efficacy_score']['mean']:6.3f} {base['paraphrase_score']['mean']:6.3f} "
          f"{base['neighborhood_score']['mean']:6.3f} {base['score']['mean']:6.3f}")
    for lam in [float(x) for x in args.lambdas.split(",")]:
        algo.hparams = dataclasses.replace(algo.hparams, mom2_update_weight=lam)
        out = Editor(model, tok, algo, probes).edit(reqs, pre=pre)
        s = summarize(out.post.metrics)
        info = out.report.info
        print(f"{lam:8.0f} {s['efficacy_score']['mean']:6.3f} {s['paraphrase_score']['mean']:6.3f} "
              f"{s['neighborhood_score']['mean']:6.3f} {s['score']['mean']:6.3f} {s['rewrite_acc']['mean']:7.3f} "
              f"{s['locality_acc']['mean']:7.3f} {info['z_error.final'] / info[f'z_error.{layers[0]}']:16.3f}",
              flush=True)


if __name__ == "__main__":
    main()
