"""Snapshot size and take/restore/verify times for one MLP down-projection of SmolLM2-135M's shape.

Usage: python bench/bench_snapshot.py [--real]   (--real uses the real SmolLM2 instead of a same-shaped tiny Llama)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from harness.snapshot import WeightsCopy, fingerprint


def _time(fn, n=50):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", action="store_true", help="load the real SmolLM2 (else random weights, same shapes)")
    args = ap.parse_args()
    if args.real:
        from harness.models import load_model

        model, _ = load_model("smollm2", device="cpu", dtype="float32")
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg).eval()
    name = "model.layers.5.mlp.down_proj.weight"
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        snap = WeightsCopy.take(model, [name])
        t_take = _time(lambda: WeightsCopy.take(model, [name]))
        t_restore = _time(lambda: snap.restore(model))
        t_verify = _time(lambda: snap.verify(model))
        t_fp = _time(lambda: fingerprint(model), n=5)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{str(dtype):15s} {name} shape={tuple(snap.tensors[name].shape)} snapshot={snap.nbytes / 2**20:.2f} MiB "
              f"({snap.nbytes} B)  take={t_take * 1e3:.2f} ms  restore={t_restore * 1e3:.2f} ms  "
              f"verify={t_verify * 1e3:.2f} ms  whole-model fingerprint ({n_params / 1e6:.1f} M params)={t_fp * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
