"""Memory of the editing algorithms: measured on SmolLM2 (CPU), estimated for an 8B model.

``--measure``: the peak resident memory (``VmHWM`` reset through ``/proc/self/clear_refs``, Linux)
above the loaded model while MEMIT's target optimisation runs for ``--n`` CounterFact requests in
one batch (the part whose per-step KV-cache copies the replay removed), and then one AlphaEdit
sequential step when its statistics are cached. Only ``/proc`` and functions that exist before and
after the change are used, so the same file measures an older checkout:
``PYTHONPATH=/path/to/old/checkout python bench/bench_memory.py --measure``.

``--estimate``: what the pieces weigh at the widths of a model config (default: Llama-3-8B's;
``--config path/to/config.json`` for another): weights, the edit snapshot, MEMIT's C, AlphaEdit's P
and C_p in float64 (before) and float32 (now), the Editor's per-step copy of C_p (before; none
now), C's per-batch device-to-host copy (before; once now) and the prompt KV cache that was
deep-copied at every optimisation step (before; shared now).

Usage: python bench/bench_memory.py [--measure [--n 16]] [--estimate [--config FILE]]
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

GB = 1e9
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "name": "Llama-3-8B"}


def hwm_bytes(field: str = "VmHWM") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def measure(n: int) -> None:
    from _common import configured, smollm2_and_requests

    from harness.algorithms.target import optimize_targets
    from harness.models import model_spec

    model, tok, reqs = smollm2_and_requests(n)
    algo = configured("memit")
    templates = algo._context_templates(model, tok)
    spec = model_spec(model)
    base = hwm_bytes("VmRSS")
    reset_hwm()
    t = time.perf_counter()
    optimize_targets(model, tok, spec, reqs, algo.hparams.layers[-1], algo.hparams.target, templates, where="block")
    print(f"z optimisation, {n} requests in one batch: {time.perf_counter() - t:.1f} s, peak RSS "
          f"{hwm_bytes() / 2**20:.0f} MiB, {(hwm_bytes() - base) / 2**20:.0f} MiB above the loaded model")


def estimate(cfg: dict, edit_layers: int = 5, rows: int = 16 * 11, prefix: int = 10) -> None:
    d, f, n_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * d // cfg["num_attention_heads"]
    params = n_layers * (2 * d * d + 2 * d * kv + 3 * d * f) + 2 * cfg["vocab_size"] * d  # attention, MLP, embeddings
    sq = f * f
    lines = [
        ("weights, bf16 / fp32", f"{2 * params / GB:.1f} / {4 * params / GB:.1f}", "same"),
        (f"edit snapshot, {edit_layers} down_proj, bf16", f"{edit_layers * d * f * 2 / GB:.2f}", "same"),
        (f"MEMIT C, {edit_layers} layers, fp32", f"{edit_layers * sq * 4 / GB:.1f}", "same"),
        (f"AlphaEdit P + C_p, {edit_layers} layers", f"{2 * edit_layers * sq * 8 / GB:.1f} (fp64)",
         f"{2 * edit_layers * sq * 4 / GB:.1f} (fp32)"),
        ("Editor's copy of C_p per step", f"{edit_layers * sq * 8 / GB:.1f}", "0 (held, not copied)"),
        ("C accumulation: host copies per batch per layer", f"{sq * 4 / GB:.2f} each", "one copy at the end"),
        (f"prompt KV cache copied per step ({rows} rows x {prefix} tokens)",
         f"{rows * prefix * n_layers * 2 * kv * 2 / GB:.2f}", "0 (shared)"),
    ]
    print(f"{cfg.get('name', 'model')}: d={d}, d_ff={f}, {n_layers} layers, kv width {kv}, "
          f"~{params / 1e9:.2f} B parameters")
    print(f"{'piece':55s} {'before (GB)':>18s}  now (GB)")
    for name, before, now in lines:
        print(f"{name:55s} {before:>18s}  {now}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--measure", action="store_true")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--estimate", action="store_true")
    ap.add_argument("--config", default=None, help="a model's config.json (default: Llama-3-8B's widths)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    if args.estimate or not args.measure:
        estimate(json.loads(Path(args.config).read_text()) if args.config else LLAMA3_8B)
    if args.measure:
        measure(args.n)


if __name__ == "__main__":
    main()
