"""General capability of the (edited) model: perplexity on a text corpus and multiple-choice accuracy.

AlphaEdit (Fang et al. 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing for Language
Models") checks that a model still *works* after thousands of sequential edits, not only that it
remembers them. This family gives sequential runs two such measures (docs/metrics/capability.md):

- ``perplexity`` (protocol ``capability`` version 1, lower is better): ``exp`` of the mean
  next-token negative log-likelihood of the model on a fixed text: the first ``max_tokens`` tokens of
  ``corpus`` (None: ``harness/data/samples/capability-corpus.txt``, neutral encyclopedic paragraphs
  written for the harness). The tokens (no BOS added) are cut into consecutive, non-overlapping
  windows of at most the model's context length; every token but the first of each window is
  predicted, and the mean is over all predicted tokens of all windows.
- ``mc_accuracy`` (protocol ``capability`` version 1): the fraction of the questions of ``tasks`` (a
  JSONL file of ``{"question": str, "choices": [str, ...], "answer": int}``) whose answer choice has
  the highest *length-normalised* log-likelihood, i.e. the lowest mean NLL per choice token, as the
  shared scorer reads ``question + " " + choice`` teacher-forced. NaN when ``tasks`` is None.

Both are properties of the model, not of a case: they are computed once per ``measure`` call (the
multiple-choice pairs are shared by every case, so the suite's scorer scores them once) and every
case of the call holds the same value; a summary's mean is then that value.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from harness.models import context_length
from harness.probes.base import MetricInfo, ProbeFamily
from harness.probes.registry import register_probe
from harness.probes.scorer import Pair, PairScore
from harness.types import EditRequest

log = logging.getLogger(__name__)

#: The text ``perplexity`` reads when ``corpus`` is None (see harness/data/samples/README.md).
DEFAULT_CORPUS = Path(__file__).resolve().parents[1] / "data" / "samples" / "capability-corpus.txt"


@dataclass(frozen=True)
class Question:
    """One multiple-choice question: the prompt, its choices and the index of the right one."""

    question: str
    choices: tuple[str, ...]
    answer: int


def load_tasks(path: str | Path) -> list[Question]:
    """The questions of a JSONL task file (one ``{"question", "choices", "answer"}`` object a line;
    blank lines are skipped).

    Raises:
        FileNotFoundError: no such file (named with the setting).
        ValueError: a malformed line; the message names the file, the line and the field.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"capability: tasks file {str(path)!r} (setting capability_tasks) not found")
    questions = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"capability tasks {path}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from e
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
        question, choices, answer = record.get("question"), record.get("choices"), record.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: field 'question' must be a non-empty string, got {question!r}")
        if not isinstance(choices, list) or len(choices) < 2 or \
                not all(isinstance(c, str) and c.strip() for c in choices):
            raise ValueError(f"{where}: field 'choices' must be a list of at least 2 non-empty strings, "
                             f"got {choices!r}")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"{where}: field 'answer' must be an index into choices (0..{len(choices) - 1}), "
                             f"got {answer!r}")
        questions.append(Question(question, tuple(choices), answer))
    if not questions:
        raise ValueError(f"capability tasks {path}: no questions")
    return questions


def perplexity(model: nn.Module, tok, text: str, max_tokens: int) -> float:
    """``exp`` of the mean next-token NLL of the first ``max_tokens`` tokens of ``text``.

    The tokens (no special tokens added) are cut into non-overlapping windows of at most the model's
    context length; each window predicts all its tokens but the first. Log-softmax in float32.

    Raises:
        ValueError: fewer than 2 tokens.
    """
    ids = tok(text, add_special_tokens=False).input_ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"capability: the corpus holds {len(ids)} token(s); perplexity needs at least 2")
    window = min(max_tokens, context_length(model) or max_tokens)
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    param = next(model.parameters())
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for w in windows:  # one window a forward: windows are long, batching them gains little
                x = torch.tensor([w], device=param.device)
                logits = model(input_ids=x).logits[0, :-1].float()
                logprobs = torch.log_softmax(logits, dim=-1)
                total -= logprobs.gather(1, x[0, 1:, None]).sum().item()
                count += len(w) - 1
    finally:
        model.train(was_training)
    return math.exp(total / count)


@dataclass
class CapabilitySettings:
    """Settings of the ``capability`` family.

    Attributes:
        corpus: a UTF-8 text file for ``perplexity`` (None: the shipped neutral text).
        max_tokens: tokens of the corpus read (from its start).
        tasks: a JSONL multiple-choice file for ``mc_accuracy`` (None: ``mc_accuracy`` is NaN).
    """

    corpus: Optional[str] = None
    max_tokens: int = 1024
    tasks: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 2:
            raise ValueError(f"capability: max_tokens must be an int >= 2, got {self.max_tokens!r}")


@register_probe("capability")
class Capability(ProbeFamily):
    """Perplexity on a fixed text and multiple-choice accuracy; one value per ``measure`` call, the
    same for every case. Off unless named."""

    METRICS = (MetricInfo("perplexity", "capability", 1, unit="perplexity", higher_is_better=False,
                          bounds=(1.0, math.inf)),
               MetricInfo("mc_accuracy", "capability", 1, unit="fraction", bounds=(0.0, 1.0)))
    Settings = CapabilitySettings

    def __init__(self, metrics: Iterable[str] | None = None, settings: Any = None, *, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__(metrics, settings, batch_size=batch_size, seed=seed)
        s = self.settings
        self.text = ""
        if "perplexity" in self.wanted:
            path = Path(s.corpus).expanduser() if s.corpus is not None else DEFAULT_CORPUS
            if not path.is_file():
                raise FileNotFoundError(f"capability: corpus file {str(path)!r} (setting capability_corpus) "
                                        f"not found")
            self.text = path.read_text(encoding="utf-8")
        self.questions = load_tasks(s.tasks) if s.tasks is not None and "mc_accuracy" in self.wanted else []
        self._pairs: list[Pair] = [(q.question, c) for q in self.questions for c in q.choices]

    def pairs(self, request: EditRequest) -> list[Pair]:
        return list(self._pairs)

    def generate(self, model: nn.Module, tok, requests: Sequence[EditRequest]) -> list[float] | None:
        if "perplexity" not in self.wanted:
            return None
        value = perplexity(model, tok, self.text, self.settings.max_tokens)
        return [value] * len(requests)

    def accuracy(self, scores: Mapping[Pair, PairScore]) -> float:
        """Fraction of questions whose answer has the lowest mean NLL per token (ties: first choice)."""
        if not self.questions:
            return math.nan
        right = 0
        for q in self.questions:
            nlls = [scores[(q.question, c)].nll for c in q.choices]
            right += min(range(len(nlls)), key=nlls.__getitem__) == q.answer
        return right / len(self.questions)

    def compute(self, request: EditRequest, scores: Mapping[Pair, PairScore], generated: Any,
                reference: Mapping[str, Any] | None) -> tuple[dict[str, float], dict[str, Any]]:
        values = {}
        if "perplexity" in self.wanted:
            values["perplexity"] = generated
        if "mc_accuracy" in self.wanted:
            values["mc_accuracy"] = self.accuracy(scores)
        return values, {}
