"""EMMET: the equality-constrained solve against a direct computation, and the algorithm on tiny models."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_hparams

from harness import EditRequest
from harness.algorithms import create
from harness.algorithms.solve import emmet_delta, memit_delta
from harness.editor import Editor
from harness.models import model_spec

F64 = torch.float64


def _problem(seed: int = 0, d: int = 12, d_ff: int = 40, n: int = 6, n_pre: int = 300):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(d_ff, n, generator=g, dtype=F64)
    resid = torch.randn(d, n, generator=g, dtype=F64)
    pre = torch.randn(d_ff, n_pre, generator=g, dtype=F64) * torch.linspace(0.2, 3.0, d_ff, dtype=F64)[:, None]
    return keys, resid, pre @ pre.T / n_pre  # C: count-normalised, full rank, anisotropic


def _direct(keys, resid, cov, a, lam, mu):
    """R (Kᵀ A⁻¹ K + λI)⁻¹ Kᵀ A⁻¹ with explicit inverses, A = aC + μI."""
    a_inv = torch.linalg.inv(a * cov + mu * torch.eye(cov.shape[0], dtype=F64))
    d = keys.T @ a_inv @ keys
    if keys.shape[1] > 1:
        d = d + lam * torch.eye(keys.shape[1], dtype=F64)
    return resid @ torch.linalg.inv(d) @ keys.T @ a_inv


@pytest.mark.parametrize("a,lam,mu", [(1.0, 0.1, 0.0), (1000.0, 0.1, 0.0), (1.0, 5.0, 0.0), (3.0, 0.5, 0.2)])
def test_emmet_matches_the_direct_formula(a, lam, mu):
    keys, resid, cov = _problem()
    delta = emmet_delta(keys, resid, cov, a, lam, mu)
    assert delta.dtype == F64 and delta.shape == (resid.shape[0], keys.shape[0])
    want = _direct(keys, resid, cov, a, lam, mu)
    assert torch.allclose(delta, want, rtol=1e-9, atol=1e-10)


def test_emmet_without_lambda_meets_the_constraints_with_the_smallest_change():
    """λ = 0: ΔK = R exactly, and any other Δ' with Δ'K = R has a larger tr(Δ' C Δ'ᵀ)."""
    keys, resid, cov = _problem(n=8)
    delta = emmet_delta(keys, resid, cov, 1.0, 0.0)
    assert torch.allclose(delta @ keys, resid, atol=1e-9)
    cost = float(torch.trace(delta @ cov @ delta.T))
    g = torch.Generator().manual_seed(1)
    proj = torch.eye(keys.shape[0], dtype=F64) - keys @ torch.linalg.pinv(keys)  # N proj: (N proj) K = 0
    for _ in range(5):
        other = delta + torch.randn(delta.shape, generator=g, dtype=F64) @ proj
        assert torch.allclose(other @ keys, resid, atol=1e-9)
        assert float(torch.trace(other @ cov @ other.T)) > cost


def test_emmet_one_key_is_romes_closed_form_and_ignores_lambda():
    keys, resid, cov = _problem(n=1)
    c_inv_k = torch.linalg.solve(cov, keys)  # [d_ff, 1]
    rome = resid @ c_inv_k.T / float(keys.T @ c_inv_k)
    for lam in (0.0, 0.1, 100.0):
        assert torch.allclose(emmet_delta(keys, resid, cov, 1.0, lam), rome, rtol=1e-9, atol=1e-12)


def test_emmet_weight_of_c_only_rescales_lambda():
    keys, resid, cov = _problem(seed=2)
    assert torch.allclose(emmet_delta(keys, resid, cov, 1000.0, 0.1), emmet_delta(keys, resid, cov, 1.0, 100.0),
                          rtol=1e-9, atol=1e-12)


def test_emmet_is_exact_where_memit_is_not():
    """On the same problem MEMIT leaves part of R unwritten (its λ trades it off); EMMET does not."""
    keys, resid, cov = _problem(n=4)
    memit = memit_delta(keys, resid, cov, 50.0)
    emmet = emmet_delta(keys, resid, cov, 1.0, 0.0)
    miss = lambda dl: float((dl @ keys - resid).norm() / resid.norm())  # noqa: E731
    assert miss(memit) > 0.05 and miss(emmet) < 1e-9


def test_emmet_rejects_bad_inputs():
    keys, resid, cov = _problem()
    with pytest.raises(ValueError, match="mom2_update_weight"):
        emmet_delta(keys, resid, cov, 0.0)
    with pytest.raises(ValueError, match="emmet_lambda"):
        emmet_delta(keys, resid, cov, 1.0, -1.0)
    with pytest.raises(ValueError, match="columns"):
        emmet_delta(keys, resid[:, :2], cov)
    with pytest.raises(ValueError, match="rows"):
        emmet_delta(keys, resid, cov[:5, :5])


# ----------------------------------------------------------------------------------------------
# the algorithm on the tiny models

REQS = (
    EditRequest("a", "{} plays the sport of", "LeBron James", "football", "basketball"),
    EditRequest("b", "The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_emmet_tiny_writes_the_layer_share_exactly(arch, tiny, tiny_gpt2, tmp_path):
    """With λ = 0 each layer's unrounded update delivers its share R_i at the edited keys exactly
    (MEMIT's leaves a residual), only the declared weights change, and the z error shrinks."""
    model, tok = tiny if arch == "llama" else tiny_gpt2
    alg = create("emmet", {**tiny_hparams("emmet", tmp_path), "emmet_lambda": 0.0})
    spec = model_spec(model)
    declared = alg.targets(model, REQS)
    assert declared == {spec.mlp_out_weight(0), spec.mlp_out_weight(1)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = Editor(model, tok, alg, keep_original_weight=False).edit(REQS).report
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == declared
    for layer in (0, 1):
        assert report.info[f"residual_unrounded.{layer}"] < 1e-6
        assert report.info[f"residual.{layer}"] < 1e-3  # float32 rounding only
    assert report.info["z_error.final"] < 0.6 * report.info["z_error.0"]
    assert all(math.isfinite(v) for v in report.losses.values())


def test_emmet_hparams_validated():
    with pytest.raises(ValueError, match="mom2_update_weight"):
        create("emmet", {"mom2_update_weight": 0.0})
    with pytest.raises(ValueError, match="emmet_lambda"):
        create("emmet", {"emmet_lambda": -0.1})
    with pytest.raises(ValueError, match="update_norm_lambda"):
        create("emmet", {"update_norm_lambda": -1.0})
    with pytest.raises(ValueError, match="strictly increasing"):
        create("emmet", {"layers": [3, 2]})
