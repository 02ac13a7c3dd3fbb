"""What causal tracing runs on: the tokenised prompt with its subject span and answer token, ROME's
token groups, and the seeded noise (Meng et al. 2022, "Locating and Editing Factual Associations
in GPT", §2.1).

* ``subject_token_range``: the token span of the subject in the prompt (character offsets).
* ``token_groups``: the rows of ROME's figure (first/middle/last subject token, first subsequent
  token, further tokens, last token) as token positions.
* ``noise_std``: the standard deviation of subject-token embeddings (ROME's noise is 3 times it);
  ``make_noise``: seeded Gaussian noise.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harness.algorithms.hooks import model_device
from harness.tokens import encode_prompt_target
from harness.models import ModelSpec, get_module


@dataclass(frozen=True)
class TracePrompt:
    """One tokenised prompt to trace.

    Attributes:
        ids: the prompt's token ids (with the tokenizer's leading special tokens, if any).
        subject: ``(start, end)``: tokens ``start .. end - 1`` hold the subject.
        answer_id: the token whose probability is traced.
    """

    ids: tuple[int, ...]
    subject: tuple[int, int]
    answer_id: int

    def __post_init__(self) -> None:
        start, end = self.subject
        if not 0 <= start < end <= len(self.ids):
            raise ValueError(f"subject span {self.subject} is not inside the {len(self.ids)} prompt tokens")


def subject_token_range(tok: Any, template: str, subject: str) -> tuple[list[int], int, int]:
    """Tokenise ``template`` with ``subject`` filled in and find the subject's tokens.

    A token belongs to the subject when its character span overlaps the subject's (so a token that
    carries the space before the subject counts, as do tokens the subject shares with its context).

    Args:
        tok: a fast Hugging Face tokenizer (offsets are needed).
        template: text with exactly one ``{}`` where the subject goes.
        subject: the subject string.

    Returns:
        ``(ids, start, end)``: the prompt's token ids (trailing special tokens dropped) and the
        subject's token span ``[start, end)``.

    Raises:
        ValueError: a template without exactly one ``{}``, an empty subject, a slow tokenizer, or
            no token covering the subject.
    """
    if template.count("{}") != 1:
        raise ValueError(f"template must contain exactly one '{{}}': {template!r}")
    if not subject:
        raise ValueError("empty subject")
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"causal tracing needs a fast tokenizer (character offsets); got {type(tok).__name__}")
    prefix, suffix = template.split("{}")
    a, b = len(prefix), len(prefix) + len(subject)
    enc = tok(prefix + subject + suffix, return_offsets_mapping=True, return_special_tokens_mask=True)
    ids, offsets, special = list(enc["input_ids"]), enc["offset_mapping"], enc["special_tokens_mask"]
    while ids and special[len(ids) - 1]:  # a trailing EOS plays no part in predicting the next token
        ids.pop()
    inside = [i for i in range(len(ids)) if not special[i] and offsets[i][0] < b and offsets[i][1] > a]
    if not inside:
        raise ValueError(f"no token covers subject {subject!r} in {template!r}")
    return ids, inside[0], inside[-1] + 1


def encode_trace_prompt(tok: Any, template: str, subject: str, answer: str | None) -> TracePrompt:
    """The ``TracePrompt`` of a request; the answer token is the first token of ``" " + answer``.

    Args:
        answer: the object whose probability is traced (e.g. the true object), or None for the
            model's own prediction (``answer_id`` -1, which ``trace_record`` fills in).
    """
    ids, start, end = subject_token_range(tok, template, subject)
    answer_id = -1
    if answer is not None:
        answer_id = encode_prompt_target(tok, template.replace("{}", subject), answer).target_ids[0]
    return TracePrompt(tuple(ids), (start, end), answer_id)


#: ROME's token groups, in the order of its figure: (CSV name, label).
TOKEN_GROUPS: tuple[tuple[str, str], ...] = (
    ("first_subject", "first subject token"),
    ("middle_subject", "middle subject tokens"),
    ("last_subject", "last subject token"),
    ("first_after", "first subsequent token"),
    ("further", "further tokens"),
    ("last", "last token"),
)


def token_groups(n_tokens: int, subject: tuple[int, int]) -> dict[str, list[int]]:
    """Token positions of each of ROME's groups for a prompt of ``n_tokens`` with subject span ``[start, end)``.

    A one-token subject is both the first and the last subject token (as in ROME); the first
    subsequent token is the one right after the subject unless that is the last token; groups a
    prompt lacks (no middle, no further tokens) are empty.
    """
    start, end = subject
    if not 0 <= start < end <= n_tokens:
        raise ValueError(f"subject span {subject} is not inside {n_tokens} tokens")
    last = n_tokens - 1
    return {
        "first_subject": [start],
        "middle_subject": list(range(start + 1, end - 1)),
        "last_subject": [end - 1],
        "first_after": [end] if end < last else [],
        "further": list(range(end + 1, last)),
        "last": [last],
    }


@torch.no_grad()
def noise_std(model: nn.Module, spec: ModelSpec, tok: Any, subjects: Sequence[str]) -> float:
    """Standard deviation of the embedding-layer outputs of the subjects' tokens (each subject alone).

    ROME corrupts with noise of 3 times this value (its ``collect_embedding_std`` over many subjects).

    Raises:
        ValueError: no subject, or no token in any of them.
    """
    embed = get_module(model, spec.embed)
    ids = [t for s in subjects for t in tok(s, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise ValueError("noise_std needs at least one subject with tokens")
    vectors = embed(torch.tensor([ids], device=model_device(model)))
    return float(vectors.to(torch.float32).std())  # explicit upcast: a half-precision std loses digits


def make_noise(samples: int, n_tokens: int, hidden: int, std: float, seed: int) -> torch.Tensor:
    """Seeded Gaussian noise ``[samples, n_tokens, hidden]`` (float32, CPU) of standard deviation ``std``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(samples, n_tokens, hidden, generator=gen) * std
