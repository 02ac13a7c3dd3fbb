"""Checked safetensors files: edit deltas and checkpoint tensors that refuse to load when anything is off.

A file written by ``write_checked`` carries in its safetensors metadata (all strings):

  ``format``          ``harness-delta-v2`` (``Editor.save_delta``) or ``harness-state-v2`` (algorithm
                      state in a checkpoint);
  ``sha256:<name>``   sha256 of each tensor's dtype, shape and bytes (``tensor_sha256``);
  ``checksum``        sha256 of every other metadata entry, so a flipped digit in a count or a base
                      fingerprint is seen too; a checkpoint's ``editor.json`` records it, which binds
                      the checkpoint's files together;
  delta files also:   ``n_edits`` and ``base:<name>``, the ``fingerprint_hex`` of the base value each
                      tensor replaces (``harness.fingerprints``: position-sensitive).

Memory files (``harness-memory-v1``, ``write_memory``): an algorithm's ``MemoryState`` (GRACE's
codebook, IKE's facts): its tensors, plus ``algorithm``, ``n_edits`` and ``structure`` (the JSON
structure) in the checked metadata. ``memory_path`` names the one written beside a delta file.

``read_checked`` refuses, naming the file (and the tensor): a file that cannot be read (missing,
truncated, garbage, a bad header: ``SnapshotError`` chained to the I/O error), another format, a
missing or wrong checksum. ``read_delta`` then checks each tensor against a model: a parameter of
it, same shape and dtype, finite values, and (``check_base``) that the model holds the very base
the delta was made from; files without base fingerprints pass only with ``check_base=False``.
``apply_delta`` writes nothing until all of that passed.

Files of the first format (``harness-delta-v1``: no checksums, bases fingerprinted the old,
position-blind way) are read only with ``check_base=False``, which says "I trust this file";
their values are still checked for shape, dtype and finiteness.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from harness.algorithms.memory import MemoryState
from harness.fingerprints import fingerprint_hex, raw_bits
from harness.snapshot import SnapshotError, WeightsCopy

log = logging.getLogger(__name__)

DELTA_FORMAT = "harness-delta-v2"
STATE_FORMAT = "harness-state-v2"
DELTA_V1 = "harness-delta-v1"
MEMORY_FORMAT = "harness-memory-v1"
_SHA, _BASE, _CHECKSUM = "sha256:", "base:", "checksum"


def tensor_sha256(t: torch.Tensor) -> str:
    """Hex sha256 of a tensor's dtype, shape and bytes (row-major), read on the CPU."""
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(raw_bits(t.detach().cpu()).view(torch.uint8).numpy())
    return h.hexdigest()


def _metadata_checksum(meta: Mapping[str, str]) -> str:
    lines = "".join(f"{k}={v}\n" for k, v in sorted(meta.items()) if k != _CHECKSUM)
    return hashlib.sha256(lines.encode()).hexdigest()


@dataclass(frozen=True)
class CheckedFile:
    """A file read and verified by ``read_checked`` or ``read_delta``.

    Attributes:
        path: where it was read from.
        tensors: name -> tensor (CPU; on the model's devices when from ``read_delta``).
        metadata: the whole safetensors metadata.
        checksum: the file's ``checksum`` entry ("" for an unchecked v1 delta).
    """

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    checksum: str


def write_checked(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """Write ``tensors`` to a safetensors file with a checksum per tensor and one over the metadata.

    Args:
        metadata: string entries to store (``format`` at least); keys may not start with ``sha256:``
            or be ``checksum``.

    Returns:
        The file's ``checksum`` entry.
    """
    bad = [k for k in metadata if k.startswith(_SHA) or k == _CHECKSUM]
    if bad:
        raise ValueError(f"metadata keys reserved for checksums: {bad}")
    cpu = {n: t.detach().contiguous().cpu() for n, t in tensors.items()}
    meta = {**metadata, **{_SHA + n: tensor_sha256(t) for n, t in cpu.items()}}
    meta[_CHECKSUM] = _metadata_checksum(meta)
    save_file(cpu, str(path), metadata=meta)
    return meta[_CHECKSUM]


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError, ValueError) as exc:
        raise SnapshotError(f"{path}: cannot read the file ({type(exc).__name__}: {exc})") from exc
    return tensors, meta


def _verify(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], fmt: str) -> str:
    found = meta.get("format")
    if found != fmt:
        raise SnapshotError(f"{path}: the file's format is {found!r}, expected {fmt!r}")
    if meta.get(_CHECKSUM) != _metadata_checksum(meta):
        raise SnapshotError(f"{path}: the metadata does not match its checksum: the file is corrupt")
    for name, t in sorted(tensors.items()):
        want = meta.get(_SHA + name)
        if want is None:
            raise SnapshotError(f"{path}: tensor {name!r} has no checksum")
        if tensor_sha256(t) != want:
            raise SnapshotError(f"{path}: tensor {name!r} does not match its checksum: the file is corrupt")
    missing = sorted(k.removeprefix(_SHA) for k in meta if k.startswith(_SHA) and k.removeprefix(_SHA) not in tensors)
    if missing:
        raise SnapshotError(f"{path}: tensors listed in the metadata are missing: {missing}")
    return meta[_CHECKSUM]


def read_checked(path: str | Path, fmt: str) -> CheckedFile:
    """Read a ``write_checked`` file of format ``fmt`` and verify every checksum.

    Raises:
        SnapshotError: naming the file (and the tensor) when it cannot be read, is of another
            format, or does not match a checksum.
    """
    path = Path(path)
    tensors, meta = _load(path)
    return CheckedFile(path, tensors, meta, _verify(path, tensors, meta, fmt))


def read_delta(model: nn.Module, path: str | Path, check_base: bool = True) -> CheckedFile:
    """Read a ``save_delta`` file and check it against ``model`` without writing anything.

    Args:
        check_base: require every tensor's base fingerprint and that ``model`` holds that base.

    Returns:
        The file, its tensors moved to their parameters' devices.

    Raises:
        SnapshotError: naming the file and the tensor at fault (see the module docstring).
    """
    path = Path(path)
    tensors, meta = _load(path)
    if meta.get("format") == DELTA_V1:
        if check_base:
            raise SnapshotError(f"{path}: a {DELTA_V1} file has no checksums and fingerprints its bases the old "
                                "way, so it cannot be verified; re-save it with Editor.save_delta, or pass "
                                "check_base=False to apply it unchecked")
        log.warning("%s: applying a %s file without checksums or base check", path, DELTA_V1)
        checksum = ""
    else:
        checksum = _verify(path, tensors, meta, DELTA_FORMAT)
    params = dict(model.named_parameters())
    for name, t in sorted(tensors.items()):
        if name not in params:
            raise SnapshotError(f"{path}: tensor {name!r} is not a parameter of {type(model).__name__}")
        p = params[name]
        if p.shape != t.shape or p.dtype != t.dtype:
            raise SnapshotError(f"{path}: tensor {name!r} is {tuple(t.shape)} {t.dtype}, "
                                f"the model has {tuple(p.shape)} {p.dtype}")
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise SnapshotError(f"{path}: tensor {name!r} has non-finite values")
        if check_base:
            want = meta.get(_BASE + name)
            if want is None:
                raise SnapshotError(f"{path}: no base fingerprint for {name!r}, so the model cannot be checked to be "
                                    "the base the delta was made from; pass check_base=False to apply it anyway")
            if fingerprint_hex(p) != want:
                raise SnapshotError(f"{path}: parameter {name!r} of this model is not the base the delta was made from")
    moved = {n: t.to(params[n].device) for n, t in tensors.items()}
    return CheckedFile(path, moved, meta, checksum)


@torch.no_grad()
def write_delta(model: nn.Module, tensors: Mapping[str, torch.Tensor],
                originals: WeightsCopy | None = None) -> list[str]:
    """Copy checked tensors (``read_delta``) into the model; all or nothing.

    Args:
        originals: when given, the replaced values of names it does not hold yet are added to it.

    Returns:
        The names written, sorted.
    """
    replaced = WeightsCopy.take(model, tensors)
    try:
        WeightsCopy(tensors).restore(model)
    except BaseException:
        replaced.restore(model)
        raise
    if originals is not None:
        for name in replaced.names:
            originals.tensors.setdefault(name, replaced.tensors[name])
    return replaced.names


def apply_delta(model: nn.Module, path: str | Path, originals: WeightsCopy | None = None,
                check_base: bool = True) -> list[str]:
    """Put a ``save_delta`` file onto a copy of the base model, in place, after checking all of it.

    Args:
        originals: when given, the replaced base values are added to it (so the edit can be undone).
        check_base: refuse a file without base fingerprints, and a model that is not the base the
            delta was made from. ``False`` skips both (and admits ``harness-delta-v1`` files).

    Returns:
        The names written.

    Raises:
        SnapshotError: naming the file, and the tensor at fault; the model is then untouched.
    """
    return write_delta(model, read_delta(model, path, check_base).tensors, originals)


# ----------------------------------------------------------------------------------------------
# memory files


@dataclass(frozen=True)
class MemoryFile:
    """A memory file read and verified by ``read_memory``: its path, the memory and the file's checksum."""

    path: Path
    state: MemoryState
    n_edits: int
    checksum: str


def memory_path(delta_path: str | Path) -> Path:
    """Where ``save_delta`` puts the memory beside a delta file: ``x.safetensors`` -> ``x.memory.safetensors``."""
    p = Path(delta_path)
    return p.with_name(p.name.removesuffix(".safetensors") + ".memory.safetensors")


def write_memory(path: str | Path, state: MemoryState, algorithm: str, n_edits: int) -> str:
    """Write an algorithm's memory as a checked safetensors file (the structure as JSON in the metadata).

    Returns:
        The file's ``checksum`` entry.
    """
    meta = {"format": MEMORY_FORMAT, "algorithm": algorithm, "n_edits": str(n_edits),
            "structure": state.structure_json()}
    return write_checked(path, state.tensors, meta)


def read_memory(path: str | Path, algorithm: str) -> MemoryFile:
    """Read and verify a ``write_memory`` file made by ``algorithm``.

    Raises:
        SnapshotError: naming the file: unreadable, corrupt, another format or another algorithm's,
            or a structure that is not JSON.
    """
    f = read_checked(path, MEMORY_FORMAT)
    made_by = f.metadata.get("algorithm")
    if made_by != algorithm:
        raise SnapshotError(f"{f.path}: the memory was made by algorithm {made_by!r}, not {algorithm!r}")
    try:
        structure = json.loads(f.metadata.get("structure", "{}"))
        n_edits = int(f.metadata.get("n_edits", "0"))
    except ValueError as exc:
        raise SnapshotError(f"{f.path}: the memory's structure or edit count does not parse ({exc})") from exc
    if not isinstance(structure, dict):
        raise SnapshotError(f"{f.path}: the memory's structure is not a JSON object")
    return MemoryFile(f.path, MemoryState(dict(f.tensors), structure), n_edits, f.checksum)
