"""Forward hooks that read or patch a model's hidden states, for the locate-then-edit pieces.

ROME (Meng et al. 2022) and MEMIT (Meng et al. 2023) read the input of an MLP's output projection
(the key), read a block's output, and add δ to a module's output while the model runs. Here are the
hooks those need: ``Hooks`` (registration with removal guaranteed), ``StopForward`` (a hook raises it
to end a forward once it has what it needs, so the layers above and the logits are not computed),
``module_input`` / ``module_output``, ``hidden_of`` / ``replace_hidden`` for modules whose output
is a tuple (transformer blocks) or a tensor (MLPs), ``add_at`` (δ at one position per row) and
``logit_head`` (the model's own final norm and unembedding, for states read at a middle block).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from harness.models import ModelSpec, get_module


class StopForward(Exception):
    """Raised by a hook to end a forward pass once what it needs is captured."""


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (where the token ids of a forward go)."""
    return next(model.parameters()).device


def hidden_of(out: Any) -> torch.Tensor:
    """The hidden states of a block/module output (a tensor, or a tuple whose first item it is)."""
    return out[0] if isinstance(out, tuple) else out


def replace_hidden(out: Any, h: torch.Tensor) -> Any:
    """``out`` with its hidden states replaced by ``h`` (same container kind)."""
    return (h, *out[1:]) if isinstance(out, tuple) else h


def add_at(h: torch.Tensor, sub: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``h`` [B, L, d] with ``delta[i]`` added at (row i, position sub[i]) for every row; out of place,
    on ``h``'s device (a model spread over devices: δ and the positions may live elsewhere)."""
    rows = torch.arange(h.shape[0], device=h.device)
    sub = sub.to(h.device)
    return h.index_put((rows, sub), h[rows, sub] + delta.to(device=h.device, dtype=h.dtype))


def logit_head(model: nn.Module, spec: ModelSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    """Final norm + unembedding (+ the config's final logit soft-capping), for hidden states a hook
    took from the last block: [R, d] -> [R, vocab]."""
    norm, unembed = get_module(model, spec.final_norm), get_module(model, spec.unembed)
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)

    norm_dev = next(norm.parameters(), None)
    unembed_dev = next(unembed.parameters(), None)

    def head(h: torch.Tensor) -> torch.Tensor:
        if norm_dev is not None:
            h = h.to(norm_dev.device)
        h = norm(h)
        logits = unembed(h if unembed_dev is None else h.to(unembed_dev.device))
        return torch.tanh(logits / cap) * cap if cap else logits

    return head


def first_input(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The first input of a module call, positional or keyword (what a forward pre-hook receives)."""
    return args[0] if args else next(iter(kwargs.values()))


class Hooks:
    """Forward hooks registered through one instance, all removed together.

    Use as a context manager (``with Hooks() as hooks: ...``) or call ``remove()``; either way no
    hook outlives the block, even when the forward raises.
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def output(self, module: nn.Module, fn: Callable[[nn.Module, tuple, Any], Any]) -> None:
        """Call ``fn(module, args, output)`` after ``module`` runs; a non-None result replaces the output."""
        self._handles.append(module.register_forward_hook(fn))

    def input(self, module: nn.Module, fn: Callable[[nn.Module, tuple, dict[str, Any]], Any]) -> None:
        """Call ``fn(module, args, kwargs)`` before ``module`` runs."""
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def run_to_stop(model: nn.Module, **inputs: Any) -> Any:
    """``model(**inputs)``; None when a hook ended it early with ``StopForward``."""
    try:
        return model(**inputs)
    except StopForward:
        return None


def module_input(model: nn.Module, module: nn.Module, **inputs: Any) -> torch.Tensor:
    """The first input ``module`` receives in ``model(**inputs)``; the forward stops there.

    Raises:
        RuntimeError: the forward never reached ``module``.
    """
    return _capture(model, module, "input", inputs)


def module_output(model: nn.Module, module: nn.Module, **inputs: Any) -> torch.Tensor:
    """The hidden states ``module`` outputs in ``model(**inputs)``, detached; the forward stops there.

    Raises:
        RuntimeError: the forward never reached ``module``.
    """
    return _capture(model, module, "output", inputs)


def _capture(model: nn.Module, module: nn.Module, side: str, inputs: dict[str, Any]) -> torch.Tensor:
    """Run ``model(**inputs)`` until ``module`` is reached; return its first input or its (detached) output."""
    seen: list[torch.Tensor] = []

    def grab_input(_m: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        seen.append(first_input(args, kwargs))
        raise StopForward

    def grab_output(_m: nn.Module, _args: tuple, out: Any) -> None:
        seen.append(hidden_of(out).detach())
        raise StopForward

    with Hooks() as hooks:
        if side == "input":
            hooks.input(module, grab_input)
        else:
            hooks.output(module, grab_output)
        run_to_stop(model, **inputs)
    if not seen:
        raise RuntimeError(f"the forward pass never reached {type(module).__name__}")
    return seen[0]
