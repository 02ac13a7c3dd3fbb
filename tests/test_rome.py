"""ROME / r-ROME: the rank-one solve on synthetic tensors, the algorithm on tiny models, one real edit."""
from __future__ import annotations


import pytest
import torch

from harness.algorithms import create, locate
from harness.algorithms.rome import Rome, RomeHparams, rank_one_update
from harness.editor import Editor
from harness.models import load_model, model_spec
from harness.snapshot import bit_equal
from harness.types import EditRequest

F64 = torch.float64
REQ = EditRequest(case_id="1", prompt="The mother tongue of {} is", subject="Danielle Darrieux",
                  target_new="English", target_true="French")
REQ2 = EditRequest(case_id="2", prompt="{} plays the sport of", subject="LeBron James", target_new="football")
FAST = dict(layer=0, target={"num_grad_steps": 4}, templates={"length_params": [[4, 2]]})


# ----------------------------------------------------------------------------------------------
# synthetic: the properties of the update in docs/algorithms/rome.md


@pytest.mark.parametrize("bias", [False, True])
def test_rank_one_update_synthetic(bias):
    g = torch.Generator().manual_seed(0)
    d, d_ff = 16, 48
    w = torch.randn(d, d_ff, generator=g, dtype=torch.float32)
    b = torch.randn(d, generator=g) if bias else None
    a = torch.randn(d_ff, 400, generator=g, dtype=F64)
    cov = a @ a.T / 400  # SPD
    k = torch.randn(d_ff, generator=g)
    v = torch.randn(d, generator=g)
    u = torch.linalg.solve(cov, k.to(F64))
    delta = rank_one_update(w, b, u / u.norm(), k, v)
    w_new = w.to(F64) + delta
    out = w_new @ k.to(F64) + (b.to(F64) if bias else 0)
    assert float((out - v.to(F64)).norm() / v.norm()) < 1e-5
    s = torch.linalg.svdvals(delta)
    assert float(s[1] / s[0]) < 1e-10  # rank one
    x = torch.randn(d_ff, generator=g, dtype=F64)
    x = x - (x @ u) / (u @ u) * u  # xᵀC⁻¹k* = 0
    torch.testing.assert_close(w_new @ x, w.to(F64) @ x, rtol=1e-10, atol=1e-10)


def test_rank_one_update_rejects_orthogonal_key():
    with pytest.raises(ValueError):
        rank_one_update(torch.eye(2), None, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.ones(2))


# ----------------------------------------------------------------------------------------------
# hyperparameters and registry


def test_hparams_validate_and_compose_with_omegaconf():
    from omegaconf import OmegaConf

    from harness.config import _hparams_node

    cfg = OmegaConf.merge(_hparams_node(RomeHparams), {"layer": 3, "templates": {"length_params": [[5, 2]]},
                                                      "target": {"lr": 0.1}})
    hp = OmegaConf.to_object(cfg)
    assert hp.layer == 3 and hp.templates.length_params == [[5, 2]] and hp.templates.seed == 0
    assert (hp.target.lr, hp.target.num_grad_steps) == (0.1, 25)  # one key of the block changed, the rest kept
    assert isinstance(create("rome", {"layer": 2}), Rome)
    for bad in ({"key_mode": "asym"}, {"layer": -1}, {"templates": {"length_params": [[5]]}},
                {"target": {"lr": 0.0}}, {"stats": {"dtype": "float16"}}):
        with pytest.raises((ValueError, TypeError)):
            RomeHparams(**bad)


def test_blocks_given_as_mappings_merge_onto_the_defaults():
    direct = RomeHparams(target={"num_grad_steps": 3}, stats={"seed": 2})
    built = create("rome", {"target": {"num_grad_steps": 3}, "stats": {"seed": 2}}).hparams
    assert direct == built
    assert (built.target.num_grad_steps, built.target.lr, built.stats.seed, built.stats.n_samples) == (3, 0.5, 2, 1000)
    replaced = Rome(built, layer=1, target={"lr": 0.2}).hparams  # an instance plus overrides
    assert (replaced.layer, replaced.target.lr, replaced.target.num_grad_steps, replaced.stats.seed) == (1, 0.2, 3, 2)
    assert built.target.lr == 0.5 and built.layer == 5  # the instance itself is untouched


# ----------------------------------------------------------------------------------------------
# tiny models


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("key_mode", ["r_rome", "original", "prompt"])
def test_rome_writes_only_its_target_and_maps_key_to_target(arch, key_mode, monkeypatch):
    model, tok = load_model("tiny", device="cpu", dtype="float32", tiny={"arch": arch})
    spec = model_spec(model)
    algo = Rome(**FAST, key_mode=key_mode)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = {}
    real = locate.compute_keys

    def spy(*args, **kw):
        out = real(*args, **kw)
        seen.setdefault("r_rome" if len(args[-1]) > 1 else "bare", out[0])
        return out

    monkeypatch.setattr("harness.algorithms.rome.compute_keys", spy)
    results = {}
    real_opt = __import__("harness.algorithms.rome", fromlist=["x"]).optimize_target

    def opt_spy(*args, **kw):
        results["v"] = real_opt(*args, **kw)
        return results["v"]

    monkeypatch.setattr("harness.algorithms.rome.optimize_target", opt_spy)
    report = algo.apply(model, tok, [REQ])
    (name,) = algo.targets(model, [REQ])
    changed = [n for n, p in model.named_parameters() if not bit_equal(p, before[n])]
    assert changed == [name]
    assert report.delta_norms[name] > 0 and report.info["key_mode"] == key_mode
    mod = model.get_submodule(spec.mlp_out.format(0))
    w = mod.weight.detach().to(F64)
    w = w.T if spec.out_transposed else w
    key = seen["r_rome"] if key_mode == "r_rome" else seen["bare"]
    out = w @ key.to(F64) + (mod.bias.to(F64) if getattr(mod, "bias", None) is not None else 0)
    v = results["v"].target.to(F64)
    assert float((out - v).norm() / v.norm()) < 1e-5  # Ŵk = v*
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rome_edit_is_the_same_whatever_the_tokenizer_padding_side(arch):
    """Keys and targets come from batches padded on the right by the algorithm, not by ``tok.padding_side``."""
    deltas = {}
    for side in ("right", "left"):
        model, tok = load_model("tiny", device="cpu", dtype="float32", tiny={"arch": arch})
        tok.padding_side = side
        algo = Rome(**FAST)
        (name,) = algo.targets(model, [REQ])
        before = model.get_parameter(name).detach().clone()
        algo.apply(model, tok, [REQ, REQ2])
        deltas[side] = model.get_parameter(name).detach() - before
        assert tok.padding_side == side
    assert float(deltas["right"].norm()) > 0
    torch.testing.assert_close(deltas["left"], deltas["right"], atol=1e-5, rtol=0)


def test_rome_sequential_requests_and_editor_restore(tiny_gpt2):
    model, tok = tiny_gpt2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = Editor(model, tok, Rome(**FAST), probes=None)
    out = editor.edit([REQ, REQ2])
    assert out.report.info["n_requests"] == 2
    assert not [n for n, p in model.named_parameters() if not bit_equal(p, before[n])]


def test_rome_with_covariance(tiny, tmp_path):
    model, tok = tiny
    algo = Rome(**FAST, mom2_adjustment=True,
                stats={"n_samples": 40, "seq_len": 16, "batch_size": 8, "ridge": 1e-2, "cache_dir": str(tmp_path)})
    report = algo.apply(model, tok, [REQ])
    assert algo.stats.computed == 1 and report.delta_norms
    algo.apply(model, tok, [REQ2])
    assert algo.stats.computed == 1  # C kept in the instance, not recomputed after an edit
    assert algo.templates.misses == 1


def test_rome_rejects_missing_layer(tiny):
    model, tok = tiny
    with pytest.raises(ValueError):
        Rome(layer=7).apply(model, tok, [REQ])


# ----------------------------------------------------------------------------------------------
# the real model


def _p(model, tok, prompt: str, word: str) -> float:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        probs = model(input_ids=ids).logits[0, -1].softmax(-1)
    return float(probs[tok(" " + word, add_special_tokens=False)["input_ids"][0]])


@pytest.mark.slow
def test_rome_smollm2_changes_mother_tongue_and_restores(smollm2):
    model, tok = smollm2
    prompt = REQ.rewrite_prompt
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert _p(model, tok, prompt, "French") > _p(model, tok, prompt, "English")
    algo = Rome(layer=5, target={"num_grad_steps": 25}, templates={"length_params": [[5, 10], [10, 10]]})
    editor = Editor(model, tok, algo, probes=None, keep_original_weight=False)
    out = editor.edit(REQ)
    p_en, p_fr = _p(model, tok, prompt, "English"), _p(model, tok, prompt, "French")
    assert p_en > p_fr, (p_en, p_fr, out.report)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        greedy = tok.decode(model(input_ids=ids).logits[0, -1].argmax())
    assert greedy.strip() == "English"
    editor.restore()
    assert not [n for n, p in model.named_parameters() if not bit_equal(p, before[n])]
    assert _p(model, tok, prompt, "French") > _p(model, tok, prompt, "English")
