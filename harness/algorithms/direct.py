"""``direct``: hand edits of named weights, as in a weight-editing lesson.

Operations (applied in order; each names a full parameter):
  * ``set_row`` / ``set_column``: overwrite row/column ``index`` with ``values`` (or fill with ``value``);
  * ``set_element``: overwrite element ``[index, col]`` with ``value``;
  * ``set_embedding``: overwrite the input-embedding row of ``token`` (a string that is one token, or
    ``"#<id>"``) with ``values``/``value``, or with the row of ``source_token``;
  * ``low_rank``: add ``scale * A @ B.T`` with A, B of rank ``rank`` drawn from N(0, 1) with ``seed``;
  * ``lora_file``: add ``(alpha / r) * B @ A`` read from a safetensors file with tensors ``A`` [r, d_in]
    and ``B`` [d_out, r] (or ``<param>.lora_A``/``<param>.lora_B`` when one file holds several).

All new values are computed first in float32 and written with ``base.write_values``: checked for
non-finite entries (nothing is written unless every operation passes), rounded once to the
parameter's dtype, and reported as the norm actually written (``delta_norms``) next to the intended
norm and the write error (``info``). Requests are ignored: the same operations are applied at each call.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from safetensors.torch import load_file

from harness.algorithms.base import AlgorithmError, EditAlgorithm, register, write_values
from harness.models import model_spec
from harness.types import EditReport

KINDS = ("set_row", "set_column", "set_element", "set_embedding", "low_rank", "lora_file")


@dataclass
class DirectOp:
    """One hand edit. Which fields matter depends on ``kind`` (see the module docstring)."""

    kind: str = "low_rank"
    param: Optional[str] = None
    index: Optional[int] = None
    col: Optional[int] = None
    values: Optional[list[float]] = None
    value: Optional[float] = None
    token: Optional[str] = None
    source_token: Optional[str] = None
    rank: int = 1
    scale: float = 0.01
    seed: int = 0
    path: Optional[str] = None
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"direct op kind={self.kind!r} is not one of {KINDS}")
        if self.kind != "set_embedding" and not self.param:
            raise ValueError(f"direct op {self.kind}: 'param' (a full parameter name) is required")
        if self.kind in ("set_row", "set_column", "set_element") and self.index is None:
            raise ValueError(f"direct op {self.kind} on {self.param}: 'index' is required")
        if self.kind == "set_element" and (self.col is None or self.value is None):
            raise ValueError(f"direct op set_element on {self.param}: 'col' and 'value' are required")
        if self.kind in ("set_row", "set_column") and self.values is None and self.value is None:
            raise ValueError(f"direct op {self.kind} on {self.param}: give 'values' or 'value'")
        if self.kind == "set_embedding":
            if not self.token:
                raise ValueError("direct op set_embedding: 'token' is required")
            if self.values is None and self.value is None and not self.source_token:
                raise ValueError("direct op set_embedding: give 'values', 'value' or 'source_token'")
        if self.kind == "low_rank" and self.rank < 1:
            raise ValueError(f"direct op low_rank on {self.param}: rank must be >= 1, got {self.rank}")
        if self.kind == "lora_file" and not self.path:
            raise ValueError(f"direct op lora_file on {self.param}: 'path' is required")


@dataclass
class DirectHparams:
    """A list of operations; the default adds a small seeded rank-1 delta to layer 0's MLP output."""

    ops: list[DirectOp] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ops = [op if isinstance(op, DirectOp) else DirectOp(**op) for op in self.ops]


def _token_id(tok, token: str) -> int:
    if token.startswith("#") and token[1:].isdigit():
        return int(token[1:])
    ids = tok(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise AlgorithmError(f"direct: token {token!r} is {len(ids)} tokens {ids}; give one token or '#<id>'")
    return ids[0]


def _row_values(op: DirectOp, n: int, where: str) -> torch.Tensor:
    if op.values is not None:
        if len(op.values) != n:
            raise AlgorithmError(f"direct {op.kind} on {where}: {len(op.values)} values for a row of {n}")
        return torch.tensor(op.values, dtype=torch.float32)
    return torch.full((n,), float(op.value), dtype=torch.float32)


@register("direct")
class Direct(EditAlgorithm):
    """Hand edits driven by hyperparameters (see module docstring)."""

    Hparams = DirectHparams

    def _param_name(self, model, op: DirectOp) -> str:
        return op.param or (model_spec(model).embed + ".weight")

    def targets(self, model, requests) -> set[str]:
        return {self._param_name(model, op) for op in self.hparams.ops}

    def apply(self, model, tok, requests) -> EditReport:
        t0 = time.perf_counter()
        params = dict(model.named_parameters())
        new: dict[str, torch.Tensor] = {}  # float32 working copies, written only at the end
        for op in self.hparams.ops:
            name = self._param_name(model, op)
            if name not in params:
                raise AlgorithmError(f"direct {op.kind}: {name!r} is not a parameter of the model")
            w = new.get(name)
            if w is None:
                w = params[name].detach().to(torch.float32, copy=True)
            new[name] = self._op(op, name, w, tok)
        for name, w in new.items():
            if not torch.isfinite(w).all():
                raise AlgorithmError(f"direct: the result for {name!r} has non-finite values; nothing written")
        written = write_values(model, new)
        return EditReport(seconds=time.perf_counter() - t0, delta_norms=written.norms, info=written.info())

    def _op(self, op: DirectOp, name: str, w: torch.Tensor, tok) -> torch.Tensor:
        if op.kind == "set_row":
            w[op.index] = _row_values(op, w.shape[1], name).to(w.device)
        elif op.kind == "set_column":
            w[:, op.index] = _row_values(op, w.shape[0], name).to(w.device)
        elif op.kind == "set_element":
            w[op.index, op.col] = float(op.value)
        elif op.kind == "set_embedding":
            row = _token_id(tok, op.token)
            if op.source_token:
                w[row] = w[_token_id(tok, op.source_token)].clone()
            else:
                w[row] = _row_values(op, w.shape[1], name).to(w.device)
        elif op.kind == "low_rank":
            g = torch.Generator().manual_seed(op.seed)
            a = torch.randn(w.shape[0], op.rank, generator=g)
            b = torch.randn(w.shape[1], op.rank, generator=g)
            w += (op.scale * a @ b.T).to(w.device)
        elif op.kind == "lora_file":
            w += self._lora_delta(op, name, w.shape).to(w.device)
        return w

    @staticmethod
    def _lora_delta(op: DirectOp, name: str, shape: torch.Size) -> torch.Tensor:
        tensors = load_file(op.path)
        a = tensors.get(f"{name}.lora_A", tensors.get("A"))
        b = tensors.get(f"{name}.lora_B", tensors.get("B"))
        if a is None or b is None:
            raise AlgorithmError(f"direct lora_file {op.path}: needs tensors 'A' and 'B' (or '{name}.lora_A/B')")
        r = a.shape[0]
        delta = (op.alpha / r) * (b.float() @ a.float())
        if delta.shape == shape:
            return delta
        if delta.T.shape == shape:  # e.g. GPT-2 Conv1D stores W^T
            return delta.T.contiguous()
        raise AlgorithmError(
            f"direct lora_file {op.path}: B@A has shape {tuple(delta.shape)}, {name} has {tuple(shape)}")
