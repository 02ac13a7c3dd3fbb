"""Seconds per ROME edit on SmolLM2-135M (CPU), the share spent in the v* loop, and the restore cost.

Setting of the reference point in ``../shared/NOTES.md`` beside the repository (about 38.6 s per edit for the field's
best-known tool on this machine): layer 5, 25 optimisation steps, 21 context templates
([[5, 10], [10, 10]]), no covariance adjustment. Edits go through ``harness.editor.Editor`` without
probes, so each edit is snapshot -> apply -> restore (verified).

Also prints the v* loop's floor: the seconds of one forward + backward of exactly what a step must
run (the suffix tokens through the edited block and those above it, the blocks below replayed:
``harness.algorithms.replay``), times the Adam steps taken, against the loop's measured seconds;
the rest is the loss, Adam and the bookkeeping.

Usage: python bench/bench_rome.py [--edits 3] [--full] [--no-replay]
  (--full: no fast path; --no-replay: recompute the blocks below the edited one at every step)
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
import time

import torch
from _common import SHARED_DATA

import harness.algorithms.rome as rome_module
from harness.algorithms.hooks import Hooks, model_device
from harness.algorithms.replay import BlockReplay
from harness.algorithms.rome import Rome
from harness.algorithms.target import DeltaForward, reference_pass
from harness.algorithms.target_rows import build_rows, full_layout, select, split_at_subject
from harness.editor import Editor
from harness.models import get_module, load_model, model_spec, num_layers
from harness.tokens import pad_id
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


def step_floor(model, tok, req: EditRequest, layer: int, templates: list[str], replay: bool,
               repeats: int = 5) -> tuple[float, float]:
    """(wall, CPU) seconds of one forward + backward through what a v* step must run (no loss, no
    Adam). On a busy machine the process's CPU seconds are the stable measure."""
    spec = model_spec(model)
    b = build_rows(tok, [req], templates, model_device(model))
    full = full_layout(b)
    last = get_module(model, spec.layer.format(num_layers(model) - 1))
    fwd = DeltaForward(model, spec, get_module(model, spec.mlp.format(layer)), last, b.row_req)
    _, v_init = reference_pass(fwd, b, full)
    cut = split_at_subject(model, b, pad_id(tok))
    if replay and layer > 0:
        fwd.replay = BlockReplay([get_module(model, spec.layer.format(i)) for i in range(layer)])
    v = select(b, cut, torch.ones(1, dtype=torch.bool))
    delta = torch.zeros_like(v_init, requires_grad=True)
    with Hooks() as hooks:
        fwd.attach(hooks)
        fwd(v, delta)  # step 0: records the replayed blocks
        t, cpu = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            logits = fwd(v, delta)
            torch.autograd.grad(logits.float().logsumexp(-1).sum(), [delta])
    return (time.perf_counter() - t) / repeats, (time.process_time() - cpu) / repeats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--edits", type=int, default=3, help="timed edits after one warm-up edit")
    ap.add_argument("--full", action="store_true", help="disable the fast path (full forward every step)")
    ap.add_argument("--no-replay", action="store_true", help="recompute the blocks below the edited one every step")
    args = ap.parse_args()
    if args.no_replay:  # the comparison only: the algorithm has no switch for it
        rome_module.optimize_target = functools.partial(rome_module.optimize_target, replay=False)
    logging.basicConfig(level=logging.WARNING)
    model, tok = load_model("smollm2", device="cpu", dtype="float32")
    algo = Rome(layer=5, target={"num_grad_steps": 25}, templates={"length_params": [[5, 10], [10, 10]]},
                mom2_adjustment=False, fast_path=not args.full)
    editor = Editor(model, tok, algo, probes=None)
    records = load_records(args.edits + 1)
    print(f"SmolLM2-135M fp32 CPU, torch threads={torch.get_num_threads()}, layer 5, 25 steps, "
          f"21 templates, mom2_adjustment=false, fast_path={not args.full}, replay={not args.no_replay}")
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
    steps = statistics.mean(r[5] for r in timed)
    print(f"mean Adam steps: {steps:.1f}")
    templates = algo.templates.get(model, tok, algo.hparams.templates.length_params, algo.hparams.templates.seed)
    loop = statistics.mean(r[2] for r in timed)
    for replay in (True, False):
        floor, cpu = step_floor(model, tok, records[-1], 5, templates, replay)
        print(f"v* loop floor ({'replayed lower blocks' if replay else 'all blocks every step'}): {floor:.3f} s "
              f"({cpu:.3f} s CPU) per forward+backward x {steps + 1:.0f} evaluations = {floor * (steps + 1):.2f} s; "
              f"loop measured {loop:.2f} s = {loop / (floor * (steps + 1)):.2f}x that floor")
    print(f"restore / edit: {sum(r[3] for r in timed) / sum(r[0] for r in timed):.4%} "
          f"(restore {statistics.mean(r[3] for r in timed) * 1e3:.2f} ms; whole-model verify "
          f"{statistics.mean(r[4] for r in timed):.2f} s, not part of restore)")


if __name__ == "__main__":
    main()
