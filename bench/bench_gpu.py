"""ROME, MEMIT (one batch) and AlphaEdit (sequential batches) on a GPU: seconds per edit and peak memory.

For each dtype (float32 and bfloat16 by default) the model is loaded on the GPU (or spread over the
visible GPUs with ``--device-map auto``) and edited through ``harness.editor.Editor`` without probes:

* ROME: ``--rome`` single edits (snapshot -> apply -> restore), seconds per edit;
* MEMIT: one batch of ``--n`` requests, seconds per edit = the batch's seconds / n;
* AlphaEdit: ``--n`` requests accumulating in batches of ``--alpha-batch`` (sequential editing), then
  the base model restored.

Peak memory is the CUDA allocator's peak during the algorithm's calls (``harness.memory``; the
weights included), printed beside the anchors' figures: ROME about 2 s per edit on GPT-2 XL on one
A6000 (Meng et al. 2022); the field's best-known tool lists 31 GB for ROME on LLaMA-2-7B. Settings
are the composed config's for ``--family`` (conf/algorithm_family; smollm2, gpt2 or llama), so the
statistics cache is the runs' own. The largest models that install offline: docs/scale.md.

Without a CUDA device it exits with status 2 and says so.

Usage: python bench/bench_gpu.py [--model smollm2|DIR|FILE.gguf] [--family llama] [--n 100]
           [--rome 10] [--alpha-batch 25] [--dtypes float32,bfloat16] [--device-map auto] [--data PATH]
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any, Optional

import torch

from harness.algorithms import get_algorithm
from harness.cli import compose_config, to_config
from harness.config import validate
from harness.data import load_requests
from harness.editor import Editor
from harness.memory import MIB, PeakMemory, model_devices
from harness.models import load_model

ANCHORS = {"rome": "~2 s/edit, GPT-2 XL fp32, one A6000 (ROME paper); 31 GB for LLaMA-2-7B (EasyEdit's table)",
           "memit": "10,000 facts on GPT-J in 7.44 h on one GPU (MEMIT paper: ~2.7 s/fact)",
           "alphaedit": "2,000 edits in batches of 100 on Llama-3-8B (AlphaEdit paper; no time given)"}


def configured(name: str, family: Optional[str], **changes: Any):
    """Algorithm ``name`` with the hyperparameters the runs compose for ``family``."""
    overrides = [f"algorithm={name}"] + ([f"family={family}"] if family else [])
    return get_algorithm(name)(validate(to_config(compose_config(overrides))), **changes)


def timed(model: Any, label: str, fn) -> tuple[float, float]:
    """(seconds, peak GiB) of ``fn()`` on the model's devices, synchronised."""
    torch.cuda.synchronize()
    with PeakMemory(model_devices(model)) as mem:
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    peak = (mem.peak.peak_bytes or 0) / (1024 * MIB)
    logging.getLogger(__name__).info("%s: %.1f s, peak %.2f GiB", label, seconds, peak)
    return seconds, peak


def run_dtype(args: argparse.Namespace, dtype: str, requests: list) -> list[tuple[str, str, float, float]]:
    """Rows (algorithm, dtype, seconds per edit, peak GiB) for one dtype."""
    model, tok = load_model(args.model, device="cuda", dtype=dtype, device_map=args.device_map)
    rows = []
    rome = Editor(model, tok, configured("rome", args.family), probes=None)
    rome.edit(requests[0])  # warm-up: context templates, kernels
    s, peak = timed(model, "rome", lambda: [rome.edit(r) for r in requests[1:args.rome + 1]])
    rows.append(("rome", dtype, s / args.rome, peak))

    memit = configured("memit", args.family)
    memit.prepare(model, tok)  # C: cached on disk after the first run
    editor = Editor(model, tok, memit, probes=None)
    s, peak = timed(model, "memit", lambda: editor.edit(requests[:args.n]))
    rows.append((f"memit (batch {args.n})", dtype, s / args.n, peak))

    alpha = configured("alphaedit", args.family)
    alpha.prepare(model, tok)  # P
    seq = Editor(model, tok, alpha, probes=None, keep_original_weight=False)
    batches = [requests[i:i + args.alpha_batch] for i in range(0, args.n, args.alpha_batch)]
    s, peak = timed(model, "alphaedit", lambda: [seq.edit(b) for b in batches])
    seq.restore()
    rows.append((f"alphaedit (seq. {len(batches)}x{args.alpha_batch})", dtype, s / args.n, peak))
    del model, rome, editor, seq
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", help="smollm2, a local model directory or a .gguf file")
    ap.add_argument("--family", default=None, help="settings family (smollm2, gpt2, llama); default: the config's")
    ap.add_argument("--n", type=int, default=100, help="MEMIT's batch, AlphaEdit's total edits")
    ap.add_argument("--rome", type=int, default=10, help="timed ROME edits (after one warm-up)")
    ap.add_argument("--alpha-batch", type=int, default=25)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--device-map", default=None, help="spread over the visible GPUs (accelerate: auto, balanced)")
    ap.add_argument("--data", default=None, help="CounterFact file (default: the shipped sample)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device visible (torch.cuda.is_available() is False); nothing measured. "
              "Run it on a machine with a GPU (docs/scale.md).", file=sys.stderr)
        raise SystemExit(2)
    logging.basicConfig(level=logging.WARNING)
    requests = list(load_requests("counterfact", args.data, limit=max(args.n, args.rome + 1)).requests)
    rows = []
    for dtype in args.dtypes.split(","):
        rows += run_dtype(args, dtype, requests)
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    print(f"{args.model} on {names}")
    print(f"{'algorithm':28s} {'dtype':9s} {'s/edit':>8s} {'peak GiB':>9s}  anchor")
    for name, dtype, spe, peak in rows:
        print(f"{name:28s} {dtype:9s} {spe:8.2f} {peak:9.2f}  {ANCHORS[name.split()[0]]}")


if __name__ == "__main__":
    main()
