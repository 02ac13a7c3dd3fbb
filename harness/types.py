"""Plain data passed between the parts of the harness: edit requests, prompt/answer pairs, reports.

All of them are frozen dataclasses: a request that reached an algorithm is the request the probes
score, and nobody can mutate it in between.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class QA:
    """A prompt and the answer expected after it (answer written without a leading space)."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into the model.

    Attributes:
        case_id: identifier of the record in its data set (stable across runs; used to resume).
        prompt: template with exactly one ``{}`` where the subject goes, e.g. ``"{} plays the sport of"``.
        subject: the subject string, e.g. ``"LeBron James"``.
        target_new: the new object, without a leading space, e.g. ``"football"``.
        target_true: the true (old) object, or None when the data set does not give it.
        paraphrase_prompts: full prompts (subject filled in) that ask for the same fact.
        neighborhood: prompts about other subjects whose answer must not change.
        portability: prompts whose answer should follow from the edit.
        generation_prompts: prompts for free generation (fluency, consistency).
        relation_id: the fact's relation (Wikidata id such as ``P103``) when the data set gives it;
            with ``target_new_id`` it selects the consistency probe's reference snippets.
        target_new_id, target_true_id: the objects' ids (Wikidata, e.g. ``Q150``) when given.
        attribute_prompts: prompts about other subjects whose true object is ``target_new`` (ROME's
            CounterFact); kept for analyses, not scored by the built-in probes.
    """

    case_id: str
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood: tuple[QA, ...] = ()
    portability: tuple[QA, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    relation_id: str | None = None
    target_new_id: str | None = None
    target_true_id: str | None = None
    attribute_prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.prompt.count("{}") != 1:
            raise ValueError(f"case {self.case_id}: prompt must contain exactly one '{{}}': {self.prompt!r}")
        if not self.subject:
            raise ValueError(f"case {self.case_id}: empty subject")
        if not self.target_new.strip():
            raise ValueError(f"case {self.case_id}: empty target_new")

    @property
    def rewrite_prompt(self) -> str:
        """The prompt with the subject filled in (``{}`` replaced, no ``str.format`` brace pitfalls)."""
        return self.prompt.replace("{}", self.subject)

    def texts(self) -> list[tuple[str, str]]:
        """(field, text) of every prompt the probes and editors run, each followed by its longest
        answer: what must fit in the model's context."""
        targets = [t for t in (self.target_new, self.target_true) if t]
        longest = max(targets, key=len)
        out = [("prompt", f"{self.rewrite_prompt} {longest}")]
        out += [(f"paraphrase_prompts[{i}]", f"{p} {longest}") for i, p in enumerate(self.paraphrase_prompts)]
        for name, qas in (("neighborhood", self.neighborhood), ("portability", self.portability)):
            out += [(f"{name}[{i}]", f"{qa.prompt} {max([qa.answer, *targets], key=len)}") for i, qa in enumerate(qas)]
        out += [(f"generation_prompts[{i}]", p) for i, p in enumerate(self.generation_prompts)]
        return out


@dataclass(frozen=True)
class EditReport:
    """What an algorithm says about one ``apply`` call. Never holds the model.

    Attributes:
        seconds: wall time of the call.
        losses: named scalar losses (e.g. ``{"v_loss_final": 0.03}``).
        delta_norms: Frobenius norm of the change written to each parameter, by full name.
        info: anything else worth a column (steps taken, null-space dimension, ...), scalars only.
    """

    seconds: float = 0.0
    losses: dict[str, float] = field(default_factory=dict)
    delta_norms: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
