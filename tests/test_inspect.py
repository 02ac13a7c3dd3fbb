"""``harness.inspect``: every parameter and buffer with its facts, the algorithm's targets and their snapshot
cost, per-layer totals, CSV output, and bare state_dict files. Tiny model only."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from harness.inspect import layer_of, layer_totals, main, model_rows
from harness.snapshot import WeightsCopy
from harness.weights import save_state_dict

SMOKE = ["experiment=smoke", "threads=1"]
TARGET = "model.layers.0.mlp.down_proj.weight"


def test_rows_cover_every_parameter_and_buffer(tiny) -> None:
    model, _ = tiny
    rows = {r["name"]: r for r in model_rows(model, {TARGET})}
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)] + [n for n, _ in model.named_buffers()]
    assert list(rows) == names
    r = rows[TARGET]
    assert (r["kind"], r["shape"], r["dtype"], r["device"], r["numel"], r["bytes"], r["trainable"], r["target"]) == \
        ("parameter", "64x128", "float32", "cpu", 8192, 8192 * 4, True, True)
    assert r["snapshot_bytes"] == WeightsCopy.take(model, {TARGET}).nbytes
    assert sum(x["snapshot_bytes"] for x in rows.values()) == r["snapshot_bytes"]  # nothing else is snapshotted
    assert rows["lm_head.weight"]["tied_to"] == "model.embed_tokens.weight"
    inv = rows["model.rotary_emb.inv_freq"]
    assert inv["kind"] == "buffer (not saved)" and inv["trainable"] is False and inv["target"] is False


def test_layer_totals_add_up_to_the_model(tiny) -> None:
    model, _ = tiny
    totals = {t["group"]: t for t in layer_totals(model_rows(model, {TARGET}))}
    unique = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    assert sum(t["bytes"] for t in totals.values()) == sum(t.numel() * t.element_size() for t in unique.values())
    assert totals["model.layers.0"]["targets"] == 1 and totals["model.layers.0"]["tensors"] == 9
    assert totals["model.layers.1"]["snapshot_bytes"] == 0 and totals["lm_head"]["bytes"] == 0  # tied: counted once
    assert layer_of("transformer.h.11.mlp.c_proj.weight") == "transformer.h.11"
    assert layer_of("lm_head.weight") == "lm_head"


def test_cli_prints_marks_and_writes_csv(tmp_path: Path, capsys) -> None:
    path = tmp_path / "inspect.csv"
    assert main([*SMOKE, "--csv", str(path)]) == 0
    out = capsys.readouterr().out
    assert "snapshot 32.0 KiB" in out and "per layer:" in out
    df = pd.read_csv(path)
    assert len(df) == 23 and df.loc[df["target"], "name"].tolist() == [TARGET]
    assert df["snapshot_bytes"].sum() == 32768 and set(df["kind"]) == {"parameter", "buffer (not saved)"}
    layers = pd.read_csv(tmp_path / "inspect.layers.csv")
    assert layers.set_index("group").loc["model.layers.0", "targets"] == 1
    assert layers["bytes"].sum() == df.loc[df["tied_to"].isna(), "bytes"].sum()


def test_bare_state_dict_files_are_listed_without_a_model(tmp_path: Path, tiny, capsys) -> None:
    model, _ = tiny
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    save_state_dict(model, tmp_path / "sd.safetensors")
    assert main([str(tmp_path / "sd.pt"), "--csv", str(tmp_path / "pt.csv")]) == 0
    pt = pd.read_csv(tmp_path / "pt.csv")
    assert len(pt) == 21 and set(pt["kind"]) == {"tensor"} and pt["target"].isna().all()
    assert pt.set_index("name").loc["lm_head.weight", "tied_to"] == "model.embed_tokens.weight"  # torch.save keeps ties
    assert main(["model=tiny", f"model.source={tmp_path / 'sd.safetensors'}", "--csv", str(tmp_path / "st.csv")]) == 0
    st = pd.read_csv(tmp_path / "st.csv")
    assert len(st) == 20 and st["bytes"].sum() == pt.loc[pt["tied_to"].isna(), "bytes"].sum()
    assert "no model: targets unknown" in capsys.readouterr().out


def test_an_unsafe_pickle_is_refused_with_the_reason(tmp_path: Path, capsys) -> None:
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    torch.save({"w": torch.zeros(2), "x": Payload()}, tmp_path / "evil.pth")
    assert main([str(tmp_path / "evil.pth")]) == 1
    assert "refused to load" in capsys.readouterr().err and not (tmp_path / "pwned").exists()
