"""One batch of WISE training (docs/algorithms/wise.md, ``harness/algorithms/wise.py``): the rows,
the margin losses, the forward from the edited block up, and the SGD loop on the side memory's Δ.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from harness.algorithms.base import AlgorithmError
from harness.algorithms.batches import TargetBatch
from harness.algorithms.finetune import trainable
from harness.algorithms.hooks import (Hooks, StopForward, hidden_of, logit_head, module_input,
                                     run_to_stop)
from harness.algorithms.locate import fill_template
from harness.algorithms.stats import accumulate
from harness.algorithms.wise_memory import Memory, WiseHook, running_mean, side_delta, stored_scores, token_scores
from harness.models import get_module, model_spec, num_layers
from harness.tokens import encode_pairs, pad_batch, pad_id
from harness.types import EditRequest

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# the projection and one batch of training


def projection(model: nn.Module, layer: int) -> tuple[nn.Module, nn.Parameter, bool]:
    """The MLP output projection at ``layer``, its weight, and whether the weight is stored transposed.

    Raises:
        AlgorithmError: ``layer`` out of range.
    """
    spec = model_spec(model)
    try:
        module = get_module(model, spec.mlp_out.format(layer))
    except (AttributeError, IndexError, KeyError) as exc:
        raise AlgorithmError(f"wise: layer {layer} has no MLP output projection {spec.mlp_out.format(layer)!r}") from exc
    return module, module.weight, spec.out_transposed


def activation_basis(model: nn.Module, tok: Any, module: nn.Module, texts: Sequence[str], k: int,
                     batch_size: int = 16) -> torch.Tensor:
    """The top ``k`` eigenvectors of the uncentred second moment ``E[a aᵀ]`` of ``module``'s input
    (the FFN activation) over every real token of ``texts``: the directions generic text occupies.
    The moment is ``stats.accumulate``'s (the forward stops at ``module``).

    Returns:
        [d_in, k] float32 with orthonormal columns, on the module's device.

    Raises:
        ValueError: ``k`` not in ``1 .. d_in - 1``, or no tokens in ``texts``.
    """
    name = next(n for n, m in model.named_modules() if m is module)
    seqs = [ids for ids in tok(list(texts))["input_ids"] if ids] if texts else []
    sums, count = accumulate(model, tok, [name], seqs, torch.float64, batch_size) if seqs else ({}, 0)
    if count == 0:
        raise ValueError("wise: project_out needs irrelevant texts with tokens to estimate the activation basis")
    moment = sums[name]
    if not 1 <= k < moment.shape[0]:
        raise ValueError(f"wise: project_out must be in 1 .. {moment.shape[0] - 1} (the projection's input "
                         f"width minus one), got {k}")
    _, vectors = torch.linalg.eigh(moment / count)
    device = next(module.parameters()).device
    return vectors[:, -k:].flip(-1).to(device=device, dtype=torch.float32).contiguous()


def project_input_side(grad: torch.Tensor, basis: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``grad`` with its input side made orthogonal to ``basis`` ([d_in, k]): ``Δ a`` then ignores the
    part of ``a`` in the basis' span (``G (I - U Uᵀ)``; Conv1D's ``(I - U Uᵀ) G``)."""
    basis = basis.to(grad.device)
    if transposed:
        return grad - basis @ (basis.T @ grad)
    return grad - (grad @ basis) @ basis.T


# ----------------------------------------------------------------------------------------------
# training one batch of edits


def _rows(tok: Any, requests: Sequence[EditRequest], templates: Sequence[str],
          device: torch.device) -> tuple[TargetBatch, torch.Tensor, torch.Tensor]:
    """One right-padded batch of the template rows of every request.

    Returns:
        (batch, decide [B, L] bool: the positions predicting a target token, owner [B]: the request of
        each row).
    """
    pairs = [(fill_template(t, r.rewrite_prompt), r.target_new) for r in requests for t in templates]
    owner = torch.tensor([i for i in range(len(requests)) for _ in templates])
    items = encode_pairs(tok, pairs)
    ids, attn = pad_batch([list(it.ids) for it in items], pad_id(tok))
    labels, _ = pad_batch([[0] * len(it.prompt_ids) + [1] * len(it.target_ids) for it in items], 0,
                          width=ids.shape[1])
    labels = labels.bool()
    decide = torch.zeros_like(labels)
    decide[:, :-1] = labels[:, 1:]
    batch = TargetBatch(ids.to(device), attn.to(device), labels.to(device))
    return batch, decide.to(device), owner.to(device)


@torch.no_grad()
def layer_inputs(model: nn.Module, tok: Any, module: nn.Module, texts: Sequence[str],
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The projection's input ``A(x)`` on every token of ``texts`` (the forward stops there: nothing
    below the side memory depends on it, so a text's scores under any Δ follow from these).

    Returns:
        ([N, L, d_in] float32, [N, L] bool: the real tokens); empty tensors when ``texts`` is.
    """
    if not texts:
        return torch.zeros(0, 0, 0, device=device), torch.zeros(0, 0, dtype=torch.bool, device=device)
    ids, attn = pad_batch(tok(list(texts))["input_ids"], pad_id(tok))
    x = module_input(model, module, input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False)
    return x.to(torch.float32), attn.bool().to(device)


def scores_at(x: torch.Tensor, mask: torch.Tensor, delta: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The running-mean scores under ``delta`` of the rows ``x`` [N, L, d_in] at the positions ``mask``."""
    if not x.numel():
        return x.new_zeros(0)
    return running_mean(token_scores(side_delta(x, delta, transposed)))[mask]


def _mean_violation(x: torch.Tensor) -> torch.Tensor:
    """Mean of the positive entries of ``x`` (0 when none): the reference's hinge averaging."""
    pos = x[x > 0]
    return pos.mean() if pos.numel() else x.new_zeros(())


def margins(s_edit: torch.Tensor, s_irr: torch.Tensor, alpha: float, beta: float, gamma: float) -> torch.Tensor:
    """The paper's routing margins on the edit scores ``s_edit`` and the irrelevant ones ``s_irr`` (1-D):
    ``mean⁺(s_irr - α) + mean⁺(β - s_edit) + mean⁺(γ - (s_edit - max s_irr))``."""
    loss = _mean_violation(beta - s_edit)
    if s_irr.numel():
        loss = loss + _mean_violation(s_irr - alpha) + _mean_violation(gamma - (s_edit - s_irr.max()))
    return loss


class UpperForward:
    """The logits of a fixed batch computed from block ``layer`` up: the blocks below do not depend on
    the side memory, so their output is computed once (``docs/algorithms/wise.md``, cost).

    The first call is checked against the whole model's forward; where they differ (an architecture
    whose blocks need more than the hidden states and the keyword arguments every block gets), every
    call runs the whole model instead.
    """

    def __init__(self, model: nn.Module, batch: TargetBatch, layer: int) -> None:
        spec = model_spec(model)
        self.model, self.batch = model, batch
        self.blocks = [get_module(model, spec.layer.format(i)) for i in range(layer, num_layers(model))]
        self.head = logit_head(model, spec)
        seen: list[tuple[tuple, dict[str, Any]]] = []

        def grab(_m: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            seen.append((args, kwargs))
            raise StopForward

        with torch.no_grad(), Hooks() as hooks:
            hooks.input(self.blocks[0], grab)
            run_to_stop(model, **self._inputs())
        self.args, self.kwargs = seen[0] if seen else ((), {})
        self.checked = self.fast = bool(seen)

    def _inputs(self) -> dict[str, Any]:
        return dict(input_ids=self.batch.input_ids, attention_mask=self.batch.attention_mask, use_cache=False)

    def __call__(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The logits at positions ``(rows[k], cols[k])`` only ([K, vocab]): the unembedding of every
        position would cost more than the blocks above a late layer."""
        if not self.fast:
            return self.model(**self._inputs()).logits[rows, cols]
        h = self.args[0]
        for block in self.blocks:
            h = hidden_of(block(h, *self.args[1:], **self.kwargs))
        logits = self.head(h[rows, cols])
        if self.checked:
            self.checked = False
            with torch.no_grad():
                full = self.model(**self._inputs()).logits[rows, cols]
            if not torch.allclose(logits.detach(), full, rtol=1e-4, atol=1e-4):
                log.warning("wise: the forward from block %d differs from the whole model's (max %.3g); "
                            "running the whole model each step", len(self.blocks),
                            float((logits.detach() - full).abs().max()))
                self.fast = False
                return self.model(**self._inputs()).logits[rows, cols]
        return logits


def target_positions_nll(logits: torch.Tensor, batch: TargetBatch, rows: torch.Tensor,
                         cols: torch.Tensor) -> torch.Tensor:
    """``batches.target_nll`` averaged over the rows, from the logits at the positions that predict
    target tokens only (``rows``, ``cols``: those positions; the gold token is the next one)."""
    logp = torch.log_softmax(logits.to(torch.float32), dim=-1)
    tok_nll = -logp.gather(-1, batch.input_ids[rows, cols + 1].unsqueeze(-1)).squeeze(-1)
    n_rows = batch.input_ids.shape[0]
    total = torch.zeros(n_rows, device=logits.device).index_add(0, rows, tok_nll)
    count = torch.zeros(n_rows, device=logits.device).index_add(0, rows, torch.ones_like(tok_nll))
    return (total / count).mean()


def train_shard(model: nn.Module, tok: Any, hook: WiseHook, module: nn.Module, memory: Memory, mask: torch.Tensor,
                requests: Sequence[EditRequest], templates: Sequence[str], irrelevant: Sequence[str],
                hp: Any, basis: Optional[torch.Tensor] = None) -> dict[str, float]:
    """Train ``memory.delta`` on ``requests`` (out of place) and update its edits and ``min_score``.

    ``hp`` is the algorithm's ``wise.WiseHparams`` (not imported here: wise.py imports this module).
    ``basis``: when given, each masked step is made orthogonal to it on the input side
    (``project_input_side``; ``project_out`` in ``WiseHparams``). The irrelevant rows' scores come from
    their layer inputs, read once (``layer_inputs``): their logits are never needed. With
    ``hp.replay`` or ``hp.live_threshold`` the edit rows' layer inputs are kept in ``memory``
    (``Memory.add_keys``); ``replay`` > 0 adds that many stored rows of earlier edits (drawn per batch)
    to the edit side of the margins; ``live_threshold`` sets ``min_score`` from the current scores of
    every stored row instead of the running minimum of the scores each edit had when it was trained.

    Returns:
        Losses and scores for the report (``loss_first``, ``loss_final``, ``nll_final``, ``steps``,
        ``edit_score_min``, ``irrelevant_score_max``, ``fast_forward``).

    Raises:
        AlgorithmError: a non-finite loss.
    """
    device = memory.delta.device
    replay, live = hp.replay, hp.live_threshold
    edit, decide, owner = _rows(tok, requests, templates, device)
    irr_x, irr_mask = layer_inputs(model, tok, module, irrelevant, device)
    old_x, old_mask = memory.keys, memory.key_mask
    if replay and old_x is not None and old_mask is not None and old_x.shape[0] > replay:
        pick = torch.randperm(old_x.shape[0])[:replay]
        old_x, old_mask = old_x[pick], old_mask[pick]
    if not replay or old_x is None or old_mask is None:
        old_x, old_mask = irr_x.new_zeros(0, 0, 0), irr_mask.new_zeros(0, 0)
    delta = memory.delta.clone().requires_grad_(True)
    mask = mask.to(device)
    losses: list[float] = []
    nll = torch.zeros(())
    with Hooks() as hooks, trainable(model, []), torch.enable_grad():
        hooks.output(module, hook)
        hook.training = delta
        try:
            forward = UpperForward(model, edit, hp.layer)
            rows, cols = decide.nonzero(as_tuple=True)
            for _ in range(hp.num_steps):
                nll = target_positions_nll(forward(rows, cols), edit, rows, cols)
                s_edit = torch.cat([running_mean(hook.scores)[decide],
                                    scores_at(old_x, old_mask, delta, hook.transposed)])
                s_irr = scores_at(irr_x, irr_mask, delta, hook.transposed)
                loss = nll + hp.margin_weight * margins(s_edit, s_irr, hp.alpha, hp.beta, hp.gamma)
                losses.append(float(loss.detach()))
                if not math.isfinite(losses[-1]):
                    raise AlgorithmError(f"wise: non-finite loss at step {len(losses) - 1}")
                if losses[-1] < hp.early_stop_loss:
                    break
                (grad,) = torch.autograd.grad(loss, [delta])
                with torch.no_grad():
                    step = grad * mask
                    if basis is not None:
                        step = project_input_side(step, basis, hook.transposed)
                    delta -= hp.lr * step
                    if hp.norm_constraint is not None:
                        delta.clamp_(-hp.norm_constraint, hp.norm_constraint)
            with torch.no_grad():
                forward(rows[:1], cols[:1])
                run_mean, edit_inputs = running_mean(hook.scores), hook.inputs
        finally:
            hook.training, hook.scores, hook.inputs = None, None, None
    at = torch.where(decide, run_mean, torch.full_like(run_mean, torch.inf)).amin(1)
    per_request = torch.full((len(requests),), torch.inf, device=device).scatter_reduce(0, owner, at, "amin")
    with torch.no_grad():
        irr = scores_at(irr_x, irr_mask, delta.detach(), hook.transposed)
    memory.delta = delta.detach()
    memory.edits += len(requests)
    if (replay or live) and edit_inputs is not None:
        width = int(decide.any(0).nonzero().max()) + 1  # nothing after the last scored position matters
        memory.add_keys(edit_inputs[:, :width], decide[:, :width])
    if live:
        memory.min_score = float(stored_scores(memory, memory.delta, hook.transposed).min())
    else:
        memory.min_score = min(memory.min_score, float(per_request.min()))
    return {"loss_first": losses[0], "loss_final": losses[-1], "nll_final": float(nll.detach()),
            "steps": float(len(losses)), "edit_score_min": float(per_request.min()),
            "irrelevant_score_max": float(irr.max()) if irr.numel() else 0.0, "fast_forward": float(forward.fast)}
