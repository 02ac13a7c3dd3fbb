"""WISE (harness/algorithms/wise.py, wise_memory.py): the side memory's pieces on tensors (TIES merge,
routing, masks, state), the hook on the tiny model, and one training run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness import EditRequest
from harness.algorithms.hooks import Hooks
from harness.algorithms.base import AlgorithmError
from harness.algorithms.wise import IrrelevantHparams, Wise, load_irrelevant
from harness.algorithms.wise_train import margins
from harness.algorithms.wise_memory import (SideMemory, WiseHook, gradient_mask, route, running_mean, ties_merge,
                                            trim)
from harness.models import tiny_model

REQ = EditRequest(case_id="1", prompt="The mother tongue of {} is", subject="Danielle Darrieux",
                  target_new="English", target_true="French")
TINY = dict(layer=1, num_steps=25, lr=50.0, alpha=0.5, beta=2.0, gamma=1.0, mask_ratio=0.5,
            norm_constraint=None, templates={"length_params": [[3, 1]]},
            # the paper's objective and memory (the SmolLM2 defaults differ; conf/algorithm/wise.yaml)
            project_out=0, margin_weight=1.0, shard_size=500, merge_every=1000, retrieve=False,
            relative_routing=False, live_threshold=False)


# ----------------------------------------------------------------------------------------------
# tensor pieces


def test_ties_merge_elects_a_sign_and_averages_only_the_agreeing_entries() -> None:
    t1, t2 = torch.tensor([3.0, -1.0, 0.5, 2.0]), torch.tensor([1.0, 2.0, -0.5, -4.0])
    # signs of the sum: +, +, 0, -; entry 2 has no agreeing shard
    assert torch.equal(ties_merge([t1, t2], density=1.0), torch.tensor([2.0, 2.0, 0.0, -4.0]))
    # trimmed to 2 of 4 entries each: t1 -> [3, 0, 0, 2], t2 -> [0, 2, 0, -4]
    assert torch.equal(ties_merge([t1, t2], density=0.5), torch.tensor([3.0, 2.0, 0.0, -4.0]))
    # weights 3:1 -> weighted sum [10, -1, 1, 2]; weighted mean of the agreeing entries
    assert torch.allclose(ties_merge([t1, t2], 1.0, [3, 1]), torch.tensor([2.5, -1.0, 0.5, 2.0]))
    assert torch.equal(ties_merge([t1], 0.5), trim(t1, 0.5))
    with pytest.raises(ValueError, match="positive weight"):
        ties_merge([t1, t2], 1.0, [1, 0])
    with pytest.raises(ValueError, match="shape"):
        ties_merge([t1, t2[:3]], 1.0)


def test_trim_keeps_the_largest_magnitudes() -> None:
    t = torch.tensor([[0.1, -5.0], [2.0, -0.3]])
    assert torch.equal(trim(t, 0.5), torch.tensor([[0.0, -5.0], [2.0, 0.0]]))
    assert torch.equal(trim(t, 1.0), t)


def test_route_picks_the_highest_score_above_its_own_threshold() -> None:
    scores = torch.tensor([[1.0, 5.0, 3.0, 0.5],   # memory 0, threshold 2
                           [4.0, 4.5, 9.0, 0.9]])  # memory 1, threshold 6
    assert route(scores, torch.tensor([2.0, 6.0])).tolist() == [-1, 0, 1, -1]
    assert route(scores, torch.tensor([9.0, 9.0])).tolist() == [-1, -1, -1, -1]  # strictly above
    scores = torch.tensor([[5.0, 3.0], [7.0, 13.0]])  # thresholds 2 and 6: ratios 2.5, 1.5 and 1.17, 2.17
    assert route(scores, torch.tensor([2.0, 6.0])).tolist() == [1, 1]
    assert route(scores, torch.tensor([2.0, 6.0]), relative=True).tolist() == [0, 1]  # relative_routing


def test_running_mean_is_causal() -> None:
    s = torch.tensor([[2.0, 4.0, 0.0, 6.0]])
    assert torch.equal(running_mean(s), torch.tensor([[2.0, 3.0, 2.0, 3.0]]))
    padded = torch.cat([s, torch.tensor([[100.0, 100.0]])], 1)  # later tokens (padding) change nothing before
    assert torch.equal(running_mean(padded)[:, :4], running_mean(s))


def test_gradient_masks_are_seeded_and_keep_the_ratio() -> None:
    a, b, c = gradient_mask((100, 100), 0.2, 7), gradient_mask((100, 100), 0.2, 7), gradient_mask((100, 100), 0.2, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.unique().tolist()) == {0.0, 1.0} and abs(float(a.mean()) - 0.2) < 0.02
    with pytest.raises(ValueError, match="mask ratio"):
        gradient_mask((2, 2), 0.0, 0)


def test_side_memory_shards_merge_and_state_round_trip() -> None:
    mem = SideMemory()
    like = torch.zeros(2, 3)
    for k, value in enumerate((1.0, -2.0, 3.0)):
        shard = mem.start_shard(like)
        shard.delta, shard.edits, shard.min_score = torch.full((2, 3), value), k + 1, 10.0 - k
    assert len(mem.pending) == 2 and mem.shards_started == 3 and len(mem.memories()) == 3
    retrieve = SideMemory.from_state(mem.state_dict())
    mem.merge(density=1.0, retrieve=False)
    assert mem.active is None and not mem.pending and len(mem.merged) == 1
    merged = mem.merged[0]
    # sign of 1*1 - 2*2 + 3*3 > 0: the positive shards agree, weighted by their edits (1 and 3)
    assert merged.edits == 6 and merged.min_score == 8.0 and torch.allclose(merged.delta, torch.full((2, 3), 2.5))
    retrieve.merge(density=1.0, retrieve=True)
    retrieve.start_shard(like).edits = 0
    retrieve.merge(density=1.0, retrieve=True)  # nothing pending: no new memory
    assert len(retrieve.merged) == 1
    again = SideMemory.from_state(mem.state_dict())
    assert again.state_dict().keys() == mem.state_dict().keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in mem.state_dict().items())
    with pytest.raises(ValueError, match="unexpected state entry 'bogus.0.delta'"):
        SideMemory.from_state({"bogus.0.delta": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"lacks \['min_score'\]"):
        SideMemory.from_state({"active.0.delta": torch.zeros(1), "active.0.edits": torch.tensor(1)})


def test_margin_loss_is_zero_when_the_margins_hold() -> None:
    good_edit, good_irr = torch.tensor([25.0, 30.0]), torch.tensor([1.0, 2.0])  # the scored positions
    assert float(margins(good_edit, good_irr, alpha=5.0, beta=20.0, gamma=10.0)) == 0.0
    bad_edit, bad_irr = torch.tensor([15.0, 30.0]), torch.tensor([1.0, 8.0])  # edit 15 < beta 20; irrelevant 8 > alpha 5
    # mean⁺(beta - s_edit) = 5, mean⁺(s_irr - alpha) = 3, gap: 10 - (15 - 8) = 3 (30 - 8 leaves none)
    assert float(margins(bad_edit, bad_irr, alpha=5.0, beta=20.0, gamma=10.0)) == pytest.approx(11.0)


def test_irrelevant_pool_formats(tmp_path: Path) -> None:
    zsre = tmp_path / "z.json"
    zsre.write_text(json.dumps([{"loc": "nq question: who", "loc_ans": "me"}, {"loc": "q2", "loc_ans": "a2"},
                                {"locality_prompt": "p", "locality_ground_truth": "g"}]))
    assert load_irrelevant(IrrelevantHparams(path=str(zsre), offset=1)) == ["q2 a2", "p g"]
    lines = tmp_path / "t.txt"
    lines.write_text("one. two\n\nthree\n")
    assert load_irrelevant(IrrelevantHparams(path=str(lines))) == ["one. two", "three"]
    default = load_irrelevant(IrrelevantHparams(limit=3))
    assert len(default) == 3 and default[0].startswith("Rivers are streams")
    bad = tmp_path / "b.jsonl"
    bad.write_text('"ok"\n{"x": 1}\n')
    with pytest.raises(ValueError, match="record 1"):
        load_irrelevant(IrrelevantHparams(path=str(bad)))
    with pytest.raises(FileNotFoundError, match="irrelevant.path"):
        load_irrelevant(IrrelevantHparams(path=str(tmp_path / "none.json")))


# ----------------------------------------------------------------------------------------------
# on the tiny model


def _forward(model, tok, texts):
    ids = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits, ids["attention_mask"]


def test_an_empty_memory_changes_nothing() -> None:
    model, tok = tiny_model("llama", n_layers=2)
    base, _ = _forward(model, tok, ["The mother tongue of Danielle Darrieux is", "Rivers flow"])
    memory = SideMemory()
    memory.start_shard(model.get_parameter("model.layers.1.mlp.down_proj.weight"))  # a shard with no edit yet
    with Hooks() as hooks:
        hooks.output(model.get_submodule("model.layers.1.mlp.down_proj"), WiseHook(memory, False, 0.9))
        same, _ = _forward(model, tok, ["The mother tongue of Danielle Darrieux is", "Rivers flow"])
    assert torch.equal(base, same)


def test_training_writes_the_side_memory_only_inside_the_mask_and_routes_the_edit() -> None:
    model, tok = tiny_model("llama", n_layers=2)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    algo = Wise(TINY)
    report = algo.apply(model, tok, [REQ])
    assert all(torch.equal(p, params[n]) and p.grad is None for n, p in model.named_parameters())
    hooked = [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == ["model.layers.1.mlp.down_proj"]  # apply leaves the memory attached (the contract)
    algo.detach(model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    mem = algo.memory.active
    mask = gradient_mask(mem.delta.shape, 0.5, algo.memory.shards_started)
    assert mem.edits == 1 and bool((mem.delta[mask == 0] == 0).all()) and bool((mem.delta[mask == 1] != 0).any())
    assert report.losses["loss_final"] < report.losses["loss_first"] and report.info["fast_forward"] == 1.0
    eps = report.info["threshold"]
    assert report.info["edit_score_min"] > eps > report.info["irrelevant_score_max"]

    texts = [REQ.rewrite_prompt + " English", "Rivers are streams of fresh water that flow"]
    base, attn = _forward(model, tok, texts)
    algo.attach(model)
    algo.attach(model)  # idempotent
    edited, _ = _forward(model, tok, texts)
    last = int(attn[0].sum()) - 1
    assert not torch.equal(base[0, last], edited[0, last])  # the edit prompt is routed to the side memory
    assert torch.equal(base[1], edited[1])  # the irrelevant text keeps the main memory's output
    alone, _ = _forward(model, tok, texts[:1])
    assert torch.allclose(alone[0], edited[0, :alone.shape[1]], atol=1e-5)  # padding in the batch changes nothing


def test_project_out_keeps_the_side_memory_blind_to_the_common_activation_directions() -> None:
    from harness.algorithms.wise_train import activation_basis, projection

    model, tok = tiny_model("llama", n_layers=2)
    module, weight, _ = projection(model, 1)
    texts = ["Rivers are streams of fresh water", "The moon orbits the earth", "Paris is a city in France"]
    basis = activation_basis(model, tok, module, texts, 4)
    assert basis.shape == (weight.shape[1], 4)
    assert torch.allclose(basis.T @ basis, torch.eye(4), atol=1e-5)
    algo = Wise({**TINY, "project_out": 4, "irrelevant": {"path": None}})
    report = algo.apply(model, tok, [REQ])
    algo.detach(model)
    delta = algo.memory.active.delta
    assert bool((delta != 0).any()) and report.losses["loss_final"] < report.losses["loss_first"]
    own = activation_basis(model, tok, module, algo._irrelevant, 4)
    assert float((delta @ own).abs().max()) < 1e-5 * float(delta.abs().max())  # Δ a = 0 on the basis' span
    with pytest.raises(ValueError, match="project_out must be in 1 .. "):
        activation_basis(model, tok, module, texts, weight.shape[1])
    with pytest.raises(ValueError, match="project_out must be >= 0"):
        Wise(project_out=-1)


def test_margin_weight_scales_the_margin_losses_only() -> None:
    model, tok = tiny_model("llama", n_layers=2)
    reports = {}
    for w in (0.0, 1.0):
        algo = Wise({**TINY, "num_steps": 1, "margin_weight": w})
        reports[w] = algo.apply(model, tok, [REQ])
        algo.detach(model)
    assert reports[0.0].losses["loss_first"] == pytest.approx(reports[0.0].losses["nll_final"])  # one step: the NLL alone
    assert reports[1.0].losses["loss_first"] > reports[0.0].losses["loss_first"]  # Δ = 0 violates beta: margins count



    from harness.algorithms.memory import MemoryState

    model, tok = tiny_model("llama", n_layers=2)
    algo = Wise(TINY)
    assert algo.memory_state().empty and algo.state_dict() == {}
    algo.apply(model, tok, [REQ])
    saved = algo.memory_state().clone()
    assert set(saved.tensors) == {"active.0"} and saved.structure["layer"] == 1
    assert saved.structure["memories"] == [{"kind": "active", "index": 0, "edits": 1,
                                            "min_score": algo.memory.active.min_score}]
    hook = model.get_submodule("model.layers.1.mlp.down_proj")._forward_hooks
    algo.load_memory(MemoryState())
    assert algo.memory.empty() and algo.memory_state().empty  # the attached hook sees the same object
    algo.load_memory(saved)
    assert algo.memory_state().equals(saved) and len(hook) == 1
    with pytest.raises(AlgorithmError, match="trained at layer 0"):
        algo.load_memory(MemoryState(saved.tensors, {**saved.structure, "layer": 0}))
    with pytest.raises(AlgorithmError, match=r"memory tensors \['extra'\] are not in its structure"):
        algo.load_memory(MemoryState({**saved.tensors, "extra": torch.zeros(1)}, saved.structure))
    algo.detach(model)


def test_the_nll_from_target_positions_equals_the_fine_tuning_objective() -> None:
    from harness.algorithms.batches import target_batch, target_nll
    from harness.algorithms.wise_train import target_positions_nll
    from harness.tokens import encode_pairs

    model, tok = tiny_model("llama", n_layers=2)
    items = encode_pairs(tok, [("The mother tongue of Danielle Darrieux is", "English"), ("Rivers", "flow into seas")])
    batch = target_batch(items, 0, torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    rows, cols = batch.label_mask[:, 1:].nonzero(as_tuple=True)
    got = target_positions_nll(logits[rows, cols], batch, rows, cols)
    assert torch.allclose(got, target_nll(logits, batch).mean(), atol=1e-6)


def test_gpt2_conv1d_projection(tiny_gpt2) -> None:
    model, tok = tiny_gpt2
    algo = Wise(TINY)
    report = algo.apply(model, tok, [REQ])
    assert algo.memory.active.delta.shape == model.get_parameter("transformer.h.1.mlp.c_proj.weight").shape
    assert report.info["edit_score_min"] > report.info["threshold"] and report.info["fast_forward"] == 1.0
    algo.detach(model)


@pytest.mark.parametrize("retrieve", [False, True])
def test_shards_start_and_merge_on_schedule(retrieve: bool) -> None:
    model, tok = tiny_model("llama", n_layers=2)
    algo = Wise({**TINY, "num_steps": 4, "shard_size": 1, "merge_every": 2, "retrieve": retrieve})
    reqs = [EditRequest(case_id=str(i), prompt="{} plays the", subject=s, target_new=t)
            for i, (s, t) in enumerate([("Toko Yasuda", "piano"), ("Ed Sheeran", "drums"), ("Yo-Yo Ma", "cello"),
                                        ("Adele", "harp")])]
    kinds = []
    for r in reqs:
        algo.apply(model, tok, [r])
        kinds.append([(e["kind"], e["edits"]) for e in algo.memory_state().structure["memories"]])
    merged_twice = [("merged", 2), ("merged", 2)] if retrieve else [("merged", 4)]
    assert kinds == [[("active", 1)], [("merged", 2)], [("merged", 2), ("active", 1)], merged_twice]
    assert algo.memory_state().structure["shards_started"] == 4
    algo.detach(model)


def test_hyperparameters_are_checked() -> None:
    with pytest.raises(ValueError, match="multiple of shard_size"):
        Wise(shard_size=3, merge_every=4)
    with pytest.raises(ValueError, match="beta > alpha"):
        Wise(alpha=5.0, beta=5.0)
    with pytest.raises(ValueError, match="margin_weight must be a finite number >= 0"):
        Wise(margin_weight=-1.0)
    with pytest.raises(TypeError, match=r"irrelevant\.pth"):
        Wise(irrelevant={"pth": "x"})
    model, tok = tiny_model("llama", n_layers=2)
    with pytest.raises(AlgorithmError, match="layer 7 has no MLP output projection"):
        Wise(layer=7).prepare(model, tok)


def test_an_edited_model_saves_and_reloads_with_its_side_memory(tmp_path: Path) -> None:
    from harness import Editor

    model, tok = tiny_model("llama", n_layers=2)
    texts = [REQ.rewrite_prompt + " English", "Rivers are streams of fresh water"]
    base, _ = _forward(model, tok, texts)
    editor = Editor(model, tok, Wise(TINY), probes=None, keep_original_weight=False)
    editor.edit([REQ])
    edited, _ = _forward(model, tok, texts)
    assert not torch.equal(base, edited)
    editor.save_delta(tmp_path / "edit.safetensors")

    fresh, tok2 = tiny_model("llama", n_layers=2)
    again = Editor(fresh, tok2, Wise(TINY), probes=None, keep_original_weight=False)
    again.apply_delta(tmp_path / "edit.safetensors")
    assert torch.equal(_forward(fresh, tok2, texts)[0], edited)  # the same routed outputs, bit for bit
    again.restore()
    assert torch.equal(_forward(fresh, tok2, texts)[0], base)


# ----------------------------------------------------------------------------------------------
# replay and live_threshold (issue 13): stored edit rows


def test_stored_scores_are_the_smallest_running_mean_at_the_scored_positions() -> None:
    from harness.algorithms.wise_memory import Memory, stored_scores

    delta = torch.zeros(2, 3)
    delta[0, 0], delta[1, 1] = 3.0, 4.0  # A Δᵀ = (3 a0, 4 a1): score = ||(3 a0, 4 a1)||
    keys = torch.tensor([[[1.0, 0.0, 7.0], [0.0, 1.0, 7.0], [1.0, 1.0, 7.0]],  # token scores 3, 4, 5
                         [[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])  # 8, 0, 0
    memory = Memory(torch.zeros(2, 3))
    memory.add_keys(keys[:1], torch.tensor([[False, True, True]]))
    memory.add_keys(keys[1:, :2], torch.tensor([[True, True]]))  # a shorter row is padded, unscored
    assert memory.keys.shape == (2, 3, 3) and memory.key_mask.tolist() == [[False, True, True], [True, True, False]]
    # row 0: running means 3, 3.5, 4 -> min over positions 1, 2 = 3.5; row 1: 8, 4 -> 4
    assert stored_scores(memory, delta, transposed=False).tolist() == pytest.approx([3.5, 4.0])
    assert stored_scores(memory, delta.T, transposed=True).tolist() == pytest.approx([3.5, 4.0])  # Conv1D layout
    state = SideMemory(active=memory).state_dict()
    back = SideMemory.from_state(state).active
    assert torch.equal(back.keys, memory.keys) and torch.equal(back.key_mask, memory.key_mask)
    with pytest.raises(ValueError, match=r"active\.0 lacks \['key_mask'\]"):
        SideMemory.from_state({k: v for k, v in state.items() if k != "active.0.key_mask"})


def _direct_score(model, tok, algo, req) -> float:
    """The edit's score computed from a fresh forward: the smallest running mean of ||A Δᵀ|| over the
    positions predicting its target, over its template rows (what ε's min_score is taken from)."""
    from harness.algorithms.wise_train import _rows, projection

    module, _, transposed = projection(model, algo.hparams.layer)
    templates = algo._templates.get(model, tok, algo.hparams.templates.length_params, algo.hparams.templates.seed)
    batch, decide, _ = _rows(tok, [req], templates, torch.device("cpu"))
    seen = []
    with Hooks() as hooks, torch.no_grad():
        hooks.input(module, lambda _m, args, kwargs: seen.append(args[0]))
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    delta = algo.memory.active.delta
    added = seen[0] @ delta if transposed else seen[0] @ delta.T
    run = running_mean(added.norm(dim=-1))
    return float(run[decide].min())


def test_live_threshold_is_the_smallest_current_score_of_every_stored_edit() -> None:
    model, tok = tiny_model("llama", n_layers=2)
    reqs = [REQ, EditRequest(case_id="2", prompt="{} plays the", subject="Toko Yasuda", target_new="piano")]
    live = Wise({**TINY, "live_threshold": True})
    for r in reqs:
        report = live.apply(model, tok, [r])
        live.detach(model)
    mem = live.memory.active
    assert mem.keys is not None and mem.keys.shape[0] == 2 * 2  # 1 + 1 template rows per edit (TINY)
    direct = [_direct_score(model, tok, live, r) for r in reqs]  # under the Δ after both edits
    assert mem.min_score == pytest.approx(min(direct), rel=1e-4)
    assert report.info["threshold"] == pytest.approx(0.88 * min(direct), rel=1e-4)
    stale = Wise(TINY)  # the paper's ε: the minimum of the scores each edit had when trained
    for r in reqs:
        stale.apply(model, tok, [r])
        stale.detach(model)
    assert stale.memory.active.keys is None and stale.memory.active.min_score != pytest.approx(min(direct), rel=1e-4)
    saved = live.memory_state().clone()
    assert set(saved.tensors) == {"active.0", "active.0.keys", "active.0.key_mask"}
    live.load_memory(saved)
    assert live.memory_state().equals(saved)


def test_replay_holds_earlier_edits_in_the_margins() -> None:
    from harness.algorithms.wise_train import margins

    assert float(margins(torch.tensor([25.0, 15.0]), torch.tensor([2.0]), 5.0, 20.0, 10.0)) == pytest.approx(5.0)
    model, tok = tiny_model("llama", n_layers=2)
    reqs = [REQ, EditRequest(case_id="2", prompt="{} plays the", subject="Toko Yasuda", target_new="piano")]
    losses = {}
    for replay in (0, 2):
        algo = Wise({**TINY, "num_steps": 1, "replay": replay, "margin_weight": 1.0, "beta": 1e3})
        for r in reqs:
            rep = algo.apply(model, tok, [r])
            algo.detach(model)
        losses[replay] = rep.losses["loss_first"]
        assert (algo.memory.active.keys is None) == (replay == 0)
    # beta = 1000: every edit score violates it by ~1000 - s; the stored rows of edit 1 score higher than
    # the new edit's (Δ was trained on them), so the mean violation changes once they are in the margin
    assert losses[2] != pytest.approx(losses[0])
    with pytest.raises(ValueError, match="replay must be >= 0"):
        Wise(replay=-1)


def test_relative_routing_reaches_the_installed_hook() -> None:
    model, tok = tiny_model("llama", n_layers=2)
    for relative in (False, True):
        algo = Wise({**TINY, "num_steps": 1, "relative_routing": relative})
        algo.apply(model, tok, [REQ])  # leaves the routing hook attached
        (hook,) = model.get_submodule("model.layers.1.mlp.down_proj")._forward_hooks.values()
        assert isinstance(hook, WiseHook) and hook.relative is relative
        algo.detach(model)
