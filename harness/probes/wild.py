"""Generation-based evaluation: the WILD protocol of "The Mirage of Model Editing: Revisiting
Evaluation in the Wild" (Wanli Yang et al., ACL 2025; docs/metrics/wild.md).

Teacher-forced accuracies (``easyedit``) feed the target's own tokens to the model and so leak its
content and length. Here the model has to *produce* the answer: greedy decoding (no sampling) from
the prompt, batched with left padding and the model's KV cache, stopping at a newline, at EOS, or
after a token budget of ``len(target tokens) + margin``. The generated answer is compared with the
target by SQuAD-style exact match and token F1 (lower-case, punctuation and the articles a/an/the
dropped, whitespace collapsed):

- ``wild_rewrite_*``: the rewrite prompt against ``target_new``;
- ``wild_rephrase_*``: mean over paraphrase prompts against ``target_new``;
- ``wild_portability_*``: mean over portability QAs against their answers;
- ``wild_locality_*``: mean over neighbourhood QAs of the generation against the *reference*
  (pre-edit) generation of the same prompt, kept in the extras under ``wild_locality_text``;
  without a reference the model is compared with itself (1.0). The budget comes from the QA's
  answer, so pre and post generate under the same budget.

With a ``judge`` (a local causal LM, ``harness.probes.judge``), ``wild_<part>_judge`` adds its 0/1
verdicts on the same answers (protocol ``wild_judge``; locality's gold answer is the reference's);
without one those metrics are not produced and exact match is the fallback.

The ``context`` setting wraps each prompt: ``question-only`` (as is), ``qa-instruction``
(``"Answer the question.\\nQ: <prompt>\\nA:"``) or ``chat-template`` (the tokenizer's own chat
template, the prompt as the user turn, ``add_generation_prompt=True``). Each case's extras record
the context (``wild_context``) and the generated texts. Missing inputs give NaN.
"""
from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from harness.models import cache_kwargs, output_cache
from harness.probes.base import MetricInfo, ProbeFamily
from harness.probes.judge import check_judge, load_judge, verdicts
from harness.probes.registry import register_probe
from harness.tokens import pad_batch, pad_id
from harness.types import EditRequest

log = logging.getLogger(__name__)

PROTOCOL = "wild"
VERSION = 1
PARTS = ("rewrite", "rephrase", "locality", "portability")
CONTEXTS = ("question-only", "qa-instruction", "chat-template")
INSTRUCTION = "Answer the question."
LOCALITY_KEY = "wild_locality_text"
NAN = float("nan")

JUDGE_PROTOCOL = "wild_judge"
JUDGE_VERSION = 1  # bump with harness.probes.judge.JUDGE_PROMPT or the verdict rule

INFOS: dict[str, MetricInfo] = {
    f"wild_{part}_{kind}": MetricInfo(f"wild_{part}_{kind}", PROTOCOL, VERSION, unit="fraction", bounds=(0.0, 1.0),
                                      headline=kind == "em")
    for part in PARTS for kind in ("em", "f1")
}
JUDGE_INFOS: dict[str, MetricInfo] = {
    f"wild_{part}_judge": MetricInfo(f"wild_{part}_judge", JUDGE_PROTOCOL, JUDGE_VERSION, unit="fraction",
                                     bounds=(0.0, 1.0), headline=False)
    for part in PARTS
}
KINDS = ("em", "f1", "judge")

# ----------------------------------------------------------------------------------------------
# SQuAD-style normalisation, exact match and token F1

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize(text: str) -> str:
    """Lower case, punctuation removed, the articles a/an/the removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, target: str) -> float:
    """1.0 when the normalised texts are equal, else 0.0."""
    return float(normalize(prediction) == normalize(target))


def token_f1(prediction: str, target: str) -> float:
    """F1 of the multiset overlap of normalised words; when either side is empty, their equality."""
    pred, gold = normalize(prediction).split(), normalize(target).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------------------------
# contexts and greedy decoding


def encode_prompt(tok: Any, prompt: str, context: str) -> list[int]:
    """Token ids of ``prompt`` in a context type.

    Raises:
        ValueError: an unknown context, or ``chat-template`` with a tokenizer that has no chat template.
    """
    if context == "question-only":
        return list(tok(prompt).input_ids)
    if context == "qa-instruction":
        return list(tok(f"{INSTRUCTION}\nQ: {prompt}\nA:").input_ids)
    if context == "chat-template":
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"wild: context='chat-template' needs a tokenizer with a chat template; "
                             f"{type(tok).__name__} ({getattr(tok, 'name_or_path', '?')}) has none "
                             f"(use context='qa-instruction' or 'question-only')")
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False)
        return list(tok(text, add_special_tokens=False).input_ids)
    raise ValueError(f"wild: unknown context {context!r}; use one of {CONTEXTS}")


def answer_budget(tok: Any, target: str, margin: int) -> int:
    """New tokens allowed for an answer: the target's tokens (as a continuation) plus ``margin``."""
    return len(tok(" " + target.lstrip(), add_special_tokens=False).input_ids) + margin


def _stops(tok: Any, token: int) -> bool:
    return token == tok.eos_token_id or "\n" in tok.decode([token])


def answer_text(tok: Any, new_tokens: Sequence[int]) -> str:
    """The decoded answer: up to the first newline, special tokens dropped, outer whitespace stripped."""
    return tok.decode(list(new_tokens), skip_special_tokens=True).split("\n", 1)[0].strip()


def greedy_answers(model: nn.Module, tok: Any, prompts: Sequence[Sequence[int]], budgets: Sequence[int],
                   batch_size: int = 32) -> list[str]:
    """Greedy answers to tokenised prompts, batched with left padding and the KV cache.

    A row stops at EOS, at a token whose text holds a newline, or after its own budget of new
    tokens; a batch stops when all its rows have. Position ids count real tokens only, so a row's
    tokens do not depend on the padding.

    Args:
        model, tok: the causal LM and its tokenizer.
        prompts: token ids per prompt.
        budgets: maximum new tokens per prompt (>= 1).
        batch_size: prompts per batch.

    Returns:
        One answer per prompt (``answer_text``).
    """
    device = next(model.parameters()).device
    pad = pad_id(tok)
    answers: list[str] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                enc = [list(p) for p in prompts[start:start + batch_size]]
                limit = list(budgets[start:start + batch_size])
                ids, mask = (x.to(device) for x in pad_batch(enc, pad, side="left"))
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                new: list[list[int]] = [[] for _ in enc]
                done = [False] * len(enc)
                past = None
                step_ids = ids
                for step in range(max(limit)):
                    out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                                use_cache=True, **cache_kwargs(model, past))
                    past = output_cache(out)
                    nxt = out.logits[:, -1].argmax(-1)
                    for i, t in enumerate(nxt.tolist()):
                        if done[i]:
                            continue
                        new[i].append(t)
                        done[i] = _stops(tok, t) or len(new[i]) >= limit[i]
                    if all(done):
                        break
                    step_ids = nxt[:, None]
                    mask = torch.cat([mask, mask.new_ones((len(enc), 1))], dim=1)
                    positions = positions[:, -1:] + 1
                answers += [answer_text(tok, n) for n in new]
    finally:
        model.train(was_training)
    return answers


# ----------------------------------------------------------------------------------------------
# the family


@dataclass
class WildSettings:
    """Settings of the ``wild`` family.

    Attributes:
        context: how a prompt is presented: ``question-only``, ``qa-instruction`` or ``chat-template``.
        margin: new tokens allowed beyond the target's token count.
        judge: a local causal LM (path, or ``smollm2``/``tiny``) that gives the ``wild_*_judge``
            verdicts (``harness.probes.judge``); None: no judge metrics.

    Raises:
        ValueError: an unknown context or a bad margin.
        FileNotFoundError: a judge path that does not exist (named as ``probes.wild_judge``).
    """

    context: str = "question-only"
    margin: int = 5
    judge: Optional[str] = None

    def __post_init__(self) -> None:
        check_judge(self.judge)
        if self.context not in CONTEXTS:
            raise ValueError(f"wild: context must be one of {CONTEXTS}, got {self.context!r}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, int) or self.margin < 0:
            raise ValueError(f"wild: margin must be an int >= 0, got {self.margin!r}")


def _items(request: EditRequest, wanted: set[str]) -> list[tuple[str, str, str]]:
    """(part, prompt, target) of every generation the wanted metrics of ``request`` need."""
    items: list[tuple[str, str, str]] = []
    want = {part for part in PARTS if any(f"wild_{part}_{kind}" in wanted for kind in KINDS)}
    if "rewrite" in want:
        items.append(("rewrite", request.rewrite_prompt, request.target_new))
    if "rephrase" in want:
        items += [("rephrase", p, request.target_new) for p in request.paraphrase_prompts]
    if "locality" in want:
        items += [("locality", q.prompt, q.answer) for q in request.neighborhood]
    if "portability" in want:
        items += [("portability", q.prompt, q.answer) for q in request.portability]
    return items


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else NAN


@register_probe("wild")
class Wild(ProbeFamily):
    """Greedy generation scored by exact match and token F1 (and a judge's verdicts when one is
    configured); off unless a config names it.

    Raises:
        ValueError: a judge metric named explicitly while no judge is configured.
    """

    METRICS = tuple(INFOS.values()) + tuple(JUDGE_INFOS.values())
    Settings = WildSettings
    default = False

    def __init__(self, metrics: Iterable[str] | None = None, settings: Any = None, *, batch_size: int = 32,
                 seed: int = 0) -> None:
        super().__init__(metrics, settings, batch_size=batch_size, seed=seed)
        self._judge: tuple[nn.Module, Any] | None = None  # loaded on first use, once per suite
        if self.settings.judge is None:
            named = [m for m in self.chosen if m in JUDGE_INFOS]
            if metrics is not None and named:
                raise ValueError(f"wild: metric(s) {named} need a judge model: set probes.wild_judge "
                                 "(a local model directory, or smollm2)")
            self.chosen = tuple(m for m in self.chosen if m not in JUDGE_INFOS)
            self.wanted = frozenset(m for m in self.wanted if m not in JUDGE_INFOS)

    def judge(self, like: nn.Module) -> tuple[nn.Module, Any]:
        """The judge model and tokenizer, loaded once (beside ``like``, the model under evaluation)."""
        if self._judge is None:
            self._judge = load_judge(self.settings.judge, like)
        return self._judge

    def generate(self, model: nn.Module, tok: Any, requests: Sequence[EditRequest]) -> list[list[tuple]] | None:
        if not self.wanted:
            return None
        per = [_items(r, set(self.wanted)) for r in requests]
        flat = [it for items in per for it in items]
        context, margin = self.settings.context, self.settings.margin
        prompts = [encode_prompt(tok, p, context) for _, p, _ in flat]
        budgets = [answer_budget(tok, t, margin) for _, _, t in flat]
        texts = greedy_answers(model, tok, prompts, budgets, self.batch_size)
        if any(m in JUDGE_INFOS for m in self.wanted):
            self.judge(model)  # loaded here, where the evaluated model's device is known
        out, i = [], 0
        for items in per:
            out.append([(*it, texts[i + k]) for k, it in enumerate(items)])
            i += len(items)
        return out

    def compute(self, request: EditRequest, scores: Mapping, generated: Any,
                reference: Mapping[str, Any] | None) -> tuple[dict[str, float], dict[str, Any]]:
        """Per-part means of EM and F1 (and of the judge's verdicts); locality compares with the
        reference's generations (the judge reads the reference's answer as the gold one).

        Raises:
            ValueError: a reference without ``wild_locality_text`` or with another number of prompts.
            RuntimeError: judge metrics wanted before ``generate`` loaded the judge.
        """
        generated = generated or []
        by_part: dict[str, list[tuple[str, str]]] = {part: [] for part in PARTS}
        questions: dict[str, list[str]] = {part: [] for part in PARTS}
        for part, prompt, target, text in generated:
            by_part[part].append((text, target))
            questions[part].append(prompt)
        extras: dict[str, Any] = {"wild_context": self.settings.context,
                                  "wild_text": {p: [t for t, _ in v] for p, v in by_part.items() if v}}
        if any(f"wild_locality_{k}" in self.wanted for k in ("em", "f1")):
            now = [t for t, _ in by_part["locality"]]
            extras[LOCALITY_KEY] = now
            pre = now
            if reference is not None:
                if LOCALITY_KEY not in reference:
                    raise ValueError(f"case {request.case_id}: reference extras lack {LOCALITY_KEY!r} "
                                     "(was the reference measured with the wild locality metrics?)")
                pre = reference[LOCALITY_KEY]
                if len(pre) != len(now):
                    raise ValueError(f"case {request.case_id}: reference has {len(pre)} neighbourhood "
                                     f"generations, request has {len(now)}")
            by_part["locality"] = list(zip(now, pre))
        metrics: dict[str, float] = {}
        for part in PARTS:
            for kind, fn in (("em", exact_match), ("f1", token_f1)):
                name = f"wild_{part}_{kind}"
                if name in self.wanted:
                    metrics[name] = _mean([fn(text, target) for text, target in by_part[part]])
        judged = [p for p in PARTS if f"wild_{p}_judge" in self.wanted]
        if judged:
            items = [(q, target, text) for p in judged for q, (text, target) in zip(questions[p], by_part[p])]
            if self._judge is None:
                raise RuntimeError("wild: the judge was not loaded (compute called before generate)")
            found = iter(verdicts(*self._judge, items, self.batch_size))
            for p in judged:
                metrics[f"wild_{p}_judge"] = _mean([next(found) for _ in by_part[p]])
            extras["wild_judge"] = self.settings.judge
        return metrics, extras
