"""``lora``: low-rank adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models")
trained on the edit, then merged into the base weights (docs/algorithms/lora.md; EasyEdit ``lora_main``).

Our own small LoRA layer replaces PEFT: ``LoraLayer`` wraps an ``nn.Linear``, an ``nn.Embedding``
or a GPT-2 ``Conv1D`` and adds ``(alpha / r) * B @ A`` to its weight, with ``A`` [r, d_in] random
(seeded) and ``B`` [d_out, r] zero, so the wrapped model starts unchanged. Unmerged, the forward is
``base(x) + dropout(x) @ A^T @ B^T * alpha / r``; the adapters are float32 whatever the base dtype
(inputs are cast explicitly), which makes them their own master weights.

``apply`` wraps the chosen modules, trains A and B on the teacher-forced target tokens (label mask
as in FT-M, ``batches.py``) with Adam, merges every delta (computed in float32, checked finite
before anything is written, added in float32 and rounded once to the weight's dtype; the norm
written, the intended norm and the write error are reported) and puts the original modules back,
also when training raises: the model ends as the original architecture with edited base weights.
Restoring is the Editor's job (from its snapshot, bit-exact); ``unmerge`` subtracts the delta and
is exact only up to rounding, never bit-exact in half precision.

A weight that several modules share (tied input/output embeddings, as in SmolLM2 and GPT-2) is
refused: an adapter changes one user's forward, but merging would change every user.

Dropout is active in the adapters during training (PEFT's semantics: train-only); the base modules'
train/eval mode is left as the caller set it.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from harness.algorithms.base import (AlgorithmError, EditAlgorithm, WriteReport, WriteStats, measure_write, register,
                                    warn_if_lost)
from harness.algorithms.finetune import (
    chunks,
    input_device,
    seeded,
    target_new_loss,
    trainable,
)
from harness.models import model_spec
from harness.tokens import encode_pairs, pad_id
from harness.types import EditReport, EditRequest

log = logging.getLogger(__name__)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # an older or newer transformers without it: nothing is a Conv1D then
        return None
    return Conv1D


def module_kind(module: nn.Module) -> str | None:
    """``linear``, ``conv1d`` (stores W^T), ``embedding``, or None when LoRA cannot wrap it."""
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


class LoraLayer(nn.Module):
    """A LoRA adapter around one module, with an honest ``merged`` flag.

    Args:
        base: the wrapped module; its weight is the one ``merge`` writes.
        rank, alpha: the adapter's rank r and scale alpha (delta = alpha / r * B @ A).
        dropout: dropout on the adapter's input (not for embeddings, whose input is token ids).
        generator: CPU generator for A's initialisation (same seed, same A on every device).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        kind = module_kind(base)
        if kind is None:
            raise AlgorithmError(f"LoRA cannot wrap a {type(base).__name__} (Linear, Embedding, Conv1D only)")
        w = base.weight
        d_out, d_in = w.shape if kind == "linear" else (w.shape[1], w.shape[0])
        self.base, self.kind, self.rank, self.alpha = base, kind, rank, alpha
        self.scaling = alpha / rank
        a = torch.empty(rank, d_in, dtype=torch.float32)
        if kind == "embedding":  # lookups read columns of A: unit scale, as PEFT's embedding init
            a.normal_(generator=generator)
        else:  # kaiming-uniform with a=sqrt(5), as nn.Linear and PEFT: U(-1/sqrt(d_in), 1/sqrt(d_in))
            bound = 1.0 / math.sqrt(d_in)
            a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(w.device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, dtype=torch.float32, device=w.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 and kind != "embedding" else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        if self.kind == "embedding":
            h = F.embedding(x, self.lora_A.T)
        else:
            h = self.dropout(x.to(self.lora_A.dtype)) @ self.lora_A.T
        return out + ((h @ self.lora_B.T) * self.scaling).to(out.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``alpha / r * B @ A`` in float32, laid out like the base weight (transposed for Conv1D and Embedding)."""
        d = (self.lora_B @ self.lora_A) * self.scaling
        return d if self.kind == "linear" else d.T

    def merge(self) -> None:
        """Add the delta into the base weight (float32 arithmetic, then cast); refuses non-finite results."""
        merge_all([self])

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the delta again. Exact only up to rounding (never in half precision): restore from a snapshot."""
        if not self.merged:
            raise AlgorithmError("unmerge of a LoRA layer that is not merged")
        w = self.base.weight
        w.copy_((w.detach().to(torch.float32) - self.delta_weight()).to(w.dtype))
        self.merged = False


@torch.no_grad()
def merge_all(layers: Sequence[LoraLayer]) -> list[WriteStats]:
    """Merge several adapters at once; nothing is written unless every result is finite.

    Each weight becomes ``W + delta`` computed in float32 and rounded once to its dtype.

    Returns:
        Per layer, in order: the norm of the change written to its weight, the delta's norm and the
        relative error of the written change (``Lora.apply`` reports them and warns on a large error).

    Raises:
        AlgorithmError: an adapter already merged, or a non-finite delta or result.
    """
    new = []
    for layer in layers:
        if layer.merged:
            raise AlgorithmError("merge of a LoRA layer that is already merged")
        w = layer.base.weight
        delta = layer.delta_weight()
        if not torch.isfinite(delta).all():
            raise AlgorithmError(f"LoRA delta for a {layer.kind} weight {tuple(w.shape)} is non-finite; nothing merged")
        out = (w.detach().to(torch.float32) + delta).to(w.dtype)
        if not torch.isfinite(out).all():
            raise AlgorithmError(
                f"merging into a {layer.kind} weight {tuple(w.shape)} gives non-finite values in {w.dtype}; nothing merged")
        new.append((out, delta))
    stats = []
    for layer, (out, delta) in zip(layers, new):
        w = layer.base.weight
        before = w.detach().clone()
        w.copy_(out)
        layer.merged = True
        stats.append(measure_write(before, delta, w))
    return stats


def check_not_shared(model: nn.Module, module_names: Sequence[str]) -> None:
    """Refuse modules whose weight another module also uses (tied input/output embeddings).

    An adapter changes only its own module's forward, but merging writes the shared weight, so the
    other user would change too: the merged model would not be the model that was trained.

    Raises:
        AlgorithmError: naming the module and the modules it shares its weight with.
    """
    users: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor):
            users.setdefault(id(w), []).append(name)
    for name in module_names:
        sharing = users.get(id(model.get_submodule(name).weight), [])
        if len(sharing) > 1:
            raise AlgorithmError(
                f"lora: {name}.weight is tied to {[s for s in sharing if s != name]}; an adapter on one user of a "
                "shared weight cannot be merged faithfully (untie the weights, or choose other modules)")


@contextmanager
def lora_adapters(model: nn.Module, module_names: Sequence[str], rank: int, alpha: float, dropout: float = 0.0,
                  seed: int = 0) -> Iterator[dict[str, LoraLayer]]:
    """Wrap the named modules in ``LoraLayer``s; put the original modules back on exit, always.

    Yields:
        module name -> its adapter (A initialised in sorted-name order from ``seed``).
    """
    check_not_shared(model, module_names)
    gen = torch.Generator().manual_seed(seed)
    placed: list[tuple[nn.Module, str, nn.Module]] = []
    layers: dict[str, LoraLayer] = {}
    try:
        for name in sorted(module_names):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            base = getattr(parent, child)
            layer = LoraLayer(base, rank, alpha, dropout, gen)
            setattr(parent, child, layer)
            placed.append((parent, child, base))
            layers[name] = layer
        yield layers
    finally:
        for parent, child, base in reversed(placed):
            setattr(parent, child, base)


# ----------------------------------------------------------------------------------------------


@dataclass
class LoraHparams:
    """Hyperparameters of the LoRA edit.

    Attributes:
        target_modules: module-name suffixes to wrap (whole dotted components), e.g. ``["mlp.down_proj"]``.
        layers: only modules inside these blocks (``ModelSpec.layer``); None = wherever they occur.
        rank, alpha, dropout: the adapter (delta = alpha / rank * B @ A; dropout train-only).
        lr, weight_decay: Adam's, on A and B.
        num_steps: epochs over the requests.
        batch_size: requests per optimiser step.
        seed: A's initialisation and the dropout masks.
    """

    target_modules: list[str] = field(default_factory=lambda: ["self_attn.q_proj", "self_attn.v_proj"])
    layers: Optional[list[int]] = None
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.1
    lr: float = 2e-4  # EasyEdit's 5e-3 x 70 steps wrecks SmolLM2 (conf/algorithm/lora.yaml has the numbers)
    weight_decay: float = 0.0
    num_steps: int = 30
    batch_size: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        self.target_modules = [str(s) for s in self.target_modules]
        if not self.target_modules or any(not s or s.startswith(".") or s.endswith(".") for s in self.target_modules):
            raise ValueError(f"target_modules must be a non-empty list of module-name suffixes, got {self.target_modules}")
        if self.layers is not None:
            self.layers = [int(x) for x in self.layers]
            if not self.layers or any(x < 0 for x in self.layers):
                raise ValueError(f"layers must be null or a non-empty list of indices >= 0, got {self.layers}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def _weight_name(model: nn.Module, module_name: str) -> str:
    """The ``named_parameters`` key of a module's weight."""
    w = model.get_submodule(module_name).weight
    return next(n for n, p in model.named_parameters() if p is w)


@register("lora")
class Lora(EditAlgorithm):
    """Train LoRA adapters on the edit's target tokens, merge them, remove them."""

    Hparams = LoraHparams

    def modules(self, model: nn.Module) -> list[str]:
        """Names of the modules to wrap.

        Raises:
            AlgorithmError: no module matches, or a match that LoRA cannot wrap.
        """
        hp = self.hparams
        prefixes = None
        if hp.layers is not None:
            template = model_spec(model).layer
            prefixes = tuple(template.format(x) + "." for x in hp.layers)
        out = []
        for name, module in model.named_modules():
            if not any(name == s or name.endswith("." + s) for s in hp.target_modules):
                continue
            if prefixes is not None and not name.startswith(prefixes):
                continue
            if module_kind(module) is None:
                raise AlgorithmError(f"lora: {name} is a {type(module).__name__}; LoRA wraps Linear, Embedding, Conv1D")
            out.append(name)
        if not out:
            raise AlgorithmError(f"lora: no module matches target_modules={hp.target_modules} in layers={hp.layers}")
        check_not_shared(model, out)
        return sorted(out)

    def targets(self, model: nn.Module, requests: Sequence[EditRequest]) -> set[str]:
        return {_weight_name(model, m) for m in self.modules(model)}

    def apply(self, model: nn.Module, tok: Any, requests: Sequence[EditRequest]) -> EditReport:
        t0 = time.perf_counter()
        hp = self.hparams
        if not requests:
            return EditReport()
        names = self.modules(model)
        weight_names = [_weight_name(model, m) for m in names]
        items = encode_pairs(tok, [(r.rewrite_prompt, r.target_new) for r in requests])
        device, pad = input_device(model), pad_id(tok)
        epoch_losses: list[float] = []
        with lora_adapters(model, names, hp.rank, hp.alpha, hp.dropout, hp.seed) as layers:
            adapter_params = [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)]
            opt = torch.optim.Adam(adapter_params, lr=hp.lr, weight_decay=hp.weight_decay)
            with trainable(model, adapter_params), seeded(hp.seed, device), torch.enable_grad():
                for layer in layers.values():
                    layer.dropout.train(True)
                for epoch in range(hp.num_steps):
                    total = 0.0
                    for chunk in chunks(items, hp.batch_size):
                        opt.zero_grad(set_to_none=True)
                        loss = target_new_loss(model, chunk, pad, device)
                        value = float(loss.detach())
                        if not math.isfinite(value):
                            raise AlgorithmError(f"lora: non-finite loss at epoch {epoch}")
                        loss.backward()
                        opt.step()
                        total += value * len(chunk)
                    epoch_losses.append(total / len(items))
                    log.debug("lora epoch %d: loss %.4f", epoch, epoch_losses[-1])
            written = WriteReport(dict(zip(weight_names, merge_all([layers[m] for m in names]))))
        for name, stats in written.stats.items():
            warn_if_lost(name, stats)
        return EditReport(
            seconds=time.perf_counter() - t0,
            losses={"loss_first": epoch_losses[0], "loss_final": epoch_losses[-1]},
            delta_norms=written.norms,
            info={"modules": len(names), "adapter_params": sum(p.numel() for p in adapter_params), **written.info()},
        )
