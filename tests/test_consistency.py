"""The consistency probe (ROME's reference score): TF-IDF cosine by hand with scikit-learn's word
pattern, ROME's file formats and their errors, the texts shared with fluency (generated once), and
a run over the ROME-layout loader that fills the column from files the test writes."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.probes import build_probes
from harness.probes.consistency import ReferenceError, TfidfModel, load_snippets, load_tfidf
from harness.probes.fluency import generation_texts
from harness.types import EditRequest

VOCAB = {"paris": 0, "france": 1, "city": 2, "danielle": 3, "darrieux": 4, "english": 5, "the": 6, "is": 7}
IDF = [1.0, 2.0, 3.0, 1.5, 1.5, 2.5, 0.1, 0.2]


def write_files(root: Path, snippets=None) -> dict[str, str]:
    """ROME-format idf.npy, tfidf_vocab.json and attribute_snippets.json under ``root``."""
    np.save(root / "idf.npy", np.array(IDF))
    (root / "tfidf_vocab.json").write_text(json.dumps(VOCAB))
    if snippets is None:
        snippets = [{"relation_id": "P103", "target_id": "Q1860", "samples": [
            {"name": "Jane Austen", "text": "English is the language Danielle Darrieux never spoke."},
            {"name": "Dickens", "text": "The English city of Portsmouth is where Dickens was born."}]},
            {"relation_id": "P37", "target_id": "Q150", "samples": [{"name": "x", "text": "France is"}]}]
    (root / "attribute_snippets.json").write_text(json.dumps(snippets))
    return {"idf": str(root / "idf.npy"), "vocab": str(root / "tfidf_vocab.json"),
            "snippets": str(root / "attribute_snippets.json")}


def request(case_id="a", relation_id="P103", target_id="Q1860", prompts=("Danielle Darrieux was", "Darrieux said")):
    return EditRequest(case_id=case_id, prompt="The mother tongue of {} is", subject="Danielle Darrieux",
                       target_new="English", target_true="French", generation_prompts=prompts,
                       relation_id=relation_id, target_new_id=target_id)


def test_tfidf_cosine_by_hand():
    model = TfidfModel(np.array(IDF), VOCAB)
    # "a" and single letters are not words (two or more word characters); case is folded;
    # out-of-vocabulary words ("lyon") are dropped: a = 2 paris + 1 city, b = 1 france + 1 city
    va, vb = np.array([2 * 1.0, 0, 3.0]), np.array([0, 2.0, 3.0])
    expected = va @ vb / np.linalg.norm(va) / np.linalg.norm(vb)  # 9 / 13
    assert model.similarity("Paris, PARIS: a city! x Lyon", "France's city") == pytest.approx(expected)
    assert expected == pytest.approx(9 / 13)
    assert model.similarity("Paris", "Paris paris") == pytest.approx(1.0)
    assert model.similarity("Paris", "France") == 0.0
    assert math.isnan(model.similarity("Lyon", "Paris"))  # no vocabulary word: NaN, as ROME's division


def test_rome_snippet_layout_and_the_mapping_layout(tmp_path):
    files = write_files(tmp_path)
    snips = load_snippets(files["snippets"])
    assert snips["P103"]["Q1860"] == ["English is the language Danielle Darrieux never spoke.",
                                      "The English city of Portsmouth is where Dickens was born."]
    (tmp_path / "m.json").write_text(json.dumps({"P103": {"Q1860": ["one", {"text": "two"}]}}))
    assert load_snippets(tmp_path / "m.json") == {"P103": {"Q1860": ["one", "two"]}}


@pytest.mark.parametrize("content, match", [
    ([{"relation_id": "P1", "samples": []}], r"entry 0: field 'target_id' missing"),
    ([{"relation_id": "P1", "target_id": "Q1", "samples": [{"name": "n"}]}], r"entry 0: samples\[0\]"),
    ("text", "must be a list"),
])
def test_bad_snippets_name_the_file_and_field(tmp_path, content, match):
    path = tmp_path / "snips.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ReferenceError, match=match) as exc:
        load_snippets(path)
    assert str(path) in str(exc.value)


def test_bad_tfidf_files_are_named(tmp_path):
    files = write_files(tmp_path)
    with pytest.raises(ReferenceError, match="idf file .*nope.npy.* not found"):
        load_tfidf(tmp_path / "nope.npy", files["vocab"])
    (tmp_path / "v.json").write_text(json.dumps({"paris": 99}))
    with pytest.raises(ReferenceError, match=r"v.json.*'paris' has index 99, not in \[0, 8\)"):
        load_tfidf(files["idf"], tmp_path / "v.json")
    np.save(tmp_path / "m.npy", np.ones((2, 2)))
    with pytest.raises(ReferenceError, match="1-D"):
        load_tfidf(tmp_path / "m.npy", files["vocab"])
    with pytest.raises(ReferenceError, match="consistency_snippets"):
        build_probes(["consistency"], consistency_idf=files["idf"], consistency_vocab=files["vocab"])


def test_requests_without_ids_or_snippets_are_refused(tiny, tmp_path):
    model, tok = tiny
    suite = build_probes(["consistency"], settings={"consistency": write_files(tmp_path)})
    with pytest.raises(ReferenceError, match="case 'b' has no relation_id"):
        suite.measure(model, tok, [request("b", relation_id=None)])
    with pytest.raises(ReferenceError, match="no text for relation_id 'P103', target 'Q9'"):
        suite.measure(model, tok, [request("c", target_id="Q9")])


def test_consistency_reads_the_fluency_texts_generated_once(tiny, tmp_path):
    model, tok = tiny
    files = write_files(tmp_path)
    requests = [request("a"), request("b", relation_id="P37", target_id="Q150", prompts=("France is the",))]
    calls = []
    original = model.generate

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    model.generate = counting
    try:
        both = build_probes(["fluency", "consistency"], batch_size=8, settings={"consistency": files})
        rows = both.measure(model, tok, requests).metrics
        assert calls == [3]  # one batch of the three generation prompts, for both families
        calls.clear()
        alone = build_probes(["consistency"], batch_size=8, settings={"consistency": files}).measure(
            model, tok, requests).metrics
        assert calls == [3]
    finally:
        del model.generate
    texts = generation_texts(model, tok, requests, 100, None, 8, 0)
    tfidf = load_tfidf(files["idf"], files["vocab"])
    refs = [" ".join(load_snippets(files["snippets"])[r.relation_id][r.target_new_id]) for r in requests]
    for row, again, ts, ref in zip(rows, alone, texts, refs):
        expected = 100 * tfidf.similarity(" ".join(ts), ref)
        assert row["consistency"] == pytest.approx(expected) and again["consistency"] == row["consistency"]
        assert 0 < row["consistency"] <= 100  # the prompts hold vocabulary words
        assert math.isfinite(row["fluency"])
    assert all(len(t) == len(r.generation_prompts) for t, r in zip(texts, requests))


def test_a_run_over_the_rome_layout_fills_the_column(tmp_path):
    from harness.cli import compose_config, to_config
    from harness.results import read_rows
    from harness.runner import ModelCache, run

    files = write_files(tmp_path)
    record = {"case_id": 7, "requested_rewrite": {
        "prompt": "The mother tongue of {} is", "relation_id": "P103", "subject": "Danielle Darrieux",
        "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"}},
        "paraphrase_prompts": ["Danielle Darrieux spoke"], "neighborhood_prompts": ["The mother tongue of Blum is"],
        "attribute_prompts": ["Jane Austen speaks"], "generation_prompts": ["Danielle Darrieux is", "Darrieux was"]}
    data = tmp_path / "counterfact.json"
    data.write_text(json.dumps([record]))
    ov = ["experiment=smoke", "threads=1", "data=counterfact_rome", f"data.path={data}", "probes=with_consistency",
          "probes.fluency_max_length=24", f"probes.consistency_idf={files['idf']}",
          f"probes.consistency_vocab={files['vocab']}", f"probes.consistency_snippets={files['snippets']}"]
    cfg = to_config(compose_config(ov))
    assert cfg.probes.consistency_max_length == 24  # follows the fluency setting
    torch.manual_seed(0)
    run(cfg, tmp_path / "run", ov, cache=ModelCache(), progress=False)
    (row,) = read_rows(tmp_path / "run" / "cases.csv")
    assert row["status"] == "ok", row.get("error")
    assert 0 < float(row["pre_consistency"]) <= 100 and 0 <= float(row["post_consistency"]) <= 100
    assert "consistency=1" in row["probe_versions"].split()
