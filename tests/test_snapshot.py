"""WeightsCopy and fingerprints: exact restore in every dtype, file round trip, clear errors."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.models import tiny_model
from harness.snapshot import SnapshotError, WeightsCopy, bit_equal, fingerprint, model_digest, tensor_fingerprint

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _model(dtype=torch.float32):
    model, _ = tiny_model(seed=0)
    return model.to(dtype)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), dtype=st.sampled_from(DTYPES), offload=st.booleans())
def test_random_targets_restore_exactly(data, dtype, offload):
    model = _model(dtype)
    names = sorted(n for n, _ in model.named_parameters())
    targets = data.draw(st.sets(st.sampled_from(names), min_size=0, max_size=len(names)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    snap = WeightsCopy.take(model, targets, offload=offload)
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in targets:
                p.add_(torch.randn(p.shape, generator=g).to(dtype) * 3)
    snap.restore(model)
    snap.verify(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_nbytes_and_offload():
    model = _model()
    snap = WeightsCopy.take(model, ["model.layers.0.mlp.down_proj.weight"], offload=True)
    p = dict(model.named_parameters())["model.layers.0.mlp.down_proj.weight"]
    assert snap.nbytes == p.numel() * 4
    assert snap.tensors["model.layers.0.mlp.down_proj.weight"].device.type == "cpu"
    assert snap.tensors["model.layers.0.mlp.down_proj.weight"].data_ptr() != p.data_ptr()


def test_unknown_name_rejected():
    with pytest.raises(SnapshotError, match="model.nope.weight"):
        WeightsCopy.take(_model(), ["model.nope.weight"])


def test_verify_names_the_changed_parameter():
    model = _model()
    snap = WeightsCopy.take(model, ["model.norm.weight", "model.layers.1.mlp.up_proj.weight"])
    with torch.no_grad():
        model.get_parameter("model.norm.weight")[3] += 1
    with pytest.raises(SnapshotError, match="model.norm.weight"):
        snap.verify(model)
    assert snap.mismatches(model) == ["model.norm.weight"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_safetensors_round_trip(tmp_path, dtype):
    model = _model(dtype)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"]
    snap = WeightsCopy.take(model, names)
    path = tmp_path / "snap.safetensors"
    snap.save(path)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    loaded = WeightsCopy.load(path, model)
    assert loaded.names == sorted(names)
    loaded.restore(model)
    snap.verify(model)


def test_mismatched_file_rejected_with_clear_message(tmp_path):
    model = _model()
    path = tmp_path / "snap.safetensors"
    WeightsCopy({"model.norm.weight": torch.zeros(7)}).save(path)
    with pytest.raises(SnapshotError, match=r"model\.norm\.weight.*\(7,\)"):
        WeightsCopy.load(path, model)
    WeightsCopy({"model.layers.9.mlp.weight": torch.zeros(3)}).save(path)
    with pytest.raises(SnapshotError, match=r"model\.layers\.9\.mlp\.weight.*not a parameter"):
        WeightsCopy.load(path, model)
    WeightsCopy({"model.norm.weight": torch.zeros(64, dtype=torch.float16)}).save(path)
    with pytest.raises(SnapshotError, match="float16"):
        WeightsCopy.load(path, model)


def test_fingerprint_sees_a_single_bit():
    model = _model()
    fp = fingerprint(model)
    digest = model_digest(model)
    p = model.get_parameter("model.layers.1.mlp.down_proj.weight")
    with torch.no_grad():
        bits = p.view(-1).view(torch.int32)
        bits[17] ^= 1  # flip the lowest mantissa bit of one element
    fp2 = fingerprint(model)
    assert [n for n in fp if fp[n] != fp2[n]] == ["model.layers.1.mlp.down_proj.weight"]
    assert model_digest(model) != digest


def test_bit_equal_distinguishes_signed_zero():
    assert not bit_equal(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert tensor_fingerprint(torch.tensor([0.0])) != tensor_fingerprint(torch.tensor([-0.0]))
