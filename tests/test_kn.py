"""Knowledge neurons: the cached-prefix integrated gradients equal full forwards, the thresholds pick
what the paper's rule picks, and the edit writes exactly scale * (e_new - e_old) into the chosen
value vectors (Llama and GPT-2 layouts)."""
from __future__ import annotations

import torch

from harness import EditRequest, create_algorithm
from harness.algorithms.kn import KnowledgeNeurons
from harness.models import get_module, model_spec, tiny_model
from harness.tokens import encode_pairs

REQ = EditRequest(case_id="1", prompt="The mother tongue of {} is", subject="Danielle Darrieux",
                  target_new="English", target_true="French")
TINY = {"steps": 4, "batch_size": 2, "templates": {"length_params": [[3, 2]]}}


def _full_forward_ig(model, tok, prompt: str, token: int, layer: int, steps: int) -> torch.Tensor:
    """Integrated gradients with whole-sequence forwards, one step at a time (the reference's way)."""
    spec = model_spec(model)
    ids = torch.tensor([encode_pairs(tok, [(prompt, "x")])[0].prompt_ids])
    module = get_module(model, spec.mlp_out.format(layer))
    seen = {}
    h = module.register_forward_pre_hook(lambda m, a: seen.setdefault("a", a[0][0, -1].detach()))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    base, total = seen["a"], torch.zeros_like(seen["a"])
    for alpha in torch.linspace(0, 1, steps):
        x = (alpha * base).requires_grad_(True)
        h = module.register_forward_pre_hook(lambda m, a: (torch.cat([a[0][:, :-1], x[None, None]], 1),))
        prob = torch.softmax(model(input_ids=ids).logits[0, -1], -1)[token]
        h.remove()
        total += torch.autograd.grad(prob, x)[0]
    return total * base / steps


def test_cached_prefix_attribution_equals_full_forwards():
    model, tok = tiny_model("llama", n_layers=2)
    algo = KnowledgeNeurons(TINY)
    prompt, token = REQ.rewrite_prompt, 7
    fast = algo.attribute(model, tok, prompt, token)
    assert fast.shape == (2, 128)
    for layer in (0, 1):
        ref = _full_forward_ig(model, tok, prompt, token, layer, steps=4)
        assert torch.allclose(fast[layer], ref, rtol=1e-4, atol=1e-9 + 1e-4 * float(ref.abs().max()))


def test_thresholds_and_sharing():
    algo = KnowledgeNeurons(p=0.7, adaptive_threshold=0.2, neuron_range=None)
    scores = [torch.zeros(2, 10) for _ in range(5)]
    for i, s in enumerate(scores):
        s[0, 0] = 10.0  # top in every prompt
        s[1, 3] = 3.0 if i < 4 else 1.0  # above 0.2 * max in 4 of 5 prompts (80% > 70%)
        s[1, 5] = 2.5 if i < 3 else 0.0  # 3 of 5 (60%): not kept at p = 0.7
        s[0, 9] = 1.9  # below 0.2 * 10 everywhere
    neurons, p, hist = algo.select(scores)
    assert neurons == [(0, 0), (1, 3)] and p == 0.7 and hist == {3: 1, 4: 1, 5: 1}
    # with the paper's count range [2, 5]: too few at p = 0.7 -> lower p until >= lo
    algo = KnowledgeNeurons(p=0.7, adaptive_threshold=0.2, neuron_range=[3, 5])
    neurons, p, _ = algo.select(scores)
    assert neurons == [(0, 0), (1, 3), (1, 5)] and p == 0.55
    # layers given: rows map to those layers
    algo = KnowledgeNeurons(layers=[4, 7], p=0.7, neuron_range=None)
    assert algo.select(scores)[0] == [(4, 0), (7, 3)]


def _check_edit(model, tok, out_transposed: bool) -> None:
    spec = model_spec(model)
    algo = create_algorithm("kn", TINY)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = algo.apply(model, tok, [REQ])
    embed = get_module(model, spec.embed).weight
    new = encode_pairs(tok, [(REQ.rewrite_prompt, REQ.target_new)])[0].target_ids[0]
    ids = torch.tensor([encode_pairs(tok, [(REQ.rewrite_prompt, REQ.target_new)])[0].prompt_ids])
    with torch.no_grad():
        old = int(_unedited(model, base)(ids))
    value = 2.0 * (embed[new] - embed[old])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, base[n])}
    assert changed and changed <= {spec.mlp_out_weight(layer) for layer in (0, 1)}
    neurons = {tuple(int(x) for x in s.split(":")) for s in report.info["neurons"].split()}
    assert len(neurons) == report.info["n_neurons"] >= 1
    for layer in (0, 1):
        name = spec.mlp_out_weight(layer)
        diff = model.get_parameter(name).detach() - base[name]
        diff = diff if out_transposed else diff.T  # one row per neuron
        touched = {(layer, int(i)) for i in torch.nonzero(diff.abs().sum(1) > 0).flatten()}
        assert touched == {n for n in neurons if n[0] == layer}
        for _, i in touched:
            assert torch.allclose(diff[i], value, atol=1e-5)


def _unedited(model, base):
    """The unedited model's top prediction (weights put back temporarily)."""
    def predict(ids):
        saved = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base[n])
            out = model(input_ids=ids).logits[0, -1].argmax()
            for n, p in model.named_parameters():
                p.copy_(saved[n])
        return out
    return predict


def test_edit_adds_the_embedding_difference_to_the_chosen_value_vectors_llama():
    model, tok = tiny_model("llama", n_layers=2)
    _check_edit(model, tok, out_transposed=False)


def test_edit_adds_the_embedding_difference_to_the_chosen_value_vectors_gpt2():
    model, tok = tiny_model("gpt2", n_layers=2)
    _check_edit(model, tok, out_transposed=True)
