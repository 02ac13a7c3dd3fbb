"""``python -m harness.trace [OPTIONS...] [OVERRIDES...]``: which layer stores the facts? (causal tracing)

Causal tracing (Meng et al. 2022, ROME §2.1; the method is in ``harness.trace.patch``) over the first
``n`` records of any data set: the subject's token embeddings are corrupted with Gaussian noise of
``noise_scale`` (3) times the standard deviation of subject embeddings, then the clean state of each
(token, layer) is restored (the residual stream; MLP and attention outputs windowed), and the
probability of the true object is recorded. Tokens are grouped as in ROME's figure (first, middle,
last subject token, first subsequent token, further tokens, last token); the average indirect
effect (AIE) of each group and layer is written and drawn, and the layer where the MLP effect at
the last subject token peaks is printed with the override that edits there.

    python -m harness.trace model=smollm2 data=counterfact n=20
    python -m harness.trace model=tiny n=2 samples=3 out=runs/trace/tiny threads=1
    python -m harness.trace data=zsre n=50 window=5 answer=predicted

Options (``key=value``; everything else is a Hydra override of ``conf/config.yaml``, whose
``model``, ``data`` (kind, path, offset), ``seed``, ``device``, ``dtype`` and ``threads`` apply):
    n=20               records to trace (from ``data.offset`` on; ``data.limit`` is ignored)
    samples=10         noise samples per record (ROME: 10)
    noise_scale=3.0    noise std = noise_scale x std of subject embeddings (0: no corruption)
    noise_std=null     give the noise std directly instead
    noise_subjects=100 how many records' subjects the embedding std is estimated from
    window=10          layers restored together for mlp/attn (ROME: 10)
    kinds=residual,mlp,attn
    answer=true        true: the true object's first token; predicted: the model's own top token
    max_rows=50        rows (samples x restored layers) per forward: fewer let more blocks be
                       replayed instead of computed (CPU); more fill an accelerator
    out=DIR            output directory (default runs/trace/<date>_<time>_<model>)

Writes ``trace.csv`` (record, kind, token_group, layer, effect), ``trace_summary.csv`` (mean, sem
and count over records), ``trace_records.csv`` (per record: answer, p_clean, p_corrupt, subject
span), ``trace.json`` (options, noise std, peaks, timing) and ``trace_<kind>.png``.
"""
from __future__ import annotations

import logging
import sys
from datetime import datetime
from pathlib import Path

import torch

from harness.results import format_table
from harness.trace.report import TraceOptions, peak, run_trace


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; ``argv`` are trace options plus Hydra overrides."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(__doc__)
        return 0
    from harness.cli import compose_config, to_config
    from harness.data import load_requests
    from harness.models import load_model

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    options, overrides = TraceOptions.parse(args)
    cfg = to_config(compose_config(overrides))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tok = load_model(cfg.model.source, device=cfg.device, dtype=cfg.dtype, cache_dir=cfg.model.cache_dir,
                            trust_remote_code=cfg.model.trust_remote_code, spec=cfg.model.spec, tiny=cfg.model.tiny)
    d = cfg.data
    loaded = load_requests(d.kind, d.path, limit=max(options.n, options.noise_subjects), offset=d.offset,
                           skip_invalid=d.skip_invalid).requests
    name = cfg.model.name or cfg.model.source
    out = Path(options.out or f"runs/trace/{datetime.now():%Y-%m-%d_%H-%M-%S}_{name}")
    result = run_trace(model, tok, loaded[: options.n], options, out, seed=cfg.seed,
                       noise_requests=loaded[options.n:],
                       meta={"model": name, "data": {"kind": d.kind, "path": d.path, "offset": d.offset}})
    recs = result.records
    print(f"\ncausal tracing of {name}: {len(recs)} record(s), {options.samples} noise sample(s) of std "
          f"{result.noise_std:.4f}, {result.seconds:.0f}s")
    print(f"p({options.answer} answer): clean {sum(r['p_clean'] for r in recs) / len(recs):.4f}, "
          f"corrupted {sum(r['p_corrupt'] for r in recs) / len(recs):.4f}")
    table = []
    for kind in options.kinds:
        last = peak(result.summary, kind, "last")
        table.append({"kind": kind, "peak layer (last subject token)": result.peaks[kind][0],
                      "AIE": result.peaks[kind][1], "peak layer (last token)": last[0], "AIE ": last[1]})
    print(format_table(table, list(table[0]), floatfmt="{:.4f}"))
    if "mlp" in result.peaks:
        layer = result.peaks["mlp"][0]
        print(f"\nthe MLP effect at the last subject token peaks at layer {layer}; to edit there:\n"
              f"  python -m harness algorithm=rome algorithm.hparams.layer={layer}")
    print(f"tables and heatmaps: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
