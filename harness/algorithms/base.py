"""The edit-algorithm contract and the registry of algorithms.

An algorithm is a class with a frozen-able hyperparameter dataclass (``Hparams``), registered by
lowercase name with ``@register("name")``. The Editor calls, per batch of requests:

  0. ``prepare(model, tok)``, once, on the base model: computes whatever the algorithm derives from
     the unedited model (context templates, key statistics, projectors). No-op by default.
  1. ``targets(model, requests)``: the full ``named_parameters()`` names it will write. Cheap, no side effects.
  2. ``apply(model, tok, requests)``: writes only those parameters; returns an ``EditReport``.

The Editor alone snapshots and restores. Algorithms that compute deltas use ``write_deltas`` (or
``add_deltas``), which checks names, shapes, devices and finiteness before writing anything, adds in
float32/float64 and rounds once to the parameter's dtype, and reports the change actually stored
next to the one intended (in bf16/fp16 small updates partly round away; a WARNING says so).

State that outlives one call (accumulated statistics, caches that depend on earlier edits) is
exposed through ``state_dict``/``load_state_dict`` (tensors only) so the Editor can snapshot and
restore it with the weights. What ``prepare`` derives from the unedited model (covariance statistics,
context templates, projectors) is not state: it stays valid across restores, and it must never be
derived from an edited model. The Editor calls ``prepare`` before the first edit and, when a
sequential run resumes, before the checkpoint is put on the freshly loaded base model.

Memory (structural edits). Besides writing declared parameters, an algorithm may add memory to the
model (``harness.algorithms.memory``): modules wrapped around named submodules, forward hooks, and/or
a context transform the probes apply to every prompt (IKE's demonstrations). It then implements:

  - ``memory_state() -> MemoryState``: the memory's tensors (safetensors) and structure (JSON-able);
    ``load_memory(state)`` puts one back (an empty ``MemoryState()``: no memory);
  - ``attach(model)``: install the current memory on the model (no-op when it is empty or already
    installed); ``detach(model)``: remove everything installed, leaving the model's tree and hooks
    as they were before ``attach``. ``apply`` may change the memory and must leave it attached;
  - ``context() -> Callable[[str], str] | None``: the prompt transform of the current memory (it
    must only prepend), or None.

The Editor clones the memory before every edit; in single-edit mode it detaches and restores it in
``finally`` (also when ``apply`` or a probe raised) and the ``StateSignature`` check proves the model
is the base again; in sequential mode it detaches, verifies that nothing but the declared weights
changed, and attaches again, so the memory persists, a failing step rolls back to the memory before
it, and ``restore()`` removes it. Checkpoints and ``save_delta`` carry it (``memory.safetensors``,
the structure as JSON in its checked metadata).

Third-party algorithms register through the entry-point group ``harness.algorithms``
(``name = "package.module:Class"``); they are loaded on first lookup.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from harness.algorithms.hparams import make_hparams
from harness.algorithms.memory import Context, MemoryState
from harness.registry import Registry
from harness.types import EditReport, EditRequest

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "harness.algorithms"


class AlgorithmError(RuntimeError):
    """An algorithm broke its contract (bad delta, undeclared target, ...)."""


@dataclass
class NoHparams:
    """For algorithms without hyperparameters."""


class EditAlgorithm:
    """Base class of every edit algorithm. Subclasses set ``Hparams`` and implement the two methods."""

    name: ClassVar[str] = ""
    Hparams: ClassVar[type] = NoHparams
    #: prefixes of ``EditReport.info`` keys that say where the run's inputs came from (the key
    #: statistics ``stats.*``); the run copies them into ``run.json`` (``provenance``).
    provenance_prefixes: ClassVar[tuple[str, ...]] = ("stats.",)
    # True: ``apply`` replaces its state tensors (``self.x = self.x + y``), never writes into one
    # that ``state_dict`` handed out; the Editor then holds them for a rollback without a copy
    # (and checks their version counters when it restores: a write in place is a RestoreError).
    state_replaced: ClassVar[bool] = False

    def __init__(self, hparams: Any = None, **overrides: Any) -> None:
        if hparams is None:
            hparams = {}
        where = f"algorithm {self.name!r}"
        if isinstance(hparams, Mapping):
            hparams = make_hparams(self.Hparams, {**hparams, **overrides}, where=where)
        elif overrides:
            hparams = make_hparams(self.Hparams, overrides, where=where, base=hparams)
        self.hparams = hparams

    # -- the contract ------------------------------------------------------------------------
    def prepare(self, model: nn.Module, tok: Any) -> None:
        """Compute what this algorithm derives from the base model (templates, statistics, ...).

        Called by the Editor once, on the unedited model, before the first edit and before a
        sequential checkpoint is loaded. Must not change the model. Idempotent. No-op by default.
        """

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

    # -- memory (structural edits) ------------------------------------------------------------
    def memory_state(self) -> MemoryState:
        """The memory this algorithm holds (tensors and JSON-able structure). Empty by default."""
        return MemoryState()

    def load_memory(self, state: MemoryState) -> None:
        """Replace the held memory by ``state`` (not attached: the Editor calls ``attach``).

        Raises:
            AlgorithmError: this algorithm keeps no memory but ``state`` is not empty.
        """
        if not state.empty:
            raise AlgorithmError(f"{self.name}: keeps no memory but was given {sorted(state.tensors)} "
                                 f"{sorted(state.structure)}")

    def attach(self, model: nn.Module) -> None:
        """Install the held memory on ``model`` (hooks, wrappers); no-op when empty or installed."""

    def detach(self, model: nn.Module) -> None:
        """Remove everything ``attach`` (or ``apply``) installed on ``model``; no-op when nothing is."""

    def context(self) -> Context | None:
        """The prompt transform of the held memory (it must only prepend), or None."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.hparams})"


# ----------------------------------------------------------------------------------------------
# writing deltas

# Relative error of a written change against the intended one above which ``write_deltas`` warns.
# bf16 keeps 8 significant bits: an update whose entries are well below 2^-9 of the weights'
# entries mostly rounds away (about 80% of a random update of relative norm 1e-3 is lost, 17% of
# one of 1e-2, 2% of one of 0.1).
WRITE_ERROR_WARN = 0.1


@dataclass(frozen=True)
class WriteStats:
    """What writing one parameter did, measured on the stored values.

    Attributes:
        dtype: the parameter's dtype by name (``"bfloat16"``).
        written_norm: ``||param_after - param_before||``, the change actually stored.
        intended_norm: ``||delta||``, the change that was asked for (before any rounding).
        error: ``||(param_after - param_before) - delta|| / ||delta||``, the fraction of the update
            lost to rounding (0 when both are zero; inf when something was written for a zero delta).
    """

    dtype: str
    written_norm: float
    intended_norm: float
    error: float


@dataclass(frozen=True)
class WriteReport:
    """``WriteStats`` per written parameter, by full name."""

    stats: dict[str, WriteStats]

    @property
    def norms(self) -> dict[str, float]:
        """The written norm of each parameter: what ``EditReport.delta_norms`` holds."""
        return {name: s.written_norm for name, s in self.stats.items()}

    def info(self) -> dict[str, float]:
        """``intended_norm.<name>`` and ``write_error.<name>`` for ``EditReport.info``."""
        out: dict[str, float] = {}
        for name, s in self.stats.items():
            out[f"intended_norm.{name}"] = s.intended_norm
            out[f"write_error.{name}"] = s.error
        return out


def _work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any of ``dtypes`` is float64, else float32: the precision of the exact sum."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


@torch.no_grad()
def measure_write(before: torch.Tensor, intended: torch.Tensor, after: torch.Tensor) -> WriteStats:
    """Compare the change stored in a parameter with the change that was intended.

    Args:
        before: the parameter's values before the write (any dtype; upcast here).
        intended: the intended change, unrounded (same shape).
        after: the parameter's values after the write.

    Returns:
        ``WriteStats`` computed in float32 (float64 when any input is float64).
    """
    work = _work_dtype(before.dtype, intended.dtype, after.dtype)
    written = after.detach().to(work) - before.detach().to(device=after.device, dtype=work)
    delta = intended.detach().to(device=after.device, dtype=work)
    w_norm, i_norm = float(written.norm()), float(delta.norm())
    miss = float((written - delta).norm())
    error = miss / i_norm if i_norm > 0 else (0.0 if miss == 0 else math.inf)
    return WriteStats(str(after.dtype).removeprefix("torch."), w_norm, i_norm, error)


def warn_if_lost(name: str, stats: WriteStats, threshold: float = WRITE_ERROR_WARN) -> None:
    """Log a WARNING when the written change misses more than ``threshold`` of the intended one."""
    if stats.error <= threshold:
        return
    hint = ""
    if stats.dtype in ("bfloat16", "float16"):
        hint = (f"; {stats.dtype} cannot hold so small a change to these weights. Load the model in float32 "
                "(top-level config dtype=float32) to keep such edits")
    log.warning("writing %s in %s lost %.0f%% of the update (relative error of the written change %.3g > %g; "
                "norm written %.4g, intended %.4g)%s", name, stats.dtype, 100 * min(stats.error, 1.0), stats.error,
                threshold, stats.written_norm, stats.intended_norm, hint)


def _check_target(params: Mapping[str, nn.Parameter], name: str, value: torch.Tensor, declared: set[str] | None,
                  what: str) -> nn.Parameter:
    if name not in params:
        raise AlgorithmError(f"{what} for unknown parameter {name!r}")
    if declared is not None and name not in declared:
        raise AlgorithmError(f"{what} for undeclared parameter {name!r}")
    p = params[name]
    if value.shape != p.shape:
        raise AlgorithmError(f"{what} for {name!r} has shape {tuple(value.shape)}, parameter has {tuple(p.shape)}")
    if not value.is_floating_point() or value.device != p.device:
        raise AlgorithmError(f"{what} for {name!r} is {value.dtype} on {value.device}; it must be a floating "
                             f"point tensor on the parameter's device {p.device}")
    if not torch.isfinite(value).all():
        raise AlgorithmError(f"{what} for {name!r} has non-finite values")
    return p


@torch.no_grad()
def _write(params: Mapping[str, nn.Parameter], new: Mapping[str, torch.Tensor],
           base: Mapping[str, torch.Tensor], intended: Mapping[str, torch.Tensor]) -> WriteReport:
    """Round every ``new`` value once to its parameter's dtype (all checked first), copy, measure, warn."""
    rounded = {}
    for name, value in new.items():
        p = params[name]
        r = value.to(p.dtype)
        if not torch.isfinite(r).all():
            raise AlgorithmError(f"writing {name!r}: the result overflows {p.dtype} (non-finite); nothing written")
        rounded[name] = r
    stats = {}
    for name, r in rounded.items():
        params[name].copy_(r)
        stats[name] = measure_write(base[name], intended[name], params[name])
        warn_if_lost(name, stats[name])
    return WriteReport(stats)


@torch.no_grad()
def write_deltas(model: nn.Module, deltas: Mapping[str, torch.Tensor],
                 declared: set[str] | None = None) -> WriteReport:
    """Check every delta, then add them all to the model's parameters, rounding once.

    Deltas may be in any floating dtype (float32 or float64, as the algorithms compute them) but
    must be on the parameter's device. Each parameter becomes ``(param + delta)`` computed in
    float32 (float64 when the delta or the parameter is float64) and rounded once to the
    parameter's dtype; the delta is never rounded on its own first. Nothing is written unless
    every delta passes: known parameter name, declared (when ``declared`` is given), same shape,
    floating point on the same device, finite values, and a result finite in the parameter's dtype.

    Returns:
        Per parameter: the norm written (``||after - before||``), the norm intended (``||delta||``)
        and the relative error of the written change. A WARNING is logged for every parameter whose
        error exceeds ``WRITE_ERROR_WARN``.

    Raises:
        AlgorithmError: naming the first parameter at fault.
    """
    params = dict(model.named_parameters())
    new, base = {}, {}
    for name, delta in deltas.items():
        p = _check_target(params, name, delta, declared, "delta")
        base[name] = p.detach().to(_work_dtype(p.dtype, delta.dtype), copy=True)
        new[name] = base[name] + delta.to(base[name].dtype)
        if not torch.isfinite(new[name]).all():
            raise AlgorithmError(f"adding the delta to {name!r} gives non-finite values")
    return _write(params, new, base, deltas)


@torch.no_grad()
def write_values(model: nn.Module, values: Mapping[str, torch.Tensor],
                 declared: set[str] | None = None) -> WriteReport:
    """Replace parameters by new values computed in float32/float64, rounding once; checks as ``write_deltas``.

    The intended change of each parameter is ``value - param`` (in float32, or float64 when either is).

    Returns:
        As ``write_deltas``.

    Raises:
        AlgorithmError: naming the first parameter at fault.
    """
    params = dict(model.named_parameters())
    base, intended = {}, {}
    for name, value in values.items():
        p = _check_target(params, name, value, declared, "value")
        base[name] = p.detach().to(_work_dtype(p.dtype, value.dtype), copy=True)
        intended[name] = value.to(base[name].dtype) - base[name]
    return _write(params, values, base, intended)


def add_deltas(model: nn.Module, deltas: Mapping[str, torch.Tensor], declared: set[str] | None = None) -> dict[str, float]:
    """``write_deltas`` returning only the norm written to each parameter (``||after - before||``).

    Raises:
        AlgorithmError: naming the first parameter at fault.
    """
    return write_deltas(model, deltas, declared).norms


# ----------------------------------------------------------------------------------------------
# registry

ALGORITHMS: Registry[type[EditAlgorithm]] = Registry("algorithm", EditAlgorithm, ENTRY_POINT_GROUP, "register")

#: Class decorator: register an ``EditAlgorithm`` under a lowercase snake name (``harness.registry``).
register = ALGORITHMS.register


def available() -> list[str]:
    """Sorted names of all registered algorithms (built-in and entry-point plugins)."""
    return sorted(ALGORITHMS.names())


def get_algorithm(name: str) -> type[EditAlgorithm]:
    """The class registered under ``name``.

    Raises:
        KeyError: unknown name; the message lists the registered ones.
    """
    return ALGORITHMS.get(name)


def create(name: str, hparams: Mapping[str, Any] | None = None, **overrides: Any) -> EditAlgorithm:
    """Instantiate the algorithm ``name`` with hyperparameters from a mapping and keyword overrides."""
    return get_algorithm(name)({**(hparams or {}), **overrides})
