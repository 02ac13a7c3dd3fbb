"""What writing an edit in half precision keeps: the old write (round Δ, then add) against one rounding.

Two measurements, each in float32 and in the half-precision dtypes asked for:

1. synthetic: random float64 updates of relative norm 1e-3 .. 1 added to the edited weight, written
   the old way (``W + Δ.to(dtype)`` in the weight's dtype: two roundings) and the new way
   (``write_deltas``: ``W + Δ`` in float32/float64, rounded once). Columns: relative error of the
   written change against Δ, and the share of Δ's entries that left the weight unchanged.
2. one ROME edit (conf/algorithm/rome.yaml's settings unless ``--fast``) on the model: Δ is computed
   once (float64), then written both ways from the same starting weight. Columns: the norm the old
   code reported (``||Δ.to(dtype)||``), the intended norm ``||Δ||``, the norm written, the write error,
   zeroed entries, the residual at the key ``||(W_stored − W) k − (v* − W k − b)|| / ||v* − W k − b||``
   and the log-probability of the new target after the edit.

Usage: python bench/bench_halfprec.py [--model tiny|smollm2] [--dtypes float32,bfloat16,float16] [--fast]

Measured (SmolLM2-135M, CPU, conf/algorithm/rome.yaml: layer 5, 25 steps, 21 templates; case 2,
Toko Yasuda -> piano; ||Δ|| = 13.74):

    write        error    zeroed   residual   log P(new)
    fp32 old     3e-7     0        8.8e-9     -0.081
    fp32 new     3e-7     0        8.4e-9     -0.081
    bf16 old     0.0204   0.113    7.38e-4    -0.070     (reported 13.739 = ||bf16(Δ)||; written 13.742)
    bf16 new     0.0203   0.113    7.31e-4    -0.072     (reported 13.742 = written; intended 13.739)

and on random updates of the same weight in bf16 (error old / new): 0.794 / 0.794 at ||Δ|| = 1e-3 ||W||,
0.165 / 0.165 at 1e-2, 0.0168 / 0.0166 at 0.1, 0.0030 / 0.0024 at 1.
"""
from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import torch

from harness.algorithms import rome as rome_module
from harness.algorithms.base import write_deltas
from harness.algorithms.rome import Rome
from harness.algorithms.solve import as_map, key_residual
from harness.data import load_requests
from harness.models import load_model, model_spec
from harness.probes import score_pairs
from _common import configured

log = logging.getLogger("bench_halfprec")
F64 = torch.float64


def write_old(param: torch.Tensor, delta: torch.Tensor) -> None:
    """The write before this change: Δ rounded to the weight's dtype, then added in that dtype."""
    with torch.no_grad():
        param.add_(delta.to(param.dtype))


def write_new(model: torch.nn.Module, name: str, delta: torch.Tensor) -> None:
    write_deltas(model, {name: delta})


def measure(before: torch.Tensor, after: torch.Tensor, delta: torch.Tensor) -> dict[str, float]:
    written = after.detach().to(F64) - before.to(F64)
    d = delta.to(F64)
    return {"intended": float(d.norm()), "written": float(written.norm()),
            "error": float((written - d).norm() / d.norm()),
            "zeroed": float(((written == 0) & (d != 0)).sum() / (d != 0).sum())}


def synthetic(model: torch.nn.Module, name: str, dtype: str) -> list[str]:
    param = model.get_parameter(name)
    base = param.detach().clone()
    lines = []
    for rel in (1e-3, 1e-2, 1e-1, 1.0):
        g = torch.Generator().manual_seed(0)
        d = torch.randn(base.shape, generator=g, dtype=F64)
        d = (d * (rel * float(base.to(F64).norm()) / float(d.norm()))).to(param.device)
        row = {}
        for mode in ("old", "new"):
            with torch.no_grad():
                param.copy_(base)
            write_old(param, d) if mode == "old" else write_new(model, name, d)
            row[mode] = measure(base, param, d)
        with torch.no_grad():
            param.copy_(base)
        lines.append(f"| {dtype} | {rel:g} | {row['old']['error']:.4f} | {row['new']['error']:.4f} | "
                     f"{row['old']['zeroed']:.3f} | {row['new']['zeroed']:.3f} |")
    return lines


def rome_edit(model: torch.nn.Module, tok: Any, algo: Rome, req: Any, dtype: str) -> list[str]:
    """One ROME edit; Δ written the old way and the new way from the same weight."""
    spec = model_spec(model)
    name = spec.mlp_out_weight(algo.hparams.layer)
    param = model.get_parameter(name)
    base = param.detach().clone()
    seen: dict[str, Any] = {}
    real_update = rome_module.rank_one_update

    def spy_update(weight, bias, u, key, target):
        seen.update(bias=bias, key=key, target=target)
        seen["delta"] = real_update(weight, bias, u, key, target)
        return seen["delta"]

    rome_module.rank_one_update = spy_update
    try:
        t = time.perf_counter()
        report = algo.apply(model, tok, [req])
        seconds = time.perf_counter() - t
    finally:
        rome_module.rank_one_update = real_update
    w_old = as_map(base, spec.out_transposed)
    key = seen["key"].to(F64)
    bias = seen["bias"].to(F64) if seen["bias"] is not None else 0.0
    wanted = seen["target"].to(F64) - w_old @ key - bias
    stored_delta = seen["delta"].T if spec.out_transposed else seen["delta"]
    lines = []
    for mode in ("old", "new"):
        with torch.no_grad():
            param.copy_(base)
        write_old(param, stored_delta) if mode == "old" else write_new(model, name, stored_delta)
        m = measure(base, param, stored_delta)
        residual = key_residual(as_map(param, spec.out_transposed) - w_old, key, wanted)
        logp = sum(score_pairs(model, tok, [(req.rewrite_prompt, req.target_new)])[0].logprobs)
        reported = float(stored_delta.to(param.dtype).float().norm()) if mode == "old" else report.delta_norms[name]
        lines.append(f"| {dtype} | {mode} | {reported:.5g} | {m['intended']:.5g} | {m['written']:.5g} | "
                     f"{m['error']:.4f} | {m['zeroed']:.3f} | {residual:.3g} | {logp:.3f} |")
    log.info("%s: the report says written %.5g, intended %.5g, write error %.4g, residual %.4g (edit %.1fs)", dtype,
             report.delta_norms[name], report.info[f"intended_norm.{name}"], report.info[f"write_error.{name}"],
             report.info[f"residual.{algo.hparams.layer}"], seconds)
    with torch.no_grad():
        param.copy_(base)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=["tiny", "smollm2"])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--fast", action="store_true", help="4 v steps, 3 templates (for a quick look)")
    ap.add_argument("--case", type=int, default=0, help="index of the CounterFact request")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("harness").setLevel(logging.WARNING)
    req = list(load_requests("counterfact", limit=args.case + 1).requests)[args.case]
    changes: dict[str, Any] = {}
    if args.fast:
        changes = dict(target={"num_grad_steps": 4}, templates={"length_params": [[5, 2]]})
    if args.model == "tiny":
        changes = {**dict(layer=1, target={"num_grad_steps": 25}, templates={"length_params": [[5, 10], [10, 10]]}),
                   **changes}

    def make_algo() -> Rome:
        if args.model == "tiny":
            return Rome(**changes)
        return configured("rome", **changes)  # conf/algorithm/rome.yaml: the runs' settings

    synth = ["| dtype | ‖Δ‖/‖W‖ | error old | error new | zeroed old | zeroed new |", "|---|---|---|---|---|---|"]
    edits = ["| dtype | write | reported | intended | written | error | zeroed | residual | log P(new) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for dtype in args.dtypes.split(","):
        model, tok = load_model(args.model, device="cpu", dtype=dtype)
        algo = make_algo()
        name = model_spec(model).mlp_out_weight(algo.hparams.layer)
        synth += synthetic(model, name, dtype)
        edits += rome_edit(model, tok, algo, req, dtype)
    print(f"\n{args.model}, ROME {algo.hparams}, case {req.case_id}: {req.subject} -> {req.target_new}\n")
    print("\n".join(synth))
    print()
    print("\n".join(edits))


if __name__ == "__main__":
    main()
