"""FT-L and FT-M: the L-inf bound, exact label masks, only declared tensors written, clean exits, exact restore."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from harness import Editor, EditRequest, create_algorithm, load_model
from harness.algorithms.base import AlgorithmError
from harness.algorithms.finetune import (
    FTHparams,
    FTMHparams,
    prompt_last_loss,
    target_new_loss,
)
from harness.algorithms.batches import target_batch
from harness.tokens import encode_prompt_target, pad_id, target_text
from harness.snapshot import bit_equal

REQS = [
    EditRequest("0", "The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    EditRequest("1", "{} plays the sport of", "LeBron James", "the guitar"),
]
FAST = {"layers": [1], "lr": 1e-2, "num_steps": 8}


def _clone(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(model, before):
    return sorted(n for n, p in model.named_parameters() if not bit_equal(p, before[n]))


def _loss(objective, model, tok, requests):
    items = [encode_prompt_target(tok, r.rewrite_prompt, r.target_new) for r in requests]
    with torch.no_grad():
        return float(objective(model, items, pad_id(tok), torch.device("cpu")))


# ----------------------------------------------------------------------------------------------
# hyperparameters


@pytest.mark.parametrize("cls", [FTHparams, FTMHparams])
def test_hparams_are_an_omegaconf_schema(cls):
    cfg = OmegaConf.structured(cls)
    assert set(cfg.keys()) == {f.name for f in dataclasses.fields(cls)}
    assert OmegaConf.to_object(OmegaConf.merge(cfg, {"norm_constraint": 5e-4})).norm_constraint == 5e-4


@pytest.mark.parametrize("field,value", [
    ("layers", []), ("layers", [-1]), ("layers", [3, 3]), ("num_steps", 0), ("lr", 0.0), ("lr", float("nan")),
    ("weight_decay", -1.0), ("norm_constraint", -1e-4), ("batch_size", 0), ("min_loss", -1.0),
])
def test_bad_hparam_named(field, value):
    with pytest.raises(ValueError, match=field):
        FTHparams(**{field: value})


def test_layer_out_of_range(tiny):
    model, _ = tiny
    with pytest.raises(AlgorithmError, match="layer 7 out of range"):
        create_algorithm("ft", {"layers": [7]}).targets(model, REQS)


def test_targets_weight_only_unless_bias_asked(tiny, tiny_gpt2):
    model, _ = tiny
    assert create_algorithm("ft", {"layers": [0, 1]}).targets(model, REQS) == {
        "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    model, _ = tiny_gpt2
    assert create_algorithm("ft_m", {"layers": [1]}).targets(model, REQS) == {"transformer.h.1.mlp.c_proj.weight"}
    assert create_algorithm("ft_m", {"layers": [1], "include_bias": True}).targets(model, REQS) == {
        "transformer.h.1.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.bias"}


# ----------------------------------------------------------------------------------------------
# label masks


@pytest.mark.parametrize("target", ["English", "the guitar", " Paris", "Toko Yasuda 0123"])
def test_labels_decode_exactly_to_target(tiny, target):
    _, tok = tiny
    item = encode_prompt_target(tok, "The mother tongue of Danielle Darrieux is", target)
    assert tok.decode(list(item.target_ids)) == target_text(target) == " " + target.lstrip(" ")


def test_batch_label_mask_under_padding(tiny):
    _, tok = tiny
    items = [encode_prompt_target(tok, r.rewrite_prompt, r.target_new) for r in REQS]
    b = target_batch(items, pad_id(tok), torch.device("cpu"))
    assert b.input_ids.shape[0] == 2 and not bool(b.attention_mask.all())  # one row is padded
    for i, r in enumerate(REQS):
        assert tok.decode(b.input_ids[i][b.label_mask[i]].tolist()) == " " + r.target_new
        assert tok.decode(b.input_ids[i][b.attention_mask[i].bool() & ~b.label_mask[i]].tolist()) == r.rewrite_prompt


def test_labels_without_offsets_fall_back_to_separate_encoding(tiny):
    _, fast = tiny

    class Slow:  # a tokenizer without offset mappings
        is_fast = False

        def __call__(self, text, **kw):
            kw.pop("return_offsets_mapping", None)
            return fast(text, **kw)

    item = encode_prompt_target(Slow(), "The capital of France is", "Paris")
    assert fast.decode(list(item.target_ids)) == " Paris"
    assert fast.decode(list(item.prompt_ids)) == "The capital of France is"


# ----------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("fixture", ["tiny", "tiny_gpt2"])
def test_ftl_stays_within_linf_bound_and_writes_only_targets(request, fixture):
    model, tok = request.getfixturevalue(fixture)
    eps = 1e-3
    algo = create_algorithm("ft", {**FAST, "norm_constraint": eps, "lr": 5e-2})
    before = _clone(model)
    (name,) = algo.targets(model, REQS)
    rep = algo.apply(model, tok, REQS)
    assert _changed(model, before) == [name]
    delta = (model.get_parameter(name) - before[name]).abs()
    assert float(delta.max()) <= eps + 1e-6
    assert float(delta.max()) >= 0.9 * eps  # a big lr pushes to the bound: the clamp is what holds it
    assert rep.delta_norms[name] == pytest.approx(float((model.get_parameter(name) - before[name]).norm()), rel=1e-5)


@pytest.mark.parametrize("name,objective", [("ft", prompt_last_loss), ("ft_m", target_new_loss)])
@pytest.mark.parametrize("fixture", ["tiny", "tiny_gpt2"])
def test_training_raises_target_logprob(request, fixture, name, objective):
    model, tok = request.getfixturevalue(fixture)
    before = _loss(objective, model, tok, REQS)
    rep = create_algorithm(name, {**FAST, "lr": 5e-2, "num_steps": 15}).apply(model, tok, REQS)
    after = _loss(objective, model, tok, REQS)
    # The tiny model's logits are bounded (RMSNorm'd state times a small tied embedding), so a
    # gain of half a nat is most of what any training can reach here.
    assert after < before - 0.5, (before, after)
    assert rep.losses["loss_final"] < rep.losses["loss_first"]


def test_ftm_include_bias_trains_bias(tiny_gpt2):
    model, tok = tiny_gpt2
    before = _clone(model)
    create_algorithm("ft_m", {**FAST, "include_bias": True}).apply(model, tok, REQS)
    assert _changed(model, before) == ["transformer.h.1.mlp.c_proj.bias", "transformer.h.1.mlp.c_proj.weight"]


def test_skip_and_early_stop_below_min_loss(tiny):
    model, tok = tiny
    before = _clone(model)
    rep = create_algorithm("ft", {**FAST, "min_loss": 1e9}).apply(model, tok, REQS)
    name = "model.layers.1.mlp.down_proj.weight"
    assert rep.info == {"epochs": 1, "steps_taken": 0, "steps_skipped": 2,
                        f"intended_norm.{name}": 0.0, f"write_error.{name}": 0.0}
    assert _changed(model, before) == [] and rep.delta_norms == {name: 0.0}


def test_deterministic_and_leaves_no_training_residue(tiny):
    model, tok = tiny
    model.train()  # the caller's mode is respected and kept (tiny Llama has no dropout)
    create_algorithm("ft_m", FAST).apply(model, tok, REQS)
    assert model.training and all(m.training for m in model.modules())
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())
    other, _ = load_model("tiny", device="cpu", dtype="float32")
    other.train()
    create_algorithm("ft_m", FAST).apply(other, tok, REQS)
    assert _changed(model, _clone(other)) == []


@pytest.mark.parametrize("name", ["ft", "ft_m"])
def test_failure_restores_flags_and_weights(tiny, monkeypatch, name):
    model, tok = tiny
    model.get_parameter("model.norm.weight").requires_grad_(True)  # a caller's flag is put back as it was
    before = _clone(model)
    algo = create_algorithm(name, FAST)
    real = type(algo).objective
    calls = []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return real(*args)

    monkeypatch.setattr(type(algo), "objective", staticmethod(flaky))
    with pytest.raises(RuntimeError, match="injected"):
        algo.apply(model, tok, REQS)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["model.norm.weight"]
    assert all(p.grad is None for p in model.parameters())
    assert _changed(model, before) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["ft", "ft_m"])
def test_editor_restore_is_bit_exact(name, dtype):
    model, tok = load_model("tiny", device="cpu", dtype=dtype)
    before = _clone(model)
    algo = create_algorithm(name, {**FAST, "layers": [0, 1]})
    out = Editor(model, tok, algo, keep_original_weight=True).edit(REQS)
    assert sum(out.report.delta_norms.values()) > 0  # the edit did write (fp32 master in bf16 too)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_ftl_equals_ftm_for_a_single_token_target():
    """With one target token, the bag-of-tokens and the teacher-forced objectives are the same loss."""
    reqs = [EditRequest("2", "The capital of {} is", "France", "Paris")]  # " Paris" is one token of the tiny vocabulary
    weights = []
    for name in ("ft", "ft_m"):
        model, tok = load_model("tiny", device="cpu", dtype="float32")
        assert len(encode_prompt_target(tok, reqs[0].rewrite_prompt, "Paris").target_ids) == 1
        create_algorithm(name, FAST).apply(model, tok, reqs)
        weights.append(model.get_parameter("model.layers.1.mlp.down_proj.weight").detach().clone())
    assert torch.allclose(weights[0], weights[1], atol=1e-6, rtol=0)
