"""AlphaEdit's update with P and C_p stored in float32 against float64, on SmolLM2 (the evidence of
``state_dtype`` in conf/algorithm/alphaedit.yaml).

The real keys of ``--earlier`` CounterFact requests give C_p, those of the next ``--batch`` the
batch's K; R is a fixed random residual (the update is linear in R, so its direction does not
change the relative error much). For each edited layer: ``alphaedit_delta`` with P and C_p as
float64 and as rounded to float32 (the solve is float64 in both), and the relative difference
``‖Δ32 − Δ64‖ / ‖Δ64‖``. P comes from the shipped config's statistics (cached on disk by any
earlier MEMIT/AlphaEdit run; computed otherwise, which takes long on a CPU).

Usage: python bench/bench_alphaedit_dtype.py [--earlier 100] [--batch 100] [--l2 10]
"""
from __future__ import annotations

import argparse

import torch
from _common import configured, smollm2_and_requests

from harness.algorithms.locate import compute_keys
from harness.algorithms.solve import alphaedit_delta
from harness.models import model_spec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--earlier", type=int, default=100)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--l2", type=float, default=None, help="default: the config's")
    ap.add_argument("--data", default=None)
    args = ap.parse_args()
    model, tok, reqs = smollm2_and_requests(args.earlier + args.batch, args.data, threads=1)
    algo = configured("alphaedit", state_dtype="float64")
    algo.prepare(model, tok)
    spec, hp = model_spec(model), algo.hparams
    l2 = hp.l2 if args.l2 is None else args.l2
    templates = algo._context_templates(model, tok)
    gen = torch.Generator().manual_seed(0)
    print(f"SmolLM2, {args.earlier} earlier edits in C_p, a batch of {args.batch}, l2={l2}")
    for layer in hp.layers:
        keys = compute_keys(model, tok, spec, layer, reqs, templates).to(torch.float64)
        earlier, batch = keys[:args.earlier], keys[args.earlier:].T  # C_p from the first; K [d_ff, n]
        cp = earlier.T @ earlier
        proj = algo.projector(model, layer).to(torch.float64)
        resid = torch.randn(model.config.hidden_size, batch.shape[1], generator=gen, dtype=torch.float64)
        d64 = alphaedit_delta(batch, resid, proj, cp, l2)
        d32 = alphaedit_delta(batch, resid, proj.float(), cp.float(), l2)
        rel = float((d32 - d64).norm() / d64.norm())
        print(f"layer {layer}: ‖Δ‖ {float(d64.norm()):.4g}, relative difference float32 vs float64 storage {rel:.2e}")


if __name__ == "__main__":
    main()
