"""Memory an edit algorithm adds to a model besides (or instead of) writing weights.

GRACE (Hartvigsen et al. 2023) installs a codebook at one layer's output, WISE (Wang et al. 2024)
a side copy of an FFN projection with a router, IKE (Zheng et al. 2023) prepends demonstrations to
every prompt. The contract (``harness.algorithms.base``) describes such an algorithm's memory by:

  - ``MemoryState``: its tensors (saved as safetensors) and its structure (JSON-able: lists,
    dicts, strings, numbers; nothing pickled). The Editor clones it before each edit to roll a
    failed step back, saves it in checkpoints and next to deltas, and puts it back on resume;
  - ``attach(model)`` / ``detach(model)``: install the current memory on the model (hooks, module
    wrappers) and remove all of it. ``Installation`` below does the bookkeeping: every hook handle
    and every module swap it made is undone, in reverse order, by one ``remove``;
  - ``context()``: an optional prompt -> prompt transform the probes apply to every prompt they
    score or generate from (``with_context`` builds the transformed request).

The Editor verifies the model with the memory detached: whatever ``detach`` does not remove is a
change outside the declared memory and raises ``RestoreError``.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from harness.types import QA, EditRequest

#: A context transform: the prompt as the probes would read it -> the prompt with the context.
Context = Callable[[str], str]


@dataclass
class MemoryState:
    """An algorithm's memory: tensors (safetensors) and structure (JSON-able).

    Attributes:
        tensors: name -> tensor.
        structure: JSON-able description (which layer, labels, facts, ...); checked with ``json.dumps``.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    structure: dict[str, Any] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """No tensors and no structure: the algorithm holds no memory."""
        return not self.tensors and not self.structure

    def clone(self) -> "MemoryState":
        """A deep copy (tensors cloned, structure through JSON, which also checks it is JSON-able).

        Raises:
            TypeError: the structure holds something JSON cannot write.
        """
        return MemoryState({k: v.detach().clone() for k, v in self.tensors.items()},
                           json.loads(self.structure_json()))

    def structure_json(self) -> str:
        """The structure as canonical JSON (sorted keys).

        Raises:
            TypeError: naming the offending value's type.
        """
        return json.dumps(self.structure, sort_keys=True)

    def equals(self, other: "MemoryState") -> bool:
        """Same structure and bit-identical tensors (same names, dtypes, shapes and values)."""
        if self.structure_json() != other.structure_json() or self.tensors.keys() != other.tensors.keys():
            return False
        return all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b.to(a.device))
                   for a, b in ((self.tensors[k], other.tensors[k]) for k in self.tensors))


class Installation:
    """Forward hooks and module swaps put on a model, all undone by one ``remove``.

    Algorithms keep one per model they attached to; ``remove`` is safe to call twice and after a
    partial installation (an exception between two installs).
    """

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def __bool__(self) -> bool:
        return bool(self._undo)

    def hook(self, model: nn.Module, name: str, fn: Callable[..., Any], pre: bool = False) -> RemovableHandle:
        """Register a forward hook (``pre``: a forward pre-hook) on the submodule ``name``.

        Raises:
            AttributeError: ``name`` is not a submodule of ``model`` (named).
        """
        module = model.get_submodule(name)
        handle = module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn)
        self._undo.append(handle.remove)
        return handle

    def wrap(self, model: nn.Module, name: str, wrapper: Callable[[nn.Module], nn.Module]) -> nn.Module:
        """Replace the submodule ``name`` by ``wrapper(original)``; ``remove`` puts the original back.

        Returns:
            The installed wrapper.

        Raises:
            AttributeError: ``name`` is not a submodule of ``model``.
        """
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        original = getattr(parent, attr)
        if not isinstance(original, nn.Module):
            raise AttributeError(f"{name!r} is not a submodule of {type(model).__name__}")
        new = wrapper(original)
        setattr(parent, attr, new)
        self._undo.append(lambda: setattr(parent, attr, original))
        return new

    def remove(self) -> None:
        """Undo every install, last first."""
        while self._undo:
            self._undo.pop()()


def _prefix_of(context: Context, prompt: str) -> str:
    """The text ``context`` puts before ``prompt``; it must only prepend (``ValueError`` otherwise)."""
    out = context(prompt)
    if not out.endswith(prompt):
        raise ValueError(f"a context transform must prepend to the prompt; {prompt!r} became {out[-200:]!r}")
    return out[:len(out) - len(prompt)]


def with_context(request: EditRequest, context: Context | None) -> EditRequest:
    """``request`` with ``context`` applied to every prompt it carries (rewrite, paraphrases,
    neighbourhood, portability, generation prompts); itself when ``context`` is None.

    The rewrite template keeps its one ``{}``: the context's prefix of the rewrite prompt is put
    before the template (so a prefix holding ``{}`` is refused).

    Raises:
        ValueError: the transform does more than prepend, or its prefix holds ``{}``.
    """
    if context is None:
        return request
    prefix = _prefix_of(context, request.rewrite_prompt)
    if "{}" in prefix:
        raise ValueError(f"case {request.case_id}: the context before the rewrite prompt holds '{{}}', which the "
                         "prompt template reserves for the subject")
    return dataclasses.replace(
        request,
        prompt=prefix + request.prompt,
        paraphrase_prompts=tuple(context(p) for p in request.paraphrase_prompts),
        neighborhood=tuple(QA(context(q.prompt), q.answer) for q in request.neighborhood),
        portability=tuple(QA(context(q.prompt), q.answer) for q in request.portability),
        generation_prompts=tuple(context(p) for p in request.generation_prompts),
    )


def check_memory(state: MemoryState, where: str) -> None:
    """Refuse a memory with non-tensor values, non-finite floating tensors or a non-JSON structure.

    Raises:
        ValueError: naming ``where`` and the tensor or the structure at fault.
    """
    if not isinstance(state.tensors, Mapping) or not isinstance(state.structure, Mapping):
        raise ValueError(f"{where}: memory tensors and structure must be mappings")
    for name, t in state.tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}: memory tensor {name!r} is a {type(t).__name__}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: memory tensor {name!r} has non-finite values")
    try:
        state.structure_json()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: the memory structure is not JSON-able ({exc})") from exc
