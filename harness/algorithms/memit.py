"""``memit``: Mass-Editing Memory in a Transformer (Meng et al., ICLR 2023), docs/algorithms/memit.md.

One ``apply`` edits a batch of n requests across layers ``l_1 < ... < l_L``:

1. Per request, a target hidden state ``z_j`` at the block output of the last edit layer ``l_L``
   (``target.optimize_targets(..., where="block")``, ``z_batch_size`` requests per batch): ``Z`` [d, n].
2. Per layer ``l_i`` in increasing order, on the current, partially edited model:
   ``K_i`` = template-averaged keys (input of the MLP output projection at the subject's last
   token; two template groups ``[["{}"], [5 samples of length 10]]`` averaged within, then
   across groups), ``H`` = block-``l_L`` output at the subject's last token of the bare prompts
   (recomputed each layer), ``R_i = (Z − H) / (L − i + 1)``,
   ``Δ_i = R_i K_iᵀ (λC_i + K_iK_iᵀ)⁻¹`` (``solve.memit_delta``, float64), written at once with
   ``write_deltas`` (``W + Δ_i`` rounded once to the weight's dtype) so that later layers see it.

The report gives the z losses, the norm written per layer (``delta_norms``) with the intended norm
and the relative error of the written change (``info["intended_norm.<name>"]``,
``info["write_error.<name>"]``), the z error ‖Z − H‖ before each layer's update and after the last
(``info["z_error.<layer>"]``, ``info["z_error.final"]``; it should shrink), per layer
``info["residual.<layer>"] = ‖(W_written − W) K − R‖ / ‖R‖`` (the part of the layer's intended
change at its keys that the stored matrix fails to deliver) next to ``residual_unrounded.<layer>``,
the same for the unrounded Δ (what the regularised solve itself leaves; the difference is rounding),
and timings.

C per layer and the context templates are computed once per instance from the model as it is at
first use (in the runner's flows: the unedited model) and kept in the instance (``StatsCache``,
``TemplateCache``); they are not *state*, since they depend only on the base model. A sequential
run that resumes from a checkpoint must call ``prepare(model, tok)`` on the base model before
``Editor.load_checkpoint``; otherwise they would come from the edited model.

``AlphaEdit`` (alphaedit.py) and ``Emmet`` (emmet.py) subclass ``Memit`` and replace the per-layer solve;
``Pmet`` (pmet.py) also replaces the targets, what they are compared with, and the share per layer.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from harness.algorithms.base import EditAlgorithm, register, write_deltas
from harness.algorithms.hooks import model_device, module_output
from harness.algorithms.hparams import build_blocks
from harness.algorithms.locate import TemplateCache, TemplateHparams, compute_keys, subject_last_index
from harness.algorithms.solve import as_map, key_residual, memit_delta, to_param_layout
from harness.algorithms.stats import StatsCache, StatsConfig
from harness.algorithms.target import TargetHparams, optimize_targets
from harness.models import ModelSpec, get_module, model_spec, num_layers
from harness.tokens import encode_right_padded
from harness.types import EditReport, EditRequest

log = logging.getLogger(__name__)


def _default_layers() -> list[int]:
    # SmolLM2-135M (30 layers): the Llama anchors' 4-8 of 32, scaled (see conf/algorithm/memit.yaml).
    return [3, 4, 5, 6, 7]


def _default_stats() -> StatsConfig:
    # 256 x 128 tokens = 32.8k keys per layer, 21x SmolLM2's d_ff (conf/algorithm/memit.yaml).
    return StatsConfig(n_samples=256)


def _default_templates() -> TemplateHparams:
    # MEMIT's second group: 5 samples of 10 tokens (the first group is the bare "{}").
    return TemplateHparams(length_params=[[10, 5]])


@dataclass
class SpreadHparams:
    """Fields MEMIT and AlphaEdit share. The defaults are SmolLM2-135M's tuned values (the default
    model; evidence in conf/algorithm/memit.yaml); other model families change some of them in
    conf/algorithm_family/<algorithm>/<family>.yaml.

    Attributes:
        layers: edited layers, strictly increasing; z is optimised at the block output of the last.
        fast_path: run the prompts up to the subject once (KV cache) and, each step, only the tokens
            from the subject on (same result).
        z_batch_size: requests whose z are optimised together in one batch (same result as one at a
            time; larger is faster and takes more memory).
        target: the z optimisation (``target.TargetHparams``; docs/algorithms/target-optimisation.md, with MEMIT's
            differences); ``loss_layer`` None means the last layer.
        stats: ``stats.StatsConfig`` of C = E[k kᵀ] (count-normalised; ``ridge`` is not used here).
        templates: ``locate.TemplateHparams`` of the second template group (all samples of
            ``length_params``; the first group is the bare ``"{}"``), MEMIT's ``[[10, 5]]``.
    """

    layers: list[int] = field(default_factory=_default_layers)
    fast_path: bool = True
    z_batch_size: int = 16
    target: TargetHparams = field(default_factory=TargetHparams)
    stats: StatsConfig = field(default_factory=_default_stats)
    templates: TemplateHparams = field(default_factory=_default_templates)

    def __post_init__(self) -> None:
        build_blocks(self)
        self.layers = [int(x) for x in self.layers]
        if self.z_batch_size < 1:
            raise ValueError(f"z_batch_size must be >= 1, got {self.z_batch_size}")
        if not self.layers:
            raise ValueError("layers must name at least one layer")
        if self.layers[0] < 0 or any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            raise ValueError(f"layers must be non-negative and strictly increasing, got {self.layers}")
        if self.target.loss_layer is not None and self.target.loss_layer < self.layers[-1]:
            raise ValueError(f"target.loss_layer ({self.target.loss_layer}) must be >= the last edit layer")


@dataclass
class MemitHparams(SpreadHparams):
    """MEMIT: the shared fields plus ``mom2_update_weight`` λ, the weight of λ·tr(ΔCΔᵀ) (the anchors'
    15000 for Llama, 20000 for GPT-2 XL; 2000 for SmolLM2, conf/algorithm/memit.yaml)."""

    mom2_update_weight: float = 2000.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mom2_update_weight < 0:
            raise ValueError(f"mom2_update_weight must be >= 0, got {self.mom2_update_weight}")


@torch.no_grad()
def outputs_at_subject(model: nn.Module, tok: Any, module: str, requests: Sequence[EditRequest]) -> torch.Tensor:
    """The output of ``module`` (a full module name) at the subject's last token of each bare rewrite prompt.

    Returns:
        [d, n] float32 on the model's device.
    """
    idx = [subject_last_index(tok, r.prompt, r.subject) for r in requests]
    enc = encode_right_padded(tok, [r.rewrite_prompt for r in requests], model_device(model))
    hidden = module_output(model, get_module(model, module), **enc, use_cache=False)
    rows = torch.arange(len(idx), device=hidden.device)
    return hidden[rows, torch.tensor(idx, device=hidden.device)].float().T


def block_outputs(model: nn.Module, tok: Any, spec: ModelSpec, layer: int,
                  requests: Sequence[EditRequest]) -> torch.Tensor:
    """H: the block-``layer`` output at the subject's last token of each bare rewrite prompt.

    Returns:
        [d, n] float32 on the model's device.
    """
    return outputs_at_subject(model, tok, spec.layer.format(layer), requests)


@register("memit")
class Memit(EditAlgorithm):
    """MEMIT batch editing (see module docstring). Holds no edit-dependent state."""

    Hparams = MemitHparams

    def __init__(self, hparams: Any = None, **overrides: Any) -> None:
        super().__init__(hparams, **overrides)
        self.templates = TemplateCache()  # from the model at first use (the unedited one); survives restores
        self.stats = StatsCache()  # C per layer, likewise

    # -- contract ----------------------------------------------------------------------------
    def targets(self, model: nn.Module, requests: Sequence[EditRequest]) -> set[str]:
        spec, n = model_spec(model), num_layers(model)
        bad = [layer for layer in self.hparams.layers if not 0 <= layer < n]
        if bad:
            raise ValueError(f"{self.name}: hparam layers={list(self.hparams.layers)} includes {bad}; "
                             f"the model has layers 0..{n - 1}")
        return {spec.mlp_out_weight(layer) for layer in self.hparams.layers}

    def prepare(self, model: nn.Module, tok: Any) -> None:
        """Compute what depends only on the base model (templates, C per layer) now.

        ``apply`` calls it; call it yourself on the unedited model before ``Editor.load_checkpoint``
        when resuming a sequential run.
        """
        self._check_layers(model)
        self._context_templates(model, tok)
        self.stats.get_many(model, tok, model_spec(model), self.hparams.layers, self.hparams.stats)

    def apply(self, model: nn.Module, tok: Any, requests: Sequence[EditRequest]) -> EditReport:
        t_start = time.perf_counter()
        hp = self.hparams
        spec = model_spec(model)
        declared = self.targets(model, requests)
        params = dict(model.named_parameters())
        info: dict[str, Any] = {"n_requests": len(requests)}

        t = time.perf_counter()
        self.prepare(model, tok)
        templates = self._context_templates(model, tok)
        info["t_prepare"] = time.perf_counter() - t
        info.update(self.stats.describe(spec, hp.layers, hp.stats))  # where C came from

        t = time.perf_counter()
        z, losses = self._optimize_z(model, tok, spec, requests, templates)
        info["t_z"] = time.perf_counter() - t

        t = time.perf_counter()
        norms: dict[str, float] = {}
        layer_keys: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(hp.layers):
            name = spec.mlp_out_weight(layer)
            dev = params[name].device  # a model spread over devices: solve where the weight is
            keys = compute_keys(model, tok, spec, layer, requests, templates).T.to(dev)  # [d_ff, n]
            layer_keys[layer] = keys
            err = z.to(dev) - self._current(model, tok, spec, requests).to(dev)  # [d, n]
            info[f"z_error.{layer}"] = float(err.norm())
            resid = self._share(err, len(hp.layers) - i)
            delta = self._layer_delta(model, tok, spec, layer, keys, resid)
            w_old = as_map(params[name], spec.out_transposed)
            written = write_deltas(model, {name: to_param_layout(delta, params[name], spec.out_transposed)}, declared)
            norms.update(written.norms)
            info.update(written.info())
            info[f"residual.{layer}"] = key_residual(as_map(params[name], spec.out_transposed) - w_old, keys, resid)
            info[f"residual_unrounded.{layer}"] = key_residual(delta, keys, resid)
            log.info("%s layer %d: |Z-H| %.4g, |delta| %.4g written (%.4g intended), residual %.3g (unrounded %.3g)",
                     self.name, layer, info[f"z_error.{layer}"], norms[name], info[f"intended_norm.{name}"],
                     info[f"residual.{layer}"], info[f"residual_unrounded.{layer}"])
        info["z_error.final"] = float((z - self._current(model, tok, spec, requests).to(z.device)).norm())
        info["t_layers"] = time.perf_counter() - t

        t = time.perf_counter()
        info.update(self._after_batch(model, tok, spec, requests, templates, layer_keys))
        info["t_after"] = time.perf_counter() - t
        return EditReport(seconds=time.perf_counter() - t_start, losses=losses, delta_norms=norms, info=info)

    # -- pieces AlphaEdit, EMMET and PMET reuse or override ---------------------------------------
    def _current(self, model: nn.Module, tok: Any, spec: ModelSpec, requests: Sequence[EditRequest]) -> torch.Tensor:
        """H [d, n]: what the targets Z are compared with on the current model (block output at the last layer)."""
        return block_outputs(model, tok, spec, self.hparams.layers[-1], requests)

    @staticmethod
    def _share(err: torch.Tensor, layers_left: int) -> torch.Tensor:
        """R_i: the part of the gap ``err`` [d, n] this layer takes when ``layers_left`` layers remain (it included)."""
        return err / layers_left

    def _layer_delta(self, model: nn.Module, tok: Any, spec: ModelSpec, layer: int, keys: torch.Tensor,
                     resid: torch.Tensor) -> torch.Tensor:
        """Δ_i [d, d_ff] float64 for one layer: MEMIT's solve against λC_i."""
        cov = self.stats.get(model, tok, spec, layer, self.hparams.stats)
        return memit_delta(keys, resid, cov, self.hparams.mom2_update_weight)

    def _after_batch(self, model: nn.Module, tok: Any, spec: ModelSpec, requests: Sequence[EditRequest],
                     templates: list[list[str]], keys: dict[int, torch.Tensor]) -> dict[str, Any]:
        """Runs after all layers are written (AlphaEdit accumulates C_p here). Returns report info.

        ``keys[layer]`` holds the keys K [d_ff, n] the layer loop solved with. They are also the
        keys of the fully edited model: the input of layer l's down projection depends only on the
        blocks below l and on layer l's own attention and up/gate projections, and the loop writes
        layer l's down projection after computing them, layers in increasing order.
        """
        return {}

    def _check_layers(self, model: nn.Module) -> None:
        n = num_layers(model)
        bad = [x for x in self.hparams.layers if x >= n]
        loss_layer = self.hparams.target.loss_layer
        if bad or (loss_layer is not None and loss_layer >= n):
            raise ValueError(f"{self.name}: layers {bad or [loss_layer]} do not exist; "
                             f"the model has {n} layers")

    def _context_templates(self, model: nn.Module, tok: Any) -> list[list[str]]:
        """MEMIT's two groups ``[["{}"], [samples]]`` (one group when no samples are asked for)."""
        hp = self.hparams
        flat = self.templates.get(model, tok, hp.templates.length_params, hp.templates.seed)
        return [flat[:1], flat[1:]] if len(flat) > 1 else [flat]

    def _optimize_z(self, model: nn.Module, tok: Any, spec: ModelSpec, requests: Sequence[EditRequest],
                    templates: list[list[str]]) -> tuple[torch.Tensor, dict[str, float]]:
        """Z [d, n]: the optimised block-output targets at the last layer, and loss summaries."""
        hp = self.hparams
        cols, start, end = [], [], []
        for i in range(0, len(requests), hp.z_batch_size):
            chunk = requests[i:i + hp.z_batch_size]
            for req, res in zip(chunk, optimize_targets(model, tok, spec, chunk, hp.layers[-1], hp.target, templates,
                                                        where="block", fast=hp.fast_path)):
                cols.append(res.target.float())
                start.append(res.losses[0])
                end.append(res.losses[-1])
                log.debug("%s z %s: loss %.3f -> %.3f in %d steps", self.name, req.case_id, res.losses[0],
                          res.losses[-1], res.steps)
        n = len(requests)
        losses = {"z_loss_start": sum(start) / n, "z_loss_end": sum(end) / n, "z_loss_end_max": max(end)}
        return torch.stack(cols, dim=1), losses
