"""Per-case overhead of the run loop (everything outside the edit call and the probes).

Runs the tiny model with ``algorithm=none`` and ``direct`` over N cases (default 50) into a temporary
directory, in one process (the second configuration reuses the loaded model and the pre-edit
measurements, as sweep jobs in one worker do), and prints per case: wall time, the Editor's parts
(pre, edit, probe, restore + verify) and the rest, i.e. the runner's own overhead (row building,
fsynced CSV appends, seeding, bookkeeping).

    python bench/bench_runner.py [--cases 50] [--threads 1]
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from harness.cli import compose_config, to_config
from harness.cases import CaseLog
from harness.premeasure import PreMeasurements
from harness.results import as_float, read_rows
from harness.runner import ModelCache, finish
from harness.runsetup import setup_run
from harness.single import run_single


def bench(algorithm: str, cases: int, threads: int, out: Path, cache: ModelCache) -> dict[str, float]:
    overrides = ["experiment=smoke", f"algorithm={algorithm}", f"data.limit={cases}", f"threads={threads}"]
    cfg = to_config(compose_config(overrides))
    t0 = time.perf_counter()
    run = setup_run(cfg, out, overrides, cache=cache)
    cases, pre = CaseLog(run), PreMeasurements(run)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_single(run, cases, pre, progress=False)
    result = finish(cases, out)
    wall = time.perf_counter() - t0
    rows = [r for r in read_rows(out / "cases.csv") if r["point"] == "edit"]
    n = len(rows)
    # time_pre_s is the seconds of a call that measured pre_batch_size cases (0 when reused)
    pre_ms = sum(as_float(r["time_pre_s"]) / max(as_float(r["pre_batch_size"]), 1) for r in rows) / n
    part = {k: sum(as_float(r[f"time_{k}_s"]) for r in rows) / n for k in ("edit", "probe", "restore", "verify")}
    part = {"pre": pre_ms, **part}
    return {"cases": n, "errors": result.n_errors, "setup_s": setup, "wall_ms": 1e3 * wall / n,
            **{f"{k}_ms": 1e3 * v for k, v in part.items()}, "overhead_ms": 1e3 * (wall / n - sum(part.values()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cache = ModelCache()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cache.get(to_config(compose_config(["experiment=smoke", f"threads={args.threads}"])))
        print(f"model load (tiny): {time.perf_counter() - t0:.2f} s")
        results = {alg: bench(alg, args.cases, args.threads, Path(tmp) / alg, cache) for alg in ("none", "direct")}
    keys = list(next(iter(results.values())))
    print(f"{'per case':<12}" + "".join(f"{alg:>10}" for alg in results))
    for k in keys:
        print(f"{k:<12}" + "".join(f"{results[a][k]:>10.2f}" if isinstance(results[a][k], float)
                                   else f"{results[a][k]:>10}" for a in results))
    print("(ms per case; pre is measured in chunks of 8 and reused by the second run; setup_s is once per run)")


if __name__ == "__main__":
    main()
