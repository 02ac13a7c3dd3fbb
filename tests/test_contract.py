"""The edit-algorithm contract, checked for every registered algorithm on the tiny model.

For each algorithm: ``targets`` is cheap, side-effect free and names real parameters; ``apply``
writes only those (the Editor's fingerprint check would raise otherwise), leaves no hooks and no
``.grad``; the single-edit Editor restores bit for bit, state and memory included (module tree,
hooks, buffers: the whole ``StateSignature``); in sequential mode an edit changes declared weights or
the algorithm's memory (hooks, wrappers, context), ``restore()`` removes all of it; two runs give
the same edit.
"""
from __future__ import annotations

import pytest
import torch

from harness import EditRequest, Editor, create_algorithm
from harness.algorithms import available
from harness.models import tiny_model
from harness.signature import StateSignature
from harness.snapshot import bit_equal

from conftest import tiny_hparams

REQS = [EditRequest(case_id="1", prompt="The mother tongue of {} is", subject="Danielle Darrieux",
                    target_new="English", target_true="French"),
        EditRequest(case_id="2", prompt="{} plays the", subject="Toko Yasuda", target_new="piano",
                    target_true="guitar")]


def _direct_default() -> dict:
    from harness.cli import compose_config, to_config
    from harness.config import validate

    return validate(to_config(compose_config(["experiment=smoke"])))


@pytest.mark.parametrize("name", available())
def test_contract(name, tmp_path):
    hp = tiny_hparams(name, tmp_path)
    if hp is None:
        pytest.skip(f"{name}: a third-party algorithm without tiny settings here")
    model, tok = tiny_model("llama", n_layers=2)
    algo = create_algorithm(name, hp) if name != "direct" else create_algorithm(name, _direct_default().__dict__)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    signature = StateSignature.take(model)
    targets = algo.targets(model, REQS)
    assert targets == algo.targets(model, REQS) and targets <= set(base)
    assert all(bit_equal(p, base[n]) for n, p in model.named_parameters())  # targets() wrote nothing

    editor = Editor(model, tok, algo, probes=None, keep_original_weight=True)
    state0 = {k: v.clone() for k, v in algo.state_dict().items()}
    out = editor.edit(REQS)
    assert set(out.targets) == targets
    assert all(bit_equal(p, base[n]) and p.grad is None for n, p in model.named_parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    state1 = algo.state_dict()
    assert state0.keys() == state1.keys() and all(torch.equal(state0[k], state1[k]) for k in state0)
    assert not signature.differences(StateSignature.take(model)) and algo.memory_state().empty

    # accumulate: only declared targets change, and something does (weights or memory; not for `none`)
    seq = Editor(model, tok, algo, probes=None, keep_original_weight=False)
    torch.manual_seed(0)
    seq.edit(REQS)
    with seq.detached():
        changed = {n for n, p in model.named_parameters() if not bit_equal(p, base[n])}
        first = {n: model.get_parameter(n).detach().clone() for n in changed}
    memory = algo.memory_state().clone()
    assert changed <= targets and ((bool(changed) or not memory.empty) == (name != "none"))
    seq.restore()
    assert all(bit_equal(p, base[n]) for n, p in model.named_parameters())
    assert not signature.differences(StateSignature.take(model)) and algo.memory_state().empty
    torch.manual_seed(0)
    seq.edit(REQS)  # deterministic: the same edit again
    with seq.detached():
        assert all(bit_equal(model.get_parameter(n), first[n]) for n in changed)
    assert algo.memory_state().equals(memory)
    seq.restore()
    assert not signature.differences(StateSignature.take(model))
