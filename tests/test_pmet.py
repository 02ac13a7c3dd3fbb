"""PMET: the two-site target optimisation (target.py, ``where="attn+mlp"``) and the FFN-share update, on the tiny
models."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_hparams

from harness import EditRequest
from harness.algorithms import create
from harness.algorithms.locate import compute_keys
from harness.algorithms.memit import outputs_at_subject
from harness.algorithms.solve import as_map, memit_delta
from harness.algorithms.target import TargetHparams, optimize_targets
from harness.editor import Editor
from harness.models import load_model, model_spec

REQS = (
    EditRequest("a", "{} plays the sport of", "LeBron James", "football", "basketball"),
    EditRequest("b", "The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    EditRequest("c", "{} was born in", "Marie Curie", "Paris", "Warsaw"),
)
TEMPLATES = [["{}"], ["Then. {}", "So it goes. {}"]]


class Pair:
    """The two-site targets of a batch, split per site: attn, mlp [d, n]; *_delta_norm [n]."""

    def __init__(self, results):
        self.results = results
        self.attn, self.mlp = (torch.stack(t, dim=1) for t in zip(*(r.target.chunk(2) for r in results)))
        self.attn_delta_norm, self.mlp_delta_norm = (torch.stack(t) for t in
                                                     zip(*(d.norm(dim=0) for d in (r.delta.view(2, -1).T for r in results))))
        self.losses = [r.losses for r in results]
        self.steps = [r.steps for r in results]
        self.fast = all(r.fast for r in results)


def _pair(model, tok, requests=REQS, layer=1, fast=True, replay=True, **hp):
    return Pair(optimize_targets(model, tok, model_spec(model), list(requests), layer,
                                 TargetHparams(**{"num_grad_steps": 6, "lr": 0.5, **hp}), TEMPLATES,
                                 where="attn+mlp", fast=fast, replay=replay))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pair_targets_start_from_the_outputs_they_replace(arch, tiny, tiny_gpt2):
    """With no Adam step (one evaluated iteration) the targets are the attention and MLP outputs at the
    subject's last token of the bare prompts: what PMET compares the MLP target with."""
    model, tok = tiny if arch == "llama" else tiny_gpt2
    spec = model_spec(model)
    res = _pair(model, tok, num_grad_steps=1)
    assert res.steps == [0, 0, 0] and float(res.mlp_delta_norm.abs().max()) == 0.0
    assert torch.allclose(res.mlp, outputs_at_subject(model, tok, spec.mlp.format(1), REQS), atol=1e-5)
    assert torch.allclose(res.attn, outputs_at_subject(model, tok, spec.attn.format(1), REQS), atol=1e-5)


def test_pair_targets_share_the_single_site_loss_and_move_both_components(tiny):
    """At δ = 0 the loss is target.py's (the same rows, NLL and KL); the gradient then moves both δ."""
    model, tok = tiny
    res = _pair(model, tok)
    single = optimize_targets(model, tok, model_spec(model), list(REQS), 1, TargetHparams(num_grad_steps=1),
                              TEMPLATES, where="mlp")
    assert [x[0] for x in res.losses] == pytest.approx([r.losses[0] for r in single], abs=1e-5)
    assert bool((res.attn_delta_norm > 0).all()) and bool((res.mlp_delta_norm > 0).all())


def test_pair_targets_clamp_each_component_against_its_own_norm(tiny):
    model, tok = tiny
    spec = model_spec(model)
    res = _pair(model, tok, clamp_norm_factor=0.05, lr=2.0)
    for name, module, moved in (("attn", spec.attn, res.attn_delta_norm), ("mlp", spec.mlp, res.mlp_delta_norm)):
        bound = 0.05 * outputs_at_subject(model, tok, module.format(1), REQS).norm(dim=0)
        assert bool((moved <= bound * (1 + 1e-5)).all()), name
        assert bool((moved >= bound * 0.99).all()), f"{name}: lr 2 should push every δ to the bound"


def test_pair_targets_decay_each_component_against_its_own_norm():
    """With no KL term, loss − NLL at the last (evaluated, not stepped) iteration is the decay
    ``weight_decay·(‖δ_attn‖/‖v_attn‖² + ‖δ_mlp‖/‖v_mlp‖²)``, not one decay of the joined vector."""
    model, tok = load_model("tiny", device="cpu", dtype="float32", tiny={"n_layers": 4})  # an NLL that depends on δ
    results = _pair(model, tok, kl_factor=0.0, weight_decay=0.5, loss_layer=2).results
    for r in results:
        d_attn, d_mlp = r.delta.chunk(2)
        v_attn, v_mlp = r.v_init.chunk(2)
        want = 0.5 * (float(d_attn.norm()) / float(v_attn.norm()) ** 2 + float(d_mlp.norm()) / float(v_mlp.norm()) ** 2)
        joined = 0.5 * float(r.delta.norm()) / float(r.v_init.norm()) ** 2
        assert r.losses[-1] - r.nll[-1] == pytest.approx(want, rel=1e-4)
        assert abs(want - joined) > 1e-3 * want  # the test tells the two apart


def test_attn_plus_mlp_is_one_more_site_of_target_py(tiny):
    """``where`` names the sites; anything else is refused with the accepted values."""
    model, tok = tiny
    with pytest.raises(ValueError, match="attn\\+mlp"):
        optimize_targets(model, tok, model_spec(model), list(REQS), 1, TargetHparams(), TEMPLATES, where="attn")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pair_targets_fast_path_replay_and_batching_change_nothing(arch):
    # 4 layers, loss read at block 2: the NLL depends on δ (as in test_locate's fast-path test; a flat
    # loss would leave Adam amplifying rounding noise)
    model, tok = load_model("tiny", device="cpu", dtype="float32", tiny={"arch": arch, "n_layers": 4})
    hp = dict(weight_decay=1e-4, clamp_norm_factor=50, loss_layer=2)
    fast = _pair(model, tok, **hp)
    slow = _pair(model, tok, fast=False, replay=False, **hp)
    assert fast.fast and not slow.fast and fast.steps == slow.steps == [5, 5, 5]
    torch.testing.assert_close(fast.mlp, slow.mlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.attn, slow.attn, rtol=1e-5, atol=1e-5)
    alone = [_pair(model, tok, requests=[r], **hp) for r in REQS]
    torch.testing.assert_close(fast.mlp, torch.cat([a.mlp for a in alone], dim=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.attn, torch.cat([a.attn for a in alone], dim=1), rtol=1e-5, atol=1e-5)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pmet_first_layer_writes_its_square_root_share_of_the_mlp_gap(arch, tiny, tiny_gpt2, tmp_path):
    """Layer l_1 of L = 2 gets Δ = ((Z_mlp − H_mlp)/√2) K₁ᵀ(λC₁ + K₁K₁ᵀ)⁻¹, H_mlp the last layer's MLP
    output; only the MLP output projections change."""
    model, tok = tiny if arch == "llama" else tiny_gpt2
    spec = model_spec(model)
    alg = create("pmet", {**tiny_hparams("pmet", tmp_path), "mom2_update_weight": 5.0})
    alg.prepare(model, tok)
    templates = alg._context_templates(model, tok)
    z, _ = alg._optimize_z(model, tok, spec, list(REQS), templates)  # deterministic: the edit's own targets
    keys = compute_keys(model, tok, spec, 0, list(REQS), templates).T
    gap = z - outputs_at_subject(model, tok, spec.mlp.format(1), REQS)
    cov = alg.stats.get(model, tok, spec, 0, alg.hparams.stats)
    want = memit_delta(keys, gap / math.sqrt(2), cov, 5.0)
    name0 = spec.mlp_out_weight(0)
    w0 = as_map(dict(model.named_parameters())[name0], spec.out_transposed)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = Editor(model, tok, alg, keep_original_weight=False).edit(list(REQS)).report
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == alg.targets(model, REQS) == {name0, spec.mlp_out_weight(1)}
    got = as_map(dict(model.named_parameters())[name0], spec.out_transposed) - w0
    assert float((got - want).norm() / want.norm()) < 1e-4
    assert report.info["mlp_delta_norm"] > 0 and report.info["attn_delta_norm"] > 0
    assert report.info["z_error.final"] < report.info["z_error.0"]
