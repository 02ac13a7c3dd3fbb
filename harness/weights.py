"""State dicts in and out, safely: read a weights file, overlay it onto a model, save one as safetensors.

Reading (``read_state_dict``):
  * ``.safetensors`` files are read directly (no code runs while loading them);
  * ``.pt`` / ``.pth`` / ``.bin`` files are pickles and go only through ``torch.load(weights_only=True)``,
    whose restricted unpickler admits tensors and plain containers; a pickle that needs anything
    more (a class, a function: what a malicious file uses to run code) is refused with the
    unpickler's reason, before any of its code runs. Load such files only from trusted sources,
    and convert them to safetensors to share them.

Overlaying (``overlay_state_dict``) is strict by default, like ``nn.Module.load_state_dict``: the file
must give every key of the model's ``state_dict`` (tied parameters count once), nothing else, and
every shape must match; the error lists missing, unexpected and mis-shaped keys by name.
``strict=False`` overlays what fits and reports what it skipped. Values are written with ``copy_``
in the model's dtype; every dtype conversion is reported (it is exact only when widening).

Saving (``save_state_dict``) writes each tensor once (tied parameters share storage; the aliases are
recorded in the file's metadata), so saving then overlaying onto the base reproduces the model bit for bit.
"""
from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
STATE_DICT_FORMAT = "harness-state-dict-v1"
_NESTED_KEYS = ("state_dict", "model")  # containers some trainers wrap a state_dict in


class WeightsError(ValueError):
    """A weights file cannot be read, or does not fit the model it is overlaid onto."""


class UnsafeWeightsError(WeightsError):
    """A pickle that ``torch.load(weights_only=True)`` refuses: it needs more than tensors to load."""


def is_weights_file(path: str | Path) -> bool:
    """True for a file whose suffix is one ``read_state_dict`` understands."""
    p = Path(path)
    return p.is_file() and p.suffix.lower() in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES


def _unpickler_reason(exc: BaseException) -> str:
    """The line of torch's message that says what the restricted unpickler refused."""
    text = str(exc)
    for line in text.splitlines():
        if "GLOBAL" in line:  # "Unsupported global: GLOBAL io.open ..." / "... unsupported GLOBAL posix.system ..."
            return line.strip().split(" was not an allowed global")[0].split(". Please")[0].removeprefix(
                "WeightsUnpickler error: ")
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat ``name -> tensor`` mapping from a safetensors or (weights-only) pickle file, on the CPU.

    A pickle whose top level is ``{"state_dict": {...}}`` or ``{"model": {...}}`` (a trainer's
    checkpoint) is unwrapped, and that is logged.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeWeightsError: a pickle that needs more than tensors and containers to load (its code is not run).
        WeightsError: an unknown suffix, an unreadable file, or values that are not tensors.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"weights file {str(p)!r} does not exist")
    suffix = p.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        try:
            return load_file(str(p))
        except Exception as exc:  # safetensors raises its own error types; name the file
            raise WeightsError(f"{p}: not a readable safetensors file: {exc}") from exc
    if suffix not in PICKLE_SUFFIXES:
        raise WeightsError(f"{p}: unknown weights format {suffix!r}; use one of "
                           f"{list(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeWeightsError(
            f"{p}: refused to load: the pickle needs more than tensors ({_unpickler_reason(exc)}). "
            "Only weights_only loading is allowed; if you trust the file, convert it to safetensors "
            "yourself and load that.") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise WeightsError(f"{p}: not a readable PyTorch file: {exc}") from exc
    if isinstance(obj, Mapping):
        for key in _NESTED_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                log.info("%s: using the state_dict under the top-level key %r", p, key)
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{p}: holds a {type(obj).__name__}, not a state_dict (a mapping of names to tensors)")
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if bad:
        raise WeightsError(f"{p}: entries that are not name -> tensor: {bad[:20]}" + (" ..." if len(bad) > 20 else ""))
    return dict(obj)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (empty for pickles and files without any)."""
    p = Path(path)
    if p.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return {}
    with safe_open(str(p), framework="pt") as f:
        return dict(f.metadata() or {})


# ----------------------------------------------------------------------------------------------
# overlay


def alias_groups(model: nn.Module) -> dict[str, list[str]]:
    """``state_dict`` keys that share storage with an earlier key (tied weights): first key -> aliases."""
    first: dict[tuple[int, int, tuple[int, ...]], str] = {}
    groups: dict[str, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if t.numel() == 0:
            continue  # empty tensors may all report the same (null) data pointer
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in first:
            groups.setdefault(first[key], []).append(name)
        else:
            first[key] = name
    return groups


@dataclass
class OverlayReport:
    """What ``overlay_state_dict`` did.

    Attributes:
        written: keys copied into the model.
        missing: model keys the file does not give (tied aliases of given keys excluded).
        unexpected: file keys the model does not have.
        mismatched: ``key -> "file shape vs model shape"``.
        converted: ``key -> "file dtype -> model dtype"`` for every tensor converted on the way in.
    """

    source: str
    written: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, str] = field(default_factory=dict)
    converted: dict[str, str] = field(default_factory=dict)

    @property
    def skipped(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def problems(self) -> str:
        """The missing, unexpected and mis-shaped keys, by name, one kind per line."""
        lines = []
        if self.missing:
            lines.append(f"missing ({len(self.missing)}): {self.missing}")
        if self.unexpected:
            lines.append(f"unexpected ({len(self.unexpected)}): {self.unexpected}")
        if self.mismatched:
            lines.append(f"mis-shaped ({len(self.mismatched)}): " +
                         ", ".join(f"{k} {v}" for k, v in self.mismatched.items()))
        return "\n  ".join(lines)

    def conversions(self) -> str:
        """A one-line count of dtype conversions, e.g. ``12 tensor(s) torch.float16 -> torch.float32``."""
        counts: dict[str, int] = {}
        for how in self.converted.values():
            counts[how] = counts.get(how, 0) + 1
        return ", ".join(f"{n} tensor(s) {how}" for how, n in sorted(counts.items()))


def _is_widening(src: torch.dtype, dst: torch.dtype) -> bool:
    """True when every ``src`` value is exactly representable in ``dst`` (floating point)."""
    if src == dst:
        return True
    if not (src.is_floating_point and dst.is_floating_point):
        return False
    fs, fd = torch.finfo(src), torch.finfo(dst)
    return fd.bits >= fs.bits and fd.max >= fs.max and fd.eps <= fs.eps and fd.tiny <= fs.tiny


@torch.no_grad()
def overlay_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True,
                       source: str = "state_dict") -> OverlayReport:
    """Copy ``state`` into ``model`` in place (``copy_``), checking keys and shapes first.

    Args:
        model: the loaded model; its dtypes and devices are kept.
        state: ``name -> tensor`` (e.g. from ``read_state_dict``).
        strict: refuse unless keys and shapes match exactly (tied aliases may be given once);
            False: overlay the keys that fit and report (log) the rest as skipped.
        source: what to call ``state`` in messages (the file path).

    Returns:
        An ``OverlayReport``.

    Raises:
        WeightsError: with ``strict``, listing every missing, unexpected and mis-shaped key; in any
            mode, when the file gives different values for tied keys of one tensor.
    """
    targets = model.state_dict(keep_vars=True)
    aliases = alias_groups(model)
    alias_of = {a: first for first, names in aliases.items() for a in names}
    report = OverlayReport(source=source)
    report.unexpected = sorted(k for k in state if k not in targets)
    for name, t in targets.items():
        group = [alias_of.get(name, name), *aliases.get(alias_of.get(name, name), [])]
        if not any(k in state for k in group):
            if name not in alias_of:
                report.missing.append(name)
            continue
        if name not in state:
            continue  # given under a tied alias
        if tuple(state[name].shape) != tuple(t.shape):
            report.mismatched[name] = f"{tuple(state[name].shape)} vs {tuple(t.shape)}"
    if strict and report.skipped:
        raise WeightsError(f"{source} does not fit {type(model).__name__} (strict overlay; pass strict=False "
                           f"to overlay only the keys that fit):\n  {report.problems()}")
    for first, names in aliases.items():
        given = [k for k in (first, *names) if k in state and k not in report.mismatched]
        if len(given) > 1 and not all(torch.equal(state[given[0]], state[k]) for k in given[1:]):
            raise WeightsError(f"{source}: tied keys {given} share one tensor in the model but differ in the file")
    lossy = []
    for name, value in state.items():
        if name not in targets or name in report.mismatched:
            continue
        t = targets[name]
        if value.dtype != t.dtype:
            report.converted[name] = f"{value.dtype} -> {t.dtype}"
            if not _is_widening(value.dtype, t.dtype):
                lossy.append(name)
        t.copy_(value.to(device=t.device, dtype=t.dtype))
        report.written.append(name)
    if report.converted:
        log.log(logging.WARNING if lossy else logging.INFO, "%s: converted %s%s", source, report.conversions(),
                f" (narrowing, not exact: {lossy[:5]}{' ...' if len(lossy) > 5 else ''})" if lossy else "")
    if report.skipped:
        log.warning("%s: partial overlay (strict=False), skipped:\n  %s", source, report.problems())
    log.info("%s: overlaid %d tensor(s) onto %s", source, len(report.written), type(model).__name__)
    return report


def overlay_file(model: nn.Module, path: str | Path, strict: bool = True) -> OverlayReport:
    """``overlay_state_dict(model, read_state_dict(path), strict)`` with the path in every message."""
    return overlay_state_dict(model, read_state_dict(path), strict=strict, source=str(path))


# ----------------------------------------------------------------------------------------------
# saving


def save_state_dict(model: nn.Module, path: str | Path, metadata: Mapping[str, str] | None = None) -> list[str]:
    """Write the model's ``state_dict`` to a safetensors file, each shared tensor once, atomically.

    Tied keys (``lm_head.weight`` sharing ``model.embed_tokens.weight``) are written under their
    first name; the metadata key ``aliases`` (JSON) records them. ``overlay_state_dict`` accepts the
    file strictly, since a tied key given once covers its aliases.

    Returns:
        The keys written.
    """
    p = Path(path)
    if p.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise WeightsError(f"{p}: state dicts are saved as safetensors; give a path ending in .safetensors")
    aliases = alias_groups(model)
    skip = {a for names in aliases.values() for a in names}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in skip}
    meta = {"format": STATE_DICT_FORMAT, "aliases": json.dumps(aliases, sort_keys=True), **(metadata or {})}
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(p)
    return list(tensors)
