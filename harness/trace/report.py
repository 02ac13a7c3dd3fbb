"""Causal tracing over many records: options, per-record effect rows by ROME's token groups, their
averages (the average indirect effect, AIE), the peak layer, and the files ``run_trace`` writes
(``trace.csv``, ``trace_summary.csv``, ``trace_records.csv``, ``trace.json``, ``trace_<kind>.png``).
The command line is ``harness.trace.cli``.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from harness.models import get_module, model_spec, num_layers
from harness.results import write_csv, write_json
from harness.trace.patch import TRACE_KINDS, RecordTrace, trace_record
from harness.trace.plot import plot_trace
from harness.trace.prompts import TOKEN_GROUPS, encode_trace_prompt, make_noise, noise_std, token_groups
from harness.types import EditRequest

log = logging.getLogger(__name__)

ANSWERS = ("true", "predicted")


@dataclass
class TraceOptions:
    """What to trace and how (the ``key=value`` options of the command; see the module docstring)."""

    n: int = 20
    samples: int = 10
    noise_scale: float = 3.0
    noise_std: float | None = None
    noise_subjects: int = 100
    window: int = 10
    kinds: tuple[str, ...] = TRACE_KINDS
    answer: str = "true"
    max_rows: int = 50
    out: str | None = None

    def __post_init__(self) -> None:
        self.kinds = tuple(self.kinds)
        for name in ("n", "samples", "window", "max_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"trace option {name} must be >= 1, got {getattr(self, name)}")
        if self.noise_scale < 0 or (self.noise_std is not None and self.noise_std < 0):
            raise ValueError("trace options noise_scale and noise_std must be >= 0")
        bad = [k for k in self.kinds if k not in TRACE_KINDS]
        if bad or not self.kinds:
            raise ValueError(f"trace option kinds={','.join(self.kinds)}: use some of {','.join(TRACE_KINDS)}")
        if self.answer not in ANSWERS:
            raise ValueError(f"trace option answer={self.answer!r}: use one of {ANSWERS}")

    @classmethod
    def parse(cls, args: Sequence[str]) -> tuple[TraceOptions, list[str]]:
        """Split ``key=value`` arguments into trace options and the remaining (Hydra) overrides.

        Raises:
            ValueError: a value that does not parse (the message names the option).
        """
        types = {"n": int, "samples": int, "noise_subjects": int, "window": int, "max_rows": int,
                 "noise_scale": float, "noise_std": lambda v: None if v.lower() in ("null", "none") else float(v),
                 "kinds": lambda v: tuple(k for k in v.split(",") if k), "answer": str, "out": str}
        values: dict[str, Any] = {}
        rest = []
        for arg in args:
            key, sep, value = arg.partition("=")
            if sep and key in types:
                try:
                    values[key] = types[key](value)
                except ValueError as exc:
                    raise ValueError(f"trace option {key}={value!r}: {exc}") from exc
            else:
                rest.append(arg)
        return cls(**values), rest


def record_rows(record: str, trace: RecordTrace) -> list[dict[str, Any]]:
    """Long rows (record, kind, token_group, layer, effect) of one traced prompt.

    ``effect`` = p(answer | corrupted, state restored) - p(answer | corrupted), averaged over the
    group's tokens; a group the prompt lacks gives no rows.
    """
    groups = token_groups(len(trace.prompt.ids), trace.prompt.subject)
    rows = []
    for kind, scores in trace.scores.items():
        for group, _ in TOKEN_GROUPS:
            if not groups[group]:
                continue
            effects = scores[groups[group]].mean(0) - trace.p_corrupt
            rows += [{"record": record, "kind": kind, "token_group": group, "layer": layer, "effect": float(e)}
                     for layer, e in enumerate(effects)]
    return rows


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Average indirect effects: mean, standard error and count over records per (kind, group, layer)."""
    cells: dict[tuple[str, str, int], list[float]] = {}
    for r in rows:
        cells.setdefault((r["kind"], r["token_group"], int(r["layer"])), []).append(float(r["effect"]))
    out = []
    for (kind, group, layer), xs in cells.items():
        mean = sum(xs) / len(xs)
        sem = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) if len(xs) > 1 else math.nan
        out.append({"kind": kind, "token_group": group, "layer": layer, "effect": mean, "sem": sem, "n": len(xs)})
    return out


def peak(summary: Sequence[Mapping[str, Any]], kind: str, group: str = "last_subject") -> tuple[int, float]:
    """(layer, effect) where the average effect of ``kind`` at ``group`` is largest.

    Raises:
        ValueError: no row of that kind and group.
    """
    cells = [(r["effect"], r["layer"]) for r in summary if r["kind"] == kind and r["token_group"] == group]
    if not cells:
        raise ValueError(f"no traced effect for kind {kind!r} at {group!r}")
    effect, layer = max(cells)
    return int(layer), float(effect)


@dataclass
class TraceResult:
    """What ``run_trace`` wrote and found.

    Attributes:
        out: the output directory.
        summary: rows of ``trace_summary.csv``.
        records: rows of ``trace_records.csv``.
        peaks: kind -> (layer, AIE) of the peak at the last subject token.
        noise_std: the standard deviation of the noise that was added.
        seconds: wall time of the tracing.
    """

    out: Path
    summary: list[dict[str, Any]]
    records: list[dict[str, Any]]
    peaks: dict[str, tuple[int, float]] = field(default_factory=dict)
    noise_std: float = 0.0
    seconds: float = 0.0


def run_trace(model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest], options: TraceOptions,
              out: str | Path, *, seed: int = 0, noise_requests: Sequence[EditRequest] = (), progress: bool = True,
              meta: Mapping[str, Any] | None = None) -> TraceResult:
    """Trace ``requests``, write the tables, heatmaps and ``trace.json`` into ``out``.

    ``trace.csv`` and ``trace_records.csv`` are rewritten (atomically) after every record; the
    summary, the heatmaps and ``trace.json`` at the end.

    Args:
        requests: the records to trace (``options.n`` is not applied here).
        seed: record i's noise is drawn with seed ``seed * 1_000_003 + i``.
        noise_requests: records whose subjects (with those of ``requests``) estimate the
            embedding std, unless ``options.noise_std`` gives the noise level.
        meta: extra facts for ``trace.json`` (model, data).

    Returns:
        A ``TraceResult``.

    Raises:
        ValueError: no request, or ``answer=true`` and a request without ``target_true``.
    """
    if not requests:
        raise ValueError("causal tracing needs at least one request")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = model_spec(model)
    prompts = []
    for r in requests:
        if options.answer == "true" and not r.target_true:
            raise ValueError(f"case {r.case_id}: no true object (target_true) to trace; use answer=predicted")
        prompts.append(encode_trace_prompt(tok, r.prompt, r.subject, r.target_true if options.answer == "true" else None))
    std = options.noise_std
    if std is None:
        subjects = [r.subject for r in requests] + [r.subject for r in noise_requests]
        std = options.noise_scale * noise_std(model, spec, tok, subjects)
    hidden = int(get_module(model, spec.embed).weight.shape[-1])
    t0 = time.perf_counter()
    rows, records = [], []
    # work: the tokens run from each traced position on, per kind (``trace_record``'s step)
    work = sum(n * (n + 1) // 2 for n in (len(p.ids) - p.subject[0] for p in prompts)) * len(options.kinds)
    with tqdm(total=work, desc="causal tracing", unit="tok", disable=not progress) as bar:
        for i, (r, prompt) in enumerate(zip(requests, prompts)):
            bar.set_postfix_str(r.subject[:24])
            noise = make_noise(options.samples, prompt.subject[1] - prompt.subject[0], hidden, std,
                               seed * 1_000_003 + i)
            trace = trace_record(model, spec, prompt, noise, options.kinds, options.window, options.max_rows,
                                 step=bar.update)
            rows += record_rows(r.case_id, trace)
            records.append({
                "record": r.case_id, "subject": r.subject, "prompt": r.rewrite_prompt,
                "answer": tok.decode([trace.prompt.answer_id]), "predicted": tok.decode([trace.predicted]),
                "p_clean": trace.p_clean, "p_corrupt": trace.p_corrupt, "n_tokens": len(prompt.ids),
                "subject_start": prompt.subject[0], "subject_end": prompt.subject[1]})
            # rewritten after every record, so an interrupted run keeps what it traced
            write_csv(out / "trace.csv", ["record", "kind", "token_group", "layer", "effect"], rows)
            write_csv(out / "trace_records.csv", list(records[0]), records)
    seconds = time.perf_counter() - t0
    summary = summarize(rows)
    write_csv(out / "trace_summary.csv", ["kind", "token_group", "layer", "effect", "sem", "n"], summary)
    peaks = {k: peak(summary, k) for k in options.kinds}
    labels = dict(TOKEN_GROUPS)
    for kind in options.kinds:
        plot_trace(out / f"trace_{kind}.png", summary, kind, [g for g, _ in TOKEN_GROUPS], labels,
                   num_layers(model), window=1 if kind == "residual" else options.window,
                   answer="true object" if options.answer == "true" else "predicted token", n=len(requests))
    write_json(out / "trace.json", {
        **(meta or {}), "options": asdict(options), "seed": seed, "n_records": len(requests),
        "noise_std": std, "noise_subjects": len(requests) + len(noise_requests), "seconds": seconds,
        "p_clean_mean": sum(r["p_clean"] for r in records) / len(records),
        "p_corrupt_mean": sum(r["p_corrupt"] for r in records) / len(records),
        "peaks_last_subject": {k: {"layer": lay, "effect": e} for k, (lay, e) in peaks.items()}})
    return TraceResult(out, summary, records, peaks, std, seconds)
