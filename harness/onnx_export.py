"""An edited model out to ONNX, checked by running the exported graph with onnxruntime.

"Edit in PyTorch, then re-export to ONNX" is the realistic path from an edit to a deployment
runtime; the export is only trusted once the graph has run. ``export_graph`` traces the causal LM
with ``torch.onnx.export(dynamo=True)`` (``torch.export`` + onnxscript) as a graph from
``input_ids`` and ``attention_mask`` (int64, ``[batch, sequence]``, both axes dynamic) to ``logits``
(``[batch, sequence, vocab]``), without a KV cache. ``check_parity`` runs the graph with
onnxruntime and the model with PyTorch on the same padded batches of prompts and compares the
logits at every real (unpadded) position: the largest absolute difference must stay within
``atol`` and the argmax (greedy next token) must agree at a fraction of positions of at least
``min_agreement``, or ``ParityError`` is raised.

The ONNX stack is the optional extra ``pip install -e ".[onnx]"`` (onnx, onnxscript, onnxruntime).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import time
import warnings
from collections.abc import Iterator
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

ONNX_EXTRA = 'pip install -e ".[onnx]"'
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
DEFAULT_OPSET = 18  # torch.onnx's native opset (torchlib); later ones go through a version converter
DEFAULT_ATOL = 1e-3  # float32 logits; measured differences are ~1e-5 (see README, "Export")
EXTERNAL_DATA_BYTES = 1 << 30  # larger graphs keep their weights in model.onnx.data (protobuf's 2 GiB limit)


class MissingDependencyError(ImportError):
    """An optional dependency of the ONNX export is not installed."""


class ParityError(RuntimeError):
    """The exported graph's logits disagree with PyTorch's beyond the bounds.

    Attributes:
        parity: the measured figures.
    """

    def __init__(self, message: str, parity: "Parity") -> None:
        super().__init__(message)
        self.parity = parity


def require_onnx() -> None:
    """Raise ``MissingDependencyError`` naming the missing packages and the install command."""
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependencyError(f"ONNX export needs {', '.join(ONNX_PACKAGES)}; missing: {', '.join(missing)}. "
                                     f"Install the optional extra: {ONNX_EXTRA}")


class LogitsOnly(nn.Module):
    """``(input_ids, attention_mask) -> logits`` of a causal LM, without a cache: the exported signature."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence what the exporter says about every export (missing torchvision ops, axis renames)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used", category=UserWarning)
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def _encode(tok: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    enc = tok(list(prompts), return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"].to(torch.int64), "attention_mask": enc["attention_mask"].to(torch.int64)}


def export_graph(model: nn.Module, tok: Any, path: str | Path, sample_prompts: Sequence[str],
                 opset: int = DEFAULT_OPSET, optimize: bool = True) -> float:
    """Write ``model`` (float32, on the CPU) as an ONNX graph with dynamic batch and sequence axes.

    Args:
        sample_prompts: prompts traced through; the shortest and the longest make a batch of two
            that is longer than two tokens, so neither axis is specialised to its sample size.
        opset: the ONNX opset of the graph.
        optimize: run onnxscript's graph optimizer (constant folding, fusions). On SmolLM2 it made
            the export 2.5x slower (177 s against 70 s on 2 busy cores) and the logits closer to
            PyTorch's (max difference 8.6e-5 against 2.1e-4 on three prompts).

    Returns:
        Seconds the export took.

    Raises:
        MissingDependencyError: the ONNX stack is not installed.
        ValueError: a model that is not float32 on the CPU, or no sample prompt.
    """
    require_onnx()
    params = list(model.parameters())
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in params):
        raise ValueError("export_graph takes a float32 model on the CPU; cast it first (exact from bf16/fp16)")
    prompts = list(dict.fromkeys(sample_prompts))
    if not prompts:
        raise ValueError("export_graph needs at least one sample prompt")
    prompts = sorted(prompts, key=len)[:1] + sorted(prompts, key=len)[-1:] if len(prompts) > 1 else prompts * 2
    enc = _encode(tok, prompts)
    while enc["input_ids"].shape[1] <= enc["input_ids"].shape[0]:  # equal sizes would tie the two axes
        prompts = [p + " ." for p in prompts]
        enc = _encode(tok, prompts)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    n_bytes = sum(p.numel() * p.element_size() for p in params)
    t0 = time.perf_counter()
    with _quiet_exporter():
        torch.onnx.export(LogitsOnly(model).eval(), (enc["input_ids"], enc["attention_mask"]), str(path),
                          dynamo=True, input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                          opset_version=opset, external_data=n_bytes > EXTERNAL_DATA_BYTES, optimize=optimize,
                          verbose=False)
    seconds = time.perf_counter() - t0
    log.info("exported %s (opset %d) in %.1fs", path, opset, seconds)
    return seconds


@dataclass
class Parity:
    """ONNX-versus-PyTorch agreement on a set of prompts (logits at real positions only).

    Attributes:
        n_prompts, n_positions: prompts run and real token positions compared.
        max_abs_diff: the largest absolute logit difference.
        argmax_agreement: fraction of positions where both pick the same top token.
        next_token_agreement: the same at each prompt's last position (the greedy next token).
        atol, min_agreement: the bounds checked.
        predictions: per prompt, the PyTorch and ONNX greedy next token (decoded).
        seconds: how long the check took (session creation included).
    """

    n_prompts: int
    n_positions: int
    max_abs_diff: float
    argmax_agreement: float
    next_token_agreement: float
    atol: float
    min_agreement: float
    predictions: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol and self.argmax_agreement >= self.min_agreement

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def summary(self) -> str:
        return (f"max |logit diff| {self.max_abs_diff:.3g} (bound {self.atol:g}), argmax agreement "
                f"{self.argmax_agreement:.4f} (bound {self.min_agreement:g}) over {self.n_positions} positions of "
                f"{self.n_prompts} prompts, next-token agreement {self.next_token_agreement:.4f}")


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session for ``path`` (``threads``: intra-op threads, default torch's count)."""
    require_onnx()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def onnx_logits(session: Any, tok: Any, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(logits ``[batch, seq, vocab]``, attention mask) of the graph on right-padded ``prompts``."""
    enc = _encode(tok, prompts)
    feed = {k: v.numpy() for k, v in enc.items()}
    return session.run(["logits"], feed)[0], feed["attention_mask"]


@torch.no_grad()
def check_parity(model: nn.Module, tok: Any, path: str | Path, prompts: Sequence[str], atol: float = DEFAULT_ATOL,
                 min_agreement: float = 1.0, batch_size: int = 8, raise_on_fail: bool = True) -> Parity:
    """Run the graph at ``path`` (onnxruntime) and ``model`` (PyTorch) on ``prompts``; compare the logits.

    Returns:
        The ``Parity`` figures.

    Raises:
        ParityError: (with ``raise_on_fail``) a bound is exceeded; the message gives the figures.
        ValueError: no prompts, or bounds out of range.
    """
    if not prompts:
        raise ValueError("check_parity needs at least one prompt")
    if atol < 0 or not 0 <= min_agreement <= 1:
        raise ValueError(f"parity bounds: atol={atol} must be >= 0 and min_agreement={min_agreement} in [0, 1]")
    t0 = time.perf_counter()
    session = onnx_session(path)
    max_diff, agree, total, next_agree = 0.0, 0, 0, 0
    predictions = []
    for i in range(0, len(prompts), batch_size):
        part = list(prompts[i:i + batch_size])
        got, mask = onnx_logits(session, tok, part)
        enc = _encode(tok, part)
        ref = model(**{k: v.to(model.device) for k, v in enc.items()}, use_cache=False).logits.float().cpu().numpy()
        if got.shape != ref.shape:
            raise ValueError(f"{path}: ONNX logits have shape {got.shape}, PyTorch's {ref.shape}")
        real = mask.astype(bool)
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))[real]
        max_diff = max(max_diff, float(diff.max()) if diff.size else 0.0)
        a_got, a_ref = got.argmax(-1), ref.argmax(-1)
        agree += int((a_got == a_ref)[real].sum())
        total += int(real.sum())
        last = real.sum(1) - 1
        for j, prompt in enumerate(part):
            t_id, o_id = int(a_ref[j, last[j]]), int(a_got[j, last[j]])
            next_agree += t_id == o_id
            predictions.append({"prompt": prompt, "torch": tok.decode([t_id]), "onnx": tok.decode([o_id])})
    parity = Parity(n_prompts=len(prompts), n_positions=total, max_abs_diff=max_diff,
                    argmax_agreement=agree / max(total, 1), next_token_agreement=next_agree / len(prompts),
                    atol=atol, min_agreement=min_agreement, predictions=predictions,
                    seconds=time.perf_counter() - t0)
    log.info("ONNX parity: %s", parity.summary())
    if raise_on_fail and not parity.passed:
        raise ParityError(f"{path}: the exported graph disagrees with PyTorch: {parity.summary()}", parity)
    return parity
