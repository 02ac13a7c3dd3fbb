"""MEMIT: the closed-form solve on synthetic tensors, and the algorithm on tiny models."""
from __future__ import annotations

import math

import pytest
import torch

from harness.algorithms.solve import memit_delta, solve_spd, to_param_layout

F64 = torch.float64


def _problem(seed: int = 0, d: int = 12, d_ff: int = 40, n: int = 6, n_pre: int = 300):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(d_ff, n, generator=g, dtype=F64)
    resid = torch.randn(d, n, generator=g, dtype=F64)
    pre = torch.randn(d_ff, n_pre, generator=g, dtype=F64)
    cov = pre @ pre.T / n_pre  # count-normalised second moment, full rank
    return keys, resid, cov


# ----------------------------------------------------------------------------------------------
# pure math


@pytest.mark.parametrize("lam", [0.5, 10.0, 1.5e4])
def test_memit_stationarity(lam):
    """Δ minimises ‖ΔK − R‖² + λ tr(ΔCΔᵀ): the gradient (ΔK − R)Kᵀ + λΔC vanishes."""
    keys, resid, cov = _problem()
    delta = memit_delta(keys, resid, cov, lam)
    assert delta.dtype == F64 and delta.shape == (resid.shape[0], keys.shape[0])
    grad = (delta @ keys - resid) @ keys.T + lam * delta @ cov
    scale = max(1.0, float(resid.abs().max() * keys.abs().max()))
    assert float(grad.abs().max()) / scale < 1e-8


def test_memit_small_lambda_interpolates():
    """λ → 0 with n <= d_ff independent keys: the update writes the residual exactly, ΔK = R."""
    keys, resid, cov = _problem(n=8)
    delta = memit_delta(keys, resid, cov, 1e-10)
    assert torch.allclose(delta @ keys, resid, atol=1e-6)


def test_memit_float32_inputs_solved_in_float64():
    keys, resid, cov = _problem(seed=1)
    d64 = memit_delta(keys, resid, cov, 3.0)
    d32 = memit_delta(keys.float(), resid.float(), cov.float(), 3.0)
    assert d32.dtype == F64
    assert torch.allclose(d32, d64, rtol=1e-4, atol=1e-6)


def test_solve_spd_falls_back_on_indefinite():
    a = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64)  # eigenvalues 3, -1: Cholesky fails
    b = torch.tensor([[1.0], [0.0]], dtype=F64)
    assert torch.allclose(a @ solve_spd(a, b), b)


def test_memit_rejects_bad_shapes_and_negative_lambda():
    keys, resid, cov = _problem()
    with pytest.raises(ValueError):
        memit_delta(keys, resid[:, :-1], cov, 1.0)
    with pytest.raises(ValueError):
        memit_delta(keys, resid, cov[:-1], 1.0)
    with pytest.raises(ValueError):
        memit_delta(keys, resid, cov, -1.0)


def test_to_param_layout_transposes_for_conv1d_and_keeps_float64():
    delta = torch.arange(6, dtype=F64).reshape(2, 3) + 1e-3  # 1e-3 does not survive a cast to float16
    w = torch.zeros(3, 2, dtype=torch.float16)
    out = to_param_layout(delta, w, transposed=True)  # write_deltas rounds W + Δ once; Δ is not rounded here
    assert out.dtype == F64 and out.shape == (3, 2) and torch.equal(out, delta.T) and out.is_contiguous()
    with pytest.raises(ValueError):
        to_param_layout(delta, w, transposed=False)


# ----------------------------------------------------------------------------------------------
# the algorithm on tiny models

from harness import EditRequest, Editor  # noqa: E402
from harness.algorithms import create  # noqa: E402
from harness.models import model_spec  # noqa: E402

REQS = (
    EditRequest("a", "{} plays the sport of", "LeBron James", "football", "basketball"),
    EditRequest("b", "The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
)


def corpus_file(tmp_path):
    """A small local text corpus for C (sampling text from the model would cost seconds)."""
    from harness.tiny import _TINY_CORPUS

    path = tmp_path / "corpus.txt"
    if not path.exists():
        path.write_text(_TINY_CORPUS * 6)
    return path


def tiny_hparams(tmp_path, **kw):
    """Hyperparameters that keep an edit of a 2-layer tiny model to about a second."""
    hp = dict(layers=[0, 1], target={"num_grad_steps": 6, "lr": 0.5}, templates={"length_params": [[3, 2]]},
              stats={"n_samples": 16, "seq_len": 32, "batch_size": 8, "cache_dir": str(tmp_path / "stats"),
                     "source": str(corpus_file(tmp_path))})
    hp.update(kw)
    return hp


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_memit_tiny_edits_declared_weights_and_shrinks_z_error(arch, tiny, tiny_gpt2, tmp_path):
    model, tok = tiny if arch == "llama" else tiny_gpt2
    alg = create("memit", tiny_hparams(tmp_path, mom2_update_weight=1.0))
    spec = model_spec(model)
    declared = alg.targets(model, REQS)
    assert declared == {spec.mlp_out_weight(0), spec.mlp_out_weight(1)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = Editor(model, tok, alg, keep_original_weight=False)  # verifies no undeclared parameter changed
    report = editor.edit(REQS).report
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == declared
    assert all(report.delta_norms[n] > 0 for n in declared)
    errs = [report.info[f"z_error.{layer}"] for layer in (0, 1)] + [report.info["z_error.final"]]
    assert errs[-1] < errs[0]
    assert report.info["z_error.final"] < 0.6 * report.info["z_error.0"]
    assert all(math.isfinite(v) for v in report.losses.values())


def test_memit_hparams_validated():
    with pytest.raises(ValueError, match="strictly increasing"):
        create("memit", {"layers": [3, 2]})
    with pytest.raises(ValueError, match="mom2_update_weight"):
        create("memit", {"mom2_update_weight": -1.0})
    with pytest.raises(ValueError, match="dtype"):
        create("memit", {"stats": {"dtype": "float16"}})
    with pytest.raises(ValueError, match="loss_layer"):
        create("memit", {"layers": [3, 4], "target": {"loss_layer": 2}})
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        create("memit", {"lambda": 1.0})
    with pytest.raises(TypeError, match=r"\['stats\.n_sample'\].*known keys of stats: .*'n_samples'"):
        create("memit", {"stats": {"n_sample": 1}})  # a typo inside a block names its path
    with pytest.raises(TypeError, match="target must be a mapping"):
        create("memit", {"target": 0.5})


def test_memit_blocks_keep_memits_own_defaults():
    """A block given in part is merged onto MEMIT's own default block, not the block class's defaults."""
    hp = create("memit", {"stats": {"seed": 1}, "templates": {"seed": 2}}).hparams
    assert (hp.stats.n_samples, hp.stats.seed) == (256, 1)  # StatsConfig's own default is 1000
    assert (hp.templates.length_params, hp.templates.seed) == ([[10, 5]], 2)  # TemplateHparams': ROME's


def test_memit_rejects_missing_layer(tiny, tmp_path):
    model, tok = tiny
    alg = create("memit", tiny_hparams(tmp_path, layers=[1, 5]))
    with pytest.raises(ValueError, match=r"layers=\[1, 5\] includes \[5\]"):
        alg.apply(model, tok, list(REQS))
    with pytest.raises(ValueError, match=r"layers=\[1, 5\] includes \[5\]"):
        alg.targets(model, list(REQS))
