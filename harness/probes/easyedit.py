"""EasyEdit's teacher-forced token accuracies (Wang et al. 2024, "EasyEdit: An Easy-to-use Knowledge
Editing Framework for Large Language Models", ``easyeditor/evaluate/evaluate_utils.py``).

For a pair ``(prompt, target)`` the accuracy is the fraction of target tokens that equal the model's
argmax at the position predicting them (teacher forcing on ``prompt + " " + target``;
docs/metrics/easyedit.md). The offsets come from the scorer's difference method, not from pad
counts, so they are right whatever the padding side.

- ``rewrite_acc``: (rewrite prompt, target_new);
- ``rephrase_acc``: mean over paraphrase prompts of (paraphrase, target_new);
- ``portability_acc``: mean over portability QAs of (prompt, answer);
- ``locality_acc``: *agreement*, not correctness: per neighbourhood QA the fraction of positions of
  ``prompt + " " + answer`` where the argmax token equals the reference (pre-edit) argmax token,
  averaged over the QAs. Without a reference the model is compared with itself (1.0). The argmax
  lists are stored in ``Measurement.extras`` under ``locality_argmax`` for a later comparison.

Missing inputs (no paraphrase, neighbourhood or portability prompts) give NaN. All four are
fractions of target tokens; higher is better.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from harness.probes.base import MetricInfo, ProbeFamily
from harness.probes.registry import register_probe
from harness.probes.scorer import Pair, PairScore
from harness.types import EditRequest

PROTOCOL = "easyedit"
VERSION = 1
LOCALITY_KEY = "locality_argmax"

INFOS: dict[str, MetricInfo] = {
    name: MetricInfo(name, PROTOCOL, VERSION, unit="fraction", bounds=(0.0, 1.0))
    for name in ("rewrite_acc", "rephrase_acc", "locality_acc", "portability_acc")
}

NAN = float("nan")


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else NAN


def pairs(request: EditRequest, wanted: set[str]) -> list[Pair]:
    """The (prompt, target) pairs the wanted EasyEdit metrics of ``request`` need."""
    out: list[Pair] = []
    if "rewrite_acc" in wanted:
        out.append((request.rewrite_prompt, request.target_new))
    if "rephrase_acc" in wanted:
        out += [(p, request.target_new) for p in request.paraphrase_prompts]
    if "locality_acc" in wanted:
        out += [(qa.prompt, qa.answer) for qa in request.neighborhood]
    if "portability_acc" in wanted:
        out += [(qa.prompt, qa.answer) for qa in request.portability]
    return out


def _agreement(post: tuple[int, ...] | list[int], pre: tuple[int, ...] | list[int]) -> float:
    if len(post) != len(pre):
        raise ValueError(f"locality: reference has {len(pre)} target tokens, this model {len(post)} "
                         "(different tokenizer or request?)")
    return sum(a == b for a, b in zip(post, pre)) / len(post)


def compute(request: EditRequest, scores: Mapping[Pair, PairScore], wanted: set[str],
            reference: Mapping[str, Any] | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """The wanted EasyEdit metrics of ``request``, and the extras a later comparison needs.

    Args:
        request: the edit request.
        scores: scorer results, holding at least ``pairs(request, wanted)``.
        wanted: metric names to fill.
        reference: the request's extras from the reference (pre-edit) measurement, or None.

    Returns:
        (metrics, extras); extras holds ``locality_argmax`` when ``locality_acc`` is wanted.

    Raises:
        ValueError: the reference lacks ``locality_argmax`` or does not match the request.
    """
    out: dict[str, float] = {}
    extras: dict[str, Any] = {}
    new = request.target_new
    if "rewrite_acc" in wanted:
        out["rewrite_acc"] = scores[(request.rewrite_prompt, new)].accuracy
    if "rephrase_acc" in wanted:
        out["rephrase_acc"] = _mean([scores[(p, new)].accuracy for p in request.paraphrase_prompts])
    if "portability_acc" in wanted:
        out["portability_acc"] = _mean([scores[(q.prompt, q.answer)].accuracy for q in request.portability])
    if "locality_acc" in wanted:
        now = [list(scores[(q.prompt, q.answer)].argmax) for q in request.neighborhood]
        extras[LOCALITY_KEY] = now
        if reference is None:
            pre = now
        else:
            if LOCALITY_KEY not in reference:
                raise ValueError(f"case {request.case_id}: reference extras lack {LOCALITY_KEY!r} "
                                 "(was the reference measured with locality_acc?)")
            pre = reference[LOCALITY_KEY]
            if len(pre) != len(now):
                raise ValueError(f"case {request.case_id}: reference has {len(pre)} neighbourhood prompts, "
                                 f"request has {len(now)}")
        out["locality_acc"] = _mean([_agreement(a, b) for a, b in zip(now, pre)])
    return out, extras


@register_probe("easyedit")
class EasyEdit(ProbeFamily):
    """EasyEdit's token accuracies; ``locality_acc`` compares with the reference's argmax tokens."""

    METRICS = tuple(INFOS.values())
    default = True

    def pairs(self, request: EditRequest) -> list[Pair]:
        return pairs(request, set(self.wanted))

    def compute(self, request: EditRequest, scores: Mapping[Pair, PairScore], generated: Any,
                reference: Mapping[str, Any] | None) -> tuple[dict[str, float], dict[str, Any]]:
        return compute(request, scores, set(self.wanted), reference)
