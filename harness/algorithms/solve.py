"""The closed-form weight solves of MEMIT, EMMET and AlphaEdit, as pure functions on tensors.

Notation follows docs/algorithms/memit.md and docs/algorithms/alphaedit.md: the edited map is
``v = W k`` with ``W`` of shape [d, d_ff]; ``K`` [d_ff, n] holds one key per column, ``R`` [d, n]
the residual each key's value must move by, ``C`` [d_ff, d_ff] the count-normalised second moment
E[k kᵀ] of preserved keys.

* MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer"):
  ``Δ = R Kᵀ (λC + K Kᵀ)⁻¹``, the minimiser of ``‖ΔK − R‖² + λ tr(Δ C Δᵀ)``.
* EMMET (Gupta et al. 2024, "A Unified Framework for Model Editing"): the equality-constrained
  batch form of ROME, the minimiser of ``tr(Δ A Δᵀ)`` subject to ``Δ K = R`` with ``A = aC + μI``:
  ``Δ = R (Kᵀ A⁻¹ K + λI)⁻¹ Kᵀ A⁻¹`` (λ only for n > 1, to keep the n×n system well conditioned).
* AlphaEdit (Fang et al. 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing"):
  ``Δ = Xᵀ`` with ``X = [P (K Kᵀ + C_p) + αI]⁻¹ P K Rᵀ``, where ``P`` projects onto the
  (near-)null space of C, so ``Δ k0 ≈ 0`` for preserved keys ``k0``.

Everything is computed in float64 (on the device of the inputs) and handed to ``base.write_deltas``
in float64, which adds it to the weight and rounds once to the weight's dtype. No explicit inverse
is formed. ``key_residual`` measures how much of an intended change at the edited keys a written
matrix delivers.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

_F64 = torch.float64


def _check_2d(name: str, t: torch.Tensor, rows: int | None = None, cols: int | None = None) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} has {t.shape[0]} rows, expected {rows}")
    if cols is not None and t.shape[1] != cols:
        raise ValueError(f"{name} has {t.shape[1]} columns, expected {cols}")


def solve_spd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve ``a x = b`` for a symmetric positive (semi-)definite ``a``.

    Cholesky when ``a`` is numerically positive definite, LU (``torch.linalg.solve``) otherwise.

    Args:
        a: [m, m] symmetric matrix.
        b: [m, k] right-hand side.

    Returns:
        x: [m, k], in the dtype of the inputs.
    """
    a = 0.5 * (a + a.T)  # exact symmetry for Cholesky
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, chol)
    log.debug("solve_spd: Cholesky failed at minor %d; falling back to LU", int(info))
    return torch.linalg.solve(a, b)


def memit_delta(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, lam: float) -> torch.Tensor:
    """MEMIT's update ``Δ = R Kᵀ (λC + K Kᵀ)⁻¹`` in float64.

    Solves the symmetric system ``(λC + K Kᵀ) X = K`` and returns ``Δ = R Xᵀ``.

    Args:
        keys: K, [d_ff, n].
        resid: R, [d, n].
        cov: C, [d_ff, d_ff], symmetric positive semi-definite.
        lam: λ >= 0 (``mom2_update_weight``). With λ = 0 and n <= d_ff independent keys, ΔK = R.

    Returns:
        Δ: [d, d_ff] float64, on the device of ``keys``.

    Raises:
        ValueError: mismatched shapes or negative λ.
    """
    _check_2d("keys", keys)
    d_ff, n = keys.shape
    _check_2d("resid", resid, cols=n)
    _check_2d("cov", cov, rows=d_ff, cols=d_ff)
    if lam < 0:
        raise ValueError(f"λ (mom2_update_weight) must be >= 0, got {lam}")
    k = keys.to(_F64)
    a = lam * cov.to(device=k.device, dtype=_F64) + k @ k.T
    x = solve_spd(a, k)  # [d_ff, n] = (λC + KKᵀ)⁻¹ K
    return resid.to(device=k.device, dtype=_F64) @ x.T


def emmet_delta(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, cov_weight: float = 1.0,
                emmet_lambda: float = 0.1, ridge: float = 0.0) -> torch.Tensor:
    """EMMET's update ``Δ = R (Kᵀ A⁻¹ K + λI)⁻¹ Kᵀ A⁻¹`` with ``A = aC + μI``, in float64.

    With λ = 0 this is the smallest change in the ``A`` norm (``tr(Δ A Δᵀ)``) that satisfies the
    equality constraints ``Δ K = R`` exactly; for one key it is ROME's closed form
    ``r (A⁻¹k)ᵀ / (kᵀA⁻¹k)``. λ > 0 (applied only when n > 1, as the reference does) trades exactness
    at the edited keys for a well-conditioned n×n system when keys are nearly collinear. Since
    ``(Kᵀ(aC)⁻¹K + λI)⁻¹ Kᵀ(aC)⁻¹ = (KᵀC⁻¹K + aλI)⁻¹ KᵀC⁻¹``, ``a`` only rescales λ when μ = 0.

    Computed without an explicit inverse: ``X = A⁻¹K`` (``solve_spd``), ``D = KᵀX + λI``,
    ``Δ = R (D⁻¹ Xᵀ)`` (``solve_spd`` again).

    Args:
        keys: K, [d_ff, n].
        resid: R, [d, n].
        cov: C, [d_ff, d_ff], symmetric positive definite (or made so by μ).
        cov_weight: a > 0 (the reference's ``mom2_update_weight``).
        emmet_lambda: λ >= 0 (the reference's ``emmet_lambda``).
        ridge: μ >= 0 (the reference's ``update_norm_lambda``).

    Returns:
        Δ: [d, d_ff] float64, on the device of ``keys``.

    Raises:
        ValueError: mismatched shapes, a <= 0, or a negative λ or μ.
    """
    _check_2d("keys", keys)
    d_ff, n = keys.shape
    _check_2d("resid", resid, cols=n)
    _check_2d("cov", cov, rows=d_ff, cols=d_ff)
    if not cov_weight > 0:
        raise ValueError(f"a (mom2_update_weight) must be > 0, got {cov_weight}")
    if emmet_lambda < 0 or ridge < 0:
        raise ValueError(f"λ (emmet_lambda) and μ (update_norm_lambda) must be >= 0, got {emmet_lambda}, {ridge}")
    k = keys.to(_F64)
    a = cov_weight * cov.to(device=k.device, dtype=_F64)
    if ridge:
        a = a + ridge * torch.eye(d_ff, dtype=_F64, device=k.device)
    x = solve_spd(a, k)  # [d_ff, n] = A⁻¹ K
    d = k.T @ x  # [n, n] = Kᵀ A⁻¹ K
    if n > 1 and emmet_lambda:
        d = d + emmet_lambda * torch.eye(n, dtype=_F64, device=k.device)
    return resid.to(device=k.device, dtype=_F64) @ solve_spd(d, x.T)


def nullspace_projector(cov: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """AlphaEdit's projector onto the span of C's eigenvectors with eigenvalue below ``threshold``.

    ``C = U S Uᵀ`` (``eigh`` in float64 on the CPU; for a symmetric PSD matrix the singular
    values the reference takes from an SVD are the absolute eigenvalues). ``Û`` = columns of U
    with ``|s| < threshold`` (an absolute threshold), ``P = Û Ûᵀ``.

    Args:
        cov: C, [d_ff, d_ff] symmetric.
        threshold: absolute eigenvalue threshold (AlphaEdit's ``nullspace_threshold``, 2e-2).

    Returns:
        (P [d_ff, d_ff] float64 on the CPU, number of kept dimensions = rank of P).
    """
    _check_2d("cov", cov, rows=cov.shape[0], cols=cov.shape[0])
    c = cov.detach().to(device="cpu", dtype=_F64)
    evals, evecs = torch.linalg.eigh(0.5 * (c + c.T))
    keep = evals.abs() < threshold
    u = evecs[:, keep]
    return u @ u.T, int(keep.sum())


def alphaedit_delta(keys: torch.Tensor, resid: torch.Tensor, proj: torch.Tensor, cp: torch.Tensor | None,
                    alpha: float | torch.Tensor) -> torch.Tensor:
    """AlphaEdit's update ``Δ = Xᵀ``, ``X = [P (K Kᵀ + C_p) + αI]⁻¹ P K Rᵀ``, in float64.

    Args:
        keys: K, [d_ff, n].
        resid: R, [d, n].
        proj: P, [d_ff, d_ff] (a projector; the identity reduces the method to a ridge solve).
        cp: C_p, [d_ff, d_ff], the unnormalised Σ kkᵀ of keys edited earlier; None means zero.
        alpha: the ridge α (AlphaEdit's ``L2``), or a [d_ff, d_ff] matrix used in place of αI
            (with P = I, C_p = 0 and λC here the result equals ``memit_delta``).

    Returns:
        Δ: [d, d_ff] float64, on the device of ``keys``.
    """
    _check_2d("keys", keys)
    d_ff, n = keys.shape
    _check_2d("resid", resid, cols=n)
    _check_2d("proj", proj, rows=d_ff, cols=d_ff)
    dev = keys.device
    k = keys.to(_F64)
    p = proj.to(device=dev, dtype=_F64)
    m = k @ k.T
    if cp is not None:
        _check_2d("cp", cp, rows=d_ff, cols=d_ff)
        m = m + cp.to(device=dev, dtype=_F64)
    if isinstance(alpha, torch.Tensor):
        _check_2d("alpha", alpha, rows=d_ff, cols=d_ff)
        reg = alpha.to(device=dev, dtype=_F64)
    else:
        if alpha < 0:
            raise ValueError(f"α (L2) must be >= 0, got {alpha}")
        reg = alpha * torch.eye(d_ff, dtype=_F64, device=dev)
    rhs = p @ (k @ resid.to(device=dev, dtype=_F64).T)  # [d_ff, d]
    x = torch.linalg.solve(p @ m + reg, rhs)  # not symmetric in general: LU
    return x.T


def to_param_layout(delta: torch.Tensor, like: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Lay a [d, d_ff] update out like a stored weight, on its device, keeping the update's dtype.

    The dtype is left alone on purpose: ``write_deltas`` adds in float32/float64 and rounds the sum
    once, instead of rounding the update on its own first.

    Args:
        delta: Δ in the mathematical orientation [d, d_ff] (float64 from the solves).
        like: the parameter it will be added to.
        transposed: True when the parameter stores Wᵀ ([d_ff, d], GPT-2 Conv1D; ``spec.out_transposed``).

    Raises:
        ValueError: the oriented shape does not match the parameter.
    """
    d = delta.T if transposed else delta
    if d.shape != like.shape:
        raise ValueError(f"update of shape {tuple(d.shape)} (transposed={transposed}) does not fit a "
                         f"parameter of shape {tuple(like.shape)}")
    return d.to(device=like.device).contiguous()


def as_map(param: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A stored weight as the map W [d, d_ff] in float64 (a copy), transposed back for Conv1D."""
    w = param.detach().to(_F64, copy=True)
    return w.T if transposed else w


def key_residual(change: torch.Tensor, keys: torch.Tensor, wanted: torch.Tensor) -> float:
    """``||change @ keys - wanted|| / ||wanted||``: the part of an intended change at the edited keys missed.

    With ``change = W_after - W_before`` (what was stored) and ``wanted`` the change of the values
    the edit aims at (ROME: ``v* - W k - b``; MEMIT/AlphaEdit: the layer's residual R), this is
    what rounding (and, for MEMIT/AlphaEdit, the regularised solve) leaves undelivered.

    Args:
        change: [d, d_ff] in the map's orientation.
        keys: [d_ff, n] (or [d_ff]).
        wanted: [d, n] (or [d]).

    Returns:
        The relative residual in float64 (inf when ``wanted`` is zero but the change is not).
    """
    c = change.to(_F64)
    k = keys.to(device=c.device, dtype=_F64)
    w = wanted.to(device=c.device, dtype=_F64)
    miss, ref = float((c @ k - w).norm()), float(w.norm())
    if ref > 0:
        return miss / ref
    return 0.0 if miss == 0 else float("inf")
