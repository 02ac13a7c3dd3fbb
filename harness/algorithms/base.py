"""The edit-algorithm contract and the registry of algorithms.

An algorithm is a class with a frozen-able hyperparameter dataclass (``Hparams``), registered by
lowercase name with ``@register("name")``. The Editor calls, per batch of requests:

  1. ``targets(model, requests)``: the full ``named_parameters()`` names it will write. Cheap, no side effects.
  2. ``apply(model, tok, requests)``: writes only those parameters; returns an ``EditReport``.

The Editor alone snapshots and restores. Algorithms that compute deltas use ``add_deltas``, which
checks names, shapes, dtypes, devices and finiteness before writing anything.

State that outlives one call (accumulated statistics, caches that depend on earlier edits) is
exposed through ``state_dict``/``load_state_dict`` (tensors only) so the Editor can snapshot and
restore it with the weights. Caches that depend only on the unedited model (covariance statistics,
context templates) are not state: they stay valid across restores.

Third-party algorithms register through the entry-point group ``harness.algorithms``
(``name = "package.module:Class"``); they are loaded on first lookup.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from harness.types import EditReport, EditRequest

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "harness.algorithms"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class AlgorithmError(RuntimeError):
    """An algorithm broke its contract (bad delta, undeclared target, ...)."""


@dataclass
class NoHparams:
    """For algorithms without hyperparameters."""


class EditAlgorithm:
    """Base class of every edit algorithm. Subclasses set ``Hparams`` and implement the two methods."""

    name: ClassVar[str] = ""
    Hparams: ClassVar[type] = NoHparams

    def __init__(self, hparams: Any = None, **overrides: Any) -> None:
        if hparams is None:
            hparams = {}
        if isinstance(hparams, Mapping):
            hparams = {**hparams, **overrides}
            hparams = make_hparams(self.Hparams, hparams, where=f"algorithm {self.name!r}")
        elif overrides:
            hparams = dataclasses.replace(hparams, **overrides)
        self.hparams = hparams

    # -- the contract ------------------------------------------------------------------------
    def targets(self, model: nn.Module, requests: Sequence[EditRequest]) -> set[str]:
        """Full names of the parameters ``apply`` will write for these requests."""
        raise NotImplementedError

    def apply(self, model: nn.Module, tok: Any, requests: Sequence[EditRequest]) -> EditReport:
        """Edit ``model`` in place for ``requests``; write only ``targets(model, requests)``."""
        raise NotImplementedError

    # -- explicit state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors of state that outlives one call and changes with edits. Empty by default."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Put back a ``state_dict``. Called by the Editor when it restores."""
        if state:
            raise AlgorithmError(f"{self.name}: has no state but was given {sorted(state)}")

    def reset_state(self) -> None:
        """Forget all accumulated state (back to 'no edits made')."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.hparams})"


def make_hparams(cls: type, values: Mapping[str, Any], where: str = "hparams") -> Any:
    """Build the dataclass ``cls`` from a mapping; an unknown key is an error that names it."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{where}: Hparams must be a dataclass, got {cls!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"{where}: unknown hyperparameter(s) {unknown}; known: {sorted(known)}")
    return cls(**dict(values))


# ----------------------------------------------------------------------------------------------
# writing deltas


@torch.no_grad()
def add_deltas(model: nn.Module, deltas: Mapping[str, torch.Tensor], declared: set[str] | None = None) -> dict[str, float]:
    """Check every delta, then add them all to the model's parameters.

    Nothing is written unless every delta passes: known parameter name, declared (when
    ``declared`` is given), same shape, same dtype and device as the parameter, finite values,
    and a finite result.

    Returns:
        Frobenius norm of each delta, by parameter name.

    Raises:
        AlgorithmError: naming the first parameter at fault.
    """
    params = dict(model.named_parameters())
    for name, delta in deltas.items():
        if name not in params:
            raise AlgorithmError(f"delta for unknown parameter {name!r}")
        if declared is not None and name not in declared:
            raise AlgorithmError(f"delta for undeclared parameter {name!r}")
        p = params[name]
        if delta.shape != p.shape:
            raise AlgorithmError(f"delta for {name!r} has shape {tuple(delta.shape)}, parameter has {tuple(p.shape)}")
        if delta.dtype != p.dtype or delta.device != p.device:
            raise AlgorithmError(
                f"delta for {name!r} is {delta.dtype} on {delta.device}, parameter is {p.dtype} on {p.device}")
        if not torch.isfinite(delta).all():
            raise AlgorithmError(f"delta for {name!r} has non-finite values")
        if not torch.isfinite(p + delta).all():
            raise AlgorithmError(f"adding the delta to {name!r} gives non-finite values")
    norms = {}
    for name, delta in deltas.items():
        params[name].add_(delta)
        norms[name] = float(delta.float().norm())
    return norms


# ----------------------------------------------------------------------------------------------
# registry

_REGISTRY: dict[str, type[EditAlgorithm]] = {}
_ENTRY_POINTS_LOADED = False


def _same_class(a: type, b: Any) -> bool:
    """Same module and qualified name: the same class, possibly re-created by a module reload. Two
    classes with one qualname in different modules are different."""
    return (a.__module__, a.__qualname__) == (getattr(b, "__module__", None), getattr(b, "__qualname__", None))


def register(name: str):
    """Class decorator: register an ``EditAlgorithm`` under a lowercase snake name.

    Raises:
        ValueError: a malformed name, or a name already taken by another class (a class is the same
            when its module and qualified name are: re-registering after a reload is allowed).
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"algorithm name {name!r} must be lowercase snake case ([a-z][a-z0-9_]*)")

    def deco(cls: type[EditAlgorithm]) -> type[EditAlgorithm]:
        if not (isinstance(cls, type) and issubclass(cls, EditAlgorithm)):
            raise TypeError(f"@register({name!r}) needs an EditAlgorithm subclass, got {cls!r}")
        old = _REGISTRY.get(name)
        if old is not None and not _same_class(old, cls):
            raise ValueError(f"algorithm name {name!r} is already registered to {old.__module__}.{old.__qualname__}; "
                             f"cannot register {cls.__module__}.{cls.__qualname__} under it")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not hide the built-in algorithms
            log.error("could not load algorithm plugin %s = %s: %s", ep.name, ep.value, exc)
            continue
        old = _REGISTRY.get(ep.name)
        if old is None:
            register(ep.name)(cls)
        elif not _same_class(old, cls):
            log.error("algorithm plugin %s = %s not loaded: the name is already registered to %s.%s",
                      ep.name, ep.value, old.__module__, old.__qualname__)


def available() -> list[str]:
    """Sorted names of all registered algorithms (built-in and entry-point plugins)."""
    _load_entry_points()
    return sorted(_REGISTRY)


def get_algorithm(name: str) -> type[EditAlgorithm]:
    """The class registered under ``name``.

    Raises:
        KeyError: unknown name; the message lists the registered ones.
    """
    _load_entry_points()
    if name not in _REGISTRY:
        raise KeyError(f"unknown algorithm {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create(name: str, hparams: Mapping[str, Any] | None = None, **overrides: Any) -> EditAlgorithm:
    """Instantiate the algorithm ``name`` with hyperparameters from a mapping and keyword overrides."""
    return get_algorithm(name)({**(hparams or {}), **overrides})
