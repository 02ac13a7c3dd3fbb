"""``ft`` (FT-L) and ``ft_m`` (FT-M): fine-tune the MLP output projection of chosen layers on the edit.

FT-L is the constrained fine-tuning baseline of Zhu et al. 2020 ("Modifying Memories in Transformer
Models") as run by ROME (Meng et al. 2022, ``baselines/ft``) and EasyEdit (``prompt_last``): the
log-probabilities of *all* target tokens are read at the last prompt token (a bag-of-tokens
objective, the anchor's quirk kept on purpose), Adam, and an L-infinity clamp around the original
weights after every step. FT-M is EasyEdit's ``target_new`` objective (Zhang et al. 2024, "A
Comprehensive Study of Knowledge Editing for Large Language Models"): teacher-forced cross-entropy
on the target tokens of ``prompt + " " + target`` only. docs/algorithms/ft.md describes both.

Both differ from the anchors where the anchors are fragile: the label mask is exact (``batches.py``)
rather than derived from padding, so the anchor's UNK mask (which only dropped padding) is not
needed; padded target positions never enter the loss.

Precision: the trained weights are optimised as float32 *master* copies. Each step the gradient of
the model's own parameter (in its dtype) is copied into the master, Adam steps the master, the
clamp applies to the master, and the master is written back into the parameter by ``copy_`` with an
explicit cast. In float32 the master equals the parameter; in bf16/fp16 the written weight is the
rounding of a value within the bound (so ``max|W - W0|`` may exceed ``eps`` by half an ulp). The
report gives the norm written (``delta_norms``) and, in ``info``, the master's (intended) norm and
the relative error of the written change; a WARNING when rounding lost more than
``base.WRITE_ERROR_WARN`` of it.

The shared training helpers (``trainable``, ``seeded``, ``chunks``) are also used by ``lora.py``.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, TypeVar

import torch
from torch import nn

from harness.algorithms.base import AlgorithmError, EditAlgorithm, WriteReport, measure_write, register, warn_if_lost
from harness.algorithms.batches import prompt_batch, target_batch, target_nll
from harness.models import model_spec, num_layers
from harness.tokens import PromptTarget, encode_pairs, pad_id
from harness.types import EditReport, EditRequest

log = logging.getLogger(__name__)

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------
# training helpers shared with lora.py


@contextmanager
def trainable(model: nn.Module, tensors: Iterable[torch.Tensor]) -> Iterator[None]:
    """Let gradients flow into ``tensors`` only; put every ``requires_grad`` flag back on exit.

    Gradients accumulated on ``tensors`` are dropped on exit, so no training residue stays on the
    model, even when the body raises.
    """
    tensors = list(tensors)
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        for t in tensors:
            t.requires_grad_(True)
        yield
    finally:
        for t in tensors:
            t.grad = None
            t.requires_grad_(False)
        for p, flag in saved:
            p.requires_grad_(flag)


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the body with the global RNGs (CPU, and ``device``'s when it is an accelerator) seeded, then restore them."""
    kw: dict[str, Any] = {"devices": []}
    if device.type != "cpu":
        kw = {"devices": [device], "device_type": device.type}
    with torch.random.fork_rng(**kw):
        torch.manual_seed(seed)
        yield


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most ``size`` items."""
    for i in range(0, len(items), size):
        yield items[i:i + size]


def input_device(model: nn.Module) -> torch.device:
    """Where token ids go: the device of the input embedding."""
    return model.get_input_embeddings().weight.device


# ----------------------------------------------------------------------------------------------
# hyperparameters


@dataclass
class FTHparams:
    """Hyperparameters of FT-L and FT-M (docs/algorithms/ft.md).

    Attributes:
        layers: layers whose MLP output projection is trained.
        num_steps: epochs over the requests.
        lr, weight_decay: Adam's.
        norm_constraint: L-infinity radius eps around the original weights; None or 0 = unconstrained.
        batch_size: requests per optimiser step.
        min_loss: a step is skipped when the batch loss is below it; training stops when an
            epoch's average loss is below it (the anchors' 1e-2).
        include_bias: train the projection's bias too (GPT-2 has one; EasyEdit's Llama does not).
        seed: seeds the global RNGs during training (only dropout in a train-mode model uses them).
    """

    layers: list[int] = field(default_factory=lambda: [20])
    num_steps: int = 25
    lr: float = 5e-4
    weight_decay: float = 0.0
    norm_constraint: Optional[float] = None
    batch_size: int = 1
    min_loss: float = 1e-2
    include_bias: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        self.layers = [int(x) for x in self.layers]
        if not self.layers or any(x < 0 for x in self.layers):
            raise ValueError(f"layers must be a non-empty list of indices >= 0, got {self.layers}")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers has duplicates: {self.layers}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.norm_constraint is not None and not self.norm_constraint >= 0:
            raise ValueError(f"norm_constraint must be None or >= 0, got {self.norm_constraint}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.min_loss >= 0:
            raise ValueError(f"min_loss must be >= 0, got {self.min_loss}")


# ----------------------------------------------------------------------------------------------
# objectives: (model, tokenised requests, pad id, device) -> scalar loss


def prompt_last_loss(model: nn.Module, items: Sequence[PromptTarget], pad: int, device: torch.device) -> torch.Tensor:
    """FT-L: minus the mean log-prob of every target token, all read at the last prompt token."""
    b = prompt_batch(items, pad, device)
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
    last = logits[torch.arange(len(items), device=device), b.last]
    logp = torch.log_softmax(last.to(torch.float32), dim=-1)  # explicit upcast: see batches.target_nll
    mask = b.target_mask.to(torch.float32)
    per_request = -(logp.gather(-1, b.target_ids) * mask).sum(1) / mask.sum(1)
    return per_request.mean()


def target_new_loss(model: nn.Module, items: Sequence[PromptTarget], pad: int, device: torch.device) -> torch.Tensor:
    """FT-M and LoRA: teacher-forced NLL on target tokens, mean over each target, then over the batch."""
    b = target_batch(items, pad, device)
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
    return target_nll(logits, b).mean()


Objective = Callable[[nn.Module, Sequence[PromptTarget], int, torch.device], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# the algorithms


class FineTune(EditAlgorithm):
    """Shared body of FT-L and FT-M; subclasses choose the objective."""

    Hparams = FTHparams
    objective: ClassVar[Objective]

    def targets(self, model: nn.Module, requests: Sequence[EditRequest]) -> set[str]:
        spec, n = model_spec(model), num_layers(model)
        params = dict(model.named_parameters())
        out = set()
        for layer in self.hparams.layers:
            if layer >= n:
                raise AlgorithmError(f"{self.name}: layer {layer} out of range (model has {n} layers)")
            out.add(spec.mlp_out_weight(layer))
            bias = spec.mlp_out.format(layer) + ".bias"
            if self.hparams.include_bias and bias in params:
                out.add(bias)
        return out

    def apply(self, model: nn.Module, tok: Any, requests: Sequence[EditRequest]) -> EditReport:
        t0 = time.perf_counter()
        hp = self.hparams
        if not requests:
            return EditReport()
        names = sorted(self.targets(model, requests))
        params = {n: model.get_parameter(n) for n in names}
        items = encode_pairs(tok, [(r.rewrite_prompt, r.target_new) for r in requests])
        device, pad = input_device(model), pad_id(tok)
        with torch.no_grad():
            originals = {n: p.detach().clone() for n, p in params.items()}
            masters = {n: p.detach().to(torch.float32, copy=True) for n, p in params.items()}
            eps = hp.norm_constraint or 0.0
            bounds = ({n: (m - eps, m + eps) for n, m in masters.items()} if eps > 0 else {})
        opt = torch.optim.Adam(list(masters.values()), lr=hp.lr, weight_decay=hp.weight_decay)
        epoch_losses: list[float] = []
        taken = skipped = 0
        ok = False
        try:
            with trainable(model, params.values()), seeded(hp.seed, device), torch.enable_grad():
                for epoch in range(hp.num_steps):
                    total = 0.0
                    for chunk in chunks(items, hp.batch_size):
                        loss = type(self).objective(model, chunk, pad, device)
                        value = float(loss.detach())
                        if not math.isfinite(value):
                            raise AlgorithmError(f"{self.name}: non-finite loss at epoch {epoch}")
                        total += value * len(chunk)
                        if value < hp.min_loss:
                            skipped += 1
                            continue
                        for p in params.values():
                            p.grad = None
                        loss.backward()
                        self._step(opt, params, masters, bounds)
                        taken += 1
                    epoch_losses.append(total / len(items))
                    log.debug("%s epoch %d: loss %.4f", self.name, epoch, epoch_losses[-1])
                    if epoch_losses[-1] < hp.min_loss:
                        break
            ok = True
        finally:
            for m in masters.values():
                m.grad = None
            if not ok:  # leave the model as it was; the Editor restores too, this is for direct callers
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(originals[n])
        with torch.no_grad():  # the trained float32 masters are the intended weights
            written = WriteReport({n: measure_write(originals[n], masters[n] - originals[n].to(torch.float32), p)
                                   for n, p in params.items()})
        for n, stats in written.stats.items():
            warn_if_lost(n, stats)
        return EditReport(
            seconds=time.perf_counter() - t0,
            losses={"loss_first": epoch_losses[0], "loss_final": epoch_losses[-1]},
            delta_norms=written.norms,
            info={"epochs": len(epoch_losses), "steps_taken": taken, "steps_skipped": skipped, **written.info()},
        )

    @staticmethod
    @torch.no_grad()
    def _step(opt: torch.optim.Optimizer, params: dict[str, nn.Parameter], masters: dict[str, torch.Tensor],
              bounds: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One Adam step on the float32 masters, the L-inf clamp, and the write-back by copy."""
        for n, m in masters.items():
            g = params[n].grad
            m.grad = None if g is None else g.to(torch.float32)
        opt.step()
        for n, m in masters.items():
            if n in bounds:
                lo, hi = bounds[n]
                torch.clamp(m, min=lo, max=hi, out=m)
            if not torch.isfinite(m).all():
                raise AlgorithmError(f"non-finite weights in {n} after an optimiser step")
            params[n].copy_(m.to(params[n].dtype))


@register("ft")
class FTL(FineTune):
    """FT-L: last-prompt-token objective, optionally L-infinity constrained."""

    objective = staticmethod(prompt_last_loss)


@dataclass
class FTMHparams(FTHparams):
    """FT-M's hyperparameters: the same fields as FT-L's (defaults may differ)."""


@register("ft_m")
class FTM(FineTune):
    """FT-M: teacher-forced cross-entropy on the target tokens of ``prompt + " " + target``."""

    Hparams = FTMHparams
    objective = staticmethod(target_new_loss)
