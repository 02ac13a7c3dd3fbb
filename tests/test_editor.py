"""The Editor's promise: exact, verified restore whatever happens; accumulation that can be undone."""
from __future__ import annotations

import pytest
import torch

from harness import EditRequest, Editor, RestoreError, apply_delta, create_algorithm
from harness.algorithms.base import AlgorithmError
from harness.algorithms.base import EditAlgorithm
from harness.models import tiny_model
from harness.probes.base import Measurement
from harness.snapshot import SnapshotError, bit_equal
from harness.types import EditReport

DOWN = "model.layers.{}.mlp.down_proj.weight"
REQ = EditRequest("0", "The mother tongue of {} is", "Danielle Darrieux", "English", "French")


class Scribble(EditAlgorithm):
    """Test algorithm: adds seeded noise to the names it declares; optional faults."""

    def __init__(self, names, write_extra=None, fail_after=None, seed=0):
        super().__init__()
        self.names, self.write_extra, self.fail_after, self.seed = list(names), write_extra, fail_after, seed
        self.calls = 0
        self.counter = torch.zeros(3)

    def targets(self, model, requests):
        return set(self.names)

    def apply(self, model, tok, requests):
        self.calls += 1
        self.counter += 1  # explicit state that an edit changes
        g = torch.Generator().manual_seed(self.seed + self.calls)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for i, n in enumerate(self.names + ([self.write_extra] if self.write_extra else [])):
                if self.fail_after is not None and i == self.fail_after:
                    raise RuntimeError("algorithm failed halfway")
                params[n].add_(torch.randn(params[n].shape, generator=g))
        return EditReport(seconds=0.0)

    def state_dict(self):
        return {"counter": self.counter}

    def load_state_dict(self, state):
        self.counter = state["counter"].clone()


class LogitProbe:
    """A real probe: the model's next-token log-prob of the first target token on the rewrite prompt."""

    def __init__(self, fail=False):
        self.fail = fail
        self.calls = 0

    def infos(self):
        return []

    def measure(self, model, tok, requests, reference=None):
        self.calls += 1
        if self.fail and reference is not None:
            raise ValueError("probe failed")
        out = []
        for r in requests:
            ids = tok(r.rewrite_prompt, return_tensors="pt").input_ids
            tgt = tok(" " + r.target_new, add_special_tokens=False).input_ids[0]
            with torch.no_grad():
                lp = model(ids).logits[0, -1].log_softmax(-1)[tgt]
            out.append({"lp": float(lp)})
        return Measurement(out, [{} for _ in out])


def _fresh():
    return tiny_model(seed=0)


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(model, ref):
    return [n for n, p in model.named_parameters() if not bit_equal(p, ref[n])]


def test_single_edit_restores_and_probes_see_the_edit():
    model, tok = _fresh()
    base = _state(model)
    editor = Editor(model, tok, Scribble([DOWN.format(0), DOWN.format(1)]), probes=LogitProbe())
    out = editor.edit(REQ)
    assert _changed(model, base) == []
    assert out.pre.metrics[0]["lp"] != out.post.metrics[0]["lp"]  # the probe saw the edited model
    assert out.targets == (DOWN.format(0), DOWN.format(1))
    assert out.snapshot_bytes == 2 * 64 * 128 * 4
    assert set(editor.weights_copy.names) == {DOWN.format(0), DOWN.format(1)}
    # independent cases do not pile up: the same case twice gives the same numbers
    again = editor.edit(REQ, pre=out.pre)
    assert again.pre is out.pre
    assert editor.algorithm.counter.tolist() == [0.0, 0.0, 0.0]  # state restored too


@pytest.mark.parametrize("fail_after", [0, 1, 2])
def test_algorithm_raising_halfway_leaves_model_unchanged(fail_after):
    model, tok = _fresh()
    base = _state(model)
    algo = Scribble([DOWN.format(0), DOWN.format(1), "model.norm.weight"], fail_after=fail_after)
    editor = Editor(model, tok, algo, probes=LogitProbe())
    with pytest.raises(RuntimeError, match="halfway"):
        editor.edit(REQ)
    assert _changed(model, base) == []
    assert algo.counter.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("keep", [True, False])
def test_probe_raising_leaves_model_unchanged(keep):
    model, tok = _fresh()
    base = _state(model)
    editor = Editor(model, tok, Scribble([DOWN.format(1)]), probes=LogitProbe(fail=True), keep_original_weight=keep)
    with pytest.raises(ValueError, match="probe failed"):
        editor.edit(REQ)
    assert _changed(model, base) == []
    assert editor.n_edits == 0


def test_keyboard_interrupt_restores():
    model, tok = _fresh()
    base = _state(model)

    class Interrupt(Scribble):
        def apply(self, model, tok, requests):
            super().apply(model, tok, requests)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Editor(model, tok, Interrupt([DOWN.format(0)])).edit(REQ)
    assert _changed(model, base) == []


@pytest.mark.parametrize("keep", [True, False])
def test_undeclared_write_is_caught_and_named(keep):
    model, tok = _fresh()
    algo = Scribble([DOWN.format(0)], write_extra="model.layers.1.self_attn.q_proj.weight")
    with pytest.raises(RestoreError, match=r"model\.layers\.1\.self_attn\.q_proj\.weight"):
        Editor(model, tok, algo, keep_original_weight=keep).edit(REQ)


def test_declared_target_that_is_not_a_parameter():
    model, tok = _fresh()
    with pytest.raises(AlgorithmError, match="model.layers.7.mlp.down_proj.weight"):
        Editor(model, tok, Scribble([DOWN.format(7)])).edit(REQ)


def test_accumulate_restore_and_delta_round_trip(tmp_path):
    model, tok = _fresh()
    base = _state(model)
    editor = Editor(model, tok, Scribble([DOWN.format(0)]), keep_original_weight=False)
    editor.edit(REQ)
    after_one = _state(model)
    editor.algorithm.names = [DOWN.format(0), DOWN.format(1)]
    editor.edit(REQ)
    edited = _state(model)
    # edits accumulate: the second edit built on the first
    assert _changed(model, base) == [DOWN.format(0), DOWN.format(1)]
    assert not bit_equal(edited[DOWN.format(0)], after_one[DOWN.format(0)])
    assert editor.n_edits == 2
    assert editor.algorithm.counter.tolist() == [2.0, 2.0, 2.0]
    assert editor.save_delta(tmp_path / "delta.safetensors") == [DOWN.format(0), DOWN.format(1)]

    fresh, _ = _fresh()
    apply_delta(fresh, tmp_path / "delta.safetensors")
    assert _changed(fresh, edited) == []

    editor.restore()
    assert _changed(model, base) == []
    assert editor.algorithm.counter.tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(SnapshotError, match="not the base"):
        apply_delta(fresh, tmp_path / "delta.safetensors")  # fresh is edited now, not the base


def test_checkpoint_resume_is_bit_exact(tmp_path):
    straight, tok = _fresh()
    e1 = Editor(straight, tok, Scribble([DOWN.format(0), DOWN.format(1)]), keep_original_weight=False)
    for _ in range(3):
        e1.edit(REQ)

    first, _ = _fresh()
    e2 = Editor(first, tok, Scribble([DOWN.format(0), DOWN.format(1)]), keep_original_weight=False)
    e2.edit(REQ)
    e2.save_checkpoint(tmp_path / "ckpt")
    resumed, _ = _fresh()
    algo = Scribble([DOWN.format(0), DOWN.format(1)])
    algo.calls = 1  # the test algorithm seeds by call number
    e3 = Editor(resumed, tok, algo, keep_original_weight=False)
    e3.load_checkpoint(tmp_path / "ckpt")
    assert e3.n_edits == 1 and algo.counter.tolist() == [1.0, 1.0, 1.0]
    e3.edit(REQ)
    e3.edit(REQ)
    assert _changed(resumed, _state(straight)) == []
    e3.restore()
    assert _changed(resumed, _state(_fresh()[0])) == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_restore_is_exact(dtype):
    model, tok = _fresh()
    model.to(dtype)
    base = _state(model)
    editor = Editor(model, tok, create_algorithm("direct", {"ops": [
        {"kind": "low_rank", "param": DOWN.format(1), "rank": 3, "scale": 0.37}]}))
    out = editor.edit(REQ)
    assert out.report.delta_norms[DOWN.format(1)] > 0
    assert _changed(model, base) == []


def test_none_touches_nothing():
    model, tok = _fresh()
    base = _state(model)
    out = Editor(model, tok, create_algorithm("none"), probes=LogitProbe()).edit([REQ, REQ])
    assert out.targets == () and out.snapshot_bytes == 0
    assert out.pre.metrics == out.post.metrics
    assert _changed(model, base) == []
