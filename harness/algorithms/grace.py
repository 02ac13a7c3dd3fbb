"""``grace``: a discrete key-value codebook at one layer (Hartvigsen et al., NeurIPS 2023, "Aging with
GRACE: Lifelong Model Editing with Discrete Key-Value Adaptors").

GRACE writes no weight. It wraps one layer (for Llama-like models a decoder block's MLP output
projection ``down_proj``, as the reference implementation and EasyEdit do) with a codebook of keys,
values and deferral radii:

- **key**: the layer's input activation at the last prompt token of the edit's rewrite prompt;
- **lookup**: at every position, the nearest key (euclidean or cosine distance); when the query lies
  within that key's radius the layer's output is replaced by the key's value, at that position and,
  with ``replacement="from_key"`` (the reference's ``replace_all`` restricted to causal positions),
  at every later position of the same forward pass, so the teacher-forced target tokens after the
  prompt read it too; ``"last"`` replaces the hit position only (the reference's ``replace_last``);
- **values** are trained for the target: ``n_iter`` Adam steps (learning rate ``lr``) on the
  teacher-forced NLL of ``target_new``, with the value put at the key position onwards; initialised
  ``cold`` (seeded uniform noise, the reference's default) or ``warm`` (the layer's own output there);
- **codebook rule** (the paper's): a query farther than ``eps + radius`` from every key adds a key
  with radius ``eps``; within reach of a key with the same label (``target_new``) the key's radius
  grows to cover the query (``expand="coverage"``; ``"moving_average"`` also moves the key halfway)
  and its value is trained further; within reach of a key with another label a new key is added and
  both radii shrink to half the distance (the nearest minus 1e-5), so the two never overlap.

The codebook is the algorithm's memory (``harness.algorithms.memory``): keys, values and radii as
tensors, the module and the labels as JSON; ``attach`` installs one forward hook on the module. In
incremental decoding with a KV cache each call sees only new positions, so ``from_key`` carries a hit
only within one forward pass (a prompt's hit reaches its first generated token, not later ones).
docs/algorithms/grace.md.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from harness.algorithms.base import AlgorithmError, EditAlgorithm, register
from harness.algorithms.batches import target_batch
from harness.algorithms.finetune import input_device
from harness.algorithms.hooks import Hooks, first_input, hidden_of, logit_head, module_input, module_output
from harness.algorithms.memory import Installation, MemoryState
from harness.models import model_spec, num_layers
from harness.tokens import encode_pairs, pad_id
from harness.types import EditReport, EditRequest

log = logging.getLogger(__name__)

DISTANCES = ("euclidean", "cosine")
VALUE_INITS = ("cold", "warm")
EXPANSIONS = ("coverage", "moving_average")
REPLACEMENTS = ("from_key", "last")


@dataclass
class GraceHparams:
    """GRACE's settings; defaults are SmolLM2's (conf/algorithm/grace.yaml gives the evidence).

    Attributes:
        layer: the block whose ``module`` is wrapped (EasyEdit's Llama-2-7B: 27 of 32).
        module: the wrapped module's name, inside block ``layer``; None: the block's MLP output projection.
        eps: the initial deferral radius of a new key (the reference: 1.0).
        distance: ``euclidean`` (the reference) or ``cosine`` (1 - cosine similarity).
        value_init: ``cold`` (seeded uniform [0, 1) noise, the reference) or ``warm`` (the layer's output).
        n_iter: optimisation steps of a value per edit (the reference: 100; EasyEdit: 50).
        lr: Adam learning rate of the value (the reference: 1.0).
        expand: the same-label rule: ``coverage`` or ``moving_average`` (see the module docstring).
        replacement: ``from_key`` or ``last`` (see the module docstring).
        stop_loss: stop a value's training once the mean target NLL is below this (0: run all ``n_iter``).
        seed: seed of the cold initialisation (offset by the key's index).
    """

    layer: int = 24
    module: Optional[str] = None
    eps: float = 1.0
    distance: str = "euclidean"
    value_init: str = "cold"
    n_iter: int = 50
    lr: float = 1.0
    expand: str = "coverage"
    replacement: str = "from_key"
    stop_loss: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        for name, allowed in (("distance", DISTANCES), ("value_init", VALUE_INITS), ("expand", EXPANSIONS),
                              ("replacement", REPLACEMENTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"grace: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.eps > 0:
            raise ValueError(f"grace: eps must be > 0, got {self.eps}")
        if self.n_iter < 1 or self.lr <= 0:
            raise ValueError(f"grace: n_iter must be >= 1 and lr > 0, got n_iter={self.n_iter}, lr={self.lr}")
        if self.layer < 0:
            raise ValueError(f"grace: layer must be >= 0, got {self.layer}")


def distances(queries: torch.Tensor, keys: torch.Tensor, kind: str) -> torch.Tensor:
    """[..., N] distances of queries [..., d] to keys [N, d], in float32."""
    q, k = queries.to(torch.float32), keys.to(torch.float32)
    if kind == "cosine":
        return 1 - torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).T
    flat = q.reshape(-1, q.shape[-1])
    return torch.cdist(flat, k).reshape(*q.shape[:-1], k.shape[0])


def replace_from(out: torch.Tensor, values: torch.Tensor, idx: torch.Tensor, hit: torch.Tensor,
                 replacement: str) -> torch.Tensor:
    """``out`` [B, L, d] with codebook values put where the lookup hit.

    Args:
        values: [N, d] the codebook's values.
        idx: [B, L] the nearest key at each position.
        hit: [B, L] whether that position lies within its nearest key's radius.
        replacement: ``last``: hit positions take their key's value; ``from_key``: every position
            from a hit on takes the value of the latest hit's key (the key is carried forward).
    """
    if replacement == "from_key":
        pos = torch.arange(hit.shape[1], device=hit.device).expand_as(hit)
        latest = torch.where(hit, pos, torch.full_like(pos, -1)).cummax(dim=1).values
        hit, idx = latest >= 0, idx.gather(1, latest.clamp(min=0))
    return torch.where(hit.unsqueeze(-1), values[idx].to(out.dtype), out)


class UpperBlocks:
    """The blocks from ``layer`` up, run on their recorded inputs: training a value at block
    ``layer`` never changes what the blocks below compute, so they run once, not once per step.

    One full forward records each upper block's call (its hidden-state input, the other arguments:
    attention mask, rotary embeddings, ...); ``__call__`` re-runs only those blocks, from the
    recorded input of the first, then the model's own final norm and unembedding at ``read``.
    """

    def __init__(self, model: nn.Module, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        spec = model_spec(model)
        self.blocks = [model.get_submodule(spec.layer.format(i)) for i in range(layer, num_layers(model))]
        self.head = logit_head(model, spec)
        self.calls: list[tuple[tuple, dict[str, Any]]] = []
        with Hooks() as hooks, torch.no_grad():
            for block in self.blocks:
                hooks.input(block, lambda _m, args, kwargs: self.calls.append((args, kwargs)))
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        if len(self.calls) != len(self.blocks):
            raise AlgorithmError(f"grace: the forward called {len(self.calls)} of the {len(self.blocks)} upper blocks")
        args, kwargs = self.calls[0]
        self.start = first_input(args, kwargs).detach()

    def __call__(self, read: torch.Tensor) -> torch.Tensor:
        """Logits [B, len(read), vocab] at positions ``read`` [B, R] (the hooks on the blocks apply)."""
        h = self.start
        for block, (args, kwargs) in zip(self.blocks, self.calls):
            out = block(h, *args[1:], **kwargs) if args else block(**{**kwargs, "hidden_states": h})
            h = hidden_of(out)
        return self.head(h[torch.arange(h.shape[0], device=h.device)[:, None], read])


@register("grace")
class Grace(EditAlgorithm):
    """GRACE: a codebook hook at one module; the module docstring describes the rules."""

    Hparams = GraceHparams

    def __init__(self, hparams: Any = None, **overrides: Any) -> None:
        super().__init__(hparams, **overrides)
        self.keys = torch.empty(0)
        self.values = torch.empty(0)
        self.radii = torch.empty(0)
        self.labels: list[str] = []
        self.module_name: str | None = None
        self.installed = Installation()

    # -- where ------------------------------------------------------------------------------
    def module_of(self, model: nn.Module) -> str:
        """The wrapped module's name (checked to exist)."""
        n = num_layers(model)
        if self.hparams.layer >= n:
            raise AlgorithmError(f"grace: layer {self.hparams.layer} out of range (model has {n} layers)")
        spec = model_spec(model)
        name = self.hparams.module or spec.mlp_out.format(self.hparams.layer)
        block = spec.layer.format(self.hparams.layer)
        if not name.startswith(block + "."):
            raise AlgorithmError(f"grace: module {name!r} must lie inside block {block!r} (hparams module and layer)")
        try:
            model.get_submodule(name)
        except AttributeError as exc:
            raise AlgorithmError(f"grace: module {name!r} is not in the model (hparams module/layer)") from exc
        return name

    def targets(self, model: nn.Module, requests: Sequence[EditRequest]) -> set[str]:
        return set()

    # -- memory -----------------------------------------------------------------------------
    def memory_state(self) -> MemoryState:
        if not self.labels:
            return MemoryState()
        return MemoryState({"keys": self.keys, "values": self.values, "radii": self.radii},
                           {"module": self.module_name, "labels": list(self.labels)})

    def load_memory(self, state: MemoryState) -> None:
        if state.empty:
            self.keys = self.values = self.radii = torch.empty(0)
            self.labels, self.module_name = [], None
            return
        t, s = state.tensors, state.structure
        missing = sorted({"keys", "values", "radii"} - t.keys()) + sorted({"module", "labels"} - s.keys())
        if missing:
            raise AlgorithmError(f"grace: memory lacks {missing}")
        n = len(s["labels"])
        if not (t["keys"].shape[0] == t["values"].shape[0] == t["radii"].shape[0] == n):
            raise AlgorithmError(f"grace: memory holds {n} labels but keys/values/radii of "
                                 f"{t['keys'].shape[0]}/{t['values'].shape[0]}/{t['radii'].shape[0]} rows")
        self.keys, self.values, self.radii = (t[k].detach().clone() for k in ("keys", "values", "radii"))
        self.labels, self.module_name = list(s["labels"]), str(s["module"])

    def attach(self, model: nn.Module) -> None:
        if self.installed or not self.labels:
            return
        keys, values, radii = (x.to(input_device(model)) for x in (self.keys, self.values, self.radii))
        hp = self.hparams

        def lookup(_m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            d = distances(args[0], keys, hp.distance)  # [B, L, N]
            nearest, idx = d.min(dim=-1)
            return replace_from(out, values, idx, nearest <= radii[idx], hp.replacement)

        self.installed.hook(model, self.module_name, lookup)

    def detach(self, model: nn.Module) -> None:
        self.installed.remove()

    # -- editing ----------------------------------------------------------------------------
    def apply(self, model: nn.Module, tok: Any, requests: Sequence[EditRequest]) -> EditReport:
        t0 = time.perf_counter()
        self.detach(model)
        name = self.module_of(model)
        if self.module_name not in (None, name):
            raise AlgorithmError(f"grace: the codebook sits at {self.module_name}, hparams now say {name}")
        self.module_name = name
        module = model.get_submodule(name)
        losses, actions = [], {"added": 0, "expanded": 0, "split": 0, "kept": 0}
        for r in requests:
            item = encode_pairs(tok, [(r.rewrite_prompt, r.target_new)])[0]
            batch = target_batch([item], pad_id(tok), input_device(model))
            pos = len(item.prompt_ids) - 1
            ids = batch.input_ids[:, :pos + 1]
            with torch.no_grad():
                query = module_input(model, module, input_ids=ids, use_cache=False)[0, pos].to(torch.float32)
                out = module_output(model, module, input_ids=ids, use_cache=False)[0, pos].to(torch.float32)
            slot, action = self._place(query, out, r.target_new)
            actions[action] += 1
            losses.append(self._train(model, module, batch, pos, slot))
        self.attach(model)
        return EditReport(seconds=time.perf_counter() - t0,
                          losses={"loss_first": losses[0][0], "loss_final": losses[-1][1]},
                          info={"n_keys": len(self.labels), **actions})

    def _place(self, query: torch.Tensor, out: torch.Tensor, label: str) -> tuple[int, str]:
        """Apply the codebook rule to a new query (``out``: the layer's output there, for a warm value);
        returns (slot of the value to train, what was done)."""
        hp = self.hparams
        if not self.labels:
            return self._add(query, out, label), "added"
        d = distances(query[None], self.keys, hp.distance)[0]
        dist, near = (float(x) for x in d.min(dim=0))
        near = int(near)
        if dist > hp.eps + float(self.radii[near]):
            return self._add(query, out, label), "added"
        if self.labels[near] != label:
            slot = self._add(query, out, label)
            self.radii[near] = dist / 2 - 1e-5
            self.radii[slot] = dist / 2
            return slot, "split"
        if dist > float(self.radii[near]):
            if hp.expand == "moving_average":
                self.keys[near] = 0.5 * self.keys[near] + 0.5 * query
            self.radii[near] = dist
            return near, "expanded"
        return near, "kept"

    def _add(self, query: torch.Tensor, out: torch.Tensor, label: str) -> int:
        """Append a key (radius ``eps``) with a cold or warm value; returns its slot."""
        n = len(self.labels)
        if self.hparams.value_init == "warm":
            value = out.detach().cpu().clone()
        else:
            value = torch.rand(out.shape[-1], generator=torch.Generator().manual_seed(self.hparams.seed + n))
        rows = (query.detach().cpu()[None], value[None], torch.tensor([self.hparams.eps]))
        if n == 0:
            self.keys, self.values, self.radii = rows
        else:
            self.keys, self.values, self.radii = (torch.cat([a, b]) for a, b in
                                                  zip((self.keys, self.values, self.radii), rows))
        self.labels.append(label)
        return n

    def _train(self, model: nn.Module, module: nn.Module, batch: Any, pos: int, slot: int) -> tuple[float, float]:
        """Train the value of ``slot`` so the target follows the prompt; returns (first, last) loss."""
        hp = self.hparams
        value = self.values[slot].clone().to(input_device(model)).requires_grad_(True)
        opt = torch.optim.Adam([value], lr=hp.lr)
        hit = torch.zeros(batch.input_ids.shape, dtype=torch.bool, device=value.device)
        hit[:, pos] = True
        idx = torch.zeros(batch.input_ids.shape, dtype=torch.long, device=value.device)

        def put(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
            return replace_from(out, value[None], idx, hit, hp.replacement)

        first = last = float("nan")
        upper = UpperBlocks(model, hp.layer, batch.input_ids, batch.attention_mask)
        read = torch.arange(pos, batch.input_ids.shape[1] - 1, device=value.device)[None]  # predict the targets
        gold = batch.input_ids[:, pos + 1:]
        handle = module.register_forward_hook(put)
        try:
            with torch.enable_grad():
                for step in range(hp.n_iter):
                    logp = torch.log_softmax(upper(read).to(torch.float32), dim=-1)
                    loss = -logp.gather(-1, gold.unsqueeze(-1)).mean()
                    last = float(loss.detach())
                    first = last if step == 0 else first
                    if not torch.isfinite(loss):
                        raise AlgorithmError(f"grace: non-finite loss at step {step}")
                    if last < hp.stop_loss:
                        break
                    (grad,) = torch.autograd.grad(loss, [value])
                    value.grad = grad
                    opt.step()
        finally:
            handle.remove()
        with torch.no_grad():
            self.values[slot] = value.detach().to("cpu", torch.float32)
        return first, last
