"""The target vector of ROME (v*: δ on an MLP output), MEMIT/AlphaEdit (z: δ on a block output) and
PMET (δ on the attention and the MLP output of one layer together).

docs/algorithms/target-optimisation.md: ROME's v* (Meng et al. 2022, "Locating and Editing Factual
Associations in GPT") and its MEMIT variant (Meng et al. 2023, "Mass-Editing Memory in a
Transformer"). ``optimize_targets`` runs, and this module reads, in this order:

1. the rows (``target_rows.build_rows``): per request, one row per context template,
   ``template(prompt) + target[:-1]``, and one KL row ``"{subject} is a"``; δ goes at the subject's
   last token of every row.
2. ``reference_pass``: one full forward with δ = 0 gives v_init and the reference logits.
3. the fast path (``target_rows.split_at_subject``): under causal attention nothing before the
   subject's last token depends on δ, so the rows are cut there; the prefixes run once into a KV
   cache, and each step runs only the suffixes through the model's own forward with that cache,
   explicit position ids and a [prefix | suffix] mask (batched generation's mechanism, so any
   architecture transformers can generate with works). Step 0 is checked against the reference
   forward; a mismatch falls back to the whole rows. After step 0 the blocks below the δ site are
   not rerun: their recorded outputs are replayed (``replay.BlockReplay``), and each step gets the
   prefix cache without a copy (``replay.fresh_cache``).
4. ``run_loop``: Adam on a float32 δ (cast to the hidden dtype where ``DeltaForward`` adds it),
   ``target_loss`` = mean target NLL + ``kl_factor``·KL(P_δ‖P_0) at the KL read +
   ``weight_decay``·‖δ‖/‖v_init‖², early stop per request (stopped requests leave the batch),
   ``adam_step`` with the norm clamp. With several sites (PMET's ``"attn+mlp"``) δ is their
   concatenation; the decay and the clamp act per site against that site's own ‖v_init‖.

The model is left as it was found: hooks are removed on exit and the gradient is taken with
``torch.autograd.grad`` with respect to δ only, so no ``.grad`` lands on a parameter.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from harness.algorithms.hooks import (Hooks, StopForward, add_at, hidden_of, logit_head, model_device, replace_hidden,
                                      run_to_stop)
from harness.algorithms.locate import as_template_groups
from harness.algorithms.replay import BlockReplay, fresh_cache
from harness.algorithms.target_rows import Layout, PromptRows, View, build_rows, full_layout, select, split_at_subject
from harness.models import ModelSpec, cache_kwargs, get_module, num_layers
from harness.tokens import pad_id
from harness.types import EditRequest

log = logging.getLogger(__name__)

# where δ goes: the ModelSpec templates of its sites, in δ's column order
SITES = {"mlp": ("mlp",), "block": ("layer",), "attn+mlp": ("attn", "mlp")}


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
            last token of the first template's prompt; for ``attn+mlp`` [attention output | MLP
            output], [2d].
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


# ----------------------------------------------------------------------------------------------
# the entry points


def optimize_target(model: nn.Module, tok: Any, spec: ModelSpec, request: EditRequest, layer: int,
                    hp: TargetHparams, templates: Sequence[str] | Sequence[Sequence[str]], where: str = "mlp",
                    fast: bool = True, replay: bool = True) -> TargetResult:
    """Optimise δ so that adding it at the subject's last token makes the model say ``target_new``
    (``optimize_targets`` for one request; the arguments are the same)."""
    return optimize_targets(model, tok, spec, [request], layer, hp, templates, where=where, fast=fast,
                            replay=replay)[0]


def optimize_targets(model: nn.Module, tok: Any, spec: ModelSpec, requests: Sequence[EditRequest], layer: int,
                     hp: TargetHparams, templates: Sequence[str] | Sequence[Sequence[str]], where: str = "mlp",
                     fast: bool = True, replay: bool = True) -> list[TargetResult]:
    """Optimise one δ per request so that adding it at the subject's last token makes the model say
    ``target_new``; all requests' prompts run in one batch (module docstring: rows, loss, fast path).

    Request j's loss reads only its own rows, so ∂(Σ_j loss_j)/∂δ_j = ∂loss_j/∂δ_j, and Adam, the
    norm clamp and the early stop act per element or per row: each δ_j follows the path it would
    follow alone (up to floating-point summation order in the batched matmuls). A request that
    meets its early stop is frozen and its rows leave the batch. This is what makes MEMIT's n
    targets cheaper than n ROME targets: one forward/backward per step for the whole batch.

    Args:
        spec, layer, hp: the model's architecture facts, the edited layer, the optimisation settings.
        templates: context templates (flat or grouped; flattened in order, the first one gives
            ``v_init`` and should be ``"{}"``).
        where: ``"mlp"`` (ROME: δ on the output of ``spec.mlp`` at ``layer``), ``"block"`` (MEMIT:
            δ on the output hidden state of block ``layer``) or ``"attn+mlp"`` (PMET: δ = [δ_attn |
            δ_mlp] on the outputs of ``spec.attn`` and ``spec.mlp`` at ``layer``, each decayed and
            clamped against its own initial norm).
        fast: cache the prompts' prefixes (up to the subject) and run only the suffixes each step;
            ``False`` runs the full model with hooks every step (the reference path).
        replay: after the first step, skip the blocks below the δ site (and the site block itself
            for ``"block"``) and replay their recorded outputs (``replay.BlockReplay``); their
            outputs do not depend on δ. ``False`` recomputes them every step (for comparison).

    Returns:
        One ``TargetResult`` per request, in order; ``seconds`` are the batch's.

    Raises:
        ValueError: bad ``where``/layers, or a subject that cannot be located.
    """
    if where not in SITES:
        raise ValueError(f"where={where!r}: use 'mlp' (ROME), 'block' (MEMIT) or 'attn+mlp' (PMET)")
    if not requests:
        return []
    last = num_layers(model) - 1
    loss_layer = last if hp.loss_layer is None else int(hp.loss_layer)
    if not 0 <= layer <= loss_layer <= last:
        raise ValueError(f"need 0 <= layer ({layer}) <= loss_layer ({loss_layer}) <= {last}")
    t_start = time.perf_counter()
    b = build_rows(tok, requests, [t for g in as_template_groups(templates) for t in g], model_device(model))
    full = full_layout(b)
    sites = [get_module(model, getattr(spec, s).format(layer)) for s in SITES[where]]
    fwd = DeltaForward(model, spec, sites, get_module(model, spec.layer.format(loss_layer)), b.row_req)
    ref, v_init = reference_pass(fwd, b, full)
    below = range(layer + (where == "block"))
    if replay and len(below):
        fwd.replay = BlockReplay([get_module(model, spec.layer.format(i)) for i in below])
    cut = split_at_subject(model, b, pad_id(tok)) if fast else None
    t_prep = time.perf_counter() - t_start
    delta, prog, fast = run_loop(fwd, b, full, cut, ref, v_init, hp)
    t_loop = time.perf_counter() - t_start - t_prep
    log.debug("targets for %d requests: %.2fs prep, %.2fs loop, steps %s", len(requests), t_prep, t_loop, prog.steps)
    return [TargetResult(target=v_init[j] + delta[j], v_init=v_init[j], delta=delta[j], losses=prog.losses[j],
                         nll=prog.nll[j], steps=prog.steps[j], fast=fast, seconds={"prep": t_prep, "loop": t_loop})
            for j in range(len(requests))]


# ----------------------------------------------------------------------------------------------
# 2. the model with δ at the edit site, and the reference pass


class DeltaForward:
    """Logits at a view's reads with δ_j added at the subject's last token of request j's rows.

    With k sites, δ_j is their concatenation: site i gets the i-th of k equal column blocks.
    ``attach`` registers the hooks on ``hooks``: ``add_delta`` on each edit site, ``stop_at_loss``
    on the loss block (it keeps the block's output and ends the forward: the blocks above and the
    full-vocabulary logits are not needed; ``head`` maps the kept states at the reads to logits).
    """

    def __init__(self, model: nn.Module, spec: ModelSpec, sites: nn.Module | Sequence[nn.Module],
                 loss_block: nn.Module, row_req: torch.Tensor) -> None:
        self.sites = [sites] if isinstance(sites, nn.Module) else list(sites)
        self.model, self.loss_block, self.row_req = model, loss_block, row_req
        self.head = logit_head(model, spec)
        self.sub: Optional[torch.Tensor] = None  # per row of the running view: where δ goes
        self.row_delta: Optional[torch.Tensor] = None  # per row: its request's δ
        self.hidden: Optional[torch.Tensor] = None  # the loss block's output in the running forward
        self.replay: Optional[BlockReplay] = None  # the blocks below the site, skipped after step 0

    def add_delta(self, site: int) -> Any:
        """The output hook of site ``site``: adds its block of δ."""
        def hook(_m: nn.Module, _args: tuple, out: Any) -> Any:
            row_delta = self.row_delta if len(self.sites) == 1 else self.row_delta.chunk(len(self.sites), dim=1)[site]
            return replace_hidden(out, add_at(hidden_of(out), self.sub, row_delta))
        return hook

    def stop_at_loss(self, _m: nn.Module, _args: tuple, out: Any) -> None:
        self.hidden = hidden_of(out)
        raise StopForward

    def attach(self, hooks: Hooks) -> None:
        for i, site in enumerate(self.sites):
            hooks.output(site, self.add_delta(i))
        hooks.output(self.loss_block, self.stop_at_loss)

    def __call__(self, v: View, delta: torch.Tensor) -> torch.Tensor:
        at = v.at
        self.sub, self.row_delta = at.sub, delta[self.row_req[v.rows]]
        kw: dict[str, Any] = {"input_ids": at.ids, "attention_mask": at.attn, "use_cache": False}
        if at.pos is not None:
            kw["position_ids"] = at.pos
        if at.cache is not None:
            kw.update(use_cache=True, **cache_kwargs(self.model, fresh_cache(at.cache)))
        if self.replay is None:
            run_to_stop(self.model, **kw)
        else:
            with self.replay.around(v.rows, len(self.row_req)):
                run_to_stop(self.model, **kw)
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            raise RuntimeError("the forward pass never reached the loss block")
        # the reads, and the logits back, on the rows' device (the loss block may sit on another)
        return self.head(hidden[v.read_rows.to(hidden.device), at.read_pos.to(hidden.device)]).to(at.ids.device)


@torch.no_grad()
def reference_pass(fwd: DeltaForward, b: PromptRows, full: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """One full forward with δ = 0: (the logits at every read, v_init [n, k·d] float32: the k sites'
    outputs side by side)."""
    n, k = len(b.first_row), len(fwd.sites)
    seen: dict[int, torch.Tensor] = {}

    def keep(i: int) -> Any:
        def hook(_m: nn.Module, _a: tuple, out: Any) -> None:  # returns None: the output is left as it is
            seen.setdefault(i, hidden_of(out).detach())
        return hook

    with Hooks() as hooks:
        for i, site in enumerate(fwd.sites):
            hooks.output(site, keep(i))
        fwd.attach(hooks)
        ref = fwd(select(b, full, torch.ones(n, dtype=torch.bool, device=b.ids.device)),
                  torch.zeros(n, k, device=b.ids.device))
    first = torch.tensor(b.first_row, device=b.ids.device)
    parts = [seen[i][first.to(seen[i].device), b.sub[first].to(seen[i].device)] for i in range(k)]
    return ref, torch.cat(parts, dim=1).float().to(b.ids.device)


# ----------------------------------------------------------------------------------------------
# 4. the loop


@dataclass
class Progress:
    """Per request: the losses seen, the Adam steps taken, and whether it still runs."""

    active: torch.Tensor  # [n] bool
    losses: list[list[float]]
    nll: list[list[float]]
    steps: list[int]


def run_loop(fwd: DeltaForward, b: PromptRows, full: Layout, fast: Optional[Layout], ref: torch.Tensor,
             v_init: torch.Tensor, hp: TargetHparams) -> tuple[torch.Tensor, Progress, bool]:
    """Optimise δ [n, k·d] (k = ``len(fwd.sites)``) from zero on the ``fast`` layout if given (else
    ``full``); the decay and the clamp act per site against its own block of ``v_init``.

    Returns:
        (δ detached, the progress, whether the fast path was used to the end).
    """
    delta = torch.zeros_like(v_init, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.lr)
    v_norm = site_norms(v_init, len(fwd.sites))  # [n, k]
    max_norm = hp.clamp_norm_factor * v_norm
    v_norm2 = v_norm ** 2
    n = len(v_init)
    prog = Progress(torch.ones(n, dtype=torch.bool, device=v_init.device), [[] for _ in range(n)],
                    [[] for _ in range(n)], [0] * n)
    # without a cache that can drop rows, stopped requests stay in the batch (frozen all the same)
    at = full if fast is None else fast
    prunable = at.cache is None or hasattr(at.cache, "batch_select_indices")
    everyone = torch.ones_like(prog.active)
    v = select(b, at, everyone)
    kl_init: Optional[torch.Tensor] = None
    eps = torch.finfo(ref.dtype).eps if ref.is_floating_point() else 1e-7
    tolerance = max(1e-4, 4 * eps) * (1.0 + float(ref.abs().max()))
    with Hooks() as hooks:
        fwd.attach(hooks)
        for it in range(hp.num_grad_steps):
            logits = fwd(v, delta)
            if it == 0 and at is fast and not torch.allclose(logits.detach(), ref, rtol=0, atol=tolerance):
                log.warning("fast path differs from the full forward by %.3g at step 0; using the full forward",
                            float((logits.detach() - ref).abs().max()))
                at = full
                if fwd.replay is not None:
                    fwd.replay.reset()  # what it recorded was the suffixes' states
                v = select(b, at, everyone)
                logits = fwd(v, delta)
            if kl_init is None:  # log P_0 at the KL reads: step 0, δ = 0, every request
                kl_init = torch.log_softmax(logits.float(), dim=-1)[v.labels < 0].detach()
            loss, nll = target_loss(logits, v, b, delta, kl_init, v_norm2, hp)
            running = prog.active[v.req]  # requests in the view that have not stopped
            for k, j in enumerate(v.req.tolist()):
                if running[k]:
                    prog.losses[j].append(float(loss[k].detach()))
                    prog.nll[j].append(float(nll[k].detach()))
            stop = (loss.detach() < hp.early_stop_loss) | (it == hp.num_grad_steps - 1)
            go = running & ~stop
            prog.active[v.req[running & stop]] = False
            if not bool(go.any()):
                break
            adam_step(opt, delta, loss[go].sum(), prog.active, max_norm)
            for j in v.req[go].tolist():
                prog.steps[j] += 1
            if prunable and bool((running & stop).any()):
                v = select(b, at, prog.active)
    return delta.detach(), prog, at is fast


def target_loss(logits: torch.Tensor, v: View, b: PromptRows, delta: torch.Tensor, kl_init: torch.Tensor,
                v_norm2: torch.Tensor, hp: TargetHparams) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, nll) per request of the view: mean target NLL over the request's prompts and target
    tokens + ``kl_factor``·KL(P_δ ‖ P_0) at its KL read + ``weight_decay``·Σ_sites ‖δ_s‖/‖v_s‖²
    (``v_norm2`` [n, k]: the squared initial norm per site)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    is_nll = v.labels >= 0
    tok_nll = -logp[is_nll].gather(1, v.labels[is_nll, None]).squeeze(1)
    nll = torch.zeros(len(v.req), device=logp.device).index_add(0, v.read_req[is_nll], tok_nll)
    nll = nll / b.n_labels[v.req]
    kl_logp = logp[~is_nll]  # one KL read per request, in request order
    kl = (kl_logp.exp() * (kl_logp - kl_init[v.req])).sum(-1)
    decay = (hp.weight_decay * site_norms(delta[v.req], v_norm2.shape[1]) / v_norm2[v.req]).sum(1)
    loss = nll + hp.kl_factor * kl + decay
    return loss, nll


def adam_step(opt: torch.optim.Optimizer, delta: torch.Tensor, loss: torch.Tensor, active: torch.Tensor,
              max_norm: torch.Tensor) -> None:
    """One Adam step on δ from ``loss``; stopped rows keep their δ; then the norm clamp per row and
    site (``max_norm`` [n, k]: each of δ's k column blocks is clamped to its own bound)."""
    (grad,) = torch.autograd.grad(loss, [delta])
    with torch.no_grad():
        kept = delta.detach().clone()
        delta.grad = grad
        opt.step()
        delta[~active] = kept[~active]  # Adam's momentum must not move a stopped δ
        norm = site_norms(delta, max_norm.shape[1])
        scale = torch.where(norm > max_norm, max_norm / norm.clamp_min(1e-30), torch.ones_like(norm))
        delta.unflatten(1, (max_norm.shape[1], -1)).mul_(scale[:, :, None])


def site_norms(x: torch.Tensor, k: int) -> torch.Tensor:
    """The norms of the k equal column blocks of each row of ``x`` [n, k·d]: [n, k]."""
    return x.unflatten(1, (k, -1)).norm(dim=2)
