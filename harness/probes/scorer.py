"""Batched teacher-forced scoring of (prompt, target) pairs: per-token log-probs and argmax tokens.

This is the one forward-pass engine behind both evaluation protocols: the probability protocol of
ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", ``test_batch_prediction``)
and EasyEdit's teacher-forced token accuracy (Wang et al. 2024, ``test_prediction_acc``). For a pair
``(x, y)`` the model reads ``x + " " + y`` and we keep, for every target token ``y_j``, its log-prob
and the argmax token at the position that predicts it (docs/metrics/scoring.md).

Tokenization: ``harness.tokens.encode_pairs`` (the difference method, ``ids(x + " " + y) =
enc(x) + target``; ``enc(x) + enc(" " + y)`` flagged ``boundary_merge`` when the tokenizer merges
across the boundary), the same function the edit algorithms train with, so an edit is scored on
the tokens it was trained on.

Batching: identical pairs are scored once. Targets sharing a prompt share one row: the prompt is
read once, and each multi-token target adds a *branch* holding its tokens but the last; a 4D
attention mask lets a branch see the prompt and itself only, and explicit position ids restart
every branch right after the prompt (so the numbers equal a separate forward per pair). Models
whose attention takes no custom 4D mask (flash attention, stubs) get one multi-token branch per
row with an ordinary 2D mask; single-token targets need no branch (they read the last prompt
position). Rows are right-padded by hand (``harness.tokens.pad_batch``; ``tokenizer.padding_side`` is never used), sorted by
length, and chunked ``batch_size`` rows per forward; logits are projected only at the positions
that predict targets (``logits_to_keep``) and normalised in float32 whatever the model dtype.
"""
from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from harness.tokens import Pair, PromptTarget, encode_pairs, pad_batch, pad_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairScore:
    """Teacher-forced result for one (prompt, target) pair.

    Attributes:
        target_ids: the scored target tokens.
        logprobs: ``log P(y_j | x, y_<j)`` per target token (float32 log-softmax).
        argmax: the model's argmax token at each position that predicts a target token.
        boundary_merge: the tokenization fallback was used (see the module docstring).
    """

    target_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    argmax: tuple[int, ...]
    boundary_merge: bool = False

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per target token."""
        return -sum(self.logprobs) / len(self.logprobs)

    @property
    def prob(self) -> float:
        """``exp(-nll)``: the per-token geometric-mean probability of ROME's protocol."""
        return math.exp(-self.nll)

    @property
    def accuracy(self) -> float:
        """EasyEdit's token accuracy: fraction of target tokens that are the argmax."""
        return sum(a == t for a, t in zip(self.argmax, self.target_ids)) / len(self.target_ids)


# ----------------------------------------------------------------------------------------------
# rows


@dataclass
class _Row:
    """One sequence of a forward pass: a prompt and the targets scored from it."""

    prompt: tuple[int, ...]
    targets: list[tuple[int, tuple[int, ...]]]  # (unique pair index, target ids)

    def __len__(self) -> int:
        return len(self.prompt) + sum(len(t) - 1 for _, t in self.targets)

    def layout(self) -> tuple[list[int], list[int], list[int], list[list[int]]]:
        """ids, segment (0 prompt, k>0 branch k), position ids, and per target the row positions
        whose logits predict its tokens."""
        n = len(self.prompt)
        ids, seg, pos = list(self.prompt), [0] * n, list(range(n))
        where = []
        for k, (_, t) in enumerate(self.targets, start=1):
            start = len(ids)
            branch = t[:-1]
            ids += branch
            seg += [k] * len(branch)
            pos += range(n, n + len(branch))
            where.append([n - 1] + list(range(start, start + len(branch))))
        return ids, seg, pos, where


def _rows(encoded: Sequence[PromptTarget], prompt_keys: Sequence[str], tree: bool, share: bool) -> list[_Row]:
    """Group pairs into rows: with ``tree`` one row per prompt; otherwise at most one multi-token
    target per row (single-token targets ride on the prompt's first row); without ``share`` one
    pair per row."""
    rows: list[_Row] = []
    by_prompt: dict[str, list[_Row]] = {}
    for i, (e, key) in enumerate(zip(encoded, prompt_keys)):
        item = (i, e.target_ids)
        if not share:
            rows.append(_Row(e.prompt_ids, [item]))
            continue
        group = by_prompt.setdefault(key, [])
        multi = len(e.target_ids) > 1
        free = next((r for r in group if tree or not multi or all(len(t) == 1 for _, t in r.targets)), None)
        if free is None:
            free = _Row(e.prompt_ids, [])
            group.append(free)
            rows.append(free)
        free.targets.append(item)
    return rows


# ----------------------------------------------------------------------------------------------
# the forward pass


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device, (t.dtype if t.is_floating_point() else torch.float32)
    return torch.device("cpu"), torch.float32


def supports_tree(model: nn.Module) -> bool:
    """True when the model's attention accepts a custom additive 4D mask (eager or sdpa)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return impl in ("eager", "sdpa")


def _keeps_logits(model: nn.Module) -> bool:
    """True when ``forward(logits_to_keep=<2D bool mask>)`` projects only the masked positions."""
    try:
        from transformers import modeling_utils
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    params = inspect.signature(model.forward).parameters
    return "logits_to_keep" in params and hasattr(modeling_utils, "slice_logits_to_keep")


def _padded(n: int, pad_to: int) -> int:
    return -(-n // pad_to) * pad_to


def _chunks(rows: Sequence[_Row], batch_size: int, pad_to: int | None) -> list[tuple[list[_Row], int]]:
    """(rows, padded width) per forward: rows sorted by length; with ``pad_to`` a chunk holds rows of
    one rounded length only, so every row is padded to the same width whatever else is scored."""
    rows = sorted(rows, key=len)
    width = (lambda r: _padded(len(r), pad_to)) if pad_to else len
    out: list[tuple[list[_Row], int]] = []
    for r in rows:
        if out and len(out[-1][0]) < batch_size and (not pad_to or out[-1][1] == width(r)):
            out[-1] = (out[-1][0] + [r], max(out[-1][1], width(r)))
        else:
            out.append(([r], width(r)))
    return out


def _forward(model: nn.Module, rows: Sequence[_Row], t: int, pad: int, tree: bool, keep_logits: bool,
             device: torch.device, dtype: torch.dtype) -> list[list[tuple[list[float], list[int]]]]:
    """One forward over ``rows`` right-padded to width ``t``; per row, per target: (log-probs, argmax ids)."""
    layouts = [r.layout() for r in rows]
    b = len(rows)
    ids, _ = pad_batch([lay[0] for lay in layouts], pad, width=t)
    seg, _ = pad_batch([lay[1] for lay in layouts], -1, width=t)
    pos, _ = pad_batch([lay[2] for lay in layouts], 0, width=t)
    n_prompt = torch.tensor([len(r.prompt) for r in rows])
    real = seg >= 0
    if tree:
        q, k = seg[:, :, None], seg[:, None, :]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        allowed = causal & (k >= 0) & ((k == 0) | (k == q))
        allowed |= torch.eye(t, dtype=torch.bool) & (q < 0)  # pad rows see themselves: no empty softmax
        mask = torch.zeros((b, 1, t, t), dtype=dtype).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
    else:
        mask = real.long()
    keep = real & (torch.arange(t)[None, :] >= (n_prompt - 1)[:, None])
    kwargs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                  use_cache=False)
    if keep_logits:
        kwargs["logits_to_keep"] = keep.to(device)
    logits = model(**kwargs).logits
    if logits.dim() == 3:  # the model projected every position
        logits = logits[keep.to(logits.device)]
    logp = logits.float().log_softmax(-1)
    top = logp.argmax(-1).cpu()
    flat = (keep.flatten().cumsum(0) - 1).view(b, t)
    # gather every target token's log-prob in one indexing op
    at, tok_ids, spans = [], [], []
    for i, ((_, _, _, where), row) in enumerate(zip(layouts, rows)):
        for w, (_, target) in zip(where, row.targets):
            spans.append((len(at), len(target)))
            at += flat[i, w].tolist()
            tok_ids += list(target)
    vals = logp[torch.tensor(at, device=logp.device), torch.tensor(tok_ids, device=logp.device)].cpu().tolist()
    tops = top[torch.tensor(at)].tolist()
    out, s = [], 0
    for row in rows:
        per = []
        for _ in row.targets:
            start, m = spans[s]
            per.append((vals[start:start + m], tops[start:start + m]))
            s += 1
        out.append(per)
    return out


def score_pairs(model: nn.Module, tok, pairs: Sequence[Pair], batch_size: int = 32,
                share_prompts: bool = True, pad_to: int | None = 16) -> list[PairScore]:
    """Teacher-forced log-probs and argmax tokens of many (prompt, target) pairs, batched.

    Args:
        model: a causal LM returning ``.logits`` (any device, any dtype).
        tok: its tokenizer.
        pairs: (prompt, target) strings; duplicates are scored once.
        batch_size: rows (sequences) per forward pass.
        share_prompts: read each distinct prompt once for all its targets (False: one pair per row,
            the plain layout; results are the same up to float rounding).
        pad_to: round every row's width up to a multiple of this, and batch only rows of equal
            width. CPU kernels pick their reduction order by sequence width, so this makes a pair's
            numbers independent of what else is in the call (checked bit for bit on SmolLM2 with
            single-target rows). None: pad each chunk to its longest row (fastest, differences of
            ~1e-5 in log-probs between batch compositions).

    Returns:
        One ``PairScore`` per input pair, in order (duplicates share one object).

    Raises:
        ValueError: ``batch_size < 1`` or a pair that cannot be encoded (see ``encode_pairs``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if pad_to is not None and pad_to < 1:
        raise ValueError(f"pad_to must be >= 1 or None, got {pad_to}")
    unique = list(dict.fromkeys((str(p), str(t)) for p, t in pairs))
    if not unique:
        return []
    encoded = encode_pairs(tok, unique)
    merges = sum(e.boundary_merge for e in encoded)
    if merges:
        log.warning("%d of %d pairs merge across the prompt/target boundary; scored with enc(' '+target)",
                    merges, len(unique))
    device, dtype = _device_dtype(model)
    tree = share_prompts and supports_tree(model)
    rows = _rows(encoded, [p for p, _ in unique], tree, share_prompts)
    pad = pad_id(tok)
    keep_logits = _keeps_logits(model)
    results: dict[int, PairScore] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for chunk, width in _chunks(rows, batch_size, pad_to):
                for row, per in zip(chunk, _forward(model, chunk, width, pad, tree, keep_logits, device, dtype)):
                    for (i, target), (lp, top) in zip(row.targets, per):
                        results[i] = PairScore(target, tuple(lp), tuple(top), encoded[i].boundary_merge)
    finally:
        model.train(was_training)
    log.debug("scored %d pairs (%d unique) in %d rows", len(pairs), len(unique), len(rows))
    index = {pair: i for i, pair in enumerate(unique)}
    return [results[index[(str(p), str(t))]] for p, t in pairs]
