"""Token-level helpers that the edit algorithms and the probes share: the pad id, one collator, and the
one prompt + target tokenisation that training and scoring both use.

Prompt + target (``encode_pairs``): the model reads ``prompt + target_text(target)``, the target as a
continuation with one leading space (added only when missing). This is the difference method of
ROME's evaluation (Meng et al. 2022, ``test_batch_prediction``): ``ids(prompt + " " + target) =
enc(prompt) + target_ids``, where ``enc`` is the tokenizer's own default call, so a BOS is added
exactly when the tokenizer adds one (Llama-style yes, SmolLM2/GPT-2 no), the same way for the prompt
and for the whole text; special tokens a tokenizer appends at the *end* (EOS templates) are dropped
from both. When the tokenizer merges across the prompt/target boundary (``enc(prompt)`` is not a
prefix of the whole encoding), the target is encoded alone, ``enc(" " + target)`` without special
tokens (the ROME anchor's choice), and the pair is flagged ``boundary_merge``. The ROME/MEMIT target
optimisation, the fine-tuning edits and the scorer all call it, so the tokens an edit trains on are
the tokens a probe scores. (EasyEdit finds the target by counting pad tokens, right only under left
padding; nothing here depends on padding.)

Batches are padded by hand (``pad_batch``), whatever ``tok.padding_side`` says: on the right, token
``i`` of a sequence sits at column ``i`` as in its unpadded encoding, so positions need no care.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

Pair = tuple[str, str]


def pad_id(tok: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padded positions are masked anyway)."""
    for tid in (tok.pad_token_id, tok.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def pad_batch(seqs: Sequence[Sequence[int]], value: int, width: int | None = None,
              side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Collate integer sequences (token ids, positions, segment ids) into one padded matrix.

    Args:
        seqs: the sequences, at least one.
        value: what fills the padded cells.
        width: the number of columns; None means the longest sequence.
        side: ``"right"`` (sequence ``i`` starts at column 0) or ``"left"`` (it ends at the last column).

    Returns:
        ``(values, mask)``: [len(seqs), width] int64 tensors on the CPU; ``mask`` is 1 on the real cells.

    Raises:
        ValueError: a bad ``side``, or a sequence longer than ``width``.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side={side!r}: use 'right' or 'left'")
    longest = max((len(s) for s in seqs), default=0)
    width = longest if width is None else width
    if longest > width:
        raise ValueError(f"a sequence of {longest} items does not fit in width {width}")
    values = torch.full((len(seqs), width), int(value), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        if len(s):
            values[i, cols] = torch.tensor(list(s), dtype=torch.long)
            mask[i, cols] = 1
    return values, mask


def encode_right_padded(tok: Any, texts: Sequence[str], device: torch.device) -> Any:
    """Tokenise ``texts`` as one batch padded on the right, whatever ``tok.padding_side`` says.

    Token ``i`` of a text is then at column ``i`` of its row (as in the unpadded encoding), and the
    model's default position ids (0, 1, ...) are right for every row.

    Returns:
        The tokenizer's batch encoding (``input_ids``, ``attention_mask``) on ``device``.

    Raises:
        ValueError: the tokenizer did not pad on the right (its attention mask has a gap before a token).
    """
    enc = tok(list(texts), return_tensors="pt", padding=True, padding_side="right")
    mask = enc["attention_mask"]
    lengths = mask.sum(1, keepdim=True)
    if not torch.equal(mask.bool(), torch.arange(mask.shape[1]) < lengths):
        raise ValueError(f"{type(tok).__name__} did not pad on the right when asked (padding_side="
                         f"{getattr(tok, 'padding_side', None)!r}); token positions would be wrong")
    return enc.to(device)


# ----------------------------------------------------------------------------------------------
# prompt + target


def target_text(target: str) -> str:
    """The target as a continuation: with one leading space, added only if missing."""
    return target if target.startswith(" ") else " " + target


@dataclass(frozen=True)
class PromptTarget:
    """Token ids of one (prompt, target) pair: the model reads ``prompt_ids + target_ids``.

    Attributes:
        prompt_ids: ``enc(prompt)``, with the tokenizer's leading special tokens (BOS) if any.
        target_ids: the target's tokens (never empty).
        boundary_merge: the tokenizer merged across the boundary, so ``target_ids`` is
            ``enc(target_text(target))`` on its own (see the module docstring).
    """

    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    boundary_merge: bool = False

    @property
    def ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.target_ids


def _suffix_specials(tok: Any) -> int:
    """How many special tokens ``tok`` appends after a text by default (0 for GPT-2 and Llama)."""
    with_special = list(tok("a")["input_ids"])
    plain = list(tok("a", add_special_tokens=False)["input_ids"])
    n = len(plain)
    for k in range(len(with_special) - n + 1):
        if with_special[k:k + n] == plain:
            return len(with_special) - k - n
    raise ValueError("cannot locate the text tokens inside the tokenizer's default encoding")


def encode_pairs(tok: Any, pairs: Sequence[Pair]) -> list[PromptTarget]:
    """Token ids of each (prompt, target) pair by the difference method (module docstring).

    Args:
        tok: a Hugging Face tokenizer (callable on a list of strings).
        pairs: (prompt, target) strings; a target gets one leading space unless it has one.

    Returns:
        One ``PromptTarget`` per pair, in order.

    Raises:
        ValueError: a prompt with no tokens at all (nothing predicts the first target token), or a
            target with none.
    """
    if not pairs:
        return []
    cut = _suffix_specials(tok)
    prompts = list(dict.fromkeys(p for p, _ in pairs))
    heads = {p: tuple(ids[:len(ids) - cut]) for p, ids in zip(prompts, tok(prompts)["input_ids"])}
    texts = [target_text(t) for _, t in pairs]
    whole = tok([p + text for (p, _), text in zip(pairs, texts)])["input_ids"]
    out = []
    for (prompt, _), text, full in zip(pairs, texts, whole):
        head, full = heads[prompt], tuple(full[:len(full) - cut])
        if not head:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens; nothing predicts the target")
        if full[:len(head)] == head and len(full) > len(head):
            out.append(PromptTarget(head, full[len(head):]))
        else:
            out.append(PromptTarget(head, tuple(tok(text, add_special_tokens=False)["input_ids"]), True))
        if not out[-1].target_ids:
            raise ValueError(f"target {text!r} encodes to no tokens")
    return out


def encode_prompt_target(tok: Any, prompt: str, target: str) -> PromptTarget:
    """``encode_pairs`` for one pair."""
    return encode_pairs(tok, [(prompt, target)])[0]
