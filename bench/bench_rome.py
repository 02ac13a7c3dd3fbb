"""Seconds per ROME edit on SmolLM2-135M (CPU), the share spent in the v* loop, and the restore cost.

Setting of the reference point in ``../shared/NOTES.md`` beside the repository (about 38.6 s per edit for the field's
best-known tool on this machine): layer 5, 25 optimisation steps, 21 context templates
([[5, 10], [10, 10]]), no covariance adjustment. Edits go through ``harness.editor.Editor`` without
probes, so each edit is snapshot -> apply -> restore (verified).

Usage: python bench/bench_rome.py [--edits 3] [--full]   (--full: no fast path, for comparison)
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics

import torch
from _common import SHARED_DATA

from harness.algorithms.rome import Rome
from harness.editor import Editor
from harness.models import load_model
from harness.types import EditRequest

COUNTERFACT = SHARED_DATA / "counterfact-train.json"  # dev fallback only


def load_records(n: int) -> list[EditRequest]:
    """CounterFact requests: ``harness.data`` when it exists, else read the dev copy by hand."""
    try:
        from harness.data import load_requests
    except ImportError:
        load_requests = None
    if load_requests is not None:
        return list(load_requests("counterfact", limit=n))
    out = []
    for rec in json.loads(COUNTERFACT.read_text()):
        if rec["subject"] in rec["prompt"]:
            out.append(EditRequest(case_id=str(rec["case_id"]), prompt=rec["prompt"].replace(rec["subject"], "{}", 1),
                                   subject=rec["subject"], target_new=rec["target_new"],
                                   target_true=rec["ground_truth"]))
        if len(out) == n:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--edits", type=int, default=3, help="timed edits after one warm-up edit")
    ap.add_argument("--full", action="store_true", help="disable the fast path (full forward every step)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model, tok = load_model("smollm2", device="cpu", dtype="float32")
    algo = Rome(layer=5, target={"num_grad_steps": 25}, templates={"length_params": [[5, 10], [10, 10]]},
                mom2_adjustment=False, fast_path=not args.full)
    editor = Editor(model, tok, algo, probes=None)
    records = load_records(args.edits + 1)
    print(f"SmolLM2-135M fp32 CPU, torch threads={torch.get_num_threads()}, layer 5, 25 steps, "
          f"21 templates, mom2_adjustment=false, fast_path={not args.full}")
    rows = []
    for i, req in enumerate(records):
        out = editor.edit(req)
        info, t = out.report.info, out.timings
        rows.append((t["edit"], info["t_v"], info["t_v_loop"], t["restore"], t["verify"], info["steps"]))
        tag = "warm-up" if i == 0 else f"edit {i}"
        print(f"{tag:8s} case {req.case_id:>6s} {req.subject!r} -> {req.target_new!r}: edit {t['edit']:.2f}s "
              f"(prepare {info['t_prepare']:.2f}, keys {info['t_keys']:.2f}, v* {info['t_v']:.2f} "
              f"[loop {info['t_v_loop']:.2f}], update {info['t_update']:.3f}), steps {info['steps']:.0f}, "
              f"v loss {out.report.losses['v_loss_start']:.3f} -> {out.report.losses['v_loss_end']:.3f}, "
              f"|dW| {info['delta_norm_max']:.3f}, restore {t['restore'] * 1e3:.2f} ms, verify {t['verify']:.2f}s")
    timed = rows[1:]
    edit = statistics.mean(r[0] for r in timed)
    print(f"mean seconds per edit (over {len(timed)} after warm-up): {edit:.2f}  "
          f"(reference 38.6 s; target <= 19.3 s)")
    print(f"share in v* optimisation: {sum(r[1] for r in timed) / sum(r[0] for r in timed):.1%} "
          f"(of which the forward/backward loop: {sum(r[2] for r in timed) / sum(r[0] for r in timed):.1%})")
    print(f"mean Adam steps: {statistics.mean(r[5] for r in timed):.1f}")
    print(f"restore / edit: {sum(r[3] for r in timed) / sum(r[0] for r in timed):.4%} "
          f"(restore {statistics.mean(r[3] for r in timed) * 1e3:.2f} ms; whole-model verify "
          f"{statistics.mean(r[4] for r in timed):.2f} s, not part of restore)")


if __name__ == "__main__":
    main()
