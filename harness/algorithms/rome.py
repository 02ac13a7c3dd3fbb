"""``rome``: Rank-One Model Editing (Meng et al. 2022) with the r-ROME fix (Gupta et al. 2024), docs/algorithms/rome.md.

One request edits the MLP output projection ``W`` (``v = W k``) of one layer with a rank-one update:

1. key: ``k̄`` = the input of ``W`` at the subject's last token, averaged over the context templates
   (``locate.compute_keys``); ``k0`` the same on the bare prompt.
2. left vector ``u ∝ C⁻¹k`` (``mom2_adjustment``; else ``u ∝ k``), with C = E[k kᵀ] from
   ``stats`` (computed once from the unedited model, kept by the instance).
3. target value ``v* = v_init + δ`` by ``target.optimize_target(where="mlp")``.
4. ``ΔW = (v* − W k − b) uᵀ / (uᵀ k)`` in float64, written with ``write_deltas`` (transposed for
   GPT-2's Conv1D), which rounds ``W + ΔW`` once to the weight's dtype.

The report gives the norm actually written (``delta_norms``), the intended one and the relative
error of the written change (``info["intended_norm.<name>"]``, ``info["write_error.<name>"]``), and
``info["residual.<layer>"] = ||(W_written − W) k − (v* − W k − b)|| / ||v* − W k − b||``: the part of
the intended change at the key that the stored matrix fails to deliver (about 1e-7 in float32; in
bf16 the rounding of small updates shows here).

``key_mode`` picks which key the update uses:
  * ``r_rome`` (default; Rebuilding ROME, EasyEdit's default): ``k = k̄`` for u, the residual and the
    denominator, so ``Ŵk̄ = v*`` exactly.
  * ``original``: u from ``k̄`` but residual and denominator from ``k0`` (the anchor's asymmetric
    use, which can produce "disabling edits" when ``uᵀk0`` is small); ``Ŵk0 = v*``.
  * ``prompt`` (p-ROME): everything from ``k0``.

Several requests in one call are applied one after another, each computed on the model as the
previous ones left it (the anchor's multi-edit mode). The instance holds no edit-dependent state.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from harness.algorithms.base import EditAlgorithm, register, write_deltas
from harness.algorithms.hparams import build_blocks
from harness.algorithms.locate import TemplateCache, TemplateHparams, compute_keys
from harness.algorithms.solve import as_map, key_residual, to_param_layout
from harness.algorithms.stats import StatsCache, StatsConfig
from harness.algorithms.target import TargetHparams, optimize_target
from harness.models import ModelSpec, get_module, model_spec, num_layers
from harness.types import EditReport, EditRequest

log = logging.getLogger(__name__)

KEY_MODES = ("r_rome", "original", "prompt")


@dataclass
class RomeHparams:
    """ROME / r-ROME hyperparameters. The defaults are SmolLM2-135M's tuned values (the default model;
    evidence in conf/algorithm/rome.yaml); other model families change some of them in
    conf/algorithm_family/rome/<family>.yaml.

    Attributes:
        layer: the edited layer.
        key_mode: ``r_rome`` | ``original`` | ``prompt`` (module docstring).
        mom2_adjustment: use ``u ∝ C⁻¹k`` (else ``u ∝ k``, EasyEdit's default).
        fast_path: run the prompts up to the subject once (KV cache) and, each step, only the tokens
            from the subject on (same result).
        target: the v* optimisation (``target.TargetHparams``; ``loss_layer`` None = last layer).
        stats: where C comes from (``stats.StatsConfig``; used only with ``mom2_adjustment``).
        templates: the context templates (``locate.TemplateHparams``, ROME's ``[[5, 10], [10, 10]]``).
    """

    layer: int = 5
    key_mode: str = "r_rome"
    mom2_adjustment: bool = False
    fast_path: bool = True
    target: TargetHparams = field(default_factory=TargetHparams)
    stats: StatsConfig = field(default_factory=StatsConfig)
    templates: TemplateHparams = field(default_factory=TemplateHparams)

    def __post_init__(self) -> None:
        build_blocks(self)
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")
        if self.key_mode not in KEY_MODES:
            raise ValueError(f"key_mode={self.key_mode!r} is not one of {KEY_MODES}")


def rank_one_update(weight: torch.Tensor, bias: Optional[torch.Tensor], u: torch.Tensor, key: torch.Tensor,
                    target: torch.Tensor) -> torch.Tensor:
    """ΔW = (v* − W k − b) uᵀ / (uᵀ k), in float64, so that (W + ΔW) k + b = v*.

    With ``u ∝ C⁻¹k*`` this is ROME's closed form, the C-weighted minimum-norm change that maps
    ``k*`` to ``v*``; it leaves ``W x`` unchanged for every ``x`` with ``uᵀx = 0``.

    Args:
        weight: W as the map [d, d_ff] (already transposed for Conv1D).
        bias: the projection's bias [d] or None.
        u: [d_ff] left vector (any scale).
        key: [d_ff] key k.
        target: [d] target value v*.

    Returns:
        ΔW [d, d_ff] float64.

    Raises:
        ValueError: ``uᵀk`` is zero or not finite.
    """
    w = weight.to(torch.float64)
    u, key, target = (t.to(device=w.device, dtype=torch.float64) for t in (u, key, target))
    value = w @ key + (bias.to(w.device, torch.float64) if bias is not None else 0.0)
    denom = u @ key
    if not torch.isfinite(denom) or denom == 0:
        raise ValueError(f"rank-one update: uᵀk = {float(denom)}")
    return torch.outer(target - value, u) / denom


@register("rome")
class Rome(EditAlgorithm):
    """ROME / r-ROME single-layer rank-one editing (see module docstring)."""

    Hparams = RomeHparams

    def __init__(self, hparams: Any = None, **overrides: Any) -> None:
        super().__init__(hparams, **overrides)
        self.templates = TemplateCache()  # from the unedited model, survives restores
        self.stats = StatsCache()  # C from the unedited model, survives restores

    def targets(self, model: nn.Module, requests: Sequence[EditRequest]) -> set[str]:
        if not 0 <= self.hparams.layer < num_layers(model):
            raise ValueError(f"rome: hparam layer={self.hparams.layer} does not exist; "
                             f"the model has layers 0..{num_layers(model) - 1}")
        return {model_spec(model).mlp_out_weight(self.hparams.layer)}

    def prepare(self, model: nn.Module, tok: Any) -> None:
        """Compute what depends only on the base model (templates, C): call on the unedited model
        before resuming a sequential run from a checkpoint."""
        self._templates(model, tok)
        if self.hparams.mom2_adjustment:
            self.stats.solver(model, tok, model_spec(model), self.hparams.layer, self.hparams.stats)

    def apply(self, model: nn.Module, tok: Any, requests: Sequence[EditRequest]) -> EditReport:
        t_start = time.perf_counter()
        hp = self.hparams
        spec = model_spec(model)
        if hp.layer >= num_layers(model):
            raise ValueError(f"rome: layer {hp.layer} does not exist; the model has {num_layers(model)} layers")
        declared = self.targets(model, requests)
        t = time.perf_counter()
        self.prepare(model, tok)
        templates = self._templates(model, tok)
        timings = {"t_prepare": time.perf_counter() - t, "t_keys": 0.0, "t_v": 0.0, "t_update": 0.0}
        rows: list[dict[str, float]] = []
        name = spec.mlp_out_weight(hp.layer)
        for req in requests:
            row = self._edit_one(model, tok, spec, req, templates, declared, timings)
            rows.append(row)
            log.info("rome %s: v loss %.3f -> %.3f in %d steps, |dW| %.4g written (%.4g intended), residual %.3g",
                     req.case_id, row["v_loss_start"], row["v_loss_end"], row["steps"], row["delta_norm"],
                     row["intended_norm"], row["residual"])
        n = len(rows)
        losses = {"v_loss_start": sum(r["v_loss_start"] for r in rows) / n,
                  "v_loss_end": sum(r["v_loss_end"] for r in rows) / n,
                  "v_loss_end_max": max(r["v_loss_end"] for r in rows)}
        info: dict[str, Any] = {"n_requests": n, "key_mode": hp.key_mode, "steps": sum(r["steps"] for r in rows) / n,
                                "fast_path": all(r["fast"] for r in rows), "uk": rows[-1]["uk"],
                                "delta_norm_max": max(r["delta_norm"] for r in rows),
                                f"intended_norm.{name}": max(r["intended_norm"] for r in rows),
                                f"write_error.{name}": max(r["write_error"] for r in rows),
                                f"residual.{hp.layer}": max(r["residual"] for r in rows), **timings}
        if hp.mom2_adjustment:
            info.update(self.stats.describe(spec, [hp.layer], hp.stats))  # where C came from
        norms = {name: max(r["delta_norm"] for r in rows)}
        if n > 1:
            info["delta_norm_note"] = "max over the sequential single edits (norms, write error and residual)"
        return EditReport(seconds=time.perf_counter() - t_start, losses=losses, delta_norms=norms, info=info)

    # ------------------------------------------------------------------------------------------
    def _templates(self, model: nn.Module, tok: Any) -> list[str]:
        hp = self.hparams
        return self.templates.get(model, tok, hp.templates.length_params, hp.templates.seed)

    def _edit_one(self, model: nn.Module, tok: Any, spec: ModelSpec, req: EditRequest, templates: list[str],
                  declared: set[str], timings: dict[str, float]) -> dict[str, float]:
        hp = self.hparams
        t = time.perf_counter()
        k_bar = compute_keys(model, tok, spec, hp.layer, [req], templates)[0]
        k0 = compute_keys(model, tok, spec, hp.layer, [req], ["{}"])[0] if hp.key_mode != "r_rome" else k_bar
        k_u = k0 if hp.key_mode == "prompt" else k_bar
        if hp.mom2_adjustment:
            u = self.stats.solver(model, tok, spec, hp.layer, hp.stats)(k_u)
        else:
            u = k_u.to(torch.float64)
        u = u / u.norm()
        timings["t_keys"] += time.perf_counter() - t

        t = time.perf_counter()
        res = optimize_target(model, tok, spec, req, hp.layer, hp.target, templates, where="mlp",
                              fast=hp.fast_path)
        timings["t_v"] += time.perf_counter() - t
        timings["t_v_loop"] = timings.get("t_v_loop", 0.0) + res.seconds["loop"]

        t = time.perf_counter()
        name = spec.mlp_out_weight(hp.layer)
        param = dict(model.named_parameters())[name]
        module = get_module(model, spec.mlp_out.format(hp.layer))
        bias = getattr(module, "bias", None)
        w_old = as_map(param, spec.out_transposed)  # float64 copy of W as the map [d, d_ff]
        key = k_bar if hp.key_mode == "r_rome" else k0
        delta = rank_one_update(w_old, bias, u, key, res.target)
        written = write_deltas(model, {name: to_param_layout(delta, param, spec.out_transposed)}, declared).stats[name]
        # What the stored matrix delivers at the key, against the change v* − W k − b the update aims at.
        key64 = key.to(device=w_old.device, dtype=torch.float64)
        wanted = res.target.to(w_old) - w_old @ key64 - (bias.to(w_old) if bias is not None else 0.0)
        residual = key_residual(as_map(param, spec.out_transposed) - w_old, key64, wanted)
        timings["t_update"] += time.perf_counter() - t
        return {"v_loss_start": res.losses[0], "v_loss_end": res.losses[-1], "steps": res.steps,
                "delta_norm": written.written_norm, "intended_norm": written.intended_norm,
                "write_error": written.error, "residual": residual, "uk": float(u @ key.to(u)), "fast": res.fast}
