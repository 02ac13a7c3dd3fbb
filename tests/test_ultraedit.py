"""UltraEdit: the pooled running statistics equal those of all rows at once, the closed form maps
each edited token's key to its pseudo-value, an edit lowers the target's loss, and the state grows
with sequential edits and is checked when loaded."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from harness import EditRequest, Editor, create_algorithm
from harness.algorithms.base import AlgorithmError
from harness.algorithms.ultraedit import EPS, RunningStats, UltraEdit, ridge_map
from harness.models import tiny_model

REQS = [EditRequest(case_id="1", prompt="The mother tongue of {} is", subject="Danielle Darrieux",
                    target_new="English", target_true="French"),
        EditRequest(case_id="2", prompt="{} plays the", subject="Toko Yasuda", target_new="piano",
                    target_true="guitar")]


def test_pooled_statistics_equal_those_of_all_rows():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(50, 7, generator=g, dtype=torch.float64) * 3 + 1
    s = RunningStats.empty(7)
    for chunk in (rows[:1], rows[1:13], rows[13:14], rows[14:]):
        s.update(chunk)
    assert int(s.n) == 50
    assert torch.allclose(s.mean, rows.mean(0), atol=1e-12)
    assert torch.allclose(s.m2 / 49, rows.var(0), atol=1e-12)
    z = s.standardise(rows)
    assert torch.allclose(z, (rows - rows.mean(0)) / (rows.std(0) + EPS), atol=1e-12)


def test_closed_form_maps_keys_to_pseudo_values():
    algo = UltraEdit(layers=[0], lr=1e-3, ridge=1e-8)
    module = nn.Linear(32, 8, bias=False)
    g = torch.Generator().manual_seed(1)
    keys, grads = torch.randn(6, 32, generator=g), torch.randn(6, 8, generator=g)
    algo._stats_for(module).update(torch.cat([keys, grads], 1))
    delta = algo._shift(module, keys, grads)
    assert delta.shape == module.weight.shape
    z = algo._stats_for(module).standardise(torch.cat([keys, grads], 1).double())
    values = -1e-3 * (z[:, :32] ** 2).sum(1, keepdim=True) * z[:, 32:]
    assert torch.allclose(keys.double() @ delta.T, values, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("tokens", [5, 40])
def test_ridge_map_small_and_large_forms_agree(tokens):
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(tokens, 20, generator=g, dtype=torch.float64)
    values = torch.randn(tokens, 4, generator=g, dtype=torch.float64)
    direct = torch.linalg.solve(keys.T @ keys + 0.5 * torch.eye(20, dtype=torch.float64), keys.T @ values)
    assert torch.allclose(ridge_map(keys, values, 0.5), direct, atol=1e-10)


def _target_nll(model, tok, req: EditRequest) -> float:
    from harness.tokens import encode_pairs

    pt = encode_pairs(tok, [(req.rewrite_prompt, req.target_new)])[0]
    ids = torch.tensor([pt.ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    start = len(pt.prompt_ids)
    return float(-sum(logp[start - 1 + j, t] for j, t in enumerate(pt.target_ids)) / len(pt.target_ids))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_edit_lowers_the_target_loss_and_only_writes_the_edited_modules(arch):
    model, tok = tiny_model(arch, n_layers=2)
    before = _target_nll(model, tok, REQS[0])
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    algo = create_algorithm("ultraedit", {"layers": [0, 1], "lr": 1e-2})
    report = algo.apply(model, tok, REQS[:1])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, base[n])}
    assert changed == algo.targets(model, REQS[:1]) and len(changed) == 2
    assert report.info["n_tokens"] > 0 and report.losses["nll_before"] == pytest.approx(before, rel=1e-4)
    assert _target_nll(model, tok, REQS[0]) < before


def test_state_accumulates_in_sequence_and_is_checked_on_load():
    model, tok = tiny_model("llama", n_layers=2)
    algo = create_algorithm("ultraedit", {"layers": [0, 1], "lr": 1e-2})
    editor = Editor(model, tok, algo, probes=None, keep_original_weight=False)
    editor.edit(REQS[:1])
    n1 = float(algo.state_dict()["norm.128x64.n"])
    editor.edit(REQS[1:])
    state = algo.state_dict()
    assert set(state) == {"norm.128x64.n", "norm.128x64.mean", "norm.128x64.m2"}
    assert float(state["norm.128x64.n"]) > n1 > 0  # both layers' down_proj share one shape's statistics
    algo.reset_state()
    assert algo.state_dict() == {}
    algo.load_state_dict(state)
    assert all(torch.equal(state[k], v) for k, v in algo.state_dict().items())
    with pytest.raises(AlgorithmError, match="unexpected state entry 'cp.0'"):
        algo.load_state_dict({"cp.0": torch.zeros(2, 2)})
    with pytest.raises(AlgorithmError, match="needs n"):
        algo.load_state_dict({"norm.128x64.n": torch.tensor(1.0), "norm.128x64.mean": torch.zeros(3)})


def test_bad_hparams_are_refused():
    with pytest.raises(ValueError, match="token must be"):
        UltraEdit(token="all")
    model, _ = tiny_model("llama", n_layers=2)
    with pytest.raises(ValueError, match="layers=.*includes \\[5\\]"):
        UltraEdit(layers=[5]).targets(model, REQS)
    with pytest.raises(ValueError, match="neither a ModelSpec"):
        UltraEdit(layers=[0], modules=["down"]).targets(model, REQS)
