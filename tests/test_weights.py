"""State dicts in and out (``harness.weights`` and ``model.weights``): exact round trips, refused pickles,
mismatches named key by key, dtype conversions reported. Tiny model only."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from harness.cli import compose_config, to_config
from harness.models import load_model
from harness.runner import ModelCache
from harness.snapshot import bit_equal
from harness.weights import (UnsafeWeightsError, WeightsError, overlay_file, overlay_state_dict, read_metadata,
                             read_state_dict, save_state_dict)


def _edit(model: torch.nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """Change two parameters (one of them tied to lm_head) in place; return a copy of every parameter."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in ("model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"):
            params[name].add_(torch.randn(params[name].shape, generator=gen))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _differs(model: torch.nn.Module, want: dict[str, torch.Tensor]) -> list[str]:
    return [n for n, p in model.named_parameters() if not bit_equal(p, want[n])]


def test_saved_state_dict_overlays_bit_for_bit(tmp_path: Path, tiny) -> None:
    model, _ = tiny
    edited = _edit(model)
    path = tmp_path / "sd.safetensors"
    written = save_state_dict(model, path, metadata={"note": "test"})
    assert "lm_head.weight" not in written  # tied to the embedding: stored once
    assert read_metadata(path)["note"] == "test" and "lm_head.weight" in read_metadata(path)["aliases"]
    fresh, _ = load_model("tiny", device="cpu", dtype="float32")
    assert _differs(fresh, edited)  # the base really differs from the edited model
    again, _ = load_model("tiny", device="cpu", dtype="float32", weights=str(path))
    assert _differs(again, edited) == []
    assert bit_equal(again.lm_head.weight, edited["model.embed_tokens.weight"])  # the tie survives


def test_weights_only_pickle_overlays_and_keeps_ties(tmp_path: Path, tiny) -> None:
    model, _ = tiny
    edited = _edit(model, seed=2)
    path = tmp_path / "sd.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)  # a trainer's checkpoint layout
    again, _ = load_model("tiny", device="cpu", dtype="float32", weights=str(path))
    assert _differs(again, edited) == []


class _OpenFile:
    """Unpickling this object calls ``open(marker, "w")``: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class _System:
    """Unpickling this object runs a shell command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", [_OpenFile, _System])
@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_malicious_pickle_is_refused_without_running_it(tmp_path: Path, payload, suffix: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    torch.save({"model.norm.weight": torch.ones(64), "x": payload(marker)}, path)
    with pytest.raises(UnsafeWeightsError, match=r"(?i)evil.*refused.*global (io\.open|posix\.system)"):
        read_state_dict(path)
    with pytest.raises(UnsafeWeightsError):
        load_model("tiny", device="cpu", dtype="float32", weights=str(path))
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what the refusal prevents: the payload does run
    assert marker.exists()


def test_mismatched_state_dict_error_lists_the_offending_keys(tmp_path: Path, tiny) -> None:
    model, _ = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del state["model.layers.0.mlp.up_proj.weight"]
    state["model.layers.9.mlp.up_proj.weight"] = torch.zeros(3)
    state["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(64, 32)
    state["model.norm.weight"] = torch.full((64,), 2.0)
    path = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"}, str(path))
    norm_before = model.model.norm.weight.clone()
    with pytest.raises(WeightsError) as err:
        overlay_file(model, path)
    msg = str(err.value)
    assert "bad.safetensors" in msg
    assert "missing (1): ['model.layers.0.mlp.up_proj.weight']" in msg
    assert "unexpected (1): ['model.layers.9.mlp.up_proj.weight']" in msg
    assert "model.layers.1.self_attn.q_proj.weight (64, 32) vs (64, 64)" in msg
    assert torch.equal(model.model.norm.weight, norm_before)  # strict: nothing written
    q_before = model.model.layers[1].self_attn.q_proj.weight.clone()
    report = overlay_file(model, path, strict=False)
    assert report.missing == ["model.layers.0.mlp.up_proj.weight"]
    assert report.unexpected == ["model.layers.9.mlp.up_proj.weight"]
    assert list(report.mismatched) == ["model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(model.model.norm.weight, torch.full((64,), 2.0))  # what fits is written
    assert torch.equal(model.model.layers[1].self_attn.q_proj.weight, q_before)  # what does not is skipped


def test_dtype_conversions_are_reported(tiny, caplog) -> None:
    model, _ = tiny
    state = {k: v.to(torch.float16) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    with caplog.at_level(logging.INFO, logger="harness.weights"):
        report = overlay_state_dict(model, state, source="half.safetensors")
    assert set(report.converted) == set(state)
    assert set(report.converted.values()) == {"torch.float16 -> torch.float32"}
    assert f"converted {len(state)} tensor(s) torch.float16 -> torch.float32" in caplog.text
    assert bit_equal(model.model.norm.weight, state["model.norm.weight"].float())
    bf16, _ = load_model("tiny", device="cpu", dtype="bfloat16")
    with caplog.at_level(logging.WARNING, logger="harness.weights"):
        overlay_state_dict(bf16, state, source="half.safetensors")
    assert "narrowing, not exact" in caplog.text  # float16 -> bfloat16 loses mantissa bits


def test_tied_keys_with_different_values_are_refused(tiny) -> None:
    model, _ = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    with pytest.raises(WeightsError, match="tied keys.*lm_head.weight"):
        overlay_state_dict(model, state)


def test_unknown_suffix_and_non_tensor_values_are_errors(tmp_path: Path) -> None:
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"unknown weights format '\.npz'"):
        read_state_dict(tmp_path / "w.npz")
    torch.save({"a": torch.zeros(1), "b": 3}, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match=r"not name -> tensor: \['b'\]"):
        read_state_dict(tmp_path / "w.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_state_dict(tmp_path / "nope.pt")


def test_config_fields_reach_the_loader_and_the_cache_key(tmp_path: Path, tiny) -> None:
    model, _ = tiny
    edited = _edit(model)
    path = tmp_path / "sd.safetensors"
    save_state_dict(model, path)
    cfg = to_config(compose_config(["model=tiny", "device=cpu", "dtype=float32", f"model.weights={path}"]))
    assert cfg.model.weights == str(path) and cfg.model.weights_strict is True
    plain = to_config(compose_config(["model=tiny", "device=cpu", "dtype=float32"]))
    loose = to_config(compose_config(["model=tiny", "device=cpu", "dtype=float32", f"model.weights={path}",
                                      "model.weights_strict=false"]))
    assert len({ModelCache.key(c) for c in (cfg, plain, loose)}) == 3
    loaded = ModelCache().get(cfg)
    assert _differs(loaded.model, edited) == []
