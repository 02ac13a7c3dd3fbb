"""Where GRACE's deferral radius can lie: distances between hooked-module inputs on SmolLM2.

For each layer, the input of the block's MLP output projection at the last prompt token (GRACE's
key) is taken for the rewrite prompt, the paraphrase and the locality prompt of the first ``--n``
records of the shipped zsRE sample (not the evaluation windows). Printed per layer: the median key
norm, the distance from a key to the nearest other key (the split rule's scale), from a paraphrase
to its own key (what a radius must reach to generalise) and from a locality prompt to the nearest
key (what a radius must stay below to keep locality).

Usage: python bench/grace_distances.py [--n 40] [--layers 18,24,27] [--threads 1]
"""
from __future__ import annotations

import argparse

import torch

from harness.algorithms.hooks import module_input
from harness.data import load_requests
from harness.models import load_model, model_spec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--layers", default="18,24,27")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2", device="cpu", dtype="float32")
    reqs = list(load_requests("zsre", None, limit=args.n))
    spec = model_spec(model)
    for layer in (int(x) for x in args.layers.split(",")):
        module = model.get_submodule(spec.mlp_out.format(layer))

        def key(prompt: str) -> torch.Tensor:
            ids = tok(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                return module_input(model, module, input_ids=ids, use_cache=False)[0, -1]

        keys = torch.stack([key(r.rewrite_prompt) for r in reqs])
        para = torch.stack([key(r.paraphrase_prompts[0]) for r in reqs])
        loc = torch.stack([key(r.neighborhood[0].prompt) for r in reqs])
        kk = torch.cdist(keys, keys).fill_diagonal_(float("inf"))
        own = torch.cdist(para, keys).diagonal()
        near_loc = torch.cdist(loc, keys).min(1).values
        q = own.quantile(torch.tensor([0.25, 0.75]))
        print(f"layer {layer}: |key| median {keys.norm(dim=1).median():.2f}; nearest other key median "
              f"{kk.min(1).values.median():.2f} (min {kk.min():.2f}); paraphrase -> own key median {own.median():.2f} "
              f"(quartiles {q[0]:.2f}-{q[1]:.2f}); locality -> nearest key median {near_loc.median():.2f} "
              f"(min {near_loc.min():.2f})", flush=True)


if __name__ == "__main__":
    main()
