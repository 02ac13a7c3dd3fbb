"""The target vector of ROME (δ on an MLP output) and MEMIT/AlphaEdit (δ on a block output).

docs/algorithms/target-optimisation.md: ROME's v* (Meng et al. 2022, "Locating and Editing Factual
Associations in GPT") and its MEMIT variant (Meng et al. 2023, "Mass-Editing Memory in a
Transformer"). Public names are also reachable as
``harness.algorithms.locate.{TargetHparams, TargetResult, optimize_target}``.

Speed: δ sits at the subject's last token, so under causal attention nothing before that token
depends on δ. ``optimize_target`` cuts every prompt there, runs the prefixes once to fill a KV
cache, and at each step runs only the suffixes (a few tokens per prompt instead of the whole
padded batch) through the model's own forward with that cache, explicit position ids and a
[prefix | suffix] mask: the mechanism of batched generation with left-padded prompts, so it works
for any architecture transformers can generate with. Step 0 is checked against the full forward;
a mismatch falls back to the full forward with hooks.

The model is left as it was found: hooks are removed in ``finally`` and the gradient is taken with
``torch.autograd.grad`` with respect to δ only, so no ``.grad`` lands on a parameter.
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from harness.algorithms.locate import (KL_TEMPLATE, _Stop, as_template_groups, fill_template, hidden_of, model_device,
                                       replace_hidden, subject_last_index)
from harness.algorithms.tokens import encode_prompt_target
from harness.models import ModelSpec, cache_kwargs, get_module, num_layers, output_cache
from harness.types import EditRequest

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class TargetHparams:
    """Settings of the target optimisation (docs/algorithms/target-optimisation.md).

    Attributes:
        num_grad_steps: loop iterations; the last one only evaluates (at most N-1 Adam steps).
        lr: Adam learning rate on δ.
        weight_decay: weight of ``‖δ‖ / ‖v_init‖²`` (the norm, not its square).
        clamp_norm_factor: δ is projected into ``‖δ‖ ≤ clamp_norm_factor·‖v_init‖`` after each step.
        kl_factor: weight of KL(P_δ ‖ P_0) at the subject's last token of ``"{subject} is a"``.
        loss_layer: the block whose output feeds the final norm and unembedding; None = last.
        early_stop_loss: stop when the total loss falls below this.
    """

    num_grad_steps: int = 25
    lr: float = 0.5
    weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    loss_layer: Optional[int] = None
    early_stop_loss: float = 5e-2

    def __post_init__(self) -> None:
        if self.num_grad_steps < 1:
            raise ValueError(f"num_grad_steps must be >= 1, got {self.num_grad_steps}")
        if not (self.lr > 0 and self.clamp_norm_factor > 0):
            raise ValueError("lr and clamp_norm_factor must be > 0")
        if self.weight_decay < 0 or self.kl_factor < 0:
            raise ValueError("weight_decay and kl_factor must be >= 0")


@dataclass
class TargetResult:
    """What ``optimize_target`` found. Vectors are float32 [d] on the model's device.

    Attributes:
        target: ``v_init + delta`` (ROME's v*, MEMIT's z).
        v_init: the unmodified MLP output (``mlp``) or block output (``block``) at the subject's
            last token of the first template's prompt.
        delta: the optimised δ.
        losses, nll: total loss and its NLL part at every evaluated iteration (step 0 first).
        steps: Adam steps taken.
        fast: whether the cached-prefix fast path was used.
        seconds: ``prep`` (one full forward, prompt building) and ``loop``.
    """

    target: torch.Tensor
    v_init: torch.Tensor
    delta: torch.Tensor
    losses: list[float]
    nll: list[float]
    steps: int
    fast: bool
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class _Batch:
    """The prompts of n requests, one row per prompt, and the positions the loss reads.

    Reads are grouped by request, in request order: its NLL positions, then its KL position.
    """

    ids: torch.Tensor  # [B, L] right padded
    attn: torch.Tensor  # [B, L]
    sub: torch.Tensor  # [B] subject-last index of each row (δ goes there)
    row_req: torch.Tensor  # [B] the request each row belongs to
    first_row: list[int]  # per request: the row of its first template (v_init is read there)
    read_rows: torch.Tensor  # [R] rows of the positions the loss reads
    read_pos: torch.Tensor  # [R]
    read_req: torch.Tensor  # [R] the request each read belongs to
    labels: torch.Tensor  # [R] target ids at NLL reads, -1 at KL reads
    n_labels: torch.Tensor  # [n] NLL reads per request


def _target_batch(tok: Any, requests: Sequence[EditRequest], templates: Sequence[str], dev: torch.device) -> _Batch:
    seqs: list[list[int]] = []
    sub, row_req, first_row, rows, pos, read_req, labels, n_labels = [], [], [], [], [], [], [], []
    for r, request in enumerate(requests):
        first_row.append(len(seqs))
        n_labels.append(0)
        for t in templates:
            filled = fill_template(t, request.prompt)
            pt = encode_prompt_target(tok, filled.replace("{}", request.subject), request.target_new)
            ids = list(pt.prompt_ids) + list(pt.target_ids[:-1])
            idx = subject_last_index(tok, filled, request.subject)
            if idx >= len(pt.prompt_ids):
                raise ValueError(f"case {request.case_id}: subject index {idx} is past the prompt of {filled!r}")
            n_target = len(pt.target_ids)
            rows += [len(seqs)] * n_target
            pos += list(range(len(ids) - n_target, len(ids)))
            labels += list(pt.target_ids)
            read_req += [r] * n_target
            n_labels[-1] += n_target
            seqs.append(ids)
            sub.append(idx)
            row_req.append(r)
        kl_text = KL_TEMPLATE.replace("{}", request.subject)
        kl_idx = subject_last_index(tok, KL_TEMPLATE, request.subject)
        rows.append(len(seqs))
        pos.append(kl_idx)
        labels.append(-1)
        read_req.append(r)
        seqs.append(list(tok(kl_text)["input_ids"]))
        sub.append(kl_idx)
        row_req.append(r)
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(seqs), width), int(pad or 0), dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1

    def t(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=dev)

    return _Batch(ids.to(dev), attn.to(dev), t(sub), t(row_req), first_row, t(rows), t(pos), t(read_req), t(labels),
                  t(n_labels))


def _add_at(h: torch.Tensor, sub: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``h`` with ``delta`` added at (row i, position sub[i]) for every row; out of place."""
    rows = torch.arange(h.shape[0], device=h.device)
    return h.index_put((rows, sub), h[rows, sub] + delta.to(h.dtype))


def _head(model: nn.Module, spec: ModelSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    """Final norm + unembedding (+ the config's final logit soft-capping) on [R, d] hidden states."""
    norm, unembed = get_module(model, spec.final_norm), get_module(model, spec.unembed)
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)

    def head(h: torch.Tensor) -> torch.Tensor:
        logits = unembed(norm(h))
        return torch.tanh(logits / cap) * cap if cap else logits

    return head


def _split(b: _Batch, tok: Any) -> dict[str, Any]:
    """Cut every row at its subject's last token: a left-padded prefix and a right-padded suffix.

    Hidden states of prefix tokens never depend on δ (causal attention), so their keys and values
    are computed once (a KV cache); each step runs only the suffixes, with explicit position ids
    (the true positions) and a mask over [prefix | suffix]. ``read_pos`` are suffix coordinates.
    """
    n_rows = b.ids.shape[0]
    lens = b.attn.sum(1).tolist()
    sub = b.sub.tolist()
    p_len, s_len = max(sub), max(n - s for n, s in zip(lens, sub))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    dev = b.ids.device
    pre = torch.full((n_rows, p_len), int(pad), dtype=torch.long, device=dev)
    suf = torch.full((n_rows, s_len), int(pad), dtype=torch.long, device=dev)
    pre_attn, suf_attn = torch.zeros_like(pre), torch.zeros_like(suf)
    for i, (n, s) in enumerate(zip(lens, sub)):
        pre[i, p_len - s:], pre_attn[i, p_len - s:] = b.ids[i, :s], 1
        suf[i, :n - s], suf_attn[i, :n - s] = b.ids[i, s:n], 1
    return {"prefix_ids": pre if p_len else None, "prefix_attn": pre_attn,
            "prefix_pos": (pre_attn.cumsum(1) - 1).clamp(min=0), "cache": None,
            "ids": suf, "attn": torch.cat([pre_attn, suf_attn], 1),
            "pos": b.sub[:, None] + torch.arange(s_len, device=dev)[None], "read_pos": b.read_pos - b.sub[b.read_rows]}


def _tolerance(ref: torch.Tensor) -> float:
    eps = torch.finfo(ref.dtype).eps if ref.is_floating_point() else 1e-7
    return max(1e-4, 4 * eps) * (1.0 + float(ref.abs().max()))


def optimize_target(model: nn.Module, tok: Any, spec: ModelSpec, request: EditRequest, layer: int,
                    hp: TargetHparams, templates: Sequence[str] | Sequence[Sequence[str]], where: str = "mlp",
                    fast: bool = True) -> TargetResult:
    """Optimise δ so that adding it at the subject's last token makes the model say ``target_new``.

    ROME (``where="mlp"``): δ is added to the output of ``spec.mlp`` at ``layer``. MEMIT
    (``where="block"``): δ is added to the output hidden state of block ``layer``. In both, δ goes
    at the subject's last token of every prompt: one rewriting prompt per template
    (``template(prompt) + target[:-1]``, as token ids, so no decode/re-encode round trip) and the
    KL prompt ``"{subject} is a"``. Loss (docs/algorithms/target-optimisation.md): mean target NLL
    over the rewriting prompts + ``kl_factor``·KL(P_δ‖P_0) at the KL prompt's subject token +
    ``weight_decay``·‖δ‖/‖v_init‖². Adam on a float32 δ (cast to the hidden dtype in the hook),
    early stop below ``early_stop_loss``, norm clamp after each step.

    Args:
        spec: the model's architecture facts.
        request: one edit request.
        layer: the edited layer.
        hp: optimisation settings.
        templates: context templates (flat or grouped; flattened in order, the first one gives
            ``v_init`` and should be ``"{}"``).
        where: ``"mlp"`` or ``"block"``.
        fast: cache the prompts' prefixes (up to the subject) and run only the suffixes each step;
            ``False`` runs the full model with hooks every step (the reference path).

    Returns:
        A ``TargetResult``.

    Raises:
        ValueError: bad ``where``/layers, or a subject that cannot be located.
    """
    return optimize_targets(model, tok, spec, [request], layer, hp, templates, where=where, fast=fast)[0]


def _select_cache(cache: Any, rows: torch.Tensor, n_rows: int) -> Any:
    """``cache`` restricted to ``rows``: a copy when some rows go, ``cache`` itself when all stay.

    (Each forward works on its own deep copy, so the returned cache is never written to.)
    """
    if cache is None or len(rows) == n_rows:
        return cache
    out = copy.deepcopy(cache)
    out.batch_select_indices(rows)
    return out


def optimize_targets(model: nn.Module, tok: Any, spec: ModelSpec, requests: Sequence[EditRequest], layer: int,
                     hp: TargetHparams, templates: Sequence[str] | Sequence[Sequence[str]], where: str = "mlp",
                     fast: bool = True) -> list[TargetResult]:
    """``optimize_target`` for several requests at once: one δ per request, all prompts in one batch.

    Request j's loss reads only its own rows, so ∂(Σ_j loss_j)/∂δ_j = ∂loss_j/∂δ_j, and Adam, the
    norm clamp and the early stop act per element or per row: each δ_j follows the path it would
    follow alone (up to floating-point summation order in the batched matmuls). A request that
    meets its early stop is frozen and its rows leave the batch. This is what makes MEMIT's n
    targets cheaper than n ROME targets: one forward/backward per step for the whole batch.

    Returns:
        One ``TargetResult`` per request, in order; ``seconds`` are the batch's.
    """
    if where not in ("mlp", "block"):
        raise ValueError(f"where={where!r}: use 'mlp' (ROME) or 'block' (MEMIT)")
    if not requests:
        return []
    n_layers = num_layers(model)
    last = n_layers - 1
    loss_layer = last if hp.loss_layer is None else int(hp.loss_layer)
    if not 0 <= layer <= loss_layer <= last:
        raise ValueError(f"need 0 <= layer ({layer}) <= loss_layer ({loss_layer}) <= {last}")
    t_start = time.perf_counter()
    flat = [t for g in as_template_groups(templates) for t in g]
    b = _target_batch(tok, requests, flat, model_device(model))
    n, n_rows = len(requests), b.ids.shape[0]
    head = _head(model, spec)
    site = get_module(model, spec.mlp.format(layer) if where == "mlp" else spec.layer.format(layer))
    loss_block = get_module(model, spec.layer.format(loss_layer))
    sfx = _split(b, tok)
    state: dict[str, Any] = {}

    def capture_site(_m, _i, out):
        state["site"] = hidden_of(out).detach()

    def add_delta(_m, _i, out):
        return replace_hidden(out, _add_at(hidden_of(out), state["sub"], state["row_delta"]))

    def capture_loss(_m, _i, out):
        state["loss"] = hidden_of(out)
        raise _Stop  # the blocks above and the full-vocabulary logits are not needed

    def view(active: torch.Tensor, fast_mode: bool) -> dict[str, Any]:
        """The batch restricted to the rows and reads of the ``active`` requests."""
        rows = torch.nonzero(active[b.row_req]).squeeze(1)
        reads = torch.nonzero(active[b.read_req]).squeeze(1)
        new_row = torch.full((n_rows,), -1, dtype=torch.long, device=rows.device)
        new_row[rows] = torch.arange(len(rows), device=rows.device)
        local = torch.cumsum(active.long(), 0) - 1
        v = {"rows": rows, "read_rows": new_row[b.read_rows[reads]], "read_req": local[b.read_req[reads]],
             "labels": b.labels[reads], "req": torch.nonzero(active).squeeze(1)}
        if fast_mode:
            v.update(ids=sfx["ids"][rows], attn=sfx["attn"][rows], pos=sfx["pos"][rows],
                     sub=torch.zeros_like(rows), read_pos=sfx["read_pos"][reads],
                     cache=_select_cache(sfx["cache"], rows, n_rows))
        else:
            v.update(ids=b.ids[rows], attn=b.attn[rows], pos=None, sub=b.sub[rows], read_pos=b.read_pos[reads],
                     cache=None)
        return v

    def forward(v: dict[str, Any], delta: torch.Tensor) -> torch.Tensor:
        """Logits at the view's reads, with δ_j added at the subject's last token of request j's rows."""
        state["sub"], state["row_delta"] = v["sub"], delta[b.row_req[v["rows"]]]
        kw: dict[str, Any] = {"input_ids": v["ids"], "attention_mask": v["attn"], "use_cache": False}
        if v["pos"] is not None:
            kw["position_ids"] = v["pos"]
        if v["cache"] is not None:
            kw.update(use_cache=True, **cache_kwargs(model, copy.deepcopy(v["cache"])))
        try:
            model(**kw)
        except _Stop:
            pass
        return head(state.pop("loss")[v["read_rows"], v["read_pos"]])

    handles = [site.register_forward_hook(capture_site)]
    try:
        with torch.no_grad():
            handles.append(site.register_forward_hook(add_delta))
            handles.append(loss_block.register_forward_hook(capture_loss))
            zero = torch.zeros(n, 1, device=b.ids.device)
            ref = forward(view(torch.ones(n, dtype=torch.bool), False), zero)
            for h in handles:
                h.remove()
            handles = []
            if fast and sfx["prefix_ids"] is not None:
                sfx["cache"] = output_cache(model(input_ids=sfx["prefix_ids"], attention_mask=sfx["prefix_attn"],
                                                  position_ids=sfx["prefix_pos"], use_cache=True))
    finally:
        for h in handles:
            h.remove()
    v_init = torch.stack([state["site"][r, b.sub[r]] for r in b.first_row]).float()  # [n, d]
    t_prep = time.perf_counter() - t_start

    delta = torch.zeros_like(v_init, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.lr)
    max_norm = hp.clamp_norm_factor * v_init.norm(dim=1)
    v_norm2 = v_init.norm(dim=1) ** 2
    losses: list[list[float]] = [[] for _ in range(n)]
    nlls: list[list[float]] = [[] for _ in range(n)]
    steps = [0] * n
    kl_init: Optional[torch.Tensor] = None
    use_fast = fast
    active = torch.ones(n, dtype=torch.bool, device=v_init.device)
    # without a cache that can drop rows, stopped requests stay in the batch (frozen all the same)
    prunable = sfx["cache"] is None or hasattr(sfx["cache"], "batch_select_indices")

    try:
        handles = [site.register_forward_hook(add_delta), loss_block.register_forward_hook(capture_loss)]
        everyone = torch.ones_like(active)
        v = view(everyone, use_fast)
        for it in range(hp.num_grad_steps):
            logits = forward(v, delta)
            if it == 0 and use_fast and not torch.allclose(logits.detach(), ref, rtol=0, atol=_tolerance(ref)):
                log.warning("fast path differs from the full forward by %.3g at step 0; using the full forward",
                            float((logits.detach() - ref).abs().max()))
                use_fast = False
                v = view(everyone, use_fast)
                logits = forward(v, delta)
            logp = torch.log_softmax(logits.float(), dim=-1)
            is_nll = v["labels"] >= 0
            req = v["req"]  # the requests in this view (global indices), in order
            tok_nll = -logp[is_nll].gather(1, v["labels"][is_nll, None]).squeeze(1)
            nll = torch.zeros(len(req), device=logp.device).index_add(0, v["read_req"][is_nll], tok_nll)
            nll = nll / b.n_labels[req]  # mean over the request's prompts and target tokens
            kl_logp = logp[~is_nll]  # one KL read per request, in request order
            if kl_init is None:
                kl_init = kl_logp.detach()
            kl = (kl_logp.exp() * (kl_logp - kl_init[req])).sum(-1)  # KL(P_δ ‖ P_0)
            loss = nll + hp.kl_factor * kl + hp.weight_decay * delta[req].norm(dim=1) / v_norm2[req]
            running = active[req]  # requests in the view that have not stopped
            for k, j in enumerate(req.tolist()):
                if running[k]:
                    losses[j].append(float(loss[k].detach()))
                    nlls[j].append(float(nll[k].detach()))
            stop = (loss.detach() < hp.early_stop_loss) | (it == hp.num_grad_steps - 1)
            go = running & ~stop
            active[req[running & stop]] = False
            if not bool(go.any()):
                break
            (grad,) = torch.autograd.grad(loss[go].sum(), [delta])
            with torch.no_grad():
                kept = delta.detach().clone()
                delta.grad = grad
                opt.step()
                delta[~active] = kept[~active]  # Adam's momentum must not move a stopped δ
                norm = delta.norm(dim=1)
                scale = torch.where(norm > max_norm, max_norm / norm.clamp_min(1e-30), torch.ones_like(norm))
                delta.mul_(scale[:, None])
            for j in req[go].tolist():
                steps[j] += 1
            if prunable and bool((running & stop).any()):
                v = view(active, use_fast)
    finally:
        for h in handles:
            h.remove()
        state.clear()
        sfx.clear()
    delta = delta.detach()
    t_loop = time.perf_counter() - t_start - t_prep
    log.debug("targets for %d requests: %.2fs prep, %.2fs loop, steps %s", n, t_prep, t_loop, steps)
    return [TargetResult(target=v_init[j] + delta[j], v_init=v_init[j], delta=delta[j], losses=losses[j], nll=nlls[j],
                         steps=steps[j], fast=use_fast, seconds={"prep": t_prep, "loop": t_loop}) for j in range(n)]
