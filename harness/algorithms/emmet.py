"""``emmet``: Equality-constrained Mass Model Editing (Gupta et al. 2024), docs/algorithms/emmet.md.

Akshat Gupta, Dev Sajnani, Gopala Anumanchipalli, "A Unified Framework for Model Editing" (2024;
EMMET is its batched generalisation of ROME's equality constraint). MEMIT's targets, keys, layer
spread and statistics (memit.py), with the per-layer solve replaced by

    Δ = R (Kᵀ A⁻¹ K + λI)⁻¹ Kᵀ A⁻¹,   A = aC + μI        (``solve.emmet_delta``, float64)

the smallest change (in the norm ``tr(Δ A Δᵀ)`` that protects ordinary keys) whose values at the
edited keys move by exactly ``R`` (``Δ K = R``), up to λ, which keeps the n×n system ``Kᵀ A⁻¹ K``
well conditioned for large batches and is applied only when n > 1 (as the reference does). For one
key and one layer this is ROME's update. MEMIT instead trades the edited keys' residual against the
preservation term (``‖ΔK − R‖² + λ tr(ΔCΔᵀ)``); EMMET keeps the edits as constraints.

Like MEMIT, the instance holds no edit-dependent state; C and the templates come from the base
model (``prepare``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harness.algorithms.base import register
from harness.algorithms.memit import Memit, SpreadHparams
from harness.algorithms.solve import emmet_delta
from harness.models import ModelSpec


@dataclass
class EmmetHparams(SpreadHparams):
    """EMMET: MEMIT's shared fields (``SpreadHparams``; SmolLM2-135M's defaults, evidence in
    conf/algorithm/emmet.yaml) plus the three weights of the solve.

    Attributes:
        mom2_update_weight: a > 0, the weight of C in ``A = aC + μI`` (the reference's name; with
            μ = 0 it only rescales λ: the solve depends on a·λ).
        emmet_lambda: λ >= 0 added to the diagonal of ``Kᵀ A⁻¹ K`` when a batch has more than one
            edit (the reference's 0.1).
        update_norm_lambda: μ >= 0, a ridge on A that also penalises ``‖Δ‖²`` (the reference's 0).
    """

    mom2_update_weight: float = 1.0
    emmet_lambda: float = 0.1
    update_norm_lambda: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.mom2_update_weight > 0:
            raise ValueError(f"mom2_update_weight must be > 0, got {self.mom2_update_weight}")
        if self.emmet_lambda < 0:
            raise ValueError(f"emmet_lambda must be >= 0, got {self.emmet_lambda}")
        if self.update_norm_lambda < 0:
            raise ValueError(f"update_norm_lambda must be >= 0, got {self.update_norm_lambda}")


@register("emmet")
class Emmet(Memit):
    """EMMET batch editing (see module docstring). Holds no edit-dependent state."""

    Hparams = EmmetHparams

    def _layer_delta(self, model: nn.Module, tok: Any, spec: ModelSpec, layer: int, keys: torch.Tensor,
                     resid: torch.Tensor) -> torch.Tensor:
        """Δ_i [d, d_ff] float64 for one layer: EMMET's equality-constrained solve against C_i."""
        hp = self.hparams
        cov = self.stats.get(model, tok, spec, layer, hp.stats)
        return emmet_delta(keys, resid, cov, hp.mom2_update_weight, hp.emmet_lambda, hp.update_norm_lambda)
