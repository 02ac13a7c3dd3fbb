"""The target optimisation's constant work done once (harness/algorithms/replay.py): the blocks below
the δ site replayed, and the prefixes' KV cache shared instead of deep-copied at every step."""
from __future__ import annotations

import pytest
import torch

from harness.algorithms import target, target_rows
from harness.algorithms.replay import BlockReplay, fresh_cache
from harness.algorithms.target import TargetHparams, optimize_target, optimize_targets
from harness.models import get_module, load_model, model_spec, output_cache
from harness.tokens import pad_batch, pad_id
from harness.types import EditRequest

REQ = EditRequest(case_id="1", prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English")
BATCH = [REQ, EditRequest(case_id="2", prompt="{} plays the sport of", subject="LeBron James", target_new="guitar"),
         EditRequest(case_id="3", prompt="The capital of {} is", subject="France", target_new="Rome")]
TPL = ["{}", "Hello there. {}", "Because I can do it. {}"]


def _tiny(arch: str, n_layers: int = 4):
    return load_model("tiny", device="cpu", dtype="float32", tiny={"arch": arch, "n_layers": n_layers})


def _calls(module: torch.nn.Module) -> list[int]:
    """A counter of real runs of ``module`` (a forward hook on its first child: a replayed block's
    children never run, while hooks on the block itself still fire)."""
    count = [0]
    next(module.children()).register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("where,layer,fast", [("mlp", 2, True), ("block", 1, True), ("mlp", 2, False)])
def test_replay_equals_recomputing_and_skips_lower_blocks(arch, where, layer, fast):
    model, tok = _tiny(arch)
    spec = model_spec(model)
    hp = TargetHparams(num_grad_steps=6, lr=0.5, weight_decay=1e-4, clamp_norm_factor=50)
    lowest = get_module(model, spec.layer.format(0))
    plain = optimize_targets(model, tok, spec, BATCH, layer, hp, TPL, where=where, fast=fast, replay=False)
    count = _calls(lowest)
    replayed = optimize_targets(model, tok, spec, BATCH, layer, hp, TPL, where=where, fast=fast, replay=True)
    for a, b in zip(plain, replayed):
        assert a.steps == b.steps and a.fast == b.fast == fast
        torch.testing.assert_close(b.delta, a.delta, rtol=0, atol=1e-6)
        assert max(abs(x - y) for x, y in zip(a.losses, b.losses)) < 1e-6
    # block 0 ran in the reference pass, the prefix pass (fast) and step 0 only, not at every step
    assert count[0] == (3 if fast else 2)
    assert not any("forward" in m.__dict__ for m in model.modules())  # every replaced forward is put back


def test_replay_matches_the_reference_path_at_the_edited_layer():
    model, tok = _tiny("llama")
    spec = model_spec(model)
    hp = TargetHparams(num_grad_steps=6, lr=0.5, weight_decay=1e-4, clamp_norm_factor=50)
    quick = optimize_target(model, tok, spec, REQ, 2, hp, TPL, where="mlp", fast=True, replay=True)
    slow = optimize_target(model, tok, spec, REQ, 2, hp, TPL, where="mlp", fast=False, replay=False)
    assert quick.steps == slow.steps == 5
    torch.testing.assert_close(quick.delta, slow.delta, rtol=1e-5, atol=1e-5)


def test_prefix_cache_is_never_written_to(monkeypatch):
    """The shared (shallow) cache copies leave the prefixes' tensors as the prefix pass made them."""
    model, tok = _tiny("llama")
    spec = model_spec(model)
    seen = []
    split = target_rows.split_at_subject

    def keep(*a, **k):
        at = split(*a, **k)
        seen.append([(t, t._version, t.clone()) for layer in at.cache.layers for t in (layer.keys, layer.values)])
        return at

    monkeypatch.setattr(target, "split_at_subject", keep)
    hp = TargetHparams(num_grad_steps=6, lr=0.5, weight_decay=1e-4, clamp_norm_factor=50, early_stop_loss=0.0)
    optimize_targets(model, tok, spec, BATCH, 1, hp, TPL, where="mlp", fast=True)
    assert seen and all(t._version == v and torch.equal(t, c) for t, v, c in seen[0])


def test_fresh_cache_shares_tensors_only_for_dynamic_layers():
    model, tok = _tiny("llama")
    ids = torch.tensor([tok("Hello there")["input_ids"]])
    cache = model(input_ids=ids, use_cache=True).past_key_values
    shallow = fresh_cache(cache)
    assert shallow is not cache and shallow.layers[0] is not cache.layers[0]
    assert shallow.layers[0].keys is cache.layers[0].keys
    shallow.layers[0].update(cache.layers[0].keys, cache.layers[0].values)
    assert cache.layers[0].keys.shape[-2] == ids.shape[1]  # the original did not grow
    assert fresh_cache(None) is None

    class Other:
        def __init__(self):
            self.t = torch.zeros(2)

    other = Other()
    assert fresh_cache(other).t is not other.t  # unknown kinds are deep-copied


def test_block_replay_needs_blocks():
    with pytest.raises(ValueError, match="at least one block"):
        BlockReplay([])


def test_replay_puts_back_a_forward_set_on_the_instance():
    """accelerate's device hooks (a dispatched model) live in the block's own ``forward``
    attribute: replay must leave them as they were, and results equal."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model, tok = _tiny("llama")
    spec = model_spec(model)
    hp = TargetHparams(num_grad_steps=4, lr=0.5, weight_decay=1e-4, clamp_norm_factor=50)
    plain = optimize_target(model, tok, spec, REQ, 2, hp, TPL, where="mlp", replay=False)
    blocks = [get_module(model, spec.layer.format(i)) for i in range(2)]
    for block in blocks:
        add_hook_to_module(block, AlignDevicesHook(execution_device=torch.device("cpu")))
    hooked = [block.__dict__["forward"] for block in blocks]
    replayed = optimize_target(model, tok, spec, REQ, 2, hp, TPL, where="mlp", replay=True)
    assert [block.__dict__["forward"] for block in blocks] == hooked
    torch.testing.assert_close(replayed.delta, plain.delta, rtol=0, atol=1e-6)


def test_a_dispatched_model_runs_end_to_end(tmp_path):
    from harness.cli import compose_config, to_config
    from harness.runner import ModelCache, run

    ov = ["experiment=smoke", "threads=1", "data.limit=2", "model.device_map=auto"]
    result = run(to_config(compose_config(ov)), tmp_path, ov, cache=ModelCache(), progress=False)
    assert result.n_errors == 0 and result.n_cases == 2


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_prefix_pass_builds_the_plain_forwards_cache_without_logits(arch):
    """split_at_subject's prefix pass: the same KV cache, bit for bit, as the plain forward that
    computes every logit, while the unembedding projects no position (and the KN prefix too)."""
    model, tok = _tiny(arch)
    spec = model_spec(model)
    b = target_rows.build_rows(tok, BATCH, TPL, torch.device("cpu"))
    pad = pad_id(tok)
    projected: list[tuple[int, ...]] = []
    unembed = get_module(model, spec.unembed)
    handle = unembed.register_forward_hook(lambda _m, _a, out: projected.append(tuple(out.shape)))
    try:
        cut = target_rows.split_at_subject(model, b, pad)
    finally:
        handle.remove()
    assert len(projected) == 1 and projected[0][:2] == (b.ids.shape[0], 0)  # [B, 0, V]: no logits
    # the plain forward over the same prefixes (what split_at_subject ran before)
    pre, pre_attn = pad_batch([r[:s] for r, s in zip(b.ids.tolist(), b.sub.tolist())], pad, side="left")
    with torch.no_grad():
        out = model(input_ids=pre, attention_mask=pre_attn, position_ids=(pre_attn.cumsum(1) - 1).clamp(min=0),
                    use_cache=True)
    assert out.logits.shape[1] == pre.shape[1]  # the plain forward does project every position
    ref = output_cache(out)
    assert len(cut.cache.layers) == len(ref.layers) > 0
    for got, want in zip(cut.cache.layers, ref.layers):
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
