"""GRACE on the tiny model: the codebook rule, the replacement, and lifelong editing that keeps
earlier edits and leaves unrelated prompts alone."""
from __future__ import annotations

import torch

from harness import EditRequest, Editor, create_algorithm
from harness.algorithms.grace import replace_from
from harness.models import tiny_model
from harness.probes import build_probes
from harness.signature import StateSignature
from harness.types import QA

# single-token targets: the random tiny model cannot put much probability on anything, but its argmax
# can be steered; a lookup that misses would leave the argmax elsewhere
FACTS = [("The mother tongue of {} is", "Danielle Darrieux", "Paris"),
         ("{} plays the", "Toko Yasuda", "Apple"),
         ("The capital of {} is", "Atlantis", "Italy"),
         ("{} was born in", "Ada Lovelace", "Paris")]
REQS = [EditRequest(str(i), p, s, t, neighborhood=(QA("The sky is", "blue"), QA("Water is", "wet")))
        for i, (p, s, t) in enumerate(FACTS)]


def test_replacement_carries_the_hit_key_forward_or_stays_at_the_hit():
    out, values = torch.zeros(1, 5, 2), torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    idx = torch.tensor([[2, 0, 2, 1, 2]])  # nearest key per position
    hit = torch.tensor([[False, True, False, True, False]])
    assert replace_from(out, values, idx, hit, "from_key")[0, :, 0].tolist() == [0, 1, 1, 2, 2]
    assert replace_from(out, values, idx, hit, "last")[0, :, 0].tolist() == [0, 1, 0, 2, 0]


def test_codebook_rule_adds_expands_and_splits():
    algo = create_algorithm("grace", {"eps": 1.0})
    out = torch.zeros(3)
    assert algo._place(torch.tensor([0.0, 0, 0]), out, "a") == (0, "added")
    assert algo._place(torch.tensor([5.0, 0, 0]), out, "a") == (1, "added")  # farther than eps + radius
    assert algo._place(torch.tensor([1.5, 0, 0]), out, "a") == (0, "expanded")  # same label: covers it
    assert algo.radii[0] == 1.5
    assert algo._place(torch.tensor([3.5, 0, 0]), out, "b") == (2, "split")  # conflict with key 1 at 1.5
    assert torch.allclose(algo.radii, torch.tensor([1.5, 0.75 - 1e-5, 0.75]))
    assert algo._place(torch.tensor([0.5, 0, 0]), out, "a") == (0, "kept")
    assert algo.labels == ["a", "a", "b"]


def test_lifelong_edits_are_kept_and_locality_is_untouched():
    model, tok = tiny_model("llama", n_layers=2)
    base = StateSignature.take(model)
    algo = create_algorithm("grace", {"layer": 1, "n_iter": 40, "lr": 0.5, "eps": 0.1})
    editor = Editor(model, tok, algo, probes=build_probes(["easyedit"]), keep_original_weight=False)
    pre = editor.evaluate(REQS)
    for r in REQS:
        editor.edit(r)
    post = editor.evaluate(REQS, reference=pre)
    assert [m["rewrite_acc"] for m in post.metrics] == [1.0] * len(REQS)
    assert [m["locality_acc"] for m in post.metrics] == [1.0] * len(REQS)
    assert algo.memory_state().structure["labels"] == [r.target_new for r in REQS]
    editor.restore()
    assert not base.differences(StateSignature.take(model))


def test_grace_memory_travels_with_the_delta_to_a_fresh_base(tmp_path):
    model, tok = tiny_model("llama", n_layers=2)
    editor = Editor(model, tok, create_algorithm("grace", {"layer": 0, "n_iter": 5}), keep_original_weight=False)
    editor.edit(REQS[:2])
    ids = tok("The capital of Atlantis is Italy", return_tensors="pt").input_ids
    with torch.no_grad():
        edited = model(ids).logits
    editor.save_delta(tmp_path / "delta.safetensors")

    fresh, tok2 = tiny_model("llama", n_layers=2)
    other = Editor(fresh, tok2, create_algorithm("grace", {"layer": 0, "n_iter": 5}), keep_original_weight=False)
    other.apply_delta(tmp_path / "delta.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, edited)
