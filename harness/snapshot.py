"""Snapshots of named parameters (``WeightsCopy``): take, restore bit for bit, verify, save and load.

A ``WeightsCopy`` clones exactly the parameters an edit will touch, restores them in place with
``copy_`` (bit-exact in every dtype: never by subtracting a delta), verifies the restore bit for
bit, and round-trips through a safetensors file.

Fingerprints (``tensor_fingerprint``, ``fingerprint``, ``model_digest``) live in
``harness.fingerprints`` and are re-exported here; the whole-model state the Editor compares
before and after an edit is ``harness.signature.StateSignature``.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from harness.fingerprints import fingerprint, fingerprint_hex, model_digest, raw_bits, tensor_fingerprint

__all__ = ["SnapshotError", "WeightsCopy", "bit_equal", "fingerprint", "fingerprint_hex", "model_digest",
           "tensor_fingerprint"]


class SnapshotError(RuntimeError):
    """A snapshot does not fit the model, or a restore/verification failed."""


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when shapes, dtypes and every bit agree (``-0.0 != 0.0``, NaN payloads compared)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(raw_bits(a), raw_bits(b.to(a.device)))


class WeightsCopy:
    """Clones of named parameters, restorable into the model they came from.

    Args:
        tensors: parameter name -> cloned tensor (use ``take`` to build one from a model).
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        self.tensors: dict[str, torch.Tensor] = dict(tensors or {})

    @classmethod
    def take(cls, model: nn.Module, names: Iterable[str], offload: bool = False) -> "WeightsCopy":
        """Clone the named parameters, on their own device or on the CPU with ``offload``.

        Raises:
            SnapshotError: a name that is not a parameter of ``model``.
        """
        params = dict(model.named_parameters())
        out = {}
        for name in sorted(set(names)):
            if name not in params:
                raise SnapshotError(f"cannot snapshot {name!r}: not a parameter of {type(model).__name__}")
            p = params[name].detach()
            out[name] = p.to("cpu", copy=True) if offload else p.clone()
        return cls(out)

    # -- basic facts ------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return sorted(self.tensors)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cloned tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def add(self, model: nn.Module, names: Iterable[str], offload: bool = False) -> list[str]:
        """Snapshot the parameters in ``names`` that are not held yet; return the new names."""
        new = [n for n in names if n not in self.tensors]
        self.tensors.update(WeightsCopy.take(model, new, offload).tensors)
        return sorted(new)

    # -- restore and verify -------------------------------------------------------------------
    def _check_fits(self, params: Mapping[str, torch.Tensor]) -> None:
        for name, t in self.tensors.items():
            if name not in params:
                raise SnapshotError(f"snapshot holds {name!r}, which is not a parameter of the model")
            p = params[name]
            if p.shape != t.shape or p.dtype != t.dtype:
                raise SnapshotError(
                    f"snapshot of {name!r} is {tuple(t.shape)} {t.dtype}, model has {tuple(p.shape)} {p.dtype}")

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Copy every held tensor back into the model, in place (``copy_``)."""
        params = dict(model.named_parameters())
        self._check_fits(params)
        for name, t in self.tensors.items():
            params[name].copy_(t)

    def mismatches(self, model: nn.Module) -> list[str]:
        """Names whose model value differs, bit for bit, from the held copy."""
        params = dict(model.named_parameters())
        return [n for n, t in sorted(self.tensors.items()) if not bit_equal(params[n], t)]

    def verify(self, model: nn.Module) -> None:
        """Raise ``SnapshotError`` naming every parameter that differs from the held copy."""
        bad = self.mismatches(model)
        if bad:
            raise SnapshotError(f"restore verification failed: {len(bad)} parameter(s) differ: {bad}")

    # -- files --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the held tensors to a safetensors file."""
        save_file({n: t.detach().contiguous().cpu() for n, t in self.tensors.items()}, str(path))

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> "WeightsCopy":
        """Read a safetensors snapshot; with ``model``, check names, shapes and dtypes and move to its devices.

        Raises:
            SnapshotError: naming the first parameter that does not fit.
        """
        tensors = load_file(str(path))
        wc = cls(tensors)
        if model is not None:
            params = dict(model.named_parameters())
            try:
                wc._check_fits(params)
            except SnapshotError as exc:
                raise SnapshotError(f"{path}: {exc}") from None
            wc.tensors = {n: t.to(params[n].device) for n, t in tensors.items()}
        return wc
