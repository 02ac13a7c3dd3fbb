"""AlphaEdit: projector and null-space solve on synthetic tensors, state handling on tiny models."""
from __future__ import annotations

import pytest
import torch

from harness.algorithms.solve import alphaedit_delta, memit_delta, nullspace_projector

F64 = torch.float64


def _low_rank_cov(seed: int = 0, d_ff: int = 40, rank: int = 12, n_pre: int = 200):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(d_ff, rank, generator=g, dtype=F64)
    k0 = basis @ torch.randn(rank, n_pre, generator=g, dtype=F64)  # preserved keys: rank-12 subspace
    return k0, k0 @ k0.T / n_pre


def test_projector_annihilates_preserved_keys():
    k0, cov = _low_rank_cov()
    proj, kept = nullspace_projector(cov, 2e-2)
    assert kept == cov.shape[0] - 12
    assert torch.allclose(proj @ proj, proj, atol=1e-10) and torch.allclose(proj, proj.T)
    assert float((proj @ k0).norm() / k0.norm()) < 1e-10


def test_projector_threshold_extremes():
    _, cov = _low_rank_cov()
    assert nullspace_projector(cov, 0.0)[1] == 0
    assert nullspace_projector(cov, 1e12)[1] == cov.shape[0]


@pytest.mark.parametrize("with_cp", [False, True])
def test_alphaedit_update_leaves_preserved_keys_alone(with_cp):
    k0, cov = _low_rank_cov()
    proj, _ = nullspace_projector(cov, 2e-2)
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(40, 5, generator=g, dtype=F64)
    resid = torch.randn(16, 5, generator=g, dtype=F64)
    cp = None
    if with_cp:
        old = torch.randn(40, 7, generator=g, dtype=F64)
        cp = old @ old.T
    delta = alphaedit_delta(keys, resid, proj, cp, 1.0)
    assert delta.shape == (16, 40) and delta.dtype == F64
    assert float((delta @ k0).norm() / (delta.norm() * k0.norm())) < 1e-6
    assert float((delta @ k0).norm() / delta.norm()) < 1e-6


def test_alphaedit_reduces_to_memit():
    """P = I, C_p = 0 and α replaced by λC: AlphaEdit's solve is MEMIT's."""
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(40, 6, generator=g, dtype=F64)
    resid = torch.randn(16, 6, generator=g, dtype=F64)
    pre = torch.randn(40, 100, generator=g, dtype=F64)
    cov = pre @ pre.T / 100
    lam = 7.5
    a = alphaedit_delta(keys, resid, torch.eye(40, dtype=F64), torch.zeros(40, 40, dtype=F64), lam * cov)
    m = memit_delta(keys, resid, cov, lam)
    assert torch.allclose(a, m, rtol=1e-9, atol=1e-12)


def test_alphaedit_rejects_bad_shapes():
    _, cov = _low_rank_cov()
    proj, _ = nullspace_projector(cov, 2e-2)
    keys = torch.zeros(40, 3, dtype=F64)
    with pytest.raises(ValueError):
        alphaedit_delta(keys, torch.zeros(16, 2, dtype=F64), proj, None, 1.0)
    with pytest.raises(ValueError):
        alphaedit_delta(keys, torch.zeros(16, 3, dtype=F64), proj[:-1], None, 1.0)
    with pytest.raises(ValueError):
        alphaedit_delta(keys, torch.zeros(16, 3, dtype=F64), proj, None, -1.0)


# ----------------------------------------------------------------------------------------------
# the algorithm on tiny models: explicit state under the Editor

from harness import EditRequest, Editor  # noqa: E402
from harness.algorithms import create  # noqa: E402
from harness.models import model_spec, tiny_model  # noqa: E402
from harness.probes.base import Measurement  # noqa: E402

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
    hp = dict(layers=[0, 1], target={"num_grad_steps": 6}, templates={"length_params": [[3, 2]]},
              stats={"n_samples": 16, "seq_len": 32, "batch_size": 8, "cache_dir": str(tmp_path / "stats"),
                     "source": str(corpus_file(tmp_path))},
              nullspace_threshold=1e-4, l2=1e-4)  # the tiny models' C has eigenvalues ~1e-5..1e-1
    hp.update(kw)
    return hp


class Recorder:
    """A probe suite that records the edited weights and the algorithm's state after each apply."""

    def __init__(self, alg, names):
        self.alg, self.names, self.seen = alg, sorted(names), []

    def infos(self):
        return []

    def measure(self, model, tok, requests, reference=None):
        if reference is not None:  # the post-edit call
            params = dict(model.named_parameters())
            self.seen.append(({n: params[n].detach().clone() for n in self.names},
                              {k: v.clone() for k, v in self.alg.state_dict().items()}))
        return Measurement([{} for _ in requests], [{} for _ in requests])


def _cp_zero(alg) -> bool:
    return all(float(v.abs().max()) == 0.0 for v in alg.state_dict().values())


def _run_single(order, tmp_path):
    model, tok = tiny_model(seed=0)
    alg = create("alphaedit", tiny_hparams(tmp_path))
    rec = Recorder(alg, alg.targets(model, REQS))
    editor = Editor(model, tok, alg, probes=rec, keep_original_weight=True)
    reports = {}
    for i in order:
        out = editor.edit(REQS[i])
        assert _cp_zero(alg), "C_p must be back to zero after a single edit"
        reports[i] = out.report
    weights = {i: rec.seen[k][0] for k, i in enumerate(order)}
    states = {i: rec.seen[k][1] for k, i in enumerate(order)}
    return weights, states, reports


def test_single_edit_mode_leaves_no_state(tmp_path):
    w1, s1, r1 = _run_single([0, 1], tmp_path)
    w2, s2, r2 = _run_single([1, 0], tmp_path)
    for i in (0, 1):
        assert all(torch.equal(w1[i][n], w2[i][n]) for n in w1[i])
        assert s1[i] and all(float(v.abs().max()) > 0 for v in s1[i].values())  # C_p was non-zero mid-case
        assert all(torch.equal(s1[i][k], s2[i][k]) for k in s1[i])
        assert r1[i].delta_norms == r2[i].delta_norms and r1[i].losses == r2[i].losses
        assert {k: v for k, v in r1[i].info.items() if not k.startswith("t_")} == \
               {k: v for k, v in r2[i].info.items() if not k.startswith("t_")}


def test_sequential_checkpoint_resume_is_bit_identical(tmp_path):
    hp = tiny_hparams(tmp_path)
    model, tok = tiny_model(seed=0)
    alg = create("alphaedit", hp)
    editor = Editor(model, tok, alg, keep_original_weight=False)
    editor.edit(REQS[0])
    cp1 = {k: v.clone() for k, v in alg.state_dict().items()}
    assert cp1 and all(float(v.norm()) > 0 for v in cp1.values())
    editor.save_checkpoint(tmp_path / "ckpt")
    editor.edit(REQS[1])
    cp2 = alg.state_dict()
    assert all(float(cp2[k].norm()) > float(cp1[k].norm()) for k in cp1)  # C_p grows
    straight = {n: p.detach().clone() for n, p in model.named_parameters()}

    model2, tok2 = tiny_model(seed=0)
    alg2 = create("alphaedit", hp)
    alg2.prepare(model2, tok2)  # base-model templates, C and P before the edited weights arrive
    editor2 = Editor(model2, tok2, alg2, keep_original_weight=False)
    editor2.load_checkpoint(tmp_path / "ckpt")
    assert all(torch.equal(alg2.state_dict()[k], cp1[k]) for k in cp1)
    editor2.edit(REQS[1])
    for n, p in model2.named_parameters():
        assert torch.equal(p, straight[n]), n
    assert all(torch.equal(alg2.state_dict()[k], cp2[k]) for k in cp2)

    alg2.reset_state()
    assert _cp_zero(alg2)


def test_state_dict_roundtrip_and_bad_keys(tmp_path):
    alg = create("alphaedit", tiny_hparams(tmp_path))
    assert alg.state_dict() == {}
    alg.load_state_dict({"cp.1": torch.eye(4)})
    assert torch.equal(alg.state_dict()["cp.1"], torch.eye(4, dtype=F64))
    alg.load_state_dict({})
    assert alg.state_dict() == {}
    from harness.algorithms.base import AlgorithmError

    with pytest.raises(AlgorithmError):
        alg.load_state_dict({"cp.7": torch.eye(4)})
    with pytest.raises(AlgorithmError):
        alg.load_state_dict({"other": torch.eye(4)})


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_alphaedit_tiny_edits_declared_weights_and_shrinks_z_error(arch, tiny, tiny_gpt2, tmp_path):
    model, tok = tiny if arch == "llama" else tiny_gpt2
    alg = create("alphaedit", tiny_hparams(tmp_path))
    declared = alg.targets(model, REQS)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = Editor(model, tok, alg, keep_original_weight=False).edit(REQS).report
    assert {n for n, p in model.named_parameters() if not torch.equal(p, before[n])} == declared
    assert report.info["z_error.final"] < 0.8 * report.info["z_error.0"]
    for layer in (0, 1):
        assert 0 < report.info[f"nullspace_dim.{layer}"] < 128  # a proper null space at this threshold
        # docs/algorithms/alphaedit.md (how it is checked): on the model's own C, ‖P C P‖₂ <= threshold.
        cov = alg.stats.get(model, tok, model_spec(model), layer, alg.hparams.stats).double()
        proj = alg.projector(model, layer).double()
        assert float(torch.linalg.matrix_norm(proj @ cov @ proj, ord=2)) <= alg.hparams.nullspace_threshold


def test_alphaedit_hparams_validated():
    with pytest.raises(ValueError, match="l2"):
        create("alphaedit", {"l2": 0.0})
    with pytest.raises(ValueError, match="nullspace_threshold"):
        create("alphaedit", {"nullspace_threshold": -1.0})
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        create("alphaedit", {"mom2_update_weight": 1.0})


def test_alphaedit_state_dtype_float32_update_within_bound_of_float64(tiny, tmp_path):
    """P and C_p kept in float32 (the default) change the sequential updates by far less than the
    bound stated in conf/algorithm/alphaedit.yaml (relative 1e-4 of ‖Δ‖) at a ridge that keeps the
    solve well conditioned (l2=1; at l2=1e-2 the tiny model's system amplifies any 1e-7 change of
    the keys, float32 rounding included, to tens of percent: alphaedit.yaml)."""
    model, tok = tiny
    deltas = {}
    for dt in ("float64", "float32"):
        alg = create("alphaedit", tiny_hparams(tmp_path, state_dtype=dt, l2=1.0))
        editor = Editor(model, tok, alg, keep_original_weight=False)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        editor.edit(REQS[:1])
        editor.edit(REQS[1:])  # the second batch's solve uses C_p of the first
        assert all(v.dtype == getattr(torch, dt) for v in alg.state_dict().values())
        assert alg.projector(model, 0).dtype == getattr(torch, dt)
        deltas[dt] = {n: p.detach() - before[n] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        editor.restore()
    assert deltas["float32"].keys() == deltas["float64"].keys() and deltas["float64"]
    for n, d64 in deltas["float64"].items():
        assert float((deltas["float32"][n] - d64).norm() / d64.norm()) < 1e-4, n


def test_alphaedit_rollback_holds_state_without_copy_and_catches_writes_in_place(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    alg = create("alphaedit", tiny_hparams(tmp_path))
    editor = Editor(model, tok, alg, keep_original_weight=False)
    editor.edit(REQS[:1])
    held = {k: (v.data_ptr(), v.clone()) for k, v in alg.state_dict().items()}
    single = Editor(model, tok, alg, keep_original_weight=True)
    single.edit(REQS[1:])  # rolled back: the very same storage comes back, unchanged
    after = alg.state_dict()
    assert after.keys() == held.keys() and held
    assert all(after[k].data_ptr() == ptr and torch.equal(after[k], v) for k, (ptr, v) in held.items())

    # an algorithm that declares state_replaced but adds in place is caught at the rollback
    def add_in_place(self, *a, **k):
        for cp in self._cp.values():
            cp.add_(1.0)
        return {}

    monkeypatch.setattr(type(alg), "_after_batch", add_in_place)
    from harness.editor import RestoreError

    with pytest.raises(RestoreError, match="state_replaced"):
        single.edit(REQS[1:])


def test_alphaedit_state_dtype_validated():
    with pytest.raises(ValueError, match="state_dtype"):
        create("alphaedit", {"state_dtype": "float16"})


def test_cp_grows_by_the_keys_of_the_edited_model(tmp_path):
    """C_p gains Σ kkᵀ of the keys on the model after the batch (the reference recomputes them there);
    the layer loop's keys, which the code reuses, are those exactly."""
    from harness.algorithms.locate import compute_keys

    model, tok = tiny_model(seed=0)
    alg = create("alphaedit", tiny_hparams(tmp_path))
    Editor(model, tok, alg, keep_original_weight=False).edit(list(REQS[:2]))
    spec, templates = model_spec(model), alg._context_templates(model, tok)
    for layer in alg.hparams.layers:
        k = compute_keys(model, tok, spec, layer, list(REQS[:2]), templates).to(F64)  # [n, d_ff], edited model
        want = (k.T @ k).to(alg.state_dtype)
        assert torch.equal(alg.state_dict()[f"cp.{layer}"], want), layer
