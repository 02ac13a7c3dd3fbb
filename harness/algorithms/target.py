"""The target vector of ROME (δ on an MLP output) and MEMIT/AlphaEdit (δ on a block output).

ALGORITHMS.md §1 step 2 (Meng et al. 2022, "Locating and Editing Factual Associations in GPT") and
its §2 variant (Meng et al. 2023, "Mass-Editing Memory in a Transformer"). Public names are also
reachable as ``harness.algorithms.locate.{TargetHparams, TargetResult, optimize_target}``.

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
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from harness.algorithms.locate import (KL_TEMPLATE, as_template_groups, fill_template, hidden_of, model_device,
                                       replace_hidden, subject_last_index)
from harness.algorithms.tokens import encode_prompt_target
from harness.models import ModelSpec, cache_kwargs, get_module, num_layers, output_cache
from harness.types import EditRequest

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class TargetHparams:
    """Settings of the target optimisation (ALGORITHMS.md §1 step 2; §2 for ``where="block"``).

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
    ids: torch.Tensor  # [B, L] right padded
    attn: torch.Tensor  # [B, L]
    sub: torch.Tensor  # [B] subject-last index of each row (δ goes there)
    read_rows: torch.Tensor  # [R] rows of the positions the loss reads (NLL positions, then the KL one)
    read_pos: torch.Tensor  # [R]
    labels: torch.Tensor  # [R - 1] target ids at the NLL positions
    n_target: int


def _target_batch(tok: Any, request: EditRequest, templates: Sequence[str], dev: torch.device) -> _Batch:
    seqs, sub, rows, pos, labels = [], [], [], [], []
    n_target = 0
    for j, t in enumerate(templates):
        filled = fill_template(t, request.prompt)
        pt = encode_prompt_target(tok, filled.replace("{}", request.subject), request.target_new)
        ids = list(pt.prompt_ids) + list(pt.target_ids[:-1])
        idx = subject_last_index(tok, filled, request.subject)
        if idx >= len(pt.prompt_ids):
            raise ValueError(f"subject index {idx} is past the prompt of {filled!r}")
        n_target = len(pt.target_ids)
        seqs.append(ids)
        sub.append(idx)
        rows += [j] * n_target
        pos += list(range(len(ids) - n_target, len(ids)))
        labels += list(pt.target_ids)
    kl_text = KL_TEMPLATE.replace("{}", request.subject)
    seqs.append(list(tok(kl_text)["input_ids"]))
    kl_idx = subject_last_index(tok, KL_TEMPLATE, request.subject)
    sub.append(kl_idx)
    rows.append(len(seqs) - 1)
    pos.append(kl_idx)
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(seqs), width), int(pad or 0), dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1

    def t(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=dev)

    return _Batch(ids.to(dev), attn.to(dev), t(sub), t(rows), t(pos), t(labels), n_target)


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
    KL prompt ``"{subject} is a"``. Loss (ALGORITHMS.md §1 step 2): mean target NLL over the
    rewriting prompts + ``kl_factor``·KL(P_δ‖P_0) at the KL prompt's subject token +
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
    if where not in ("mlp", "block"):
        raise ValueError(f"where={where!r}: use 'mlp' (ROME) or 'block' (MEMIT)")
    n_layers = num_layers(model)
    last = n_layers - 1
    loss_layer = last if hp.loss_layer is None else int(hp.loss_layer)
    if not 0 <= layer <= loss_layer <= last:
        raise ValueError(f"need 0 <= layer ({layer}) <= loss_layer ({loss_layer}) <= {last}")
    t_start = time.perf_counter()
    flat = [t for g in as_template_groups(templates) for t in g]
    b = _target_batch(tok, request, flat, model_device(model))
    head = _head(model, spec)
    blocks = [get_module(model, spec.layer.format(i)) for i in range(n_layers)]
    site = get_module(model, spec.mlp.format(layer) if where == "mlp" else spec.layer.format(layer))
    sfx = _split(b, tok)
    state: dict[str, Any] = {}

    def capture_site(_m, _i, out):
        state["site"] = hidden_of(out).detach()

    def capture_loss(_m, _i, out):
        state["loss"] = hidden_of(out)

    def add_delta(_m, _i, out):
        return replace_hidden(out, _add_at(hidden_of(out), state["sub"], state["delta"]))

    def logits_at(out: Any, pos: torch.Tensor) -> torch.Tensor:
        if loss_layer == last:
            return out.logits[b.read_rows, pos]
        return head(state["loss"][b.read_rows, pos])

    def forward_full() -> torch.Tensor:
        state["sub"] = b.sub
        return logits_at(model(input_ids=b.ids, attention_mask=b.attn, use_cache=False), b.read_pos)

    def forward_fast() -> torch.Tensor:
        state["sub"] = torch.zeros_like(b.sub)  # the subject's last token opens every suffix
        cache = copy.deepcopy(sfx["cache"]) if sfx["cache"] is not None else None
        out = model(input_ids=sfx["ids"], attention_mask=sfx["attn"], position_ids=sfx["pos"],
                    use_cache=cache is not None, **cache_kwargs(model, cache))
        return logits_at(out, sfx["read_pos"])

    handles = [site.register_forward_hook(capture_site)]
    if loss_layer < last:
        handles.append(blocks[loss_layer].register_forward_hook(capture_loss))
    try:
        with torch.no_grad():
            ref = forward_full()
            handles.pop(0).remove()
            if fast and sfx["prefix_ids"] is not None:
                sfx["cache"] = output_cache(model(input_ids=sfx["prefix_ids"], attention_mask=sfx["prefix_attn"],
                                                  position_ids=sfx["prefix_pos"], use_cache=True))
    finally:
        for h in handles:
            h.remove()
    v_init = state["site"][0, b.sub[0]].float()
    t_prep = time.perf_counter() - t_start

    delta = torch.zeros_like(v_init, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.lr)
    max_norm = hp.clamp_norm_factor * v_init.norm()
    v_norm2 = v_init.norm() ** 2
    losses: list[float] = []
    nlls: list[float] = []
    kl_init: Optional[torch.Tensor] = None
    steps, use_fast = 0, fast

    try:
        handles = [site.register_forward_hook(add_delta)]
        if loss_layer < last:
            handles.append(blocks[loss_layer].register_forward_hook(capture_loss))
        for it in range(hp.num_grad_steps):
            state["delta"] = delta
            logits = forward_fast() if use_fast else forward_full()
            if it == 0 and use_fast and not torch.allclose(logits.detach(), ref, rtol=0, atol=_tolerance(ref)):
                log.warning("fast path differs from the full forward by %.3g at step 0; using the full forward",
                            float((logits.detach() - ref).abs().max()))
                use_fast = False
                logits = forward_full()
            logp = torch.log_softmax(logits.float(), dim=-1)
            nll = -logp[:-1].gather(1, b.labels[:, None]).sum() / len(b.labels)  # mean over prompts and tokens
            if kl_init is None:
                kl_init = logp[-1:].detach()
            kl = hp.kl_factor * F.kl_div(kl_init, logp[-1:], log_target=True, reduction="batchmean")
            loss = nll + kl + hp.weight_decay * delta.norm() / v_norm2
            losses.append(float(loss.detach()))
            nlls.append(float(nll.detach()))
            log.debug("target step %d: loss %.4f nll %.4f kl %.4f p(target) %.3f", it, losses[-1], nlls[-1],
                      float(kl.detach()), math.exp(-nlls[-1]))
            if losses[-1] < hp.early_stop_loss or it == hp.num_grad_steps - 1:
                break
            (grad,) = torch.autograd.grad(loss, [delta])
            delta.grad = grad
            opt.step()
            steps += 1
            with torch.no_grad():
                norm = delta.norm()
                if norm > max_norm:
                    delta.mul_(max_norm / norm)
    finally:
        for h in handles:
            h.remove()
        state.clear()
        sfx.clear()
    delta = delta.detach()
    t_loop = time.perf_counter() - t_start - t_prep
    return TargetResult(target=v_init + delta, v_init=v_init, delta=delta, losses=losses, nll=nlls, steps=steps,
                        fast=use_fast, seconds={"prep": t_prep, "loop": t_loop})
