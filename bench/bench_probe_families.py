"""Cost of each probe family per case on the real SmolLM2-135M (unedited), one family at a time.

For N CounterFact records, times ``build_probes([family]).measure`` for every built-in family that
needs no user files (counterfact, easyedit, fluency, fluency_short, wild), after one warm-up call,
and ``fluency`` + ``consistency`` together (compare with ``fluency`` alone) (the consistency texts are
fluency's; the reference files are synthetic: a vocabulary of the generated words, so the TF-IDF
work is real in size only roughly). Prints seconds per case. Run it with one thread on a quiet
machine, or note the load average beside the numbers.

Usage: python bench/bench_probe_families.py [--n 5] [--data ../shared/data/counterfact-val.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import SHARED_DATA

from harness.data import load_requests
from harness.models import load_model
from harness.probes import build_probes
from harness.types import EditRequest

FAMILIES = ["counterfact", "easyedit", "fluency", "fluency_short", "wild"]


def _rs_files(root: Path, requests: list[EditRequest]) -> dict[str, str]:
    """Synthetic RS files: every word of the prompts, one snippet per request (ids made up)."""
    words = sorted({w.lower() for r in requests for w in (r.rewrite_prompt + " " + r.target_new).split()})
    np.save(root / "idf.npy", np.ones(len(words)))
    (root / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(words)}))
    (root / "snips.json").write_text(json.dumps([{"relation_id": "R", "target_id": r.case_id, "samples": [
        {"name": r.subject, "text": f"{r.subject} {r.target_new}"}]} for r in requests]))
    return {"idf": str(root / "idf.npy"), "vocab": str(root / "vocab.json"), "snippets": str(root / "snips.json")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5, help="CounterFact records")
    ap.add_argument("--data", default=str(SHARED_DATA / "counterfact-val.json"), help="EasyEdit-layout CounterFact")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    model, tok = load_model("smollm2", device="cpu", dtype="float32")
    requests = list(load_requests("counterfact", args.data, limit=args.n))
    print(f"SmolLM2-135M-Instruct fp32, {torch.get_num_threads()} thread(s); {len(requests)} records of {args.data}")
    build_probes(["counterfact"]).measure(model, tok, requests[:1])  # warm-up
    for family in FAMILIES:
        suite = build_probes([family], batch_size=args.batch_size)
        t = time.perf_counter()
        suite.measure(model, tok, requests)
        print(f"{family:28s} {(time.perf_counter() - t) / len(requests):7.2f} s per case")
    with tempfile.TemporaryDirectory() as d:
        rs = [dataclasses.replace(r, relation_id="R", target_new_id=r.case_id) for r in requests]
        files = _rs_files(Path(d), rs)
        for names in (["fluency", "consistency"],):  # compare with the fluency line above
            suite = build_probes(names, batch_size=args.batch_size, settings={"consistency": files})
            t = time.perf_counter()
            suite.measure(model, tok, rs)
            print(f"{' + '.join(names):28s} {(time.perf_counter() - t) / len(rs):7.2f} s per case")


if __name__ == "__main__":
    main()
