"""CounterFact probability metrics of the ROME paper (Meng et al. 2022, "Locating and Editing Factual
Associations in GPT", ``experiments/py/eval_utils_counterfact.py`` and ``summarize.py``).

Per request, from the scorer's per-token geometric-mean probabilities ``P(y|x) = exp(-NLL)``
(docs/metrics/counterfact.md):

- ``efficacy_score`` = 1[P(o*|rewrite) > P(o|rewrite)], ``efficacy_magnitude`` = P(o*) - P(o);
- ``paraphrase_score`` / ``paraphrase_magnitude``: the same, averaged over the paraphrase prompts;
- ``neighborhood_score`` = mean over neighbourhood prompts of 1[P(answer) > P(o*)],
  ``neighborhood_magnitude`` = mean of P(answer) - P(o*);
- ``score`` = harmonic mean of the *means* over cases of ES, PS and NS. It is an aggregate only:
  per-case rows do not carry it (a per-case harmonic mean is 0 whenever one indicator is 0, and its
  mean is not the paper's number); ``summarize`` computes it from the three means.

Units: scores are fractions of cases (or of a case's prompts), magnitudes differences of
probabilities; higher is better for all of them (neighbourhood magnitudes are P(true) - P(new)).

Values are fractions in [0, 1] (magnitudes in [-1, 1]); the paper's tables multiply by 100.
Comparisons are strict, so ties count as failures. Missing inputs give NaN: no ``target_true``
for efficacy and paraphrase, no paraphrases, no neighbourhood.
"""
from __future__ import annotations

from collections.abc import Mapping

from typing import Any

from harness.probes.base import MetricInfo, ProbeFamily
from harness.probes.registry import register_probe
from harness.probes.scorer import Pair, PairScore
from harness.probes.summary import harmonic_mean
from harness.types import EditRequest

PROTOCOL = "counterfact"
VERSION = 1
COMPONENTS = ("efficacy_score", "paraphrase_score", "neighborhood_score")


def _info(name: str, unit: str = "fraction", **kw: Any) -> MetricInfo:
    bounds = (-1.0, 1.0) if unit == "probability" else (0.0, 1.0)
    return MetricInfo(name, PROTOCOL, VERSION, unit=unit, bounds=bounds, headline=unit == "fraction", **kw)


INFOS: dict[str, MetricInfo] = {info.name: info for info in (
    _info("efficacy_score"), _info("efficacy_magnitude", "probability"),
    _info("paraphrase_score"), _info("paraphrase_magnitude", "probability"),
    _info("neighborhood_score"), _info("neighborhood_magnitude", "probability"),
    _info("score", aggregate="hmean", inputs=COMPONENTS),
)}

NAN = float("nan")


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else NAN


def pairs(request: EditRequest, wanted: set[str]) -> list[Pair]:
    """The (prompt, target) pairs the wanted CounterFact metrics of ``request`` need."""
    out: list[Pair] = []
    new, true = request.target_new, request.target_true
    if true is not None and wanted & {"efficacy_score", "efficacy_magnitude"}:
        out += [(request.rewrite_prompt, new), (request.rewrite_prompt, true)]
    if true is not None and wanted & {"paraphrase_score", "paraphrase_magnitude"}:
        out += [(p, t) for p in request.paraphrase_prompts for t in (new, true)]
    if wanted & {"neighborhood_score", "neighborhood_magnitude"}:
        out += [(qa.prompt, t) for qa in request.neighborhood for t in (qa.answer, new)]
    return out


def _contest(scores: Mapping[Pair, PairScore], prompts: list[str], winner: list[str], loser: list[str]
             ) -> tuple[float, float]:
    """Mean of 1[P(winner) > P(loser)] and of P(winner) - P(loser) over the prompts (NaN if none).

    The indicator compares NLLs (exactly equivalent to comparing the probabilities, without the
    rounding of ``exp``)."""
    wins, gaps = [], []
    for p, w, l in zip(prompts, winner, loser):
        a, b = scores[(p, w)], scores[(p, l)]
        wins.append(float(a.nll < b.nll))
        gaps.append(a.prob - b.prob)
    return _mean(wins), _mean(gaps)


def compute(request: EditRequest, scores: Mapping[Pair, PairScore], wanted: set[str]) -> dict[str, float]:
    """The wanted per-case CounterFact metrics of ``request`` (``score`` is never per case).

    Args:
        request: the edit request.
        scores: scorer results, holding at least ``pairs(request, wanted)``.
        wanted: metric names to fill (others are ignored).
    """
    new, true = request.target_new, request.target_true
    out: dict[str, float] = {}
    groups = {
        "efficacy": [request.rewrite_prompt] if true is not None else [],
        "paraphrase": list(request.paraphrase_prompts) if true is not None else [],
    }
    for family, prompts in groups.items():
        if not wanted & {f"{family}_score", f"{family}_magnitude"}:
            continue
        s, m = _contest(scores, prompts, [new] * len(prompts), [true] * len(prompts)) if prompts else (NAN, NAN)
        out[f"{family}_score"], out[f"{family}_magnitude"] = s, m
    if wanted & {"neighborhood_score", "neighborhood_magnitude"}:
        qas = request.neighborhood
        s, m = _contest(scores, [q.prompt for q in qas], [q.answer for q in qas], [new] * len(qas))
        out["neighborhood_score"], out["neighborhood_magnitude"] = s, m
    return {k: v for k, v in out.items() if k in wanted}


@register_probe("counterfact")
class CounterFact(ProbeFamily):
    """The CounterFact probability metrics (scores, magnitudes, and the ``score`` aggregate)."""

    METRICS = tuple(INFOS.values())
    default = True

    def pairs(self, request: EditRequest) -> list[Pair]:
        return pairs(request, set(self.wanted))

    def compute(self, request: EditRequest, scores: Mapping[Pair, PairScore], generated: Any,
                reference: Mapping[str, Any] | None) -> tuple[dict[str, float], dict[str, Any]]:
        return compute(request, scores, set(self.wanted)), {}


__all__ = ["COMPONENTS", "INFOS", "CounterFact", "compute", "harmonic_mean", "pairs"]
