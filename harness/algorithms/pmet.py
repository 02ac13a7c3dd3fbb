"""``pmet``: Precise Model Editing in a Transformer (Li et al., AAAI 2024), docs/algorithms/pmet.md.

Xiaopeng Li, Shasha Li, Shezheng Song, Jing Yang, Jun Ma, Jie Yu, "PMET: Precise Model Editing in
a Transformer". The block output is the residual plus two components, the attention output and the
FFN (MLP) output. PMET optimises targets for both components at once and edits the FFN weights with
the FFN's share only:

1. Per request, two vectors δ_attn and δ_mlp, added at the subject's last token to the outputs of
   the attention module and of the MLP of the last edit layer ``l_L``, are optimised together with
   the loss of ROME/MEMIT's target optimisation (target.py: the target NLL over the context
   templates, the KL term) and a weight decay per component,
   ``Σ_c weight_decay·‖δ_c‖/‖v_c‖²``; each δ_c is clamped to ``clamp_norm_factor·‖v_c‖`` of its own
   initial value v_c. ``Z_mlp = V_mlp + Δ_mlp`` [d, n] are the FFN targets; the attention targets
   are reported (their norms) but not written, as in the reference.
2. Per layer ``l_i`` in increasing order (memit.py's loop): keys as MEMIT's; ``H`` = the MLP output
   of layer ``l_L`` at the subject's last token of the bare prompts, recomputed each layer;
   ``R_i = (Z_mlp − H) / sqrt(L − i + 1)`` (the reference's square-root spread);
   ``Δ_i = R_i K_iᵀ (λC_i + K_iK_iᵀ)⁻¹`` (``solve.memit_delta``), written at once.

The two-site optimisation reuses target.py's rows, fast path, reference forward, loss and Adam step;
its loop is its own because the decay and the clamp act per component.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
from torch import nn

from harness.algorithms.base import register
from harness.algorithms.hooks import Hooks, add_at, hidden_of, model_device, replace_hidden
from harness.algorithms.locate import as_template_groups
from harness.algorithms.memit import Memit, MemitHparams, outputs_at_subject
from harness.algorithms.target import DeltaForward, TargetHparams, adam_step, target_loss
from harness.algorithms.target_rows import PromptRows, build_rows, full_layout, select, split_at_subject
from harness.models import ModelSpec, get_module, num_layers
from harness.tokens import pad_id
from harness.types import EditRequest

log = logging.getLogger(__name__)


@dataclass
class PmetHparams(MemitHparams):
    """PMET: MEMIT's fields (``mom2_update_weight`` λ of the same solve); the defaults are SmolLM2-135M's
    (evidence in conf/algorithm/pmet.yaml). ``target.*`` applies to both components: ``weight_decay``
    and ``clamp_norm_factor`` per component against its own initial norm."""


@dataclass
class PairTargets:
    """What the two-site optimisation found, per request (columns) on the model's device, float32.

    Attributes:
        attn, mlp: the targets ``v + δ`` of the attention and MLP outputs, [d, n].
        attn_delta_norm, mlp_delta_norm: ``‖δ‖`` per request, [n].
        losses: the total loss of each request at every evaluated step.
        steps: Adam steps per request.
        fast: whether the cached-prefix fast path was used.
    """

    attn: torch.Tensor
    mlp: torch.Tensor
    attn_delta_norm: torch.Tensor
    mlp_delta_norm: torch.Tensor
    losses: list[list[float]]
    steps: list[int]
    fast: bool


class PairForward(DeltaForward):
    """``DeltaForward`` with δ = [δ_attn | δ_mlp] per request ([n, 2d]): the first half added to the
    attention output, the second to the MLP output, both at the subject's last token."""

    def __init__(self, model: nn.Module, spec: ModelSpec, layer: int, loss_layer: int, row_req: torch.Tensor,
                 width: int) -> None:
        super().__init__(model, spec, get_module(model, spec.mlp.format(layer)),
                         get_module(model, spec.layer.format(loss_layer)), row_req)
        self.attn_site = get_module(model, spec.attn.format(layer))
        self.width = width

    def add_attn(self, _m: nn.Module, _args: tuple, out: Any) -> Any:
        return replace_hidden(out, add_at(hidden_of(out), self.sub, self.row_delta[:, :self.width]))

    def add_delta(self, _m: nn.Module, _args: tuple, out: Any) -> Any:
        return replace_hidden(out, add_at(hidden_of(out), self.sub, self.row_delta[:, self.width:]))

    def attach(self, hooks: Hooks) -> None:
        hooks.output(self.attn_site, self.add_attn)
        super().attach(hooks)


@torch.no_grad()
def _reference(fwd: PairForward, b: PromptRows) -> tuple[torch.Tensor, torch.Tensor]:
    """One full forward with δ = 0: (the logits at every read, [v_attn | v_mlp] [n, 2d] float32)."""
    n = len(b.first_row)
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(_m: nn.Module, _a: tuple, out: Any) -> None:  # returns None: the output is left as it is
            seen.setdefault(name, hidden_of(out).detach())
        return hook

    with Hooks() as hooks:
        hooks.output(fwd.attn_site, keep("attn"))
        hooks.output(fwd.site, keep("mlp"))
        fwd.attach(hooks)
        everyone = torch.ones(n, dtype=torch.bool, device=b.ids.device)
        ref = fwd(select(b, full_layout(b), everyone), torch.zeros(n, 2 * fwd.width, device=b.ids.device))
    first = torch.tensor(b.first_row, device=b.ids.device)
    at = b.sub[first]
    return ref, torch.cat([seen["attn"][first, at], seen["mlp"][first, at]], dim=1).float()


def optimize_pair_targets(model: nn.Module, tok: Any, spec: ModelSpec, requests: Sequence[EditRequest], layer: int,
                          hp: TargetHparams, templates: Sequence[str] | Sequence[Sequence[str]],
                          fast: bool = True) -> PairTargets:
    """Optimise δ_attn and δ_mlp of every request together (module docstring, step 1).

    As in ``target.optimize_targets``, request j's loss reads only its own rows, so the batch gives
    each request the path it would follow alone; a request whose loss falls below
    ``hp.early_stop_loss`` is frozen (it stays in the batch).

    Args:
        layer: the edit layer whose attention and MLP outputs get the deltas (PMET: the last one).
        hp: the optimisation settings; ``weight_decay`` and ``clamp_norm_factor`` act per component.
        templates: context templates (flat or grouped; the first should be ``"{}"``).
        fast: cache the prompts' prefixes up to the subject (same result, faster).

    Raises:
        ValueError: bad layers, or a subject that cannot be located.
    """
    last = num_layers(model) - 1
    loss_layer = last if hp.loss_layer is None else int(hp.loss_layer)
    if not 0 <= layer <= loss_layer <= last:
        raise ValueError(f"need 0 <= layer ({layer}) <= loss_layer ({loss_layer}) <= {last}")
    dev = model_device(model)
    b = build_rows(tok, requests, [t for g in as_template_groups(templates) for t in g], dev)
    width = int(getattr(model.config, "hidden_size", 0) or model.config.n_embd)
    fwd = PairForward(model, spec, layer, loss_layer, b.row_req, width)
    ref, v_init = _reference(fwd, b)
    full = full_layout(b)
    cut = split_at_subject(model, b, pad_id(tok)) if fast else None
    n = len(requests)
    norm2 = torch.stack([v_init[:, :width].norm(dim=1), v_init[:, width:].norm(dim=1)], 1).clamp_min(1e-12) ** 2
    max_norm = hp.clamp_norm_factor * norm2.sqrt()  # [n, 2]
    no_decay = replace(hp, weight_decay=0.0)  # target_loss gives NLL + KL; the decay per component is added here
    delta = torch.zeros_like(v_init, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.lr)
    active = torch.ones(n, dtype=torch.bool, device=dev)
    losses: list[list[float]] = [[] for _ in range(n)]
    steps = [0] * n
    at = full if cut is None else cut
    v = select(b, at, active)
    kl_init: Optional[torch.Tensor] = None
    tolerance = 1e-4 * (1.0 + float(ref.abs().max()))
    with Hooks() as hooks:
        fwd.attach(hooks)
        for it in range(hp.num_grad_steps):
            logits = fwd(v, delta)
            if it == 0 and at is cut and not torch.allclose(logits.detach(), ref, rtol=0, atol=tolerance):
                log.warning("pmet: fast path differs from the full forward by %.3g; using the full forward",
                            float((logits.detach() - ref).abs().max()))
                at = full
                v = select(b, at, active)
                logits = fwd(v, delta)
            if kl_init is None:
                kl_init = torch.log_softmax(logits.float(), dim=-1)[v.labels < 0].detach()
            loss, _ = target_loss(logits, v, b, delta, kl_init, norm2[:, 0], no_decay)
            parts = torch.stack([delta[:, :width].norm(dim=1), delta[:, width:].norm(dim=1)], 1)
            loss = loss + hp.weight_decay * (parts / norm2).sum(1)
            for j in torch.nonzero(active).squeeze(1).tolist():
                losses[j].append(float(loss[j].detach()))
            stop = active & ((loss.detach() < hp.early_stop_loss) | (it == hp.num_grad_steps - 1))
            go = active & ~stop
            active = go
            if not bool(go.any()):
                break
            adam_step(opt, delta, loss[go].sum(), active, torch.full((n,), math.inf, device=dev))
            with torch.no_grad():  # the clamp of each component against its own initial norm
                for c, cols in enumerate((slice(0, width), slice(width, 2 * width))):
                    norm = delta[:, cols].norm(dim=1)
                    delta[:, cols] *= torch.where(norm > max_norm[:, c], max_norm[:, c] / norm.clamp_min(1e-30),
                                                  torch.ones_like(norm))[:, None]
            for j in torch.nonzero(go).squeeze(1).tolist():
                steps[j] += 1
    target = (v_init + delta.detach()).T  # [2d, n]
    return PairTargets(attn=target[:width], mlp=target[width:], attn_delta_norm=delta.detach()[:, :width].norm(dim=1),
                       mlp_delta_norm=delta.detach()[:, width:].norm(dim=1), losses=losses, steps=steps,
                       fast=at is cut and cut is not None)


@register("pmet")
class Pmet(Memit):
    """PMET batch editing (see module docstring). Holds no edit-dependent state."""

    Hparams = PmetHparams

    def __init__(self, hparams: Any = None, **overrides: Any) -> None:
        super().__init__(hparams, **overrides)
        self._z_info: dict[str, float] = {}  # the last batch's target norms, handed to the report

    def _current(self, model: nn.Module, tok: Any, spec: ModelSpec, requests: Sequence[EditRequest]) -> torch.Tensor:
        """H [d, n]: the MLP output of the last edit layer at the subject's last token of the bare prompts."""
        return outputs_at_subject(model, tok, spec.mlp.format(self.hparams.layers[-1]), requests)

    @staticmethod
    def _share(err: torch.Tensor, layers_left: int) -> torch.Tensor:
        """The reference's square-root spread: ``err / sqrt(layers_left)``."""
        return err / math.sqrt(layers_left)

    def _optimize_z(self, model: nn.Module, tok: Any, spec: ModelSpec, requests: Sequence[EditRequest],
                    templates: list[list[str]]) -> tuple[torch.Tensor, dict[str, float]]:
        """Z_mlp [d, n] from the two-site optimisation, and loss and norm summaries."""
        hp = self.hparams
        cols, start, end, attn_norm, mlp_norm = [], [], [], [], []
        t = time.perf_counter()
        for i in range(0, len(requests), hp.z_batch_size):
            chunk = requests[i:i + hp.z_batch_size]
            res = optimize_pair_targets(model, tok, spec, chunk, hp.layers[-1], hp.target, templates,
                                        fast=hp.fast_path)
            cols.append(res.mlp)
            start += [x[0] for x in res.losses]
            end += [x[-1] for x in res.losses]
            attn_norm += res.attn_delta_norm.tolist()
            mlp_norm += res.mlp_delta_norm.tolist()
        n = len(requests)
        log.debug("%s: targets of %d requests in %.1fs", self.name, n, time.perf_counter() - t)
        self._z_info = {"attn_delta_norm": sum(attn_norm) / n, "mlp_delta_norm": sum(mlp_norm) / n}
        losses = {"z_loss_start": sum(start) / n, "z_loss_end": sum(end) / n, "z_loss_end_max": max(end)}
        return torch.cat(cols, dim=1), losses

    def _after_batch(self, model: nn.Module, tok: Any, spec: ModelSpec, requests: Sequence[EditRequest],
                     templates: list[list[str]]) -> dict[str, Any]:
        """The mean ‖δ_attn‖ and ‖δ_mlp‖ of this batch's targets (``info``); only δ_mlp is written."""
        info, self._z_info = self._z_info, {}
        return info
