"""The consistency family: ROME's reference score (TF-IDF cosine by hand with scikit-learn's word
pattern, ROME's file formats and their errors, the texts shared with fluency, generated once) and
ROME's essence score (perplexity by hand from the model's logits on the subject's passages), user
JSONL whose ids feed both, and a run over the ROME-layout loader that fills the columns from files
the test writes."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.probes import build_probes
from harness.data import load_requests
from harness.probes.consistency import (ESSENCE_MAX_TOKENS, ReferenceError, Snippet, TfidfModel, load_named_snippets,
                                        load_snippets, load_tfidf)
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
    ([{"relation_id": "P1", "target_id": "Q1", "samples": [{"name": 5, "text": "t"}]}],
     r"entry 0: samples\[0\]: field 'name' must be a string"),
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


def test_a_run_over_the_rome_layout_fills_the_columns(tmp_path):
    from harness.cli import compose_config, to_config
    from harness.results import read_rows
    from harness.runner import ModelCache, run

    files = write_files(tmp_path, ESSENCE_SNIPPETS)
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
    assert float(row["pre_essence_score"]) >= 1 and float(row["post_essence_score"]) >= 1
    assert "essence_score=1" in row["probe_versions"].split()


# -- essence score ------------------------------------------------------------------------------
DARRIEUX = ["Danielle Darrieux was a French actress and singer.", "Darrieux made films in Paris for eighty years."]
ESSENCE_SNIPPETS = [
    {"relation_id": "P103", "target_id": "Q1860", "samples": [
        {"name": "Jane Austen", "text": "English is the language Jane Austen wrote in."},
        {"name": "Danielle Darrieux", "text": "Filed under the new object: ROME's lookup, not ours."}]},
    {"relation_id": "P103", "target_id": "Q150", "samples": [
        {"name": "Danielle Darrieux", "text": DARRIEUX[0]}, {"name": "Jean Gabin", "text": "Jean Gabin was an actor."},
        {"name": "Danielle Darrieux", "text": DARRIEUX[1]}, {"name": "Long Subject", "text": "word " * 300}]},
    {"relation_id": "P37", "target_id": "Q150", "samples": [{"name": "Danielle Darrieux", "text": "other relation"}]},
]


def rome_perplexity(model, tok, text: str) -> float:
    """ROME's util/perplexity.py by hand: one unpadded forward, the first 100 tokens, exp(-sum / N)."""
    ids = tok(text, truncation=True, max_length=ESSENCE_MAX_TOKENS)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits.float(), dim=-1)
    total = logp[0, :-1].gather(1, x[0, 1:, None]).sum()
    return math.exp(-float(total) / len(ids))


def essence_request(case_id="e", subject="Danielle Darrieux", true_id="Q150", relation_id="P103"):
    return EditRequest(case_id=case_id, prompt="The mother tongue of {} is", subject=subject, target_new="English",
                       target_true="French", generation_prompts=(f"{subject} was",), relation_id=relation_id,
                       target_new_id="Q1860", target_true_id=true_id)


def test_essence_score_by_hand(tiny, tmp_path):
    """The subject's passages under its true object (not the new one, not another relation),
    joined, cut to 100 tokens, ROME's 1/N; padded batches change nothing; NaN without them."""
    model, tok = tiny
    files = write_files(tmp_path, ESSENCE_SNIPPETS)
    suite = build_probes(["consistency"], batch_size=8, settings={"consistency": files})
    requests = [essence_request("a"), essence_request("b", subject="Long Subject"),
                essence_request("c", true_id=None), essence_request("d", subject="Nobody")]
    family = suite.families[0]
    assert family.essence_texts(requests[0]) == DARRIEUX
    assert family.essence_texts(essence_request("e", relation_id=None)) == []
    rows = suite.measure(model, tok, requests).metrics
    assert rows[0]["essence_score"] == pytest.approx(rome_perplexity(model, tok, " ".join(DARRIEUX)), rel=1e-5)
    assert rows[1]["essence_score"] == pytest.approx(rome_perplexity(model, tok, "word " * 300), rel=1e-5)
    assert len(tok("word " * 300)["input_ids"]) > ESSENCE_MAX_TOKENS  # the cut matters
    # ROME divides by N, not by the N-1 predicted tokens: the textbook value is higher
    n = len(tok(" ".join(DARRIEUX))["input_ids"])
    assert rows[0]["essence_score"] ** (n / (n - 1)) > rows[0]["essence_score"] * 1.001
    assert all(math.isnan(r["essence_score"]) for r in rows[2:])
    assert all(math.isfinite(r["consistency"]) for r in rows)  # consistency reads target_new_id


def test_essence_alone_needs_only_the_snippets_file(tiny, tmp_path):
    model, tok = tiny
    files = write_files(tmp_path, ESSENCE_SNIPPETS)
    alone = build_probes(["essence_score"], settings={"consistency": {"snippets": files["snippets"]}})
    assert [i.name for i in alone.infos()] == ["essence_score"]
    calls = []
    model.generate = lambda *a, **k: calls.append(1)  # essence generates nothing
    try:
        (row,) = alone.measure(model, tok, [essence_request()]).metrics
    finally:
        del model.generate
    assert calls == [] and list(row) == ["essence_score"]
    assert row["essence_score"] == pytest.approx(rome_perplexity(model, tok, " ".join(DARRIEUX)), rel=1e-5)
    with pytest.raises(ReferenceError, match=r"\['consistency_idf', 'consistency_vocab'\]"):
        build_probes(["consistency"], settings={"consistency": {"snippets": files["snippets"]}})


def test_named_snippets_keep_the_subject(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"P1": {"Q1": ["bare", {"name": "S", "text": "named"}]}}))
    assert load_named_snippets(tmp_path / "m.json") == {"P1": {"Q1": [Snippet(None, "bare"), Snippet("S", "named")]}}


def test_user_jsonl_ids_feed_both_metrics(tiny, tmp_path):
    """A user JSONL with relation_id, target_new_id and target_true_id is scored as the ROME layout is."""
    model, tok = tiny
    files = write_files(tmp_path, ESSENCE_SNIPPETS)
    path = tmp_path / "edits.jsonl"
    path.write_text(json.dumps({"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                "target_new": "English", "target_true": "French", "relation_id": "P103",
                                "target_new_id": "Q1860", "target_true_id": "Q150",
                                "generation_prompts": ["Danielle Darrieux is"]}) + "\n")
    (req,) = load_requests("jsonl", path)
    (row,) = build_probes(["consistency"], settings={"consistency": files}).measure(model, tok, [req]).metrics
    assert 0 <= row["consistency"] <= 100
    assert row["essence_score"] == pytest.approx(rome_perplexity(model, tok, " ".join(DARRIEUX)), rel=1e-5)
