"""The optional LLM judge of the ``wild`` family (docs/metrics/wild.md, "Judge").

"The Mirage of Model Editing" (Yang et al., ACL 2025) scores generated answers with an LLM judge
and reports exact match as the rule-based fallback. Here the judge is a *local* causal LM (a model
directory, a ``.gguf`` file, or a name ``harness.models.load_model`` knows: ``smollm2``, ``tiny``);
no API is called. For each (question, gold answer, model answer) it reads the fixed prompt
``JUDGE_PROMPT`` and the verdict is 1 when the judge gives the continuation ``" yes"`` a higher
log-probability than ``" no"`` (teacher-forced by the shared scorer, summed over their tokens),
else 0 (a tie is 0).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from harness.probes.scorer import score_pairs

log = logging.getLogger(__name__)

#: The judge's prompt; ``{question}``, ``{gold}`` and ``{answer}`` are filled in. Changing it is a new
#: version of the ``wild_judge`` protocol.
JUDGE_PROMPT = ("Question: {question}\n"
                "Gold answer: {gold}\n"
                "Model answer: {answer}\n"
                "Is the model answer correct? Answer yes or no:")
YES, NO = "yes", "no"  # scored as continuations: " yes", " no"
#: Judge names ``load_model`` resolves without a path.
NAMED_JUDGES = ("smollm2", "tiny")


def check_judge(source: str | None, key: str = "probes.wild_judge") -> None:
    """Refuse a judge that cannot be loaded, before any model is.

    Raises:
        TypeError: not a string.
        FileNotFoundError: neither a known name nor an existing path (the message names ``key``).
    """
    if source is None:
        return
    if not isinstance(source, str) or not source.strip():
        raise TypeError(f"{key} must be a model directory, a .gguf file or one of {NAMED_JUDGES} "
                        f"(or null), got {source!r}")
    if source not in NAMED_JUDGES and not Path(source).expanduser().exists():
        raise FileNotFoundError(f"{key}={source!r}: no such model directory or file "
                                f"(names known without a path: {NAMED_JUDGES})")


def judge_prompt(question: str, gold: str, answer: str) -> str:
    """``JUDGE_PROMPT`` filled in (outer whitespace of the three parts stripped)."""
    return JUDGE_PROMPT.format(question=question.strip(), gold=gold.strip(), answer=answer.strip())


def load_judge(source: str, like: nn.Module) -> tuple[nn.Module, Any]:
    """The judge model and tokenizer, on the device of ``like`` (the model under evaluation).

    ``tiny`` is loaded in float32 (its default seed, so verdicts are reproducible); anything else in
    the device's default dtype.
    """
    from harness.models import load_model

    device = next(like.parameters()).device
    log.info("loading the wild judge %s on %s", source, device)
    return load_model(source, device=device, dtype="float32" if source == "tiny" else "auto")


def verdicts(judge: nn.Module, tok: Any, items: Sequence[tuple[str, str, str]], batch_size: int = 32) -> list[float]:
    """The judge's 0/1 verdicts on (question, gold, answer) triples.

    Args:
        judge, tok: the judge model and its tokenizer.
        items: (question, gold answer, model answer) per verdict.
        batch_size: rows per forward pass of the scorer.

    Returns:
        1.0 where ``log P(" yes") > log P(" no")`` after ``judge_prompt``, else 0.0; in order.
    """
    prompts = [judge_prompt(*item) for item in items]
    pairs = [(p, word) for p in prompts for word in (YES, NO)]
    scores = score_pairs(judge, tok, pairs, batch_size=batch_size)
    out = []
    for i in range(len(prompts)):
        yes, no = sum(scores[2 * i].logprobs), sum(scores[2 * i + 1].logprobs)
        out.append(float(yes > no))
    return out
