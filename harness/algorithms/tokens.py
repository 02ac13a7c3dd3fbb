"""Prompt + target tokenisation with an exact label mask, for the fine-tuning edits (FT-L, FT-M, LoRA).

EasyEdit finds where the target starts in ``prompt + target`` by counting pad tokens, which is
right only under left padding (docs/algorithms/ft.md). Here the split comes from character offsets of
the joint encoding: a token is a target token when it is not special and starts at or after the
end of the prompt. Should a token straddle that boundary (a tokenizer merging across it), or the
tokenizer give no offsets (a slow one), the prompt and the target are encoded separately and
concatenated, so the labelled tokens always decode exactly to the target text.

Batches are right-padded by us (whatever ``tok.padding_side`` says): position ids then need no
care, and the label mask and last-prompt-token index are explicit tensors, never derived from pads.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


def target_text(target: str) -> str:
    """The target as a continuation: with one leading space, added only if missing."""
    return target if target.startswith(" ") else " " + target


@dataclass(frozen=True)
class PromptTarget:
    """One tokenised ``prompt + " " + target``.

    Attributes:
        prompt_ids: the prompt's tokens, with the tokenizer's leading special tokens (BOS) if any.
        target_ids: the target's tokens; ``decode(target_ids) == target_text(target)``.
    """

    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]

    @property
    def ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.target_ids


def _strip_trailing_special(ids: list[int], special: list[int]) -> list[int]:
    while ids and special[len(ids) - 1]:
        ids = ids[:-1]
    return ids


def encode_prompt_target(tok, prompt: str, target: str) -> PromptTarget:
    """Tokenise ``prompt + target_text(target)`` and split it into prompt and target tokens.

    Trailing special tokens a tokenizer appends (EOS) are dropped: they come after the target and
    play no part in predicting it.

    Raises:
        ValueError: the prompt has no token (nothing to predict the first target token from), or
            the target has none.
    """
    text = target_text(target)
    full = prompt + text
    boundary = len(prompt)
    prompt_ids: list[int] | None = None
    target_ids: list[int] = []
    if getattr(tok, "is_fast", False):
        enc = tok(full, return_offsets_mapping=True, return_special_tokens_mask=True)
        ids, offsets, special = enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"]
        is_target = [not sp and s >= boundary and e > s for (s, e), sp in zip(offsets, special)]
        straddles = any(not sp and s < boundary < e for (s, e), sp in zip(offsets, special))
        first = is_target.index(True) if any(is_target) else len(ids)
        last = first + sum(is_target)
        contiguous = all(is_target[first:last])
        if not straddles and contiguous and first < len(ids):
            prompt_ids, target_ids = list(ids[:first]), list(ids[first:last])
            if tok.decode(target_ids) != text:  # e.g. a normaliser that rewrites characters
                prompt_ids = None
    if prompt_ids is None:
        log.debug("encoding prompt and target of %r separately", full)
        enc = tok(prompt, return_special_tokens_mask=True)
        prompt_ids = _strip_trailing_special(list(enc["input_ids"]), list(enc["special_tokens_mask"]))
        target_ids = list(tok(text, add_special_tokens=False)["input_ids"])
    if not prompt_ids:
        raise ValueError(f"prompt {prompt!r} has no tokens: the first target token cannot be predicted")
    if not target_ids:
        raise ValueError(f"target {text!r} has no tokens")
    return PromptTarget(tuple(prompt_ids), tuple(target_ids))


def pad_id(tok) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padded positions are masked anyway)."""
    for tid in (tok.pad_token_id, tok.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


@dataclass(frozen=True)
class TargetBatch:
    """Right-padded ``prompt + target`` sequences.

    Attributes:
        input_ids, attention_mask: [B, L].
        label_mask: [B, L] bool, True exactly at target-token positions.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    label_mask: torch.Tensor


def target_batch(items: Sequence[PromptTarget], pad: int, device: torch.device) -> TargetBatch:
    """Collate full sequences, labelling the target tokens of each."""
    width = max(len(it.ids) for it in items)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    attn = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.zeros((len(items), width), dtype=torch.bool)
    for i, it in enumerate(items):
        n_p, n = len(it.prompt_ids), len(it.ids)
        ids[i, :n] = torch.tensor(it.ids)
        attn[i, :n] = 1
        labels[i, n_p:n] = True
    return TargetBatch(ids.to(device), attn.to(device), labels.to(device))


@dataclass(frozen=True)
class PromptBatch:
    """Right-padded prompts and their targets (FT-L's last-prompt-token objective).

    Attributes:
        input_ids, attention_mask: [B, L] prompts only.
        last: [B] index of each prompt's last token.
        target_ids, target_mask: [B, T] target tokens (padded) and which of them are real.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    last: torch.Tensor
    target_ids: torch.Tensor
    target_mask: torch.Tensor


def prompt_batch(items: Sequence[PromptTarget], pad: int, device: torch.device) -> PromptBatch:
    """Collate prompts alone, with each request's target tokens beside them."""
    width = max(len(it.prompt_ids) for it in items)
    t_width = max(len(it.target_ids) for it in items)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    attn = torch.zeros((len(items), width), dtype=torch.long)
    tgt = torch.full((len(items), t_width), pad, dtype=torch.long)
    tmask = torch.zeros((len(items), t_width), dtype=torch.bool)
    for i, it in enumerate(items):
        ids[i, :len(it.prompt_ids)] = torch.tensor(it.prompt_ids)
        attn[i, :len(it.prompt_ids)] = 1
        tgt[i, :len(it.target_ids)] = torch.tensor(it.target_ids)
        tmask[i, :len(it.target_ids)] = True
    last = torch.tensor([len(it.prompt_ids) - 1 for it in items])
    return PromptBatch(ids.to(device), attn.to(device), last.to(device), tgt.to(device), tmask.to(device))


def target_nll(logits: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """Teacher-forced NLL of the target tokens, averaged over each request's target tokens.

    The log-softmax runs in float32 (an explicit upcast of half-precision logits) so the loss of
    a nearly learnt target does not round to zero.

    Returns:
        [B] mean negative log-probability per request.
    """
    logp = torch.log_softmax(logits[:, :-1].to(torch.float32), dim=-1)
    gold = batch.input_ids[:, 1:]
    mask = batch.label_mask[:, 1:].to(torch.float32)
    tok_logp = logp.gather(-1, gold.unsqueeze(-1)).squeeze(-1)
    return -(tok_logp * mask).sum(1) / mask.sum(1)
