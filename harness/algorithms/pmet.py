"""``pmet``: Precise Model Editing in a Transformer (Li et al., AAAI 2024), docs/algorithms/pmet.md.

Xiaopeng Li, Shasha Li, Shezheng Song, Jing Yang, Jun Ma, Jie Yu, "PMET: Precise Model Editing in
a Transformer". The block output is the residual plus two components, the attention output and the
FFN (MLP) output. PMET optimises targets for both components at once and edits the FFN weights with
the FFN's share only:

1. Per request, two vectors δ_attn and δ_mlp, added at the subject's last token to the outputs of
   the attention module and of the MLP of the last edit layer ``l_L``, are optimised together with
   the loss of ROME/MEMIT's target optimisation (target.py: the target NLL over the context
   templates, the KL term) and a weight decay per component,
   ``Σ_c weight_decay·‖δ_c‖/‖v_c‖²``; each δ_c is clamped to ``clamp_norm_factor·‖v_c‖`` of its own
   initial value v_c. ``Z_mlp = V_mlp + Δ_mlp`` [d, n] are the FFN targets; the attention targets
   are reported (their norms) but not written, as in the reference.
2. Per layer ``l_i`` in increasing order (memit.py's loop): keys as MEMIT's; ``H`` = the MLP output
   of layer ``l_L`` at the subject's last token of the bare prompts, recomputed each layer;
   ``R_i = (Z_mlp − H) / sqrt(L − i + 1)`` (the reference's square-root spread);
   ``Δ_i = R_i K_iᵀ (λC_i + K_iK_iᵀ)⁻¹`` (``solve.memit_delta``), written at once.

The two-site optimisation is target.py's (``optimize_targets(..., where="attn+mlp")``): the same
rows, fast path, replay, loss and Adam loop as MEMIT's, with the decay and the clamp per site.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harness.algorithms.base import register
from harness.algorithms.memit import Memit, MemitHparams, outputs_at_subject
from harness.algorithms.target import optimize_targets
from harness.models import ModelSpec
from harness.types import EditRequest

log = logging.getLogger(__name__)


@dataclass
class PmetHparams(MemitHparams):
    """PMET: MEMIT's fields (``mom2_update_weight`` λ of the same solve); the defaults are SmolLM2-135M's
    (evidence in conf/algorithm/pmet.yaml). ``target.*`` applies to both components: ``weight_decay``
    and ``clamp_norm_factor`` per component against its own initial norm."""


@register("pmet")
class Pmet(Memit):
    """PMET batch editing (see module docstring). Holds no edit-dependent state."""

    Hparams = PmetHparams

    def __init__(self, hparams: Any = None, **overrides: Any) -> None:
        super().__init__(hparams, **overrides)
        self._z_info: dict[str, float] = {}  # the last batch's target norms, handed to the report

    def _current(self, model: nn.Module, tok: Any, spec: ModelSpec, requests: Sequence[EditRequest]) -> torch.Tensor:
        """H [d, n]: the MLP output of the last edit layer at the subject's last token of the bare prompts."""
        return outputs_at_subject(model, tok, spec.mlp.format(self.hparams.layers[-1]), requests)

    @staticmethod
    def _share(err: torch.Tensor, layers_left: int) -> torch.Tensor:
        """The reference's square-root spread: ``err / sqrt(layers_left)``."""
        return err / math.sqrt(layers_left)

    def _optimize_z(self, model: nn.Module, tok: Any, spec: ModelSpec, requests: Sequence[EditRequest],
                    templates: list[list[str]]) -> tuple[torch.Tensor, dict[str, float]]:
        """Z_mlp [d, n] from the two-site optimisation, and loss and norm summaries."""
        hp = self.hparams
        cols, start, end, attn_norm, mlp_norm = [], [], [], [], []
        t = time.perf_counter()
        for i in range(0, len(requests), hp.z_batch_size):
            chunk = requests[i:i + hp.z_batch_size]
            for res in optimize_targets(model, tok, spec, chunk, hp.layers[-1], hp.target, templates,
                                        where="attn+mlp", fast=hp.fast_path):
                d_attn, d_mlp = res.delta.float().chunk(2)
                _, z_mlp = res.target.float().chunk(2)
                cols.append(z_mlp)
                start.append(res.losses[0])
                end.append(res.losses[-1])
                attn_norm.append(float(d_attn.norm()))
                mlp_norm.append(float(d_mlp.norm()))
        n = len(requests)
        log.debug("%s: targets of %d requests in %.1fs", self.name, n, time.perf_counter() - t)
        self._z_info = {"attn_delta_norm": sum(attn_norm) / n, "mlp_delta_norm": sum(mlp_norm) / n}
        losses = {"z_loss_start": sum(start) / n, "z_loss_end": sum(end) / n, "z_loss_end_max": max(end)}
        return torch.stack(cols, dim=1), losses

    def _after_batch(self, model: nn.Module, tok: Any, spec: ModelSpec, requests: Sequence[EditRequest],
                     templates: list[list[str]], keys: dict[int, torch.Tensor]) -> dict[str, Any]:
        """The mean ‖δ_attn‖ and ‖δ_mlp‖ of this batch's targets (``info``); only δ_mlp is written."""
        info, self._z_info = self._z_info, {}
        return info
