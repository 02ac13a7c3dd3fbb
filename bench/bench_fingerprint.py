"""What the Editor's whole-model verification costs: fingerprints, ``StateSignature``, ``model_digest``.

For the tiny model and SmolLM2-135M (fp32 and bf16, CPU) prints the median seconds of:
  blind      the former position-blind fingerprint (sum and sum of squares of the bits), for reference;
  prints     ``tensor_fingerprint`` of every parameter and buffer (the new, position-sensitive one);
  take       ``StateSignature.take`` (prints + module tree, hooks, flags: what the Editor does per edit);
  compare    ``differences`` between two signatures;
  digest     ``model_digest``.
With ``--rome``, also three ROME edits on SmolLM2 through the Editor (layer 5, 25 steps, as
bench/bench_rome.py), to set the verification against the edit it checks.

Usage: python bench/bench_fingerprint.py [--threads N] [--repeat 5] [--no-smollm2] [--rome]

Measured (torch 2.13 CPU, 1 thread, a machine shared with other jobs, load ~13; medians of 3):
SmolLM2 fp32 blind 2.03 s, prints 1.43 s, take 1.23 s, compare 13 ms, digest 1.24 s; bf16: blind
1.43 s, take 1.12 s. The old fingerprint allocated a squared copy of each tensor; the new one works
in 2 MiB chunks and costs no more. ROME edits (layer 5, 25 steps; 2 threads on the same loaded
machine): verify 3.2-4.9 s against edits of 200-560 s, 1-2.5 % of an edit.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from harness.fingerprints import raw_bits, tensor_fingerprint
from harness.models import load_model
from harness.signature import StateSignature
from harness.snapshot import model_digest


def _medians(fns: dict[str, Callable[[], object]], n: int) -> dict[str, float]:
    """Median seconds of each function, the functions interleaved so that load on the machine hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up (tables, allocator)
    for _ in range(n):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _blind(model: nn.Module) -> None:
    for t in [*model.parameters(), *model.buffers()]:
        x = raw_bits(t)
        int(x.sum(dtype=torch.int64)), int((x * x).sum(dtype=torch.int64))


def _prints(model: nn.Module) -> None:
    for t in [*model.parameters(), *model.buffers()]:
        tensor_fingerprint(t)


def measure(label: str, model: nn.Module, repeat: int) -> None:
    n = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    sig = StateSignature.take(model)
    other = StateSignature.take(model)
    times = _medians({"blind": lambda: _blind(model), "prints": lambda: _prints(model),
                      "take": lambda: StateSignature.take(model), "compare": lambda: sig.differences(other),
                      "digest": lambda: model_digest(model)}, repeat)
    print(f"{label:20s} {n / 1e6:7.2f} M elements  " + "  ".join(f"{k} {v * 1e3:7.1f} ms" for k, v in times.items())
          + f"  (take / blind = {times['take'] / times['blind']:.2f})")


def rome_edit(model: nn.Module, tok, repeat: int) -> None:
    from harness.algorithms.rome import Rome
    from harness.data import load_requests
    from harness.editor import Editor

    algo = Rome(layer=5, v_num_grad_steps=25, context_template_length_params=[[5, 10], [10, 10]],
                mom2_adjustment=False)
    editor = Editor(model, tok, algo, probes=None)
    for i, req in enumerate(load_requests("counterfact", limit=repeat + 1).requests):
        t = editor.edit(req).timings
        print(f"ROME edit {'(warm-up)' if i == 0 else i}: edit {t['edit']:.2f} s, restore {t['restore'] * 1e3:.2f} ms, "
              f"verify (StateSignature + compare) {t['verify']:.3f} s = {t['verify'] / t['edit']:.1%} of the edit")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-smollm2", action="store_true", help="the tiny model only")
    ap.add_argument("--rome", action="store_true", help="also time ROME edits on SmolLM2 (minutes)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU")
    tiny, _ = load_model("tiny", device="cpu", dtype="float32")
    measure("tiny fp32", tiny, args.repeat)
    if args.no_smollm2:
        return
    model, tok = load_model("smollm2", device="cpu", dtype="float32")
    measure("SmolLM2-135M fp32", model, args.repeat)
    if args.rome:
        rome_edit(model, tok, 2)
    measure("SmolLM2-135M bf16", model.to(torch.bfloat16), args.repeat)


if __name__ == "__main__":
    main()
