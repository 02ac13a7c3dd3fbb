"""Structural edits: memory (hooks, wrappers) and context transforms under the Editor's guarantees.

A test algorithm keeps a memory (one offset vector per edit, added by a forward hook at one MLP's
output, or by a wrapper module) and a context (a prefix naming the edited targets). The Editor must
remove it in single-edit mode whatever raises, keep it in sequential mode, roll a failed step back
to the memory before it, remove it on ``restore()``, refuse a hook the algorithm did not declare,
and carry the memory through checkpoints and deltas bit for bit.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from harness import EditRequest, Editor, RestoreError
from harness.algorithms.base import EditAlgorithm
from harness.algorithms.memory import Installation, MemoryState, with_context
from harness.editor import CheckpointError
from harness.models import tiny_model
from harness.probes import build_probes
from harness.safefiles import memory_path
from harness.signature import StateSignature
from harness.types import QA, EditReport

MODULE = "model.layers.1.mlp.down_proj"
REQS = [EditRequest(str(i), "The mother tongue of {} is", f"Person {i}", "English", "French",
                    paraphrase_prompts=(f"Person {i} speaks",), neighborhood=(QA("The sky is", "blue"),))
        for i in range(4)]


class Wrapped(nn.Module):
    """A wrapper module: the original plus an offset added to its output."""

    def __init__(self, inner: nn.Module, offset: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("offset", offset)

    def forward(self, x):
        return self.inner(x) + self.offset


class Offsets(EditAlgorithm):
    """Memory = one seeded offset per edited case, summed into MODULE's output; context = the targets.

    Args:
        wrap: install a wrapper module instead of a forward hook.
        fail: raise in ``apply`` after attaching ("apply"), or leave a stray hook ("stray").
    """

    name = "offsets"

    def __init__(self, wrap: bool = False, fail: str | None = None) -> None:
        super().__init__()
        self.wrap, self.fail = wrap, fail
        self.offsets: list[torch.Tensor] = []
        self.cases: list[str] = []
        self.installed = Installation()
        self.calls = 0  # forward passes that went through the memory

    def targets(self, model, requests):
        return set()

    def apply(self, model, tok, requests):
        self.detach(model)
        d = model.get_submodule(MODULE).out_features
        for r in requests:
            g = torch.Generator().manual_seed(1000 + int(r.case_id))
            self.offsets.append(torch.randn(d, generator=g))
            self.cases.append(r.case_id)
        self.attach(model)
        if self.fail == "apply":
            raise RuntimeError("apply failed after attaching")
        if self.fail == "stray":
            model.get_submodule(MODULE).register_forward_hook(lambda *a: None)
        return EditReport()

    def _total(self) -> torch.Tensor:
        return torch.stack(self.offsets).sum(0)

    def attach(self, model):
        if self.installed or not self.offsets:
            return
        if self.wrap:
            self.installed.wrap(model, MODULE, lambda inner: Wrapped(inner, self._total()))
        else:
            def hook(module, args, out):
                self.calls += 1
                return out + self._total()
            self.installed.hook(model, MODULE, hook)

    def detach(self, model):
        self.installed.remove()

    def memory_state(self):
        if not self.offsets:
            return MemoryState()
        return MemoryState({"offsets": torch.stack(self.offsets)}, {"cases": list(self.cases)})

    def load_memory(self, state):
        self.offsets = list(state.tensors["offsets"].unbind(0)) if state.tensors else []
        self.cases = list(state.structure.get("cases", []))

    def context(self):
        if not self.cases:
            return None
        prefix = "".join(f"Fact {c}. " for c in self.cases)
        return lambda prompt: prefix + prompt


def logits(model, tok, text="The mother tongue of Person 0 is"):
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits


@pytest.fixture
def tiny():
    return tiny_model("llama", n_layers=2)


@pytest.mark.parametrize("wrap", [False, True])
def test_single_edit_removes_memory_and_probes_see_it(tiny, wrap):
    model, tok = tiny
    base, sig = logits(model, tok), StateSignature.take(model)
    algo = Offsets(wrap=wrap)
    editor = Editor(model, tok, algo, probes=build_probes(["easyedit"]), keep_original_weight=True)
    out = editor.edit(REQS[0])
    assert not sig.differences(StateSignature.take(model))
    assert torch.equal(logits(model, tok), base) and algo.memory_state().empty
    assert out.post.metrics[0] != out.pre.metrics[0] and (wrap or algo.calls > 0)


@pytest.mark.parametrize("fail", ["apply", "probe"])
def test_single_edit_removes_memory_when_apply_or_a_probe_raises(tiny, fail):
    model, tok = tiny
    sig = StateSignature.take(model)

    class Broken:
        def infos(self):
            return []

        def measure(self, *a, **kw):
            if kw.get("context") is not None:
                raise RuntimeError("probe failed")
            from harness.probes.base import Measurement
            return Measurement([{}], [{}])

    algo = Offsets(fail="apply" if fail == "apply" else None)
    editor = Editor(model, tok, algo, probes=Broken(), keep_original_weight=True)
    with pytest.raises(RuntimeError, match="failed"):
        editor.edit(REQS[0])
    assert not sig.differences(StateSignature.take(model)) and algo.memory_state().empty


def test_an_undeclared_hook_is_caught(tiny):
    model, tok = tiny
    editor = Editor(model, tok, Offsets(fail="stray"), keep_original_weight=False)
    with pytest.raises(RestoreError, match="forward hook was left on " + MODULE):
        editor.edit(REQS[0])


@pytest.mark.parametrize("wrap", [False, True])
def test_sequential_memory_persists_rolls_back_and_restores(tiny, wrap):
    model, tok = tiny
    base, sig = logits(model, tok), StateSignature.take(model)
    algo = Offsets(wrap=wrap)
    editor = Editor(model, tok, algo, keep_original_weight=False)
    editor.edit(REQS[0])
    one = logits(model, tok)
    assert not torch.equal(one, base)
    editor.edit(REQS[1])
    two, kept = logits(model, tok), algo.memory_state().clone()
    assert algo.memory_state().structure == {"cases": ["0", "1"]} and not torch.equal(two, one)

    algo.fail = "apply"  # a failing step: back to the memory of two edits, still attached
    with pytest.raises(RuntimeError, match="apply failed"):
        editor.edit(REQS[2])
    assert algo.memory_state().equals(kept) and torch.equal(logits(model, tok), two)
    assert editor.n_edits == 2

    editor.restore()
    assert not sig.differences(StateSignature.take(model)) and torch.equal(logits(model, tok), base)
    assert algo.memory_state().empty


def test_checkpoint_carries_memory_bit_for_bit(tiny, tmp_path):
    model, tok = tiny
    editor = Editor(model, tok, Offsets(), keep_original_weight=False)
    editor.edit(REQS[:2])
    edited = logits(model, tok)
    editor.save_checkpoint(tmp_path / "ck")

    model2, tok2 = tiny_model("llama", n_layers=2)
    fresh = Offsets()
    again = Editor(model2, tok2, fresh, keep_original_weight=False)
    again.load_checkpoint(tmp_path / "ck")
    assert fresh.memory_state().equals(editor.algorithm.memory_state()) and again.n_edits == 2
    assert torch.equal(logits(model2, tok2), edited)

    blob = bytearray((tmp_path / "ck" / "memory.safetensors").read_bytes())
    blob[-2] ^= 0xFF
    (tmp_path / "ck" / "memory.safetensors").write_bytes(bytes(blob))
    model3, tok3 = tiny_model("llama", n_layers=2)
    sig3 = StateSignature.take(model3)
    third = Offsets()
    with pytest.raises(CheckpointError, match="memory.safetensors"):
        Editor(model3, tok3, third, keep_original_weight=False).load_checkpoint(tmp_path / "ck")
    assert third.memory_state().empty and not sig3.differences(StateSignature.take(model3))


def test_delta_carries_memory_to_a_fresh_base(tiny, tmp_path):
    model, tok = tiny
    editor = Editor(model, tok, Offsets(), keep_original_weight=False)
    editor.edit(REQS[:3])
    edited = logits(model, tok)
    editor.save_delta(tmp_path / "delta.safetensors")
    assert memory_path(tmp_path / "delta.safetensors").name == "delta.memory.safetensors"

    model2, tok2 = tiny_model("llama", n_layers=2)
    sig2 = StateSignature.take(model2)
    other = Editor(model2, tok2, Offsets(), keep_original_weight=False)
    other.apply_delta(tmp_path / "delta.safetensors")
    assert torch.equal(logits(model2, tok2), edited) and other.n_edits == 3
    other.restore()
    assert not sig2.differences(StateSignature.take(model2))

    editor.restore()  # no memory left: a stale memory file beside the delta is removed
    editor.save_delta(tmp_path / "delta.safetensors")
    assert not memory_path(tmp_path / "delta.safetensors").exists()


def test_with_context_transforms_every_prompt_and_keeps_the_template():
    r = EditRequest("7", "{} was born in", "Ada", "Paris", paraphrase_prompts=("Ada's birthplace is",),
                    neighborhood=(QA("Bob was born in", "Rome"),), generation_prompts=("Ada",))
    c = with_context(r, lambda p: "CTX. " + p)
    assert c.rewrite_prompt == "CTX. Ada was born in" and c.paraphrase_prompts == ("CTX. Ada's birthplace is",)
    assert c.neighborhood == (QA("CTX. Bob was born in", "Rome"),) and c.generation_prompts == ("CTX. Ada",)
    assert with_context(r, None) is r
    with pytest.raises(ValueError, match="must prepend"):
        with_context(r, lambda p: p + " suffix")


def test_probes_score_the_prompts_with_the_context(tiny):
    model, tok = tiny
    probes = build_probes(["easyedit", "counterfact"])
    ctx = lambda p: "Fact: Person 0 speaks English. " + p  # noqa: E731
    with_ctx = probes.measure(model, tok, REQS[:2], context=ctx).metrics
    direct = probes.measure(model, tok, [with_context(r, ctx) for r in REQS[:2]]).metrics
    plain = probes.measure(model, tok, REQS[:2]).metrics
    assert with_ctx == direct and with_ctx != plain
