"""The rows of the target optimisation (``target.py``): the prompts, the fast path's cut, and views.

* ``build_rows``: per request, one row per context template, ``template(prompt) + target[:-1]`` as
  token ids (tokenised by ``harness.tokens.encode_pairs``, as the probes tokenise their pairs), and
  one KL row ``"{subject} is a"`` (ROME's "essence" prompt, Meng et al. 2022); where δ goes (the
  subject's last token) and where the loss reads (the positions that predict each target token,
  and the KL row's subject token).
* ``Layout``: the rows as one forward takes them: whole (``full_layout``), or cut by
  ``split_at_subject`` (the fast path) into prefixes run once into a KV cache and the suffixes that
  each optimisation step reruns.
* ``select``: a layout restricted to the requests that have not stopped yet (``View``).

Rows are padded on the right by ``harness.tokens.pad_batch``, whatever ``tok.padding_side`` says.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from harness.algorithms.locate import fill_template, subject_last_index
from harness.algorithms.replay import fresh_cache, prefix_cache
from harness.tokens import encode_pairs, pad_batch, pad_id
from harness.types import EditRequest

KL_TEMPLATE = "{} is a"  # the "essence" prompt of ROME's KL term


@dataclass(frozen=True)
class PromptRows:
    """The prompts of n requests, one row per prompt, right-padded, and the positions the loss reads.

    Reads are grouped by request, in request order: its NLL positions, then its KL position.
    """

    ids: torch.Tensor  # [B, L]
    attn: torch.Tensor  # [B, L]
    sub: torch.Tensor  # [B] subject-last index of each row (δ goes there)
    row_req: torch.Tensor  # [B] the request each row belongs to
    first_row: list[int]  # per request: the row of its first template (v_init is read there)
    read_rows: torch.Tensor  # [R] rows of the positions the loss reads
    read_pos: torch.Tensor  # [R]
    read_req: torch.Tensor  # [R] the request each read belongs to
    labels: torch.Tensor  # [R] target ids at NLL reads, -1 at KL reads
    n_labels: torch.Tensor  # [n] NLL reads per request


def build_rows(tok: Any, requests: Sequence[EditRequest], templates: Sequence[str], dev: torch.device) -> PromptRows:
    """The rewriting rows (``template(prompt) + target[:-1]``, tokenised by ``encode_pairs`` like the
    probes' pairs) and the KL row of every request."""
    filled = [[fill_template(t, r.prompt) for t in templates] for r in requests]
    encoded = iter(encode_pairs(tok, [(f.replace("{}", r.subject), r.target_new)
                                      for r, fs in zip(requests, filled) for f in fs]))
    seqs: list[list[int]] = []
    sub, row_req, first_row = [], [], []
    reads: list[tuple[int, int, int, int]] = []  # (row, position, request, target id or -1 for the KL read)
    for r, (request, fs) in enumerate(zip(requests, filled)):
        first_row.append(len(seqs))
        for f in fs:
            pt = next(encoded)
            idx = subject_last_index(tok, f, request.subject)
            if idx >= len(pt.prompt_ids):
                raise ValueError(f"case {request.case_id}: subject index {idx} is past the prompt of {f!r}")
            ids = list(pt.prompt_ids) + list(pt.target_ids[:-1])
            start = len(ids) - len(pt.target_ids)  # the position that predicts the first target token
            reads += [(len(seqs), start + k, r, label) for k, label in enumerate(pt.target_ids)]
            seqs.append(ids)
            sub.append(idx)
            row_req.append(r)
        kl_idx = subject_last_index(tok, KL_TEMPLATE, request.subject)
        reads.append((len(seqs), kl_idx, r, -1))
        seqs.append(list(tok(KL_TEMPLATE.replace("{}", request.subject))["input_ids"]))
        sub.append(kl_idx)
        row_req.append(r)
    ids, attn = pad_batch(seqs, pad_id(tok))
    read_rows, read_pos, read_req, labels = (torch.tensor(c, dtype=torch.long, device=dev) for c in zip(*reads))
    return PromptRows(ids.to(dev), attn.to(dev), torch.tensor(sub, device=dev), torch.tensor(row_req, device=dev),
                      first_row, read_rows, read_pos, read_req, labels,
                      torch.bincount(read_req[labels >= 0], minlength=len(requests)))


@dataclass(frozen=True)
class Layout:
    """The rows as one forward takes them, and the positions of the loss reads in them."""

    ids: torch.Tensor  # [B, W]
    attn: torch.Tensor  # [B, W]; fast path: [B, P + W], over [cached prefix | suffix]
    sub: torch.Tensor  # [B] where δ goes
    read_pos: torch.Tensor  # [R]
    pos: Optional[torch.Tensor] = None  # [B, W] position ids (fast path: the true positions)
    cache: Any = None  # the prefixes' KV cache (fast path)


def full_layout(b: PromptRows) -> Layout:
    """The whole rows (the reference path)."""
    return Layout(b.ids, b.attn, b.sub, b.read_pos)


@torch.no_grad()
def split_at_subject(model: nn.Module, b: PromptRows, pad: int) -> Layout:
    """The fast path: every row cut before its subject's last token; the prefixes (left-padded) run
    once into a KV cache, and the suffixes (right-padded) are what each step runs, δ at their first
    token. Hidden states of prefix tokens never depend on δ (causal attention). The prefix pass
    computes no logits (``replay.prefix_cache``): only its cache is read."""
    dev = b.ids.device
    rows, lens, sub = b.ids.tolist(), b.attn.sum(1).tolist(), b.sub.tolist()
    pre, pre_attn = (x.to(dev) for x in pad_batch([r[:s] for r, s in zip(rows, sub)], pad, side="left"))
    suf, suf_attn = (x.to(dev) for x in pad_batch([r[s:n] for r, n, s in zip(rows, lens, sub)], pad))
    cache = None
    if pre.shape[1]:  # else every subject ends at token 0: nothing to cache
        cache = prefix_cache(model, input_ids=pre, attention_mask=pre_attn,
                             position_ids=(pre_attn.cumsum(1) - 1).clamp(min=0))
    return Layout(ids=suf, attn=torch.cat([pre_attn, suf_attn], 1), sub=torch.zeros_like(b.sub),
                  read_pos=b.read_pos - b.sub[b.read_rows],
                  pos=b.sub[:, None] + torch.arange(suf.shape[1], device=dev)[None], cache=cache)


@dataclass(frozen=True)
class View:
    """The requests still running: their rows as one forward takes them, and their reads."""

    at: Layout  # the layout restricted to these requests' rows and reads
    rows: torch.Tensor  # rows of ``PromptRows`` in this view
    req: torch.Tensor  # the requests in this view (global indices), in order
    read_rows: torch.Tensor  # per read: its row in this view
    read_req: torch.Tensor  # per read: its request's index in this view
    labels: torch.Tensor  # per read: the target id, -1 at KL reads


def select(b: PromptRows, at: Layout, active: torch.Tensor) -> View:
    """``at`` restricted to the rows and reads of the ``active`` requests ([n] bool)."""
    rows = torch.nonzero(active[b.row_req]).squeeze(1)
    reads = torch.nonzero(active[b.read_req]).squeeze(1)
    n_rows = b.ids.shape[0]
    new_row = torch.full((n_rows,), -1, dtype=torch.long, device=rows.device)
    new_row[rows] = torch.arange(len(rows), device=rows.device)
    local = torch.cumsum(active.long(), 0) - 1
    cache = at.cache  # each forward works on its own copy (replay.fresh_cache): this one is never written to
    if cache is not None and len(rows) < n_rows:
        cache = fresh_cache(cache)
        cache.batch_select_indices(rows)
    kept = Layout(ids=at.ids[rows], attn=at.attn[rows], sub=at.sub[rows], read_pos=at.read_pos[reads],
                  pos=None if at.pos is None else at.pos[rows], cache=cache)
    return View(kept, rows, torch.nonzero(active).squeeze(1), new_row[b.read_rows[reads]],
                local[b.read_req[reads]], b.labels[reads])
