"""Half precision that keeps the edit: one rounding, the written norm reported, residuals, a warning.

In bf16/fp16 the weights hold 8/11 significant bits, so ``W + Δ`` must be rounded. ``write_deltas``
adds in float32/float64 and rounds once (never the delta on its own first), reports the change it
actually stored next to the intended one, and warns when rounding lost more than
``WRITE_ERROR_WARN`` of it. ROME, MEMIT and AlphaEdit also report how much of the intended change
at the edited keys the stored matrix fails to deliver (``residual.<layer>``).

What one rounding buys over the old "round Δ, then add in the weight's dtype": never a larger
error (round-to-nearest of the exact sum is the closest representable value), and a clearly
smaller one only when Δ is comparable to W (about 1.3x at ||Δ|| = ||W||). For a small update both
lose the same (about 80% of a random update of relative norm 1e-3): the storage format, not the
order of rounding, loses it; that is what the warning is for.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from harness.algorithms import create
from harness.algorithms.base import WRITE_ERROR_WARN, AlgorithmError, write_deltas
from harness.algorithms.locate import compute_keys
from harness.models import load_model, model_spec
from harness.tiny import _TINY_CORPUS
from harness.types import EditRequest

F64 = torch.float64
DOWN = "model.layers.0.mlp.down_proj.weight"
UNIT = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}  # half an ulp, relative to |x|
TINIEST = {torch.bfloat16: 0.0, torch.float16: 2.0 ** -25}  # half the smallest fp16 subnormal
REQ = EditRequest("a", "{} plays the sport of", "LeBron James", "football", "basketball")
REQS = (REQ, EditRequest("b", "The mother tongue of {} is", "Danielle Darrieux", "English", "French"))
ROME = dict(layer=0, target={"num_grad_steps": 4}, templates={"length_params": [[4, 2]]})


def spread_hparams(tmp_path: Path, **kw) -> dict:
    """MEMIT/AlphaEdit settings that keep a tiny-model edit to a fraction of a second."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_TINY_CORPUS * 6)
    return dict(layers=[0, 1], target={"num_grad_steps": 6}, templates={"length_params": [[3, 2]]},
                stats={"n_samples": 16, "seq_len": 32, "batch_size": 8, "cache_dir": str(tmp_path / "stats"),
                       "source": str(corpus)}, **kw)


def synthetic_delta(w: torch.Tensor, rel: float, seed: int = 0) -> torch.Tensor:
    """A float64 update of norm ``rel * ||w||``."""
    d = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return d * (rel * float(w.double().norm()) / float(d.norm()))


def assert_one_rounding(before: torch.Tensor, delta: torch.Tensor, after: torch.Tensor) -> None:
    """Every stored entry is within half an ulp of the exact ``before + delta``."""
    exact = before.double() + delta.double()
    bound = UNIT[after.dtype] * exact.abs() + TINIEST[after.dtype] + 1e-12 * exact.abs()
    assert bool(((after.double() - exact).abs() <= bound).all())


# ----------------------------------------------------------------------------------------------
# the writer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rel", [1.0, 1e-2])
def test_write_deltas_rounds_once_and_reports_what_was_stored(dtype, rel):
    model, _ = load_model("tiny", device="cpu", dtype=str(dtype).removeprefix("torch."))
    param = model.get_parameter(DOWN)
    before = param.detach().clone()
    delta = synthetic_delta(before, rel)
    stats = write_deltas(model, {DOWN: delta}, {DOWN}).stats[DOWN]
    after = param.detach()
    assert after.dtype == dtype
    assert_one_rounding(before, delta, after)
    written = after.double() - before.double()
    assert stats.written_norm == pytest.approx(float(written.norm()), rel=1e-6)
    assert stats.intended_norm == pytest.approx(float(delta.norm()), rel=1e-9)
    assert stats.error == pytest.approx(float((written - delta).norm() / delta.norm()), rel=1e-6)
    # The old way: round Δ to the weight's dtype, then add in that dtype (a second rounding).
    old = before + delta.to(dtype)
    err_new, err_old = (written - delta).abs(), (old.double() - before.double() - delta).abs()
    assert bool((err_new <= err_old + 1e-12).all())  # never worse, entry by entry
    if rel == 1.0:  # and measurably better when Δ is as large as W
        assert float(err_old.norm()) > 1.15 * float(err_new.norm())


def test_write_deltas_in_float32_is_nearly_exact_and_silent(caplog):
    model, _ = load_model("tiny", device="cpu", dtype="float32")
    delta = synthetic_delta(model.get_parameter(DOWN).detach(), 1e-3)
    with caplog.at_level(logging.WARNING):
        stats = write_deltas(model, {DOWN: delta}).stats[DOWN]
    assert stats.error < 1e-3 and stats.written_norm == pytest.approx(stats.intended_norm, rel=1e-3)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_tiny_update_in_bf16_warns_and_names_the_float32_option(caplog):
    model, _ = load_model("tiny", device="cpu", dtype="bfloat16")
    before = model.get_parameter(DOWN).detach().clone()
    delta = synthetic_delta(before, 1e-3)
    with caplog.at_level(logging.WARNING, logger="harness.algorithms.base"):
        stats = write_deltas(model, {DOWN: delta}).stats[DOWN]
    assert stats.error > 0.5  # most of a 1e-3 update rounds away in bf16
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert DOWN in warnings[0] and "bfloat16" in warnings[0] and "dtype=float32" in warnings[0]
    assert f"lost {100 * stats.error:.0f}%" in warnings[0]
    assert stats.error > WRITE_ERROR_WARN


def test_write_deltas_checks_everything_before_writing():
    model, _ = load_model("tiny", device="cpu", dtype="float16")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    up = "model.layers.0.mlp.up_proj.weight"
    ok = torch.zeros_like(model.get_parameter(up), dtype=torch.float32)
    big = torch.full_like(model.get_parameter(DOWN), 1e6, dtype=torch.float32)
    with pytest.raises(AlgorithmError, match=f"{DOWN}.*overflows"):
        write_deltas(model, {up: ok, DOWN: big})
    with pytest.raises(AlgorithmError, match=f"{DOWN}.*floating point"):
        write_deltas(model, {DOWN: torch.zeros_like(big, dtype=torch.long)})
    with pytest.raises(AlgorithmError, match=f"undeclared parameter '{DOWN}'"):
        write_deltas(model, {DOWN: big * 0}, declared={up})
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_direct_reports_written_norm_and_warns_for_a_tiny_update(caplog):
    model, tok = load_model("tiny", device="cpu", dtype="bfloat16")
    before = model.get_parameter(DOWN).detach().clone()
    alg = create("direct", {"ops": [{"kind": "low_rank", "param": DOWN, "rank": 1, "scale": 1e-6, "seed": 0}]})
    with caplog.at_level(logging.WARNING):
        rep = alg.apply(model, tok, [])
    measured = float((model.get_parameter(DOWN).double() - before.double()).norm())
    assert rep.delta_norms[DOWN] == pytest.approx(measured, rel=1e-6, abs=1e-12)
    assert rep.info[f"intended_norm.{DOWN}"] > 0 and rep.info[f"write_error.{DOWN}"] > WRITE_ERROR_WARN
    assert any(DOWN in r.getMessage() and "dtype=float32" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------------
# the key-value editors in half precision


def _spy_writes(monkeypatch, module: str) -> list[dict[str, torch.Tensor]]:
    """Record the deltas an algorithm hands to the real ``write_deltas`` (which still writes them)."""
    seen: list[dict[str, torch.Tensor]] = []
    real = write_deltas

    def spy(model, deltas, declared=None):
        seen.append({n: d.detach().clone() for n, d in deltas.items()})
        return real(model, deltas, declared)

    monkeypatch.setattr(f"harness.algorithms.{module}.write_deltas", spy)
    return seen


def _run(algo: str, dtype: str, tmp_path: Path, monkeypatch):
    model, tok = load_model("tiny", device="cpu", dtype=dtype)
    if algo == "rome":
        alg, reqs = create("rome", ROME), REQS[:1]
    elif algo == "memit":
        alg, reqs = create("memit", spread_hparams(tmp_path, mom2_update_weight=1.0)), REQS
    else:
        alg, reqs = create("alphaedit", spread_hparams(tmp_path, nullspace_threshold=1e-4, l2=1e-4)), REQS
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = _spy_writes(monkeypatch, "rome" if algo == "rome" else "memit")
    report = alg.apply(model, tok, reqs)
    return model, tok, alg, before, seen, report


@pytest.mark.parametrize("algo,dtype", [("rome", "bfloat16"), ("rome", "float16"), ("memit", "bfloat16"),
                                        ("alphaedit", "bfloat16"), ("alphaedit", "float16")])
def test_key_value_editor_writes_once_rounded_and_reports_it(algo, dtype, tmp_path, monkeypatch):
    model, _, alg, before, seen, report = _run(algo, dtype, tmp_path, monkeypatch)
    params = dict(model.named_parameters())
    assert {n for d in seen for n in d} == alg.targets(model, REQS) == set(report.delta_norms)
    for deltas in seen:
        for name, delta in deltas.items():
            assert delta.dtype == F64  # computed and handed over unrounded
            after = params[name].detach()
            assert_one_rounding(before[name], delta, after)
            written = after.double() - before[name].double()
            assert report.delta_norms[name] == pytest.approx(float(written.norm()), rel=1e-6, abs=1e-12)
            assert report.info[f"intended_norm.{name}"] == pytest.approx(float(delta.norm()), rel=1e-9)
            err = float((written - delta).norm() / delta.norm()) if float(delta.norm()) > 0 else 0.0
            assert report.info[f"write_error.{name}"] == pytest.approx(err, rel=1e-6, abs=1e-12)
    layers = [0] if algo == "rome" else [0, 1]
    for layer in layers:
        assert math.isfinite(report.info[f"residual.{layer}"]) and report.info[f"residual.{layer}"] >= 0


def test_rome_residual_is_measured_on_the_stored_matrix(tmp_path, monkeypatch):
    """residual = ||(W_stored − W) k − Δ k|| / ||Δ k||, recomputed here from the model and the key."""
    res = {}
    for dtype in ("float32", "bfloat16"):
        model, tok, alg, before, seen, report = _run("rome", dtype, tmp_path, monkeypatch)
        spec = model_spec(model)
        key = compute_keys(model, tok, spec, 0, [REQ], alg._templates(model, tok))[0].double()  # down_proj's
        delta = seen[0][DOWN]  # input: unchanged by the edit of down_proj itself
        change = model.get_parameter(DOWN).double() - before[DOWN].double()
        want = delta @ key  # = v* − W k − b, by construction of the rank-one update
        res[dtype] = float((change @ key - want).norm() / want.norm())
        assert report.info["residual.0"] == pytest.approx(res[dtype], rel=1e-3, abs=1e-9)
    assert res["float32"] < 1e-5 < res["bfloat16"]


@pytest.mark.parametrize("algo", ["memit", "alphaedit"])
def test_spread_residual_separates_rounding_from_the_solve(algo, tmp_path, monkeypatch):
    """In float32 the stored matrix delivers what the float64 solve does; in bf16 rounding adds to it."""
    _, _, _, _, _, r32 = _run(algo, "float32", tmp_path / "a", monkeypatch)
    _, _, _, _, _, r16 = _run(algo, "bfloat16", tmp_path / "b", monkeypatch)
    for layer in (0, 1):
        assert r32.info[f"residual.{layer}"] == pytest.approx(r32.info[f"residual_unrounded.{layer}"], rel=1e-3)
        assert r16.info[f"residual.{layer}"] != r16.info[f"residual_unrounded.{layer}"]
        assert r16.info[f"write_error.model.layers.{layer}.mlp.down_proj.weight"] > 1e3 * r32.info[
            f"write_error.model.layers.{layer}.mlp.down_proj.weight"]


def test_ft_m_in_bf16_reports_written_and_intended_norms(tmp_path):
    model, tok = load_model("tiny", device="cpu", dtype="bfloat16")
    name = "model.layers.1.mlp.down_proj.weight"
    before = model.get_parameter(name).detach().clone()
    rep = create("ft_m", {"layers": [1], "num_steps": 3, "lr": 1e-3}).apply(model, tok, REQS)
    measured = float((model.get_parameter(name).double() - before.double()).norm())
    assert rep.delta_norms[name] == pytest.approx(measured, rel=1e-6)
    assert rep.info[f"intended_norm.{name}"] > 0 and 0 < rep.info[f"write_error.{name}"] < 1
