"""The observable state of a model, recorded so that an edit can be proved to have left nothing behind.

Weights are not all a model is. A forward pass also depends on buffers (a changed rotary
``inv_freq`` moves every logit, and it is not even in the state dict), on hooks registered on any
module, on ``train()``/``eval()`` flags (dropout), and on the module tree itself (a wrapper left in
place). A ``StateSignature`` records all of it:

  - every parameter and every buffer (persistent or not): dtype, shape and the position-sensitive
    fingerprint of ``harness.fingerprints``; each tensor once, under its first name, plus which
    other names are tied to it (untying shows);
  - the module tree: every module name, shared modules under each of their names, -> class
    qualified name;
  - the hooks on every module (forward, forward-pre, backward, backward-pre, with their
    with-kwargs and always-call flags, state-dict hooks), on every parameter (tensor hooks) and
    torch's global module hooks, by handle id: a hook left behind has an id not seen before;
  - each module's ``training`` flag, each parameter's ``requires_grad`` and whether it holds a gradient.

``differences`` compares two signatures and says in words what changed; the Editor raises it as a
``RestoreError``. The cost is the fingerprints' (one pass over the weights); the rest is a walk
over a few hundred modules.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.modules.module as torch_module
from torch import nn

from harness.fingerprints import tensor_fingerprint

# module attribute -> words, for the hook dictionaries every nn.Module carries
_MODULE_HOOKS = {
    "_forward_hooks": "forward hook",
    "_forward_pre_hooks": "forward pre-hook",
    "_backward_hooks": "backward hook",
    "_backward_pre_hooks": "backward pre-hook",
    "_state_dict_hooks": "state-dict hook",
    "_state_dict_pre_hooks": "state-dict pre-hook",
    "_load_state_dict_pre_hooks": "load-state-dict pre-hook",
    "_load_state_dict_post_hooks": "load-state-dict post-hook",
}
# flags kept beside the hook dictionaries (handle id -> True)
_HOOK_FLAGS = {
    "_forward_hooks": ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"),
    "_forward_pre_hooks": ("_forward_pre_hooks_with_kwargs",),
}
# torch's hooks that apply to every module
_GLOBAL_HOOKS = {
    "_global_forward_hooks": ("forward hook", ("_global_forward_hooks_with_kwargs",
                                                "_global_forward_hooks_always_called")),
    "_global_forward_pre_hooks": ("forward pre-hook", ()),
    "_global_backward_hooks": ("backward hook", ()),
    "_global_backward_pre_hooks": ("backward pre-hook", ()),
    "_global_module_registration_hooks": ("module-registration hook", ()),
    "_global_parameter_registration_hooks": ("parameter-registration hook", ()),
    "_global_buffer_registration_hooks": ("buffer-registration hook", ()),
}
_TENSOR_HOOKS = {"_backward_hooks": "tensor hook", "_post_accumulate_grad_hooks": "post-accumulate-grad hook"}
GLOBAL = "<global>"  # where torch's global hooks are recorded
_SHOW = 8  # names listed in a message before "... and N more"


@dataclass(frozen=True)
class TensorPrint:
    """What is recorded of one tensor: dtype, shape and its fingerprint (``None``: not taken)."""

    dtype: str
    shape: tuple[int, ...]
    bits: tuple[int, int] | None

    @classmethod
    def of(cls, t: torch.Tensor, values: bool = True) -> "TensorPrint":
        return cls(str(t.dtype).removeprefix("torch."), tuple(t.shape), tensor_fingerprint(t) if values else None)


HookKey = tuple[str, str]  # (where: module name, "param:<name>" or GLOBAL; kind in words)


@dataclass
class StateSignature:
    """Everything ``differences`` compares; build one with ``take``.

    Attributes:
        params, buffers: first name of each distinct tensor -> ``TensorPrint``.
        aliases: every other name of a tied tensor -> its first name (``"param:"``/``"buffer:"`` prefixed).
        modules: every module name (root: ``""``) -> class qualified name.
        hooks: (where, kind) -> sorted (handle id, flags) pairs; absent when there are none.
        training: module name -> ``training`` flag.
        requires_grad: parameter name -> flag.
        grads: names of parameters that hold a ``.grad``.
    """

    params: dict[str, TensorPrint] = field(default_factory=dict)
    buffers: dict[str, TensorPrint] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=dict)
    hooks: dict[HookKey, tuple[tuple[int, str], ...]] = field(default_factory=dict)
    training: dict[str, bool] = field(default_factory=dict)
    requires_grad: dict[str, bool] = field(default_factory=dict)
    grads: frozenset[str] = frozenset()

    @classmethod
    def take(cls, model: nn.Module, skip_values: Iterable[str] = ()) -> "StateSignature":
        """Record ``model`` as it is now.

        Args:
            skip_values: parameter names whose values are not fingerprinted (dtype and shape still are).
        """
        skip = set(skip_values)
        sig = cls()
        sig.params = {n: TensorPrint.of(p, n not in skip) for n, p in model.named_parameters()}
        sig.buffers = {n: TensorPrint.of(b) for n, b in model.named_buffers()}
        sig.aliases = {**_aliases("param", model.named_parameters(remove_duplicate=False)),
                       **_aliases("buffer", model.named_buffers(remove_duplicate=False))}
        sig.modules = {n: _qualname(m) for n, m in model.named_modules(remove_duplicate=False)}
        for name, module in model.named_modules():
            sig.training[name] = module.training
            for attr, kind in _MODULE_HOOKS.items():
                _record(sig.hooks, (name, kind), module, attr, _HOOK_FLAGS.get(attr, ()))
        for name, p in model.named_parameters():
            sig.requires_grad[name] = p.requires_grad
            for attr, kind in _TENSOR_HOOKS.items():
                _record(sig.hooks, ("param:" + name, kind), p, attr, ())
        for attr, (kind, flags) in _GLOBAL_HOOKS.items():
            _record(sig.hooks, (GLOBAL, kind), torch_module, attr, flags)
        sig.grads = frozenset(n for n, p in model.named_parameters() if p.grad is not None)
        return sig

    def refresh(self, model: nn.Module, names: Iterable[str]) -> None:
        """Record the current values of the parameters in ``names`` (after an edit that is kept)."""
        params = dict(model.named_parameters())
        for n in names:
            self.params[n] = TensorPrint.of(params[n])

    def differences(self, after: "StateSignature", ignore_values: Iterable[str] = ()) -> list[str]:
        """What changed from ``self`` to ``after``, one sentence per kind of change; empty when nothing did.

        Args:
            ignore_values: parameter names whose values may change (their dtype and shape may not).
        """
        ignore = set(ignore_values)
        out = _tree_changes(self.modules, after.modules)
        out += _tensor_changes("parameter", self.params, after.params, ignore)
        out += _tensor_changes("buffer", self.buffers, after.buffers, set())
        retied = sorted(n for n in self.aliases.keys() | after.aliases.keys()
                        if self.aliases.get(n) != after.aliases.get(n))
        if retied:
            shown = [n.replace("param:", "parameter ").replace("buffer:", "buffer ") for n in retied]
            out.append(f"tied weights changed (what shares storage with what) for {', '.join(shown)}")
        out += _hook_changes(self.hooks, after.hooks)
        flipped = sorted(n for n in self.training.keys() & after.training.keys()
                         if self.training[n] != after.training[n])
        if flipped:
            mode = "train" if after.training[flipped[0]] else "eval"
            modules = _names("module", [_where(n) for n in flipped])
            out.append(f"the training flag changed (now {mode} mode) on {modules}")
        grad = sorted(n for n in self.requires_grad.keys() & after.requires_grad.keys()
                      if self.requires_grad[n] != after.requires_grad[n])
        if grad:
            out.append(f"requires_grad changed (now {after.requires_grad[grad[0]]}) on {_names('parameter', grad)}")
        if after.grads - self.grads:
            out.append(f"a gradient was left on {_names('parameter', sorted(after.grads - self.grads))}")
        if self.grads - after.grads:
            out.append(f"the gradient was dropped from {_names('parameter', sorted(self.grads - after.grads))}")
        return out


# ----------------------------------------------------------------------------------------------
def _qualname(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _aliases(kind: str, named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    first: dict[int, str] = {}
    out = {}
    for name, t in named:
        owner = first.setdefault(id(t), name)
        if owner != name:
            out[f"{kind}:{name}"] = f"{kind}:{owner}"
    return out


def _record(hooks: dict[HookKey, tuple[tuple[int, str], ...]], key: HookKey, owner: object, attr: str,
            flag_attrs: Iterable[str]) -> None:
    registered = getattr(owner, attr, None)
    if not registered:
        return
    flags = [getattr(owner, f, None) or {} for f in flag_attrs]
    hooks[key] = tuple(sorted((hid, ",".join(f for f, d in zip(flag_attrs, flags) if hid in d))
                              for hid in registered))


def _where(module: str) -> str:
    return module or "<root>"


def _names(noun: str, names: list[str]) -> str:
    """``"<noun> a"`` for one name, ``"3 <noun>s [a, b, c]"`` for several (the first few, then a count)."""
    if len(names) == 1:
        return f"{noun} {names[0]}"
    shown = ", ".join(names[:_SHOW]) + (f", ... and {len(names) - _SHOW} more" if len(names) > _SHOW else "")
    return f"{len(names)} {noun}s [{shown}]"


def _tree_changes(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    added = sorted(after.keys() - before.keys())
    removed = sorted(before.keys() - after.keys())
    retyped = sorted(n for n in before.keys() & after.keys() if before[n] != after[n])
    parts = [f"{label} {_names('module', [_where(n) for n in names])}"
             for label, names in (("added", added), ("removed", removed)) if names]
    parts += [f"{_where(n)} is a {after[n]}, was a {before[n]}" for n in retyped[:_SHOW]]
    return [f"module tree changed: {'; '.join(parts)}"] if parts else []


def _tensor_changes(kind: str, before: Mapping[str, TensorPrint], after: Mapping[str, TensorPrint],
                    ignore: set[str]) -> list[str]:
    out = [f"{_names(kind, names)} {label}"
           for label, names in (("added", sorted(after.keys() - before.keys())),
                                ("removed", sorted(before.keys() - after.keys()))) if names]
    changed = []
    for n in sorted(before.keys() & after.keys()):
        b, a = before[n], after[n]
        if (b.dtype, b.shape) != (a.dtype, a.shape):
            out.append(f"{kind} {n} is now {a.dtype} {list(a.shape)}, was {b.dtype} {list(b.shape)}")
        elif n not in ignore and None not in (b.bits, a.bits) and b.bits != a.bits:
            changed.append(n)
    if changed:
        out.append(f"{_names(kind, changed)} changed")
    return out


def _hook_changes(before: Mapping[HookKey, tuple], after: Mapping[HookKey, tuple]) -> list[str]:
    out = []
    for key in sorted(before.keys() | after.keys()):
        where, kind = key
        was, now = dict(before.get(key, ())), dict(after.get(key, ()))
        if where == GLOBAL:
            place = "globally (on every module)"
        elif where.startswith("param:"):
            place = "on parameter " + where.removeprefix("param:")
        else:
            place = "on " + _where(where)
        for what, ids in (("left", sorted(now.keys() - was.keys())), ("removed", sorted(was.keys() - now.keys()))):
            if ids:
                many = len(ids) > 1
                out.append(f"{len(ids) if many else 'a'} {kind}{'s were' if many else ' was'} {what} {place} "
                           f"(handle id {', '.join(map(str, ids))})")
        if any(was[h] != now[h] for h in was.keys() & now.keys()):
            out.append(f"the flags of a {kind} {place} changed")
    return out
