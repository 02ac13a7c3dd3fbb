"""Peak memory of one piece of work (an edit call, a retention pass), for the cost columns of a row.

Two kinds, chosen from the devices the model's parameters are on (docs/results.md, "Cost columns"):

* ``cuda``: the allocator's peak, ``torch.cuda.max_memory_allocated`` after
  ``torch.cuda.reset_peak_memory_stats``, summed over the CUDA devices the model uses (a model
  spread over several GPUs: the sum of each device's own peak, an upper bound of the simultaneous
  total). Tensors only: the CUDA context and the allocator's cached blocks are not counted.
* ``rss``: the process's resident-set high-water mark (``VmHWM``), reset at the start through
  ``/proc/self/clear_refs`` (Linux, writing ``5``), so it is the peak *during* the work: the model,
  Python and everything else resident count too. Where the reset is not allowed, a thread samples
  ``VmRSS`` every ``interval`` seconds (``rss_sampled``: a peak shorter than the interval can be
  missed); where there is no ``/proc`` (macOS, Windows), ``getrusage``'s ``ru_maxrss`` is the
  process's peak since it started (``rss_process``: monotone, an upper bound, not the work's own).

The measurement is process-wide: do not nest two of them.
"""
from __future__ import annotations

import resource
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
MIB = 1024 * 1024


@dataclass
class Peak:
    """What ``PeakMemory`` measured: ``kind`` (``cuda``, ``rss``, ``rss_sampled``, ``rss_process``),
    the memory at the start and the peak, in bytes (``peak_bytes`` is None until the block ends)."""

    kind: str
    start_bytes: int
    peak_bytes: Optional[int] = None

    def cells(self) -> dict[str, object]:
        """The row cells: ``mem_kind``, ``mem_peak_mb`` and ``mem_increase_mb`` (peak − start), MiB."""
        if self.peak_bytes is None:
            return {}
        return {"mem_kind": self.kind, "mem_peak_mb": round(self.peak_bytes / MIB, 1),
                "mem_increase_mb": round(max(self.peak_bytes - self.start_bytes, 0) / MIB, 1)}


def _status_kb(field: str) -> Optional[int]:
    """A ``kB`` field of ``/proc/self/status`` in bytes, or None where there is none."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset the resident-set high-water mark to the current RSS; False where not allowed."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _ru_maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024  # macOS: bytes; Linux: kB


class PeakMemory:
    """Context manager measuring the peak memory of its block (module docstring: the kinds).

    Args:
        devices: the devices the work uses (e.g. those of the model's parameters); any CUDA device
            among them selects the ``cuda`` kind, otherwise the process's resident set is measured.
        interval: sampling period in seconds of the ``rss_sampled`` fallback.

    Attributes:
        peak: the ``Peak`` (its ``peak_bytes`` is set when the block exits, also on an exception).
    """

    def __init__(self, devices: Iterable[torch.device], interval: float = 0.01) -> None:
        self.cuda = sorted({d for d in (torch.device(x) for x in devices) if d.type == "cuda"}, key=str)
        self.interval = interval
        self.peak = Peak("rss", 0)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._sampled = 0

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            for d in self.cuda:
                torch.cuda.reset_peak_memory_stats(d)
            self.peak = Peak("cuda", sum(torch.cuda.memory_allocated(d) for d in self.cuda))
        elif _status_kb("VmRSS") is None:
            self.peak = Peak("rss_process", _ru_maxrss_bytes())
        elif _reset_hwm():
            self.peak = Peak("rss", _status_kb("VmRSS") or 0)
        else:
            self.peak = Peak("rss_sampled", _status_kb("VmRSS") or 0)
            self._sampled = self.peak.start_bytes
            self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._sampled = max(self._sampled, _status_kb("VmRSS") or 0)

    def __exit__(self, *exc: object) -> None:
        kind = self.peak.kind
        if kind == "cuda":
            self.peak.peak_bytes = sum(torch.cuda.max_memory_allocated(d) for d in self.cuda)
        elif kind == "rss":
            self.peak.peak_bytes = _status_kb("VmHWM")
        elif kind == "rss_sampled":
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak.peak_bytes = max(self._sampled, _status_kb("VmRSS") or 0)
        else:
            self.peak.peak_bytes = _ru_maxrss_bytes()


def model_devices(model: torch.nn.Module) -> set[torch.device]:
    """The devices holding the model's parameters and buffers."""
    return {t.device for t in model.parameters()} | {t.device for t in model.buffers()}
