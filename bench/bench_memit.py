"""MEMIT on one batch of n edits against n single ROME edits, on SmolLM2-135M (CPU), in one process.

Both use the shipped configs (conf/algorithm/memit.yaml, conf/algorithm/rome.yaml) and go through
``harness.editor.Editor`` without probes (snapshot -> apply -> verified restore). MEMIT's C is
computed once per model and layer and cached on disk; its cost is printed separately ("prepare")
and is zero when the cache is warm. Also prints MEMIT with ``z_batch_size=1`` (targets optimised
one request at a time) so the gain of batching the targets is measured in the same run.

Usage: python bench/bench_memit.py [--n 20] [--threads 2] [--data PATH]
"""
from __future__ import annotations

import argparse
import time

import torch
from _common import configured, smollm2_and_requests

from harness.editor import Editor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--data", default=None, help="CounterFact file (default: the shipped sample)")
    args = ap.parse_args()
    model, tok, reqs = smollm2_and_requests(args.n, args.data, args.threads)
    print(f"SmolLM2-135M fp32 CPU, torch threads={torch.get_num_threads()}, {len(reqs)} CounterFact requests")

    rows = {}
    for label, algo in [("memit", configured("memit")), ("memit z_batch_size=1", configured("memit", z_batch_size=1))]:
        t = time.perf_counter()
        algo.prepare(model, tok)  # templates + C (cached on disk after the first run)
        prep = time.perf_counter() - t
        out = Editor(model, tok, algo, probes=None).edit(reqs)
        info = out.report.info
        rows[label] = out.timings["edit"]
        print(f"{label:22s}: {out.timings['edit']:7.1f} s for the batch ({out.timings['edit'] / len(reqs):5.2f} s per "
              f"request): z {info['t_z']:.1f} s, layers {info['t_layers']:.1f} s; prepare {prep:.1f} s; "
              f"z loss {out.report.losses['z_loss_start']:.2f} -> {out.report.losses['z_loss_end']:.3f}; "
              f"restore {out.timings['restore'] * 1e3:.1f} ms")

    rome = Editor(model, tok, configured("rome"), probes=None)
    rome.edit(reqs[0])  # warm-up: context templates
    t = time.perf_counter()
    for r in reqs:
        rome.edit(r)
    rows["rome"] = time.perf_counter() - t
    print(f"{'rome, one at a time':22s}: {rows['rome']:7.1f} s for {len(reqs)} edits ({rows['rome'] / len(reqs):5.2f} s per edit)")
    print(f"memit batch / {len(reqs)} rome edits: {rows['memit'] / rows['rome']:.2f}x the time "
          f"({rows['rome'] / rows['memit']:.1f}x faster); batching z: "
          f"{rows['memit z_batch_size=1'] / rows['memit']:.2f}x faster than one at a time")


if __name__ == "__main__":
    main()
