"""Position-sensitive fingerprints of tensors, and a digest of a whole model's weights and buffers.

A fingerprint is two 64-bit weighted sums over a tensor's raw bits, computed on the tensor's own
device in one pass. It is how the Editor proves that nothing it did not declare moved, how a delta
file names the base it was made from, and (through ``model_digest``) how caches are keyed by weights.

Definition. Read the tensor in row-major order as n integers b_0 .. b_{n-1}: each element's raw bits
as a signed integer of the element's width (1-byte types unsigned; 16-byte types as two int64).
With odd 64-bit constants K, C and tables T, M of odd 64-bit constants (splitmix64, fixed seeds):

    A = sum_i b_i * (C + 2*K*i)                                  mod 2^64
    B = sum_i b_i * T[i mod 2^18] * M[(i div 2^18) mod 2^14]     mod 2^64

Every weight is odd. Integer sums that wrap around are exact and order-free, so the value does not
depend on the device, the chunking or the thread count.

What it is guaranteed to see (component A, for element widths <= 32 bits and tensors under 2^32
elements: every float type up to fp32):
  - one element changed from b to b' (b' != b): A moves by (b' - b) * w_i, nonzero mod 2^64 because
    w_i is odd and 0 < |b' - b| < 2^64;
  - two elements swapped (positions i < j, b_i != b_j): A moves by (b_i - b_j)(w_j - w_i) =
    2K (b_i - b_j)(j - i), nonzero mod 2^64 because the 2-adic valuations add up to at most
    31 + 31 + 1 = 63 < 64 (|b_i - b_j| < 2^32, j - i < 2^32, K odd).
What it sees with high probability (component B): any other change, e.g. a row swap or the
transposition of a square matrix, which are many swaps at once whose terms can cancel in A. With
d_i = b'_i - b_i != 0 for some i and v the least 2-adic valuation of the d_i, model the weights
u_i = T*M as independent uniform odd residues (they come from a mixer unrelated to any weight
values): sum d_i u_i vanishes for one residue of one u_i mod 2^(64 - v) among 2^(63 - v) odd ones,
so B misses with probability 2^-(63 - v): at most 2^-32 for <= 32-bit elements, 2^-63 for a change
with an odd difference. A miss needs A and B to miss together.
This is not a cryptographic hash: whoever knows the constants can build collisions. It guards
against bugs, not adversaries; files carry sha256 checksums (``harness.safefiles``) instead.

Cost: chunks of 2^18 elements are widened to int64 one at a time (memory stays bounded by a few
MiB whatever the tensor), then three reductions each: ``bench/bench_fingerprint.py`` measures it.
"""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 18  # elements per chunk, the length of table T
_N_MULT = 1 << 14  # length of table M: distinct chunk multipliers for tensors under 2^32 elements
_MASK = (1 << 64) - 1
_K = 0x9E3779B97F4A7C15  # odd (the golden-ratio increment of splitmix64)
_C = 0xD1B54A32D192ED03  # odd


def raw_bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as a flat integer tensor (a view when contiguous, no copy)."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dtype == torch.bool:
        return t.reshape(-1).view(torch.uint8)
    size = t.element_size()
    if size in _INT_VIEW:
        return t.reshape(-1).view(_INT_VIEW[size])
    return t.reshape(-1).view(torch.int64)  # complex128: two words per element


def _s64(v: int) -> int:
    """``v`` mod 2^64 as a signed 64-bit Python int (what an int64 tensor can be multiplied by)."""
    v &= _MASK
    return v - (1 << 64) if v >= 1 << 63 else v


def _splitmix64(seed: int, n: int) -> np.ndarray:
    """``n`` odd pseudo-random 64-bit constants (splitmix64 from ``seed``), as int64."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(_K)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z | np.uint64(1)).view(np.int64)


_MULTIPLIERS = [int(m) for m in _splitmix64(0x5EED_0002, _N_MULT)]


@functools.lru_cache(maxsize=8)
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Position indices 0..2^18-1 and the weight table T, on ``device``.

    Constants (3 MiB per device), memoised so that a pass over a model does not rebuild them per
    tensor; nothing in them depends on any model.
    """
    index = torch.arange(_CHUNK, dtype=torch.int64, device=device)
    table = torch.from_numpy(_splitmix64(0x5EED_0001, _CHUNK)).to(device)
    return index, table


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Wrapping int64 dot product: ``torch.dot`` on the CPU (fused), multiply-and-sum elsewhere."""
    if a.device.type == "cpu":
        return torch.dot(a, b)
    return (a * b).sum()


def tensor_fingerprint(t: torch.Tensor) -> tuple[int, int]:
    """The pair (A, B) defined in the module docstring, each in [0, 2^64).

    It depends on the tensor's bits in row-major order only (not its dtype, shape or device):
    compare dtypes and shapes separately where they matter.
    """
    x = raw_bits(t)
    if x.numel() == 0:
        return 0, 0
    index, table = _tables(x.device)
    acc_a = torch.zeros((), dtype=torch.int64, device=x.device)
    acc_b = torch.zeros((), dtype=torch.int64, device=x.device)
    for k, start in enumerate(range(0, x.numel(), _CHUNK)):
        c = x[start:start + _CHUNK].to(torch.int64)
        m = c.numel()
        # sum_j c_j (C + 2K (start + j)) = (C + 2K start) sum_j c_j + 2K sum_j j c_j
        acc_a += c.sum() * _s64(_C + 2 * _K * start) + _dot(c, index[:m]) * _s64(2 * _K)
        acc_b += _dot(c, table[:m]) * _MULTIPLIERS[k % _N_MULT]
    return int(acc_a) & _MASK, int(acc_b) & _MASK


def fingerprint_hex(t: torch.Tensor) -> str:
    """``tensor_fingerprint`` as 32 hex digits (how files store it)."""
    a, b = tensor_fingerprint(t)
    return f"{a:016x}{b:016x}"


def fingerprint(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, tuple[int, int]]:
    """Fingerprint of every named parameter (or of ``names``), keyed by full parameter name."""
    params = dict(model.named_parameters())
    keys = params.keys() if names is None else names
    return {n: tensor_fingerprint(params[n]) for n in keys}


def model_digest(model: nn.Module) -> str:
    """A short hex digest of every parameter and buffer (name, dtype, shape, fingerprint).

    Buffers count whether persistent or not (a rotary ``inv_freq`` changes every logit); tied
    tensors count once, under their first name. Used to key on-disk caches by weights and to
    check that a cached model is still the one loaded.
    """
    h = hashlib.sha256()
    for kind, named in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in sorted(named, key=lambda item: item[0]):
            a, b = tensor_fingerprint(t)
            h.update(f"{kind}:{name}:{t.dtype}:{tuple(t.shape)}:{a:x}:{b:x};".encode())
    return h.hexdigest()[:16]
