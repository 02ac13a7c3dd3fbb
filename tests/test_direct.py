"""The ``direct`` algorithm: each hand edit writes what it says, refuses non-finite results, restores."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from harness import EditRequest, Editor, create_algorithm
from harness.algorithms.base import AlgorithmError
from harness.snapshot import bit_equal

REQ = EditRequest("0", "{} is", "Paris", "London")
DOWN = "model.layers.0.mlp.down_proj.weight"


def _apply(model, tok, ops):
    algo = create_algorithm("direct", {"ops": ops})
    return algo, algo.apply(model, tok, [REQ])


def test_set_row_column_element(tiny):
    model, tok = tiny
    w = model.get_parameter(DOWN)
    _apply(model, tok, [
        {"kind": "set_row", "param": DOWN, "index": 3, "value": 0.5},
        {"kind": "set_column", "param": DOWN, "index": 7, "values": [float(i) for i in range(64)]},
        {"kind": "set_element", "param": DOWN, "index": 3, "col": 7, "value": -2.0},
    ])
    assert torch.all(w[3, :7] == 0.5) and torch.all(w[3, 8:] == 0.5)
    assert w[10, 7] == 10.0 and w[3, 7] == -2.0


def test_set_embedding_from_source_token(tiny):
    model, tok = tiny
    emb = model.get_parameter("model.embed_tokens.weight")
    src = tok(" France", add_special_tokens=False).input_ids[0]
    dst = tok(" Paris", add_special_tokens=False).input_ids[0]
    _apply(model, tok, [{"kind": "set_embedding", "token": " Paris", "source_token": " France"}])
    assert torch.equal(emb[dst], emb[src])
    with pytest.raises(AlgorithmError, match="tokens"):
        _apply(model, tok, [{"kind": "set_embedding", "token": " Parisian mother", "value": 0.0}])


def test_low_rank_is_seeded_and_of_given_rank(tiny):
    model, tok = tiny
    w0 = model.get_parameter(DOWN).detach().clone()
    _, rep = _apply(model, tok, [{"kind": "low_rank", "param": DOWN, "rank": 2, "scale": 0.1, "seed": 4}])
    delta = model.get_parameter(DOWN).detach() - w0
    assert torch.linalg.matrix_rank(delta, atol=1e-4) == 2
    assert rep.delta_norms[DOWN] == pytest.approx(float(delta.norm()), rel=1e-4)


def test_lora_file_update(tiny, tmp_path):
    model, tok = tiny
    a, b = torch.randn(4, 128), torch.randn(64, 4)
    save_file({"A": a, "B": b}, str(tmp_path / "lora.safetensors"))
    w0 = model.get_parameter(DOWN).detach().clone()
    _apply(model, tok, [{"kind": "lora_file", "param": DOWN, "path": str(tmp_path / "lora.safetensors"), "alpha": 8}])
    assert torch.allclose(model.get_parameter(DOWN), w0 + 2.0 * b @ a, atol=1e-5)


def test_lora_file_on_gpt2_conv1d_is_transposed(tiny_gpt2, tmp_path):
    model, tok = tiny_gpt2
    name = "transformer.h.0.mlp.c_proj.weight"  # Conv1D stores [d_ff, d] = W^T
    a, b = torch.randn(2, 128), torch.randn(64, 2)
    save_file({"A": a, "B": b}, str(tmp_path / "lora.safetensors"))
    w0 = model.get_parameter(name).detach().clone()
    _apply(model, tok, [{"kind": "lora_file", "param": name, "path": str(tmp_path / "lora.safetensors")}])
    assert torch.allclose(model.get_parameter(name), w0 + (0.5 * b @ a).T, atol=1e-5)


def test_non_finite_refused_before_anything_written(tiny):
    model, tok = tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(AlgorithmError, match="non-finite"):
        _apply(model, tok, [
            {"kind": "set_row", "param": "model.layers.1.mlp.up_proj.weight", "index": 0, "value": 1.0},
            {"kind": "set_element", "param": DOWN, "index": 0, "col": 0, "value": float("inf")},
        ])
    assert all(bit_equal(p, before[n]) for n, p in model.named_parameters())


def test_overflow_in_half_precision_refused(tiny):
    model, tok = tiny
    model.half()
    with pytest.raises(AlgorithmError, match="overflows"):
        _apply(model, tok, [{"kind": "set_element", "param": DOWN, "index": 0, "col": 0, "value": 1e6}])


def test_missing_fields_are_named():
    with pytest.raises(ValueError, match="'index'"):
        create_algorithm("direct", {"ops": [{"kind": "set_row", "param": DOWN, "value": 1.0}]})
    with pytest.raises(ValueError, match="'param'"):
        create_algorithm("direct", {"ops": [{"kind": "low_rank"}]})


def test_editor_restores_direct_edits(tiny):
    model, tok = tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    algo = create_algorithm("direct", {"ops": [
        {"kind": "set_embedding", "token": " Paris", "value": 3.0},
        {"kind": "low_rank", "param": DOWN, "rank": 4}]})
    out = Editor(model, tok, algo).edit(REQ)
    assert set(out.targets) == {"model.embed_tokens.weight", DOWN}
    assert all(bit_equal(p, before[n]) for n, p in model.named_parameters())
