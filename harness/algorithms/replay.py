"""Work the target optimisation would repeat at every step, done once.

The target optimisation (``target.py``: ROME's v*, Meng et al. 2022, "Locating and Editing Factual
Associations in GPT"; MEMIT's z, Meng et al. 2023) runs the same rows through the model at every
step with only δ changing, and δ enters at one site: block ``layer``'s MLP output (ROME) or block
``layer``'s output (MEMIT). Two things are therefore the same at every step:

* ``BlockReplay``: the outputs of the blocks below the site (for a block-output site, the site
  block's own output too: δ is added after it). The first forward over every row records the
  topmost skipped block's output; later forwards replace those blocks' ``forward`` (for the
  duration of the call only) by one that returns the recorded hidden states of the rows in the
  running view. The model's own forward (embeddings, masks, position embeddings, the blocks above,
  any hooks) runs unchanged around them, so no architecture is named here.
* ``fresh_cache``: the prefixes' KV cache as the prefixes left it. A ``DynamicCache`` of plain
  ``DynamicLayer`` s appends by concatenation (a new tensor; the old one is never written to), so a
  shallow copy of its layers is enough; any other cache is deep-copied, as before.
* ``prefix_cache``: the KV cache of a forward over the prefixes, computing no logits: only the
  cache is read, and full-vocabulary logits at every prefix position (SmolLM2: 49,152 per token)
  would be the costliest part of that forward.
"""
from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from harness.algorithms.hooks import hidden_of, replace_hidden
from harness.models import output_cache

_MISSING = object()


def fresh_cache(cache: Any) -> Any:
    """A cache a forward may append to without changing ``cache``: a shallow copy where appending
    is known to allocate (``DynamicCache`` of ``DynamicLayer`` s), a deep copy otherwise."""
    if cache is None:
        return None
    layers = getattr(cache, "layers", None)
    if type(cache) is DynamicCache and layers is not None and all(type(x) is DynamicLayer for x in layers):
        out = copy.copy(cache)
        out.layers = [copy.copy(x) for x in layers]
        return out
    return copy.deepcopy(cache)


@torch.no_grad()
def prefix_cache(model: nn.Module, **kwargs: Any) -> Any:
    """The KV cache of ``model(**kwargs, use_cache=True)``, with no logits computed.

    Where the forward takes transformers' ``logits_to_keep``, an empty index keeps no position: the
    unembedding gets ``[B, 0, d]`` and returns ``[B, 0, V]``, and the cache is the one the full
    forward builds (the blocks run unchanged; the logits come after them). A model without
    ``logits_to_keep`` computes its logits, which are dropped.

    Args:
        model: a causal LM.
        kwargs: the forward's inputs (``input_ids``, ``attention_mask``, ``position_ids``, ...).

    Returns:
        The cache the forward returned (``cache`` or ``past_key_values``).
    """
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = torch.zeros(0, dtype=torch.long)  # a CPU index is valid on any device
    return output_cache(model(**kwargs, use_cache=True))


class BlockReplay:
    """The outputs of ``blocks`` (the consecutive blocks below the δ site, bottom first), recorded
    once over every row and replayed for any subset of the rows.

    Usage: ``with replay.around(rows, n_rows): model(...)``. Until something is recorded, the
    forward runs for real and, if ``rows`` are all ``n_rows`` rows, the topmost block's output is
    kept; afterwards the blocks are skipped. ``reset()`` forgets the recording (another layout).
    """

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        if not blocks:
            raise ValueError("BlockReplay needs at least one block")
        self.blocks = list(blocks)
        self.kept: Optional[torch.Tensor] = None  # [n_rows, W, d] the topmost block's hidden states
        self.template: Any = None  # that block's output container (a tensor or a tuple)
        self.replayable = True  # False when the output carries per-row tensors besides the hidden states

    def reset(self) -> None:
        self.kept, self.template, self.replayable = None, None, True

    @property
    def ready(self) -> bool:
        return self.kept is not None

    @contextmanager
    def around(self, rows: torch.Tensor, n_rows: int) -> Iterator[None]:
        """Record (first complete forward) or replay (afterwards) the blocks for ``rows``."""
        if self.kept is not None:
            with self._skipping(rows):
                yield
            return
        if not self.replayable or len(rows) != n_rows:
            yield
            return
        handle = self.blocks[-1].register_forward_hook(self._keep, prepend=True)  # before δ is added
        try:
            yield
        finally:
            handle.remove()

    def _keep(self, _m: nn.Module, _args: tuple, out: Any) -> None:
        if isinstance(out, tuple) and any(isinstance(x, torch.Tensor) for x in out[1:]):
            self.replayable = False  # e.g. attention weights: they would need row selection too
            return
        self.kept, self.template = hidden_of(out).detach(), out

    @contextmanager
    def _skipping(self, rows: torch.Tensor) -> Iterator[None]:
        assert self.kept is not None
        out = replace_hidden(self.template, self.kept[rows])

        def forward(*_args: Any, **_kwargs: Any) -> Any:
            return out

        saved = [block.__dict__.get("forward", _MISSING) for block in self.blocks]  # e.g. accelerate's hook
        try:
            for block in self.blocks:
                block.forward = forward
            yield
        finally:
            for block, prev in zip(self.blocks, saved):
                if prev is _MISSING:
                    del block.forward
                else:
                    block.forward = prev
