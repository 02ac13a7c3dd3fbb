"""Verification that sees everything: position-sensitive fingerprints and the whole-model state signature.

The fingerprint is checked against a plain numpy reference of its definition and shown to move with
swaps, row swaps and transpositions (which a position-blind sum cannot see); the Editor is shown to
raise ``RestoreError`` for every kind of residue an edit can leave: a permuted undeclared parameter
or buffer, a hook, a training or requires_grad flag, a gradient, a changed buffer, an added module,
untied weights.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.modules.module as torch_module
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import harness.fingerprints as fp
from harness import EditRequest, Editor, RestoreError
from harness.algorithms.base import EditAlgorithm
from harness.models import tiny_model
from harness.signature import StateSignature
from harness.snapshot import bit_equal, model_digest, tensor_fingerprint
from harness.types import EditReport

REQ = EditRequest("0", "The mother tongue of {} is", "Danielle Darrieux", "English", "French")
TARGET = "model.layers.0.mlp.down_proj.weight"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _reference(t: torch.Tensor) -> tuple[int, int]:
    """The module docstring's definition, computed with numpy's wrapping uint64 arithmetic."""
    b = fp.raw_bits(t).to(torch.int64).numpy().astype(np.uint64)
    i = np.arange(b.size, dtype=np.uint64)
    w_a = np.uint64(fp._C) + np.uint64(2 * fp._K & fp._MASK) * i
    table = fp._splitmix64(0x5EED_0001, fp._CHUNK).view(np.uint64)
    mult = np.array(fp._MULTIPLIERS, dtype=np.int64).view(np.uint64)
    w_b = table[i % np.uint64(fp._CHUNK)] * mult[(i // np.uint64(fp._CHUNK)) % np.uint64(fp._N_MULT)]
    return int((b * w_a).sum(dtype=np.uint64)), int((b * w_b).sum(dtype=np.uint64))


@pytest.mark.parametrize("t", [
    torch.randn(600_001, generator=torch.Generator().manual_seed(0)),  # three chunks, a partial last one
    torch.randn(7, 3).half(), torch.randn(5).bfloat16(), torch.randn(300_000).double(),
    torch.tensor([True, False, True]), torch.randint(0, 255, (1000,), dtype=torch.uint8),
    torch.randint(-2**63, 2**63 - 1, (257,), dtype=torch.int64), torch.randn(4, 4, dtype=torch.complex128),
    torch.zeros(0),
], ids=lambda t: f"{t.dtype}{list(t.shape)}")
def test_fingerprint_is_its_definition(t):
    assert tensor_fingerprint(t) == _reference(t)


def test_fingerprint_does_not_depend_on_layout():
    x = torch.randn(64, 48)
    assert tensor_fingerprint(x.t().contiguous().t()) == tensor_fingerprint(x)  # same values, other strides
    assert tensor_fingerprint(x.t()) == tensor_fingerprint(x.t().contiguous())


def _matrix(data, dtype):
    n = data.draw(st.integers(2, 24), label="n")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    return (torch.randn(n, n, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), dtype=st.sampled_from(DTYPES + [torch.uint8]))
def test_fingerprint_sees_swaps_row_swaps_and_transposes(data, dtype):
    x = _matrix(data, dtype) if dtype != torch.uint8 else torch.randint(0, 256, (9, 9), dtype=torch.uint8)
    n = x.shape[0]
    kind = data.draw(st.sampled_from(["element", "row", "transpose"]))
    y = x.clone()
    if kind == "element":
        i, j = data.draw(st.lists(st.integers(0, n * n - 1), min_size=2, max_size=2, unique=True))
        flat = y.view(-1)
        flat[i], flat[j] = x.view(-1)[j], x.view(-1)[i]
    elif kind == "row":
        i, j = data.draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=2, unique=True))
        y[[i, j]] = x[[j, i]]
    else:
        y = x.t().contiguous()
    assume(not bit_equal(x, y))  # e.g. two equal elements swapped: nothing to see
    assert tensor_fingerprint(x) != tensor_fingerprint(y)


def test_position_blind_sums_would_miss_what_it_sees():
    x = torch.randn(16, 16)
    blind = lambda t: (int(fp.raw_bits(t).sum()), int((fp.raw_bits(t).long() ** 2).sum()))  # noqa: E731
    assert blind(x) == blind(x.t().contiguous())
    assert tensor_fingerprint(x) != tensor_fingerprint(x.t().contiguous())


def test_model_digest_sees_buffers_and_permutations_and_is_reproducible():
    model, _ = tiny_model(seed=0)
    digest = model_digest(model)
    assert model_digest(tiny_model(seed=0)[0]) == digest  # no object ids: the same weights, the same digest
    inv_freq = model.get_buffer("model.rotary_emb.inv_freq")
    with torch.no_grad():
        inv_freq[[0, 1]] = inv_freq[[1, 0]].clone()
    assert model_digest(model) != digest
    with torch.no_grad():
        inv_freq[[0, 1]] = inv_freq[[1, 0]].clone()
        q = model.get_parameter("model.layers.1.self_attn.q_proj.weight")
        assert model_digest(model) == digest
        q.copy_(q.t().clone())
    assert model_digest(model) != digest


# ----------------------------------------------------------------------------------------------
# the Editor sees every kind of residue


class Residue(EditAlgorithm):
    """Test algorithm: writes its declared target, then does ``mess(model)`` (the residue under test)."""

    name = "residue"

    def __init__(self, mess):
        super().__init__()
        self.mess = mess

    def targets(self, model, requests):
        return {TARGET}

    def apply(self, model, tok, requests):
        with torch.no_grad():
            model.get_parameter(TARGET).add_(1.0)
            self.mess(model)
        return EditReport()


def _with_buffers(dtype=torch.float32):
    """The tiny Llama plus a persistent and a non-persistent 2-D buffer (rows and transposes to permute)."""
    model, tok = tiny_model(seed=0)
    model.to(dtype)
    g = torch.Generator().manual_seed(1)
    model.model.register_buffer("table", torch.randn(6, 6, generator=g).to(dtype), persistent=True)
    model.model.register_buffer("scratch", torch.randn(5, 5, generator=g).to(dtype), persistent=False)
    return model, tok


def _permute(t: torch.Tensor, kind: str, i: int, j: int) -> None:
    if kind == "transpose":
        t.copy_(t.t().clone())
    elif kind == "rows":
        t[[i, j]] = t[[j, i]].clone()
    else:
        flat = t.view(-1)
        flat[[i, j]] = flat[[j, i]].clone()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), dtype=st.sampled_from(DTYPES), keep=st.booleans())
def test_any_permuted_undeclared_tensor_is_caught(data, dtype, keep):
    model, tok = _with_buffers(dtype)
    tensors = {**{("parameter", n): p for n, p in model.named_parameters() if n != TARGET},
               **{("buffer", n): b for n, b in model.named_buffers()}}
    kind_of, name = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    t = tensors[(kind_of, name)]
    square = t.dim() == 2 and t.shape[0] == t.shape[1]
    kind = data.draw(st.sampled_from(["transpose", "rows", "elements"] if square else
                                     ["rows", "elements"] if t.dim() == 2 else ["elements"]), label="kind")
    size = t.shape[0] if kind == "rows" else t.numel()
    i, j = data.draw(st.lists(st.integers(0, size - 1), min_size=2, max_size=2, unique=True), label="positions")
    probe = t.detach().clone()
    _permute(probe, kind, i, j)
    assume(not bit_equal(probe, t))  # equal rows or elements: nothing changed

    editor = Editor(model, tok, Residue(lambda m: _permute(t, kind, i, j)), keep_original_weight=keep)
    with pytest.raises(RestoreError, match=f"{kind_of} {name} changed"):
        editor.edit(REQ)


@pytest.mark.parametrize("keep", [True, False])
def test_a_clean_edit_passes(keep):
    model, tok = _with_buffers()
    editor = Editor(model, tok, Residue(lambda m: None), keep_original_weight=keep)
    editor.edit(REQ)
    editor.edit(REQ)
    assert StateSignature.take(model).differences(StateSignature.take(model)) == []


def _leave_forward_hook(model):
    model.get_submodule("model.layers.1.mlp").register_forward_hook(lambda *a: None)


def _leave_pre_hook_with_kwargs(model):
    model.get_submodule("model.layers.0.self_attn").register_forward_pre_hook(lambda *a: None, with_kwargs=True)


def _leave_backward_hook(model):
    model.get_submodule("model.norm").register_full_backward_hook(lambda *a: None)


def _leave_tensor_hook(model):
    p = model.get_parameter("model.norm.weight")
    p.requires_grad_(True)  # torch registers tensor hooks only then; the flag itself is put back
    p.register_hook(lambda g: g)
    p.requires_grad_(False)


def _train(model):
    model.train()


def _dropout_on_one(model):
    model.get_submodule("model.layers.1.mlp").train()


def _requires_grad(model):
    model.get_parameter("model.layers.1.mlp.up_proj.weight").requires_grad_(True)


def _leave_grad(model):
    p = model.get_parameter("model.layers.0.mlp.gate_proj.weight")
    p.grad = torch.ones_like(p)


def _change_inv_freq(model):
    model.get_buffer("model.rotary_emb.inv_freq").mul_(1.5)


def _add_module(model):
    model.model.extra = nn.Linear(2, 2)


def _wrap_module(model):
    model.model.layers[1].mlp = nn.Sequential(model.model.layers[1].mlp)


def _untie(model):
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("mess, message", [
    (_leave_forward_hook, r"a forward hook was left on model\.layers\.1\.mlp"),
    (_leave_pre_hook_with_kwargs, r"a forward pre-hook was left on model\.layers\.0\.self_attn"),
    (_leave_backward_hook, r"backward (pre-)?hook was left on model\.norm"),
    (_leave_tensor_hook, r"a tensor hook was left on parameter model\.norm\.weight"),
    (_train, r"training flag changed \(now train mode\) on \d+ modules \[<root>, lm_head, model"),
    (_dropout_on_one, r"training flag changed \(now train mode\) on .*model\.layers\.1\.mlp"),
    (_requires_grad, r"requires_grad changed \(now True\) on parameter model\.layers\.1\.mlp\.up_proj\.weight"),
    (_leave_grad, r"a gradient was left on parameter model\.layers\.0\.mlp\.gate_proj\.weight"),
    (_change_inv_freq, r"buffer model\.rotary_emb\.inv_freq changed"),
    (_add_module, r"module tree changed: added module model\.extra"),
    (_wrap_module, r"module tree changed: added .*model\.layers\.1\.mlp\.0.*model\.layers\.1\.mlp is a "
                   r"torch\.nn\.modules\.container\.Sequential"),
    (_untie, r"parameter lm_head\.weight added.*tied weights changed .* for parameter lm_head\.weight"),
], ids=lambda v: getattr(v, "__name__", "msg"))
def test_every_kind_of_residue_is_caught_and_named(mess, message, keep):
    model, tok = tiny_model(seed=0)
    with pytest.raises(RestoreError, match=message):
        Editor(model, tok, Residue(mess), keep_original_weight=keep).edit(REQ)


def test_a_global_hook_is_caught():
    model, tok = tiny_model(seed=0)
    handles = []
    try:
        with pytest.raises(RestoreError, match=r"a forward hook was left globally"):
            Editor(model, tok, Residue(lambda m: handles.append(
                torch_module.register_module_forward_hook(lambda *a: None)))).edit(REQ)
    finally:
        for h in handles:
            h.remove()


def test_hooks_present_before_the_edit_are_fine_and_their_removal_is_seen():
    model, tok = tiny_model(seed=0)
    handle = model.get_submodule("model.layers.0.mlp").register_forward_hook(lambda *a: None)
    editor = Editor(model, tok, Residue(lambda m: None))
    editor.edit(REQ)
    editor.algorithm.mess = lambda m: handle.remove()
    with pytest.raises(RestoreError, match=r"a forward hook was removed on model\.layers\.0\.mlp"):
        editor.edit(REQ)
