"""Export time, file sizes and ONNX parity: the tiny Llama/GPT-2, and SmolLM2 before and after a ROME edit.

Usage: python bench/bench_export.py [--out DIR] [--threads N] [--tiny-only]

SmolLM2 (float32, CPU) gets the README's ROME edit ("The mother tongue of Danielle Darrieux is" ->
English) through a sequential Editor; the delta and a run.json go into a run directory, which
``harness.export.export_run`` then exports as ONNX (edited and --base), HF and a state_dict. The ONNX
graphs are also checked on 64 prompts of the shipped CounterFact sample (more positions than the
run's own five). The state_dict is overlaid onto a fresh base (``model.weights``) and compared bit for bit.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from harness.algorithms import get_algorithm
from harness.cli import compose_config, to_config
from harness.config import validate
from harness.data import load_requests
from harness.editor import Editor, apply_delta
from harness.export import export_model, export_run
from harness.models import load_model
from harness.onnx_export import check_parity
from harness.snapshot import bit_equal

DARRIEUX = {"case_id": "0", "prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
            "target_new": "English", "target_true": "French",
            "paraphrase_prompts": ["Danielle Darrieux, a native", "Danielle Darrieux spoke the language"],
            "neighborhood_prompts": ["The mother tongue of Léon Blum is", "The native language of Montesquieu is"]}


def _mib(files: dict[str, int]) -> float:
    return sum(files.values()) / 2**20


def tiny(out: Path) -> None:
    prompts = [r.rewrite_prompt for r in load_requests("counterfact", limit=16).requests]
    for arch in ("llama", "gpt2"):
        model, tok = load_model("tiny", device="cpu", dtype="float32", tiny={"arch": arch})
        res = export_model(model, tok, "onnx", out / f"tiny_{arch}", prompts=prompts, overwrite=True)
        print(f"tiny {arch}: export {res.seconds:.1f}s, {_mib(res.files):.2f} MiB; {res.parity.summary()}")


def smollm2(out: Path) -> None:
    run_dir = out / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    data = run_dir / "darrieux.jsonl"
    data.write_text(json.dumps(DARRIEUX) + "\n")
    cfg = to_config(compose_config(["model=smollm2", "algorithm=rome", "keep_original_weight=false", "data=jsonl",
                                    f"data.path={data}", "device=cpu", "dtype=float32"]))
    (run_dir / "run.json").write_text(json.dumps({"config": dataclasses.asdict(cfg)}, default=str))
    model, tok = load_model("smollm2", device="cpu", dtype="float32")
    editor = Editor(model, tok, get_algorithm("rome")(validate(cfg)), keep_original_weight=False)
    t0 = time.perf_counter()
    editor.edit(load_requests("jsonl", data).requests[0])
    print(f"SmolLM2 ROME edit: {time.perf_counter() - t0:.1f}s")
    editor.save_delta(run_dir / "delta.safetensors")
    edited = {n: p.detach().clone() for n, p in model.named_parameters()}
    del editor, model
    wide = [r.rewrite_prompt for r in load_requests("counterfact", limit=64).requests]
    for name, base in (("edited", False), ("base", True)):
        res = export_run(run_dir, "onnx", out / f"onnx_{name}", base=base, overwrite=True)
        p = res.parity
        pred = next(x for x in p.predictions if x["prompt"].startswith("The mother tongue of Danielle"))
        print(f"SmolLM2 {name} ONNX: export+check {res.seconds:.1f}s, model.onnx {res.files['model.onnx'] / 2**20:.1f} "
              f"MiB; run prompts: {p.summary()}; Darrieux -> torch {pred['torch']!r}, onnx {pred['onnx']!r}")
        m, t = load_model("smollm2", device="cpu", dtype="float32")
        if not base:
            apply_delta(m, run_dir / "delta.safetensors")
        t0 = time.perf_counter()
        w = check_parity(m, t, out / f"onnx_{name}" / "model.onnx", wide, raise_on_fail=False)
        print(f"  64 CounterFact prompts ({time.perf_counter() - t0:.1f}s): {w.summary()}")
        del m
    for fmt in ("hf", "state_dict"):
        res = export_run(run_dir, fmt, out / fmt, overwrite=True)
        print(f"SmolLM2 {fmt}: {res.seconds:.1f}s, {_mib(res.files):.1f} MiB")
    t0 = time.perf_counter()
    sd = out / "state_dict" / "state_dict.safetensors"
    m, _ = load_model("smollm2", device="cpu", dtype="float32", weights=str(sd))
    differ = [n for n, p in m.named_parameters() if not bit_equal(p, edited[n])]
    print(f"state_dict overlay (load + overlay {time.perf_counter() - t0:.1f}s): {len(differ)} parameter(s) differ "
          f"from the edited model")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", help="where to write (default: a temporary directory)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny-only", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_export"))
    tiny(out)
    if not args.tiny_only:
        smollm2(out)


if __name__ == "__main__":
    main()
