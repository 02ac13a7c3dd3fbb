"""LoRA: merged == unmerged, merge/unmerge round trip, exact restore, no wrappers or grads left, non-finite refused."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from harness import Editor, EditRequest, create_algorithm, load_model
from harness.algorithms import lora as lora_mod
from harness.algorithms.base import AlgorithmError
from harness.algorithms.finetune import target_new_loss
from harness.algorithms.lora import LoraHparams, LoraLayer, lora_adapters, merge_all
from harness.tokens import encode_prompt_target, pad_id
from harness.snapshot import bit_equal

REQS = [
    EditRequest("0", "The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    EditRequest("1", "{} plays the sport of", "LeBron James", "the guitar"),
]
FAST = {"target_modules": ["mlp.down_proj"], "num_steps": 6, "lr": 1e-2}
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
WRAP = {  # modules to wrap per architecture: Linear, Embedding, Conv1D
    "llama": ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.embed_tokens"],
    "gpt2": ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj", "transformer.wte"],
}


def _clone(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(model, before):
    return sorted(n for n, p in model.named_parameters() if not bit_equal(p, before[n]))


def _tree(model):
    return [(n, id(m)) for n, m in model.named_modules()]


def _untie(model):
    """Give the unembedding its own copy of the tied weight, so the input embedding can take an adapter."""
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    return model


def _untie_loaded(loaded):
    _untie(loaded[0])
    return loaded


def _randomise_b(layers, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)


# ----------------------------------------------------------------------------------------------
# hyperparameters and module selection


def test_hparams_are_an_omegaconf_schema():
    cfg = OmegaConf.structured(LoraHparams)
    assert set(cfg.keys()) == {f.name for f in dataclasses.fields(LoraHparams)}
    hp = OmegaConf.to_object(OmegaConf.merge(cfg, {"layers": [1, 2], "target_modules": ["self_attn.q_proj"]}))
    assert hp.layers == [1, 2] and hp.target_modules == ["self_attn.q_proj"]


@pytest.mark.parametrize("field,value", [
    ("target_modules", []), ("target_modules", [".q_proj"]), ("layers", []), ("layers", [-2]), ("rank", 0),
    ("alpha", 0.0), ("dropout", 1.0), ("lr", -1.0), ("weight_decay", -0.1), ("num_steps", 0), ("batch_size", 0),
])
def test_bad_hparam_named(field, value):
    with pytest.raises(ValueError, match=field):
        LoraHparams(**{field: value})


def test_module_selection_by_suffix_and_layer(tiny):
    model, _ = tiny
    algo = create_algorithm("lora", {"target_modules": ["self_attn.q_proj", "v_proj"], "layers": [1]})
    assert algo.targets(model, REQS) == {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"}
    assert len(create_algorithm("lora", {"target_modules": ["v_proj"]}).targets(model, REQS)) == 2
    with pytest.raises(AlgorithmError, match="no module matches"):
        create_algorithm("lora", {"target_modules": ["proj"]}).targets(model, REQS)  # whole components only
    with pytest.raises(AlgorithmError, match="LoRA wraps"):
        create_algorithm("lora", {"target_modules": ["mlp"]}).targets(model, REQS)


@pytest.mark.parametrize("fixture,mods,untied", [("tiny", ["lm_head"], "lm_head.weight"),
                                                 ("tiny", ["embed_tokens"], "model.embed_tokens.weight"),
                                                 ("tiny_gpt2", ["wte"], "transformer.wte.weight")])
def test_tied_weights_refused(request, fixture, mods, untied):
    model, tok = request.getfixturevalue(fixture)  # both tie the unembedding to the input embedding
    algo = create_algorithm("lora", {**FAST, "target_modules": mods})
    with pytest.raises(AlgorithmError, match="tied"):
        algo.targets(model, REQS)
    with pytest.raises(AlgorithmError, match="tied"):
        algo.apply(model, tok, REQS)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    _untie(model)
    assert algo.targets(model, REQS) == {untied}


# ----------------------------------------------------------------------------------------------
# the layer


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_matches_unmerged_and_unmerge_round_trips(arch):
    model, _ = _untie_loaded(load_model("tiny", device="cpu", dtype="float32", tiny={"arch": arch}))
    tree = _tree(model)
    w0 = _clone(model)
    with torch.no_grad(), lora_adapters(model, WRAP[arch], rank=4, alpha=8.0, dropout=0.1, seed=1) as layers:
        for layer in layers.values():
            layer.eval()  # dropout off: the unmerged forward is then exactly W + delta
        ref = model(IDS).logits
        _randomise_b(layers)
        unmerged = model(IDS).logits
        merge_all(list(layers.values()))
        assert all(layer.merged for layer in layers.values())
        merged = model(IDS).logits
        assert float((unmerged - ref).abs().max()) > 1e-3  # the adapters do something
        assert torch.allclose(merged, unmerged, atol=1e-5, rtol=0)
        for layer in layers.values():
            layer.unmerge()
    assert _tree(model) == tree
    assert max(float((p - w0[n]).abs().max()) for n, p in model.named_parameters()) <= 1e-6


def test_layer_kinds_and_conv1d_delta_is_transposed(tiny_gpt2):
    model, _ = tiny_gpt2
    conv = model.get_submodule("transformer.h.1.mlp.c_proj")  # weight [d_ff, d] = W^T
    layer = LoraLayer(conv, rank=2, alpha=2.0, generator=torch.Generator().manual_seed(0))
    assert layer.kind == "conv1d" and layer.lora_A.shape == (2, 128) and layer.lora_B.shape == (64, 2)
    with torch.no_grad():
        layer.lora_B.normal_()
    assert torch.equal(layer.delta_weight(), (layer.lora_B @ layer.lora_A).T)
    with pytest.raises(AlgorithmError, match="cannot wrap"):
        LoraLayer(model.get_submodule("transformer.ln_f"), rank=2, alpha=2.0)


def test_non_finite_merge_refused_before_anything_written(tiny):
    model, _ = _untie_loaded(tiny)
    before = _clone(model)
    with lora_adapters(model, WRAP["llama"], rank=2, alpha=4.0) as layers:
        _randomise_b(layers)
        with torch.no_grad():
            layers["model.layers.1.mlp.down_proj"].lora_B[0, 0] = float("inf")
        with pytest.raises(AlgorithmError, match="non-finite"):
            merge_all(list(layers.values()))
        assert not any(layer.merged for layer in layers.values())
    assert _changed(model, before) == []


def test_merge_overflowing_half_precision_refused():
    base = torch.nn.Linear(8, 4).to(torch.float16)
    w0 = base.weight.detach().clone()
    layer = LoraLayer(base, rank=2, alpha=2.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_B.fill_(1e6)  # finite in float32, beyond float16's 65504
    assert torch.isfinite(layer.delta_weight()).all()
    with pytest.raises(AlgorithmError, match="non-finite values in torch.float16"):
        layer.merge()
    assert bit_equal(base.weight, w0) and not layer.merged


# ----------------------------------------------------------------------------------------------
# the algorithm


@pytest.mark.parametrize("fixture,mods", [("tiny", ["self_attn.q_proj", "self_attn.v_proj"]),
                                          ("tiny_gpt2", ["attn.c_attn", "mlp.c_proj"])])
def test_apply_edits_declared_weights_and_removes_wrappers(request, fixture, mods):
    model, tok = request.getfixturevalue(fixture)
    tree, before = _tree(model), _clone(model)
    algo = create_algorithm("lora", {**FAST, "target_modules": mods})
    targets = algo.targets(model, REQS)
    items = [encode_prompt_target(tok, r.rewrite_prompt, r.target_new) for r in REQS]
    with torch.no_grad():
        loss_before = float(target_new_loss(model, items, pad_id(tok), torch.device("cpu")))
    rep = algo.apply(model, tok, REQS)
    with torch.no_grad():
        loss_after = float(target_new_loss(model, items, pad_id(tok), torch.device("cpu")))
    assert _tree(model) == tree  # the very same module objects, no LoraLayer anywhere
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert _changed(model, before) == sorted(targets) == sorted(rep.delta_norms)
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())
    assert loss_after < loss_before - 0.5, (loss_before, loss_after)


def test_deterministic_given_seed(tiny):
    model, tok = tiny
    create_algorithm("lora", {**FAST, "seed": 3}).apply(model, tok, REQS)
    other, _ = load_model("tiny", device="cpu", dtype="float32")
    create_algorithm("lora", {**FAST, "seed": 3}).apply(other, tok, REQS)
    assert _changed(model, _clone(other)) == []
    third, _ = load_model("tiny", device="cpu", dtype="float32")
    create_algorithm("lora", {**FAST, "seed": 4}).apply(third, tok, REQS)
    assert _changed(third, _clone(other)) != []


def test_training_failure_removes_wrappers_and_restores_flags(tiny, monkeypatch):
    model, tok = tiny
    tree, before = _tree(model), _clone(model)
    calls = []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("injected failure")
        return target_new_loss(*args)

    monkeypatch.setattr(lora_mod, "target_new_loss", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        create_algorithm("lora", FAST).apply(model, tok, REQS)
    assert _tree(model) == tree
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())
    assert _changed(model, before) == []  # nothing merged


def test_non_finite_delta_in_apply_writes_nothing(tiny, monkeypatch):
    model, tok = tiny
    tree, before = _tree(model), _clone(model)
    real = LoraLayer.delta_weight
    victim = model.get_submodule("model.layers.1.mlp.down_proj")  # merged after layer 0's

    def poisoned(self):
        d = real(self)
        if self.base is victim:
            d[0, 0] = float("nan")
        return d

    monkeypatch.setattr(LoraLayer, "delta_weight", poisoned)
    with pytest.raises(AlgorithmError, match="non-finite"):
        create_algorithm("lora", FAST).apply(model, tok, REQS)
    assert _tree(model) == tree
    assert _changed(model, before) == []  # layer 0's finite delta was not written either


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_editor_restore_is_bit_exact(arch, dtype):
    model, tok = _untie_loaded(load_model("tiny", device="cpu", dtype=dtype, tiny={"arch": arch}))
    before = _clone(model)
    mods = ["mlp.down_proj", "embed_tokens"] if arch == "llama" else ["mlp.c_proj", "wte"]
    out = Editor(model, tok, create_algorithm("lora", {**FAST, "target_modules": mods}), keep_original_weight=True).edit(REQS)
    assert len(out.targets) == 3 and all(v > 0 for v in out.report.delta_norms.values())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
