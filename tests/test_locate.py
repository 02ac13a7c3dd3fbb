"""Shared locate-then-edit pieces: subject index, templates, keys, target optimisation, statistics."""
from __future__ import annotations

import pytest
import torch

from harness import tokens
from harness.algorithms import locate, stats, target
from harness.algorithms.target import TargetHparams, optimize_target
from harness.models import load_model, model_spec
from harness.types import EditRequest

REQ = EditRequest(case_id="1", prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English")


def _tiny(arch: str, n_layers: int = 3):
    return load_model("tiny", device="cpu", dtype="float32", tiny={"arch": arch, "n_layers": n_layers})


@pytest.mark.parametrize("template,subject", [
    ("The mother tongue of {} is", "Danielle Darrieux"),
    ("{} plays the sport of", "LeBron James"),
    ("Rome is the capital of {}", "Italy"),
    ("{}", "Apple A5"),
])
def test_subject_last_index_decodes_to_subject_end(tiny, template, subject):
    _, tok = tiny
    idx = locate.subject_last_index(tok, template, subject)
    ids = tok(template.replace("{}", subject))["input_ids"]
    upto = tok.decode(ids[: idx + 1], skip_special_tokens=True)
    assert upto.rstrip().endswith(subject)
    assert not tok.decode(ids[:idx], skip_special_tokens=True).rstrip().endswith(subject)


def test_subject_last_index_rejects_bad_template(tiny):
    _, tok = tiny
    with pytest.raises(ValueError):
        locate.subject_last_index(tok, "no slot here", "x")


def test_context_templates_deterministic_and_cached(tiny):
    model, tok = tiny
    a = locate.generate_context_templates(model, tok, [[5, 3], [8, 2]], seed=1)
    b = locate.generate_context_templates(model, tok, [[5, 3], [8, 2]], seed=1)
    assert a == b and len(a) == 6 and a[0] == "{}"
    assert all(t.endswith(". {}") and t.count("{") == 1 and t.count("}") == 1 for t in a[1:])
    cache = locate.TemplateCache()
    assert cache.get(model, tok, [[5, 3], [8, 2]], 1) == a
    cache.get(model, tok, [[5, 3], [8, 2]], 1)
    assert cache.misses == 1


def test_compute_keys_flat_and_grouped(tiny):
    model, tok = tiny
    spec = model_spec(model)
    tpl = ["{}", "Hello there. {}", "Because I can. {}"]
    flat = locate.compute_keys(model, tok, spec, 1, [REQ], tpl)
    singles = torch.stack([locate.compute_keys(model, tok, spec, 1, [REQ], [t])[0] for t in tpl])
    torch.testing.assert_close(flat[0], singles.mean(0))
    grouped = locate.compute_keys(model, tok, spec, 1, [REQ, REQ], [["{}"], tpl[1:]])
    torch.testing.assert_close(grouped[1], 0.5 * singles[0] + 0.25 * (singles[1] + singles[2]))
    # the key is what the MLP output projection receives
    seen = []
    h = model.get_submodule(spec.mlp_out.format(1)).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        model(**tok(REQ.rewrite_prompt, return_tensors="pt"))
    finally:
        h.remove()
    idx = locate.subject_last_index(tok, REQ.prompt, REQ.subject)
    torch.testing.assert_close(singles[0], seen[0][0, idx])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_keys_targets_and_block_outputs_ignore_the_tokenizer_padding_side(arch):
    """Positions are read from batches padded on the right whatever ``tok.padding_side`` says."""
    from harness.algorithms.memit import block_outputs

    model, tok = _tiny(arch, n_layers=2)
    spec = model_spec(model)
    reqs = [REQ, EditRequest("2", "{} plays the sport of", "LeBron James", "football")]
    tpl = ["{}", "Hello there. {}", "Because I can, you know. {}"]  # different lengths: padded batches
    hp = TargetHparams(num_grad_steps=3)
    out = {}
    for side in ("right", "left"):
        tok.padding_side = side
        out[side] = (locate.compute_keys(model, tok, spec, 0, reqs, tpl),
                     optimize_target(model, tok, spec, reqs[0], 0, hp, tpl, where="mlp", fast=True).target,
                     optimize_target(model, tok, spec, reqs[1], 0, hp, tpl, where="mlp", fast=False).target,
                     block_outputs(model, tok, spec, 1, reqs))
        assert tok.padding_side == side  # the caller's setting is left alone
    for right, left in zip(out["right"], out["left"]):
        torch.testing.assert_close(left, right, atol=1e-5, rtol=0)


def test_encode_right_padded_refuses_a_tokenizer_that_pads_left():
    class LeftOnly:
        padding_side = "left"

        def __call__(self, texts, **kw):
            return {"input_ids": torch.tensor([[0, 5], [6, 7]]), "attention_mask": torch.tensor([[0, 1], [1, 1]])}

    with pytest.raises(ValueError, match="did not pad on the right"):
        tokens.encode_right_padded(LeftOnly(), ["a", "b c"], torch.device("cpu"))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("where,loss_layer", [("mlp", None), ("block", None), ("mlp", 2), ("block", 2)])
def test_fast_path_equals_full_path(arch, where, loss_layer):
    # (block output read at the edited block itself would leave the NLL independent of δ: Adam then
    # amplifies rounding noise, so that degenerate setting is not compared here)
    model, tok = _tiny(arch, n_layers=4)
    spec = model_spec(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    hp = TargetHparams(num_grad_steps=6, lr=0.5, weight_decay=1e-4, clamp_norm_factor=50, loss_layer=loss_layer)
    tpl = ["{}", "Hello there. {}", "Because I can do it. {}"]
    fast = optimize_target(model, tok, spec, REQ, 1, hp, tpl, where=where, fast=True)
    full = optimize_target(model, tok, spec, REQ, 1, hp, tpl, where=where, fast=False)
    assert fast.fast and not full.fast and fast.steps == full.steps == 5
    torch.testing.assert_close(fast.delta, full.delta, rtol=1e-5, atol=1e-5)
    assert max(abs(a - b) for a, b in zip(fast.losses, full.losses)) < 1e-5
    torch.testing.assert_close(fast.v_init, full.v_init, rtol=0, atol=0)
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _target_nll(model, tok, spec, layer, delta=None):
    """Mean NLL of the target tokens after the bare rewrite prompt, with δ added to the MLP output."""
    from harness.tokens import encode_prompt_target

    pt = encode_prompt_target(tok, REQ.rewrite_prompt, REQ.target_new)
    ids = torch.tensor([list(pt.ids)])
    idx = locate.subject_last_index(tok, REQ.prompt, REQ.subject)

    def add(_m, _i, out):
        out = out.clone()
        out[0, idx] += delta
        return out

    h = model.get_submodule(spec.mlp.format(layer)).register_forward_hook(add) if delta is not None else None
    try:
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
    finally:
        if h is not None:
            h.remove()
    n = len(pt.target_ids)
    return float(-logp[-n:].gather(1, ids[0, -n:, None]).mean())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_target_raises_target_probability(arch):
    """A hooked forward with v* = v_init + δ makes the target likelier than the unhooked one.

    (Random tiny models move little: the margin that matters is checked on SmolLM2 in test_rome.)
    """
    model, tok = _tiny(arch)
    spec = model_spec(model)
    hp = TargetHparams(num_grad_steps=15, lr=0.5, weight_decay=0.0, clamp_norm_factor=1e4, kl_factor=0.0)
    res = optimize_target(model, tok, spec, REQ, 0, hp, ["{}"], where="mlp")
    assert res.nll[-1] < res.nll[0] and res.steps == 14
    assert _target_nll(model, tok, spec, 0, res.delta) < _target_nll(model, tok, spec, 0) - 1e-3
    assert abs(_target_nll(model, tok, spec, 0, res.delta) - res.nll[-1]) < 1e-4  # same loss the loop saw


def test_target_validates_arguments(tiny):
    model, tok = tiny
    spec = model_spec(model)
    with pytest.raises(ValueError):
        optimize_target(model, tok, spec, REQ, 0, TargetHparams(), ["{}"], where="attn")
    with pytest.raises(ValueError):
        optimize_target(model, tok, spec, REQ, 5, TargetHparams(), ["{}"], where="mlp")


# ----------------------------------------------------------------------------------------------
# statistics


def test_second_moment_matches_definition_and_disk_cache_is_reused(tmp_path):
    model, tok = _tiny("gpt2")
    spec = model_spec(model)
    cfg = stats.StatsConfig(n_samples=6, seq_len=12, batch_size=4, cache_dir=str(tmp_path))
    first = stats.StatsCache()
    c = first.get_many(model, tok, spec, [0, 2], cfg)
    assert first.computed == 2 and first.loaded == 0
    # definition: mean of k kᵀ over all (non-pad) tokens of the sampled corpus
    seqs = stats.sample_texts(model, tok, 6, 12, seed=0, batch_size=4)
    seen = []
    h = model.get_submodule(spec.mlp_out.format(2)).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        model(input_ids=torch.tensor(seqs))
    finally:
        h.remove()
    k = seen[0].reshape(-1, seen[0].shape[-1])
    torch.testing.assert_close(c[2], k.T @ k / k.shape[0], rtol=1e-4, atol=1e-6)
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == 2
    mtimes = [f.stat().st_mtime_ns for f in files]
    second = stats.StatsCache()
    c2 = second.get(model, tok, spec, 2, cfg)
    assert second.computed == 0 and second.loaded == 1
    assert torch.equal(c2, c[2])
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    second.get(model, tok, spec, 2, cfg)  # in memory now
    assert second.loaded == 1


def test_stats_from_jsonl_corpus(tmp_path):
    model, tok = _tiny("llama", n_layers=2)
    spec = model_spec(model)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "The capital of France is Paris."}\n{"text": "LeBron James plays basketball."}\n')
    cfg = stats.StatsConfig(source=str(corpus), n_samples=2, seq_len=16, dtype="float64", cache_dir=str(tmp_path))
    c = stats.second_moment(model, tok, spec, 1, cfg)
    assert c.dtype == torch.float64 and c.shape == (128, 128)
    torch.testing.assert_close(c, c.T)


def test_inverse_apply_solves_with_ridge():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 200, generator=g, dtype=torch.float64)
    cov = (a @ a.T / 200).float()
    x = torch.randn(30, generator=g)
    y = stats.inverse_apply(cov, x, ridge=0.0)
    torch.testing.assert_close(cov.double() @ y, x.double(), rtol=1e-8, atol=1e-8)
    eps = 0.1 * float(cov.diagonal().mean())
    y2 = stats.inverse_apply(cov, x, ridge=0.1)
    torch.testing.assert_close((cov.double() + eps * torch.eye(30, dtype=torch.float64)) @ y2, x.double())


def test_stats_config_validates():
    with pytest.raises(ValueError):
        stats.StatsConfig(dtype="float16")
    with pytest.raises(ValueError):
        stats.StatsConfig(source="corpus.parquet")


BATCH = [REQ,
         EditRequest(case_id="2", prompt="{} plays the sport of", subject="LeBron James", target_new="football"),
         EditRequest(case_id="3", prompt="The capital city of {} is", subject="Italy", target_new="Paris"),
         EditRequest(case_id="4", prompt="{} was developed by", subject="Apple A5", target_new="Google")]


@pytest.mark.parametrize("arch,where,fast", [("llama", "block", True), ("gpt2", "mlp", True), ("llama", "mlp", False)])
def test_batched_targets_equal_one_at_a_time(arch, where, fast):
    """Each δ_j of a batch follows its own path, including a request that stops early."""
    model, tok = _tiny(arch, n_layers=4)
    spec = model_spec(model)
    tpl = [["{}"], ["Hello there. {}", "Because I can do it. {}"]]
    probe = TargetHparams(num_grad_steps=8, lr=0.05, weight_decay=0.0, clamp_norm_factor=50, early_stop_loss=0.0)
    curves = [optimize_target(model, tok, spec, r, 1, probe, tpl, where=where, fast=fast).losses for r in BATCH]
    # an early-stop threshold at which the requests stop at different steps (random models move
    # their losses either way, so it is picked from the curves themselves)

    def stops(thr):
        return {next((i for i, x in enumerate(c) if x < thr), len(c) - 1) for c in curves}

    def mixed(thr):  # someone stops after taking steps, someone else at another step
        got = stops(thr)
        return len(got) > 1 and any(0 < s < len(curves[0]) - 1 for s in got)

    thr = next(x + 1e-6 for x in sorted(x for c in curves for x in c) if mixed(x + 1e-6))
    hp = TargetHparams(num_grad_steps=8, lr=0.05, weight_decay=0.0, clamp_norm_factor=50, early_stop_loss=thr)
    singles = [optimize_target(model, tok, spec, r, 1, hp, tpl, where=where, fast=fast) for r in BATCH]
    batch = target.optimize_targets(model, tok, spec, BATCH, 1, hp, tpl, where=where, fast=fast)
    assert [r.steps for r in batch] == [r.steps for r in singles]
    assert len({r.steps for r in batch}) > 1 and any(0 < r.steps < 7 for r in batch)
    assert all(r.fast == fast for r in batch)
    for one, many in zip(singles, batch):
        torch.testing.assert_close(many.v_init, one.v_init, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(many.delta, one.delta, rtol=1e-4, atol=1e-4)
        assert max(abs(a - b) for a, b in zip(one.losses, many.losses)) < 1e-4
        assert len(one.losses) == len(many.losses)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
