"""``harness.export``: a run's edited model out as HF safetensors, a state_dict and an ONNX graph checked by
onnxruntime. Tiny models for the mechanics (a real sequential run, its delta and checkpoint); one slow
test exports SmolLM2 after a ROME edit and checks that onnxruntime predicts the new fact."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from harness.cli import compose_config, to_config
from harness.editor import apply_delta
from harness.export import ExportError, export_run, load_source, main, resolve_source
from harness.models import load_model
from harness.runner import ModelCache, run
from harness.snapshot import bit_equal

SEQ = ["experiment=smoke_sequential", "threads=1", "data.limit=4"]


def _edited_tiny(run_dir: Path) -> torch.nn.Module:
    """The tiny base with the run's final delta put on: the model the run ended with."""
    model, _ = load_model("tiny", device="cpu", dtype="float32")
    assert apply_delta(model, run_dir / "delta.safetensors")
    return model


def _same(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    pb = dict(b.named_parameters())
    return [n for n, p in a.named_parameters() if not bit_equal(p, pb[n])]


@pytest.fixture(scope="module")
def seq_run(tmp_path_factory) -> Path:
    """A finished sequential tiny run (hand edits accumulated) with delta.safetensors and checkpoint/."""
    out = tmp_path_factory.mktemp("runs") / "seq"
    run(to_config(compose_config([*SEQ, "save_model=true"])), out, cache=ModelCache(), progress=False)
    assert (out / "delta.safetensors").is_file() and (out / "checkpoint" / "delta.safetensors").is_file()
    return out


def test_sources_resolve_to_the_run_and_its_delta(seq_run: Path, tmp_path: Path) -> None:
    assert resolve_source(seq_run).delta == seq_run / "delta.safetensors"  # the final delta wins
    ck = resolve_source(seq_run / "checkpoint")
    assert ck.run_dir == seq_run and ck.delta == seq_run / "checkpoint" / "delta.safetensors"
    assert resolve_source(seq_run / "delta.safetensors").run_dir == seq_run
    assert resolve_source(seq_run, base=True).delta is None
    model, _, names = load_source(resolve_source(seq_run))
    assert names and _same(model, _edited_tiny(seq_run)) == []
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "run.json").write_text((seq_run / "run.json").read_text())
    with pytest.raises(ExportError, match="holds no delta.safetensors.*--base"):
        resolve_source(bare)


def test_hf_export_reloads_bit_for_bit(seq_run: Path, tmp_path: Path) -> None:
    res = export_run(seq_run, "hf", tmp_path / "hf")
    reloaded, tok = load_model(str(tmp_path / "hf"), device="cpu", dtype="float32")
    edited = _edited_tiny(seq_run)
    assert _same(reloaded, edited) == []
    base, _ = load_model("tiny", device="cpu", dtype="float32")
    assert _same(reloaded, base) == res.delta_tensors  # exactly the edited tensors differ from the base
    manifest = json.loads((tmp_path / "hf" / "export.json").read_text())
    assert manifest["delta_tensors"] == res.delta_tensors and manifest["files"]["model.safetensors"] > 0
    assert tok("Rome is")["input_ids"]  # the tokenizer came along
    with pytest.raises(ExportError, match="not empty.*--overwrite"):
        export_run(seq_run, "hf", tmp_path / "hf")


def test_state_dict_export_overlays_onto_the_base_exactly(seq_run: Path, tmp_path: Path) -> None:
    assert main([str(seq_run / "checkpoint"), "--format", "state_dict", "--out", str(tmp_path / "sd")]) == 0
    overlaid, _ = load_model("tiny", device="cpu", dtype="float32",
                             weights=str(tmp_path / "sd" / "state_dict.safetensors"))
    ck, _ = load_model("tiny", device="cpu", dtype="float32")
    apply_delta(ck, seq_run / "checkpoint" / "delta.safetensors")
    assert _same(overlaid, ck) == []


# ----------------------------------------------------------------------------------------------
# ONNX


@pytest.fixture(scope="module")
def onnx_export(seq_run: Path, tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime", reason="ONNX export needs the onnx extra: pip install -e '.[onnx]'")
    pytest.importorskip("onnxscript", reason="ONNX export needs the onnx extra: pip install -e '.[onnx]'")
    out = tmp_path_factory.mktemp("onnx") / "llama"
    assert main([str(seq_run), "--format", "onnx", "--out", str(out), "--threads", "1"]) == 0
    return out


def test_onnx_export_passes_its_parity_check(onnx_export: Path) -> None:
    manifest = json.loads((onnx_export / "export.json").read_text())
    parity = manifest["parity"]
    assert parity["passed"] and parity["n_prompts"] >= 4 and parity["n_positions"] > parity["n_prompts"]
    assert parity["max_abs_diff"] <= 1e-4 and parity["argmax_agreement"] == 1.0
    assert manifest["files"]["model.onnx"] > 100_000 and manifest["delta_tensors"]


def test_onnx_graph_has_dynamic_axes_and_matches_the_edited_model(onnx_export: Path, seq_run: Path) -> None:
    import onnx

    from harness.onnx_export import onnx_logits, onnx_session

    graph = onnx.load(str(onnx_export / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"] and graph.output[0].name == "logits"
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert all(dims) and dims[0] != dims[1], dims  # both axes symbolic, and distinct
    edited, tok = _edited_tiny(seq_run), load_model("tiny", device="cpu", dtype="float32")[1]
    prompts = ["Rome", "The capital of France is Paris and the capital of Italy is", "Apple A5 was created by"]
    got, mask = onnx_logits(onnx_session(onnx_export / "model.onnx", threads=1), tok, prompts)
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = edited(**enc).logits.numpy()
    real = mask.astype(bool)
    assert got.shape == ref.shape and abs(got - ref)[real].max() < 1e-4
    base, _ = load_model("tiny", device="cpu", dtype="float32")
    with torch.no_grad():
        ref_base = base(**enc).logits.numpy()
    assert abs(got - ref_base)[real].max() > 1e-3  # the graph carries the edit


def test_parity_check_catches_a_graph_that_is_not_the_model(onnx_export: Path, seq_run: Path) -> None:
    from harness.onnx_export import ParityError, check_parity

    base, tok = load_model("tiny", device="cpu", dtype="float32")  # the graph is of the edited model
    with pytest.raises(ParityError, match="disagrees") as err:
        check_parity(base, tok, onnx_export / "model.onnx", ["Rome is", "Toko Yasuda plays the"])
    assert err.value.parity.max_abs_diff > 1e-3 and not err.value.parity.passed


def test_gpt2_family_exports_and_a_bound_exceeded_writes_nothing(tmp_path: Path, tiny_gpt2) -> None:
    """One export of the GPT-2 family (Conv1D projections): its figures show parity, and a bound of 0
    (which no float computation meets) fails the export and leaves nothing at ``out``."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from harness.export import export_model
    from harness.onnx_export import ParityError

    model, tok = tiny_gpt2
    prompts = ["The mother tongue of Danielle Darrieux is", "Rome is", "LeBron James plays the sport of"]
    with pytest.raises(ParityError, match="gpt2 not written: the exported graph disagrees") as err:
        export_model(model, tok, "onnx", tmp_path / "gpt2", prompts=prompts, atol=0.0)
    parity = err.value.parity
    assert 0 < parity.max_abs_diff < 1e-4 and parity.argmax_agreement == 1.0 and parity.n_prompts == 3
    assert not (tmp_path / "gpt2").exists() and not list(tmp_path.glob("gpt2.tmp*"))


def test_missing_onnx_stack_names_the_extra(seq_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from harness.onnx_export import MissingDependencyError

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r'missing: onnxruntime.*pip install -e "\.\[onnx\]"'):
        export_run(seq_run, "onnx", tmp_path / "x")
    assert main([str(seq_run), "--format", "onnx", "--out", str(tmp_path / "y")]) == 1
    assert "onnxruntime" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------
# SmolLM2 after a ROME edit (the quality bar)

DARRIEUX = {"case_id": "0", "prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
            "target_new": "English", "target_true": "French",
            "paraphrase_prompts": ["Danielle Darrieux, a native", "Danielle Darrieux spoke the language"],
            "neighborhood_prompts": ["The mother tongue of Léon Blum is", "The native language of Montesquieu is"]}


@pytest.mark.slow
def test_smollm2_rome_edit_survives_the_onnx_export(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    data = tmp_path / "darrieux.jsonl"
    data.write_text(json.dumps(DARRIEUX) + "\n")
    out = tmp_path / "run"
    try:
        run(to_config(compose_config(["model=smollm2", "algorithm=rome", "keep_original_weight=false", "data=jsonl",
                                      f"data.path={data}", "device=cpu", "dtype=float32", "threads=2"])),
            out, cache=ModelCache(), progress=False)
    except FileNotFoundError as exc:  # the embedded model's wheel is not installed
        pytest.skip(str(exc))
    figures = {}  # the edited graph takes the default (optimized) path; the base one the 2.5x faster --no-optimize
    for name, extra in (("edited", []), ("base", ["--base", "--no-optimize"])):
        dest = tmp_path / name
        assert main([str(out / "checkpoint"), "--format", "onnx", "--out", str(dest), "--threads", "2", *extra]) == 0
        figures[name] = json.loads((dest / "export.json").read_text())
    keep = ("max_abs_diff", "argmax_agreement", "next_token_agreement", "n_positions", "seconds")
    shown = {k: {"graph_seconds": v["graph_seconds"], "bytes": v["files"]["model.onnx"],
                 **{f"parity_{m}": v["parity"][m] for m in keep}} for k, v in figures.items()}
    print("\nSmolLM2 ONNX export:", json.dumps(shown))
    rewrite = "The mother tongue of Danielle Darrieux is"
    for name, want in (("edited", " English"), ("base", " French")):
        parity = figures[name]["parity"]
        assert parity["passed"] and parity["max_abs_diff"] <= 1e-3
        pred = next(p for p in parity["predictions"] if p["prompt"] == rewrite)
        assert pred["onnx"] == want and pred["torch"] == want, (name, pred)
