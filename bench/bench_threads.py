"""How torch's CPU thread settings behave when other processes keep the cores busy.

Runs a fixed piece of the edit workload (forward + backward of SmolLM2 over a batch shaped like
ROME's v* optimisation: 21 prompts of ~20 tokens) in a fresh process per setting, optionally with
``--busy N`` CPU-bound processes running beside it, and prints seconds per step and the ratio to the
quiet default. Settings: torch's default (2 threads here), ``threads=1``, and two threads with
OpenMP's passive wait policy (threads sleep instead of spinning at barriers).

    python bench/bench_threads.py --busy 0
    python bench/bench_threads.py --busy 2
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

WORK = r"""
import os, sys, time, torch
from harness.models import load_model
threads = int(sys.argv[1])
if threads:
    torch.set_num_threads(threads)
model, tok = load_model("smollm2", device="cpu", dtype="float32")
ids = torch.randint(100, 40000, (21, 20))
emb = model.get_input_embeddings()(ids).detach().requires_grad_()  # gradients w.r.t. activations, as in v*
def step():
    emb.grad = None
    model(inputs_embeds=emb, labels=ids).loss.backward()
step()
t = time.perf_counter()
for _ in range(int(sys.argv[2])):
    step()
print((time.perf_counter() - t) / int(sys.argv[2]))
"""

SETTINGS = {"default (torch's threads)": ({}, 0), "threads=1": ({}, 1),
             "2 threads, OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", type=int, default=2, help="CPU-bound processes running beside the workload")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        time.sleep(0.5 if hogs else 0)
        for name, (env, threads) in SETTINGS.items():
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")} | env
            out = subprocess.run([sys.executable, "-c", WORK, str(threads), str(args.steps)], env=env,
                                 capture_output=True, text=True, check=True).stdout.split()[-1]
            print(f"busy={args.busy}  {name:38s} {float(out):7.3f} s/step  load={os.getloadavg()[0]:.1f}",
                  flush=True)
    finally:
        for h in hogs:
            h.kill()


if __name__ == "__main__":
    main()
