"""``ultraedit``: training-, subject- and memory-free lifelong editing (Gu et al. 2025), docs/algorithms/ultraedit.md.

Xiaojie Gu, Guangxu Chen, Jungang Li, Jia-Chen Gu, Xuming Hu, Kai Zhang, "UltraEdit: Training-,
Subject-, and Memory-Free Lifelong Editing in Large Language Models", arXiv 2505.14679 (2025).

One ``apply`` edits a batch of requests with one forward and one backward pass and a closed-form
solve per edited linear module ``W`` (input size ``d_in``, output size ``d_out``):

1. Each request reads ``prompt + " " + target_new``; the loss is the request's mean negative
   log-likelihood of its target tokens (summed over requests, so a request's gradient does not
   depend on the batch size). At every edited module and every token of the text (the reference's
   ``token: mask``), the hooks keep the module's input ``k`` (the key) and the gradient of the loss
   with respect to its output ``g``.
2. **Lifelong normalisation.** ``[k; g]`` (``d_in + d_out``) updates running statistics (count,
   mean, sum of squared deviations; Chan et al.'s pooled update) that persist across ``apply``
   calls, shared by modules of the same shape as in the reference; then every ``[k; g]`` of this
   batch is standardised with them: ``[k̂; ĝ] = ([k; g] − mean) / (std + ε)``.
3. **Closed form.** Pseudo-values ``v = −lr · ‖k̂‖² · ĝ`` per token; with ``K`` [T, d_in] the raw keys
   and ``V`` [T, d_out] the pseudo-values, ``Δ = ((KᵀK + ridge·I)⁻¹ KᵀV)ᵀ`` (float64), so that
   ``Δ k ≈ v`` at the edited tokens: each token's output moves against its normalised gradient.
   All modules' shifts are computed from the same pass, then written with ``write_deltas``.

The running statistics are the algorithm's state (``state_dict``: ``norm.<d_in>x<d_out>.{n,mean,m2}``,
float64): the Editor snapshots and restores them with the weights, so a single edit leaves nothing
behind and sequential checkpoints resume bit for bit. Nothing is derived from the base model, so
``prepare`` has nothing to do.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from harness.algorithms.base import AlgorithmError, EditAlgorithm, register, write_deltas
from harness.algorithms.hooks import Hooks, model_device
from harness.models import ModelSpec, get_module, model_spec, num_layers
from harness.tokens import encode_pairs, pad_id
from harness.types import EditReport, EditRequest

log = logging.getLogger(__name__)

# The reference normalises with float32's epsilon (its statistics are float32); kept for the same numbers.
EPS = float(torch.finfo(torch.float32).eps)


def _default_layers() -> list[int]:
    # SmolLM2-135M (30 layers): see conf/algorithm/ultraedit.yaml for the evidence.
    return [22, 23, 24, 25, 26, 27]


def _default_modules() -> list[str]:
    return ["mlp_out"]


@dataclass
class UltraEditHparams:
    """UltraEdit; defaults are SmolLM2-135M's (evidence in conf/algorithm/ultraedit.yaml).

    Attributes:
        layers: layers whose templated ``modules`` are edited.
        modules: the edited linear modules: a ``ModelSpec`` field name (``mlp_out``, the MLP output
            projection) or a module-path template with ``{}`` (``model.layers.{}.mlp.up_proj``),
            each taken at every one of ``layers``; or a full module path without ``{}``
            (``model.layers.11.mlp.gate_proj``), taken as it is.
        lr: the step size of the pseudo-values ``v = −lr ‖k̂‖² ĝ``.
        ridge: the ridge of the closed-form solve ``(KᵀK + ridge·I)`` (the reference: 1).
        token: where keys and gradients are read: ``mask`` (every token of prompt + target, the
            reference's setting) or ``ans`` (the target tokens' input positions only).
    """

    layers: list[int] = field(default_factory=_default_layers)
    modules: list[str] = field(default_factory=_default_modules)
    lr: float = 3e-4
    ridge: float = 1.0
    token: str = "mask"

    def __post_init__(self) -> None:
        self.layers = [int(x) for x in self.layers]
        if (self.layers and min(self.layers) < 0) or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be distinct non-negative layer indices, got {self.layers}")
        if not self.modules:
            raise ValueError("modules must name at least one module")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.ridge > 0:
            raise ValueError(f"ridge must be > 0, got {self.ridge}")
        if self.token not in ("mask", "ans"):
            raise ValueError(f"token must be 'mask' or 'ans', got {self.token!r}")


class RunningStats:
    """Count, mean and sum of squared deviations of rows seen so far (float64, CPU)."""

    def __init__(self, n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        self.n, self.mean, self.m2 = n, mean, m2

    @classmethod
    def empty(cls, size: int) -> RunningStats:
        z = torch.zeros(size, dtype=torch.float64)
        return cls(torch.zeros((), dtype=torch.float64), z, z.clone())

    def update(self, x: torch.Tensor) -> None:
        """Pool the rows of ``x`` [N, D] into the statistics (out of place: handed-out tensors stay intact)."""
        x = x.detach().to(device="cpu", dtype=torch.float64)
        m, n = float(x.shape[0]), float(self.n)
        total = n + m
        mean_x = x.mean(0)
        delta = mean_x - self.mean
        self.mean = self.mean + delta * (m / total)
        self.m2 = self.m2 + ((x - mean_x) ** 2).sum(0) + delta ** 2 * (n * m / total)
        self.n = torch.tensor(total, dtype=torch.float64)

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """``(x − mean) / (std + ε)`` with the unbiased std of everything seen (0 when fewer than 2 rows)."""
        n = float(self.n)
        std = (self.m2 / (n - 1)).sqrt() if n > 1 else torch.zeros_like(self.m2)
        return (x - self.mean.to(x)) / (std.to(x) + EPS)


@register("ultraedit")
class UltraEdit(EditAlgorithm):
    """UltraEdit lifelong editing; the running statistics of keys and gradients are explicit state."""

    Hparams = UltraEditHparams

    def __init__(self, hparams: Any = None, **overrides: Any) -> None:
        super().__init__(hparams, **overrides)
        self._stats: dict[str, RunningStats] = {}  # by shape "<d_in>x<d_out>"; absent = nothing seen

    # -- explicit state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for shape, s in sorted(self._stats.items()):
            out.update({f"norm.{shape}.n": s.n, f"norm.{shape}.mean": s.mean, f"norm.{shape}.m2": s.m2})
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the whole state; shapes absent from ``state`` go back to 'nothing seen'.

        Raises:
            AlgorithmError: a key that is not ``norm.<d_in>x<d_out>.{n,mean,m2}``, or a shape's entries
                incomplete or of the wrong size.
        """
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            prefix, shape, what = (key.split(".") + ["", ""])[:3]
            dims = shape.split("x")
            if prefix != "norm" or what not in ("n", "mean", "m2") or len(dims) != 2 or not all(d.isdigit() for d in dims):
                raise AlgorithmError(f"{self.name}: unexpected state entry {key!r} (norm.<d_in>x<d_out>.n|mean|m2)")
            parts.setdefault(shape, {})[what] = value.detach().to(device="cpu", dtype=torch.float64)
        stats = {}
        for shape, p in parts.items():
            size = sum(int(d) for d in shape.split("x"))
            if set(p) != {"n", "mean", "m2"} or p["n"].numel() != 1 or p["mean"].shape != (size,) \
                    or p["m2"].shape != (size,):
                raise AlgorithmError(f"{self.name}: state of shape {shape} needs n (1 value), mean and m2 "
                                     f"({size} values each); got { {k: tuple(v.shape) for k, v in p.items()} }")
            stats[shape] = RunningStats(p["n"].reshape(()).clone(), p["mean"].clone(), p["m2"].clone())
        self._stats = stats

    def reset_state(self) -> None:
        self._stats = {}

    # -- contract ----------------------------------------------------------------------------
    def targets(self, model: nn.Module, requests: Sequence[EditRequest]) -> set[str]:
        return {f"{path}.weight" for path in self._module_paths(model)}

    def apply(self, model: nn.Module, tok: Any, requests: Sequence[EditRequest]) -> EditReport:
        t_start = time.perf_counter()
        declared = self.targets(model, requests)
        paths = self._module_paths(model)
        modules = {p: get_module(model, p) for p in paths}
        info: dict[str, Any] = {"n_requests": len(requests)}

        t = time.perf_counter()
        keys, grads, loss = self._keys_and_grads(model, tok, requests, modules)
        info["t_backward"] = time.perf_counter() - t
        info["n_tokens"] = int(next(iter(keys.values())).shape[0])

        t = time.perf_counter()
        for path in paths:  # all tokens of this batch join the statistics first, as in the reference
            self._stats_for(modules[path]).update(torch.cat([keys[path], grads[path]], dim=1))
        deltas = {}
        for path in paths:
            deltas[f"{path}.weight"] = self._shift(modules[path], keys[path], grads[path])
        info["t_solve"] = time.perf_counter() - t
        written = write_deltas(model, deltas, declared)
        info.update(written.info())
        for shape, s in self._stats.items():
            info[f"norm_count.{shape}"] = int(s.n)
        log.info("%s: %d requests, %d tokens, loss %.3f, |delta| %s", self.name, len(requests), info["n_tokens"], loss,
                 {k: round(v, 4) for k, v in written.norms.items()})
        return EditReport(seconds=time.perf_counter() - t_start, losses={"nll_before": loss},
                          delta_norms=written.norms, info=info)

    # -- pieces ------------------------------------------------------------------------------
    def _module_paths(self, model: nn.Module) -> list[str]:
        spec, n = model_spec(model), num_layers(model)
        bad = [layer for layer in self.hparams.layers if layer >= n]
        if bad:
            raise ValueError(f"{self.name}: hparam layers={self.hparams.layers} includes {bad}; "
                             f"the model has layers 0..{n - 1}")
        out = []
        for entry in self.hparams.modules:
            template = _template(spec, entry)
            out += [template.format(layer) for layer in self.hparams.layers] if "{}" in template else [template]
        out = list(dict.fromkeys(out))
        if not out:
            raise ValueError(f"{self.name}: hparams modules={self.hparams.modules} with layers={self.hparams.layers} "
                             "name no module")
        for path in out:
            module = get_module(model, path)
            if getattr(module, "weight", None) is None or module.weight.dim() != 2:
                raise ValueError(f"{self.name}: module {path!r} (hparam modules) has no 2-D weight")
        return out

    def _stats_for(self, module: nn.Module) -> RunningStats:
        d_in, d_out = _io_sizes(module)
        key = f"{d_in}x{d_out}"
        if key not in self._stats:
            self._stats[key] = RunningStats.empty(d_in + d_out)
        return self._stats[key]

    def _keys_and_grads(self, model: nn.Module, tok: Any, requests: Sequence[EditRequest],
                        modules: dict[str, nn.Module]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
        """Keys [T, d_in] and output gradients [T, d_out] per module (float32, CPU), and the mean loss."""
        pairs = encode_pairs(tok, [(r.rewrite_prompt, r.target_new) for r in requests])
        width = max(len(p.ids) for p in pairs)
        pad = pad_id(tok)
        dev = model_device(model)
        ids = torch.full((len(pairs), width), pad, dtype=torch.long)
        attn = torch.zeros((len(pairs), width), dtype=torch.long)
        labels = torch.full((len(pairs), width), -100, dtype=torch.long)
        read = torch.zeros((len(pairs), width), dtype=torch.bool)
        for i, p in enumerate(pairs):
            n, start = len(p.ids), len(p.prompt_ids)
            ids[i, :n], attn[i, :n] = torch.tensor(p.ids), 1
            labels[i, start - 1:n - 1] = torch.tensor(p.target_ids)  # position t predicts token t + 1
            read[i] = attn[i].bool() if self.hparams.token == "mask" else labels[i] != -100
        ids, attn, labels, read = ids.to(dev), attn.to(dev), labels.to(dev), read.to(dev)

        seen_in: dict[str, torch.Tensor] = {}
        seen_out: dict[str, torch.Tensor] = {}

        def keep(path: str):
            def hook(_m: nn.Module, args: tuple, out: torch.Tensor) -> None:
                seen_in[path] = args[0].detach()
                seen_out[path] = out
            return hook

        def differentiable(_m: nn.Module, _args: tuple, out: torch.Tensor) -> Any:
            # frozen weights (requires_grad False) would leave nothing to differentiate: the
            # embeddings' output becomes a leaf that does, so every module above carries a gradient
            return out if out.requires_grad else out.detach().requires_grad_()

        with torch.enable_grad(), Hooks() as hooks:
            hooks.output(get_module(model, model_spec(model).embed), differentiable)
            for path, module in modules.items():
                hooks.output(module, keep(path))
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            mask = labels != -100
            nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
            per_request = nll.sum(1) / mask.sum(1)
            outs = [seen_out[p] for p in modules]
            grads = torch.autograd.grad(per_request.sum(), outs)
        keys = {p: seen_in[p][read].float().cpu() for p in modules}
        vgrad = {p: g[read].float().cpu() for p, g in zip(modules, grads)}
        return keys, vgrad, float(per_request.mean().detach())

    def _shift(self, module: nn.Module, keys: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """The weight delta of one module in its parameter layout (float64 on the weight's device)."""
        d_in, _ = _io_sizes(module)
        z = self._stats_for(module).standardise(torch.cat([keys, grads], dim=1).to(torch.float64))
        k_hat, g_hat = z[:, :d_in], z[:, d_in:]
        values = -self.hparams.lr * (k_hat * k_hat).sum(1, keepdim=True) * g_hat  # [T, d_out]
        shift = ridge_map(keys.to(torch.float64), values, self.hparams.ridge)  # [d_in, d_out]
        weight = module.weight
        shift = shift.T if weight.shape == (shift.shape[1], shift.shape[0]) and isinstance(module, nn.Linear) else shift
        return shift.contiguous().to(weight.device)


def ridge_map(keys: torch.Tensor, values: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(KᵀK + ridge·I)⁻¹ KᵀV`` [d_in, d_out], the ridge map from keys [T, d_in] to values [T, d_out].

    With fewer tokens than key dimensions (the usual case) the same matrix is computed as
    ``Kᵀ (KKᵀ + ridge·I)⁻¹ V`` (the push-through identity), a T×T solve instead of a d_in×d_in one.
    """
    t, d_in = keys.shape
    if t < d_in:
        gram = keys @ keys.T + ridge * torch.eye(t, dtype=keys.dtype)
        return keys.T @ torch.linalg.solve(gram, values)
    gram = keys.T @ keys + ridge * torch.eye(d_in, dtype=keys.dtype)
    return torch.linalg.solve(gram, keys.T @ values)


def _template(spec: ModelSpec, name: str) -> str:
    """A module path or path template from a ``ModelSpec`` field name, a template with ``{}`` or a path."""
    if "{}" in name or "." in name:
        return name
    value = getattr(spec, name, None)
    if not isinstance(value, str) or "{}" not in value:
        raise ValueError(f"ultraedit: hparam modules entry {name!r} is neither a ModelSpec module field "
                         "(mlp_out, mlp, ...) nor a module path (template)")
    return value


def _io_sizes(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear module: ``nn.Linear`` stores [out, in], GPT-2's Conv1D [in, out]."""
    rows, cols = module.weight.shape
    return (cols, rows) if isinstance(module, nn.Linear) else (rows, cols)
