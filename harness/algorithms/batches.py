"""Teacher-forced batches of prompt + target for the fine-tuning edits (FT-L, FT-M, LoRA; docs/algorithms/ft.md).

The pairs come tokenised from ``harness.tokens.encode_pairs`` (the tokenisation the probes score
with). EasyEdit finds where the target starts by counting pad tokens, which is right only under
left padding; here the label mask and the last-prompt-token index are explicit tensors, never
derived from pads. Batches are right-padded by ``harness.tokens.pad_batch`` (whatever
``tok.padding_side`` says), so position ids need no care.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from harness.tokens import PromptTarget, pad_batch


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
    ids, attn = pad_batch([it.ids for it in items], pad)
    labels, _ = pad_batch([[0] * len(it.prompt_ids) + [1] * len(it.target_ids) for it in items], 0)
    return TargetBatch(ids.to(device), attn.to(device), labels.bool().to(device))


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
    ids, attn = pad_batch([it.prompt_ids for it in items], pad)
    tgt, tmask = pad_batch([it.target_ids for it in items], pad)
    last = torch.tensor([len(it.prompt_ids) - 1 for it in items])
    return PromptBatch(ids.to(device), attn.to(device), last.to(device), tgt.to(device), tmask.bool().to(device))


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
