"""Data loaders: the shipped samples, every kind of invalid record, skip/limit/offset, the user
JSONL/CSV formats and the ROME layout (fixtures written to tmp_path)."""
from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest

from harness.data import KINDS, DataError, LoadedData, load_requests, sample_path
from harness.types import QA


def raw(kind: str) -> list[dict]:
    return json.loads(sample_path(kind).read_text(encoding="utf-8"))


def write_json(tmp_path: Path, records: list, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def assert_names(exc: pytest.ExceptionInfo, path: Path, index: int, field: str | None) -> None:
    err = exc.value
    assert (err.path, err.index, err.field) == (str(path), index, field)
    assert str(path) in str(err) and f"record {index + 1}" in str(err)  # messages count from 1
    if field is not None:
        assert repr(field) in str(err)


# -- shipped samples -----------------------------------------------------------------------------
def test_counterfact_sample_matches_raw_json():
    records = raw("counterfact")
    loaded = load_requests("counterfact")
    assert isinstance(loaded, LoadedData) and len(loaded) == len(records) == 500 and not loaded.skipped
    r, rec = loaded.requests[0], records[0]
    assert r.case_id == str(rec["case_id"]) == "2"
    assert (r.subject, r.target_new, r.target_true) == (rec["subject"], rec["target_new"], rec["ground_truth"])
    assert r.paraphrase_prompts == (rec["rephrase_prompt"],)
    assert r.neighborhood == (QA(rec["locality_prompt"], rec["locality_ground_truth"]),)
    for r, rec in zip(loaded, records):
        assert r.prompt.count("{}") == 1 and r.rewrite_prompt == rec["prompt"]


def test_zsre_sample_matches_raw_json():
    records = raw("zsre")
    loaded = load_requests("zsre")
    assert len(loaded) == len(records) == 100 and loaded.total == 100
    r, rec = loaded.requests[0], records[0]
    assert r.case_id == "0" and r.prompt == "What is the product made by {}?"
    assert (r.target_new, r.target_true) == (rec["alt"], rec["answers"][0])
    assert r.paraphrase_prompts == (rec["rephrase"],)
    assert r.neighborhood == (QA(rec["loc"], rec["loc_ans"]),)
    assert r.neighborhood[0].prompt.startswith("nq question: ")
    for i, (r, rec) in enumerate(zip(loaded, records)):
        assert r.case_id == str(i) and r.rewrite_prompt == rec["src"]


def test_sample_paths_live_in_the_package():
    pkg = Path(__import__("harness").__file__).resolve().parent
    for kind in ("counterfact", "zsre", "jsonl", "csv", "user"):
        assert sample_path(kind).is_relative_to(pkg)
    with pytest.raises(ValueError, match="no sample"):
        sample_path("counterfact_rome")
    with pytest.raises(ValueError, match="unknown data kind"):
        load_requests("nope")
    assert set(KINDS) == {"counterfact", "counterfact_rome", "zsre", "jsonl", "csv", "user"}


def test_full_development_files(shared_data):
    assert len(load_requests("counterfact", shared_data / "counterfact-train.json")) == 10000
    assert len(load_requests("counterfact", shared_data / "counterfact-val.json")) == 1919
    zsre = load_requests("zsre", shared_data / "zsre_mend_train-1k.json", skip_invalid=True)
    assert len(zsre) == 998 and [(s.index, s.field) for s in zsre.skipped] == [(534, "alt"), (723, "alt")]


# -- invalid records -----------------------------------------------------------------------------
def _drop(rec: dict, key: str) -> None:
    del rec[key]


def _set(key: str, value: object):
    return lambda rec: rec.__setitem__(key, value)


CF_BAD = {
    "missing field": (lambda rec: _drop(rec, "target_new"), "target_new", "missing"),
    "subject not in prompt": (_set("prompt", "Someone else, the"), "prompt", "does not contain the subject"),
    "empty target": (_set("ground_truth", "  "), "ground_truth", "empty"),
    "wrong type": (_set("subject", 7), "subject", "expected a string"),
    "wrong list item type": (_set("rephrase_prompt", ["ok", 3]), "rephrase_prompt[1]", "expected a string"),
    "braces in literal prompt": (_set("prompt", "Toko Yasuda {}, the"), "prompt", "must not contain"),
    "bad case_id": (_set("case_id", 1.5), "case_id", "expected an integer"),
    "unpaired locality": (_set("locality_ground_truth", ["a", "b"]), "locality_ground_truth", "2 answer"),
}


@pytest.mark.parametrize("case", sorted(CF_BAD))
def test_counterfact_invalid_record_names_file_index_field(tmp_path, case):
    mutate, field, reason = CF_BAD[case]
    records = raw("counterfact")[:5]
    mutate(records[3])
    path = write_json(tmp_path, records)
    with pytest.raises(DataError, match=reason) as exc:
        load_requests("counterfact", path)
    assert_names(exc, path, 3, field)
    loaded = load_requests("counterfact", path, skip_invalid=True)
    assert len(loaded) == 4 and [(s.index, s.field) for s in loaded.skipped] == [(3, field)]
    assert [r.case_id for r in loaded] == [str(records[i]["case_id"]) for i in (0, 1, 2, 4)]


ZSRE_BAD = {
    "missing field": (lambda rec: _drop(rec, "loc_ans"), "loc_ans", "missing"),
    "subject not in src": (_set("src", "What is made there?"), "src", "does not contain the subject"),
    "empty alt": (_set("alt", ""), "alt", "empty"),
    "empty answers": (_set("answers", []), "answers", "empty list"),
    "wrong type": (_set("answers", {"a": 1}), "answers", "expected a string or a list"),
}


@pytest.mark.parametrize("case", sorted(ZSRE_BAD))
def test_zsre_invalid_record_names_file_index_field(tmp_path, case):
    mutate, field, reason = ZSRE_BAD[case]
    records = raw("zsre")[:4]
    mutate(records[1])
    path = write_json(tmp_path, records)
    with pytest.raises(DataError, match=reason) as exc:
        load_requests("zsre", path)
    assert_names(exc, path, 1, field)
    loaded = load_requests("zsre", path, skip_invalid=True)
    assert [r.case_id for r in loaded] == ["0", "2", "3"] and loaded.skipped[0].index == 1


def test_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_requests("counterfact", tmp_path / "absent.json")
    path = tmp_path / "bad.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON") as exc:
        load_requests("counterfact", path, skip_invalid=True)
    assert exc.value.index is None
    path = write_json(tmp_path, {"case_id": 1})
    with pytest.raises(DataError, match="JSON array"):
        load_requests("zsre", path)
    path = write_json(tmp_path, [raw("counterfact")[0], "oops"])
    with pytest.raises(DataError, match="expected an object") as exc:
        load_requests("counterfact", path)
    assert_names(exc, path, 1, None)


def test_duplicate_case_ids_and_wrong_layout(tmp_path):
    records = raw("counterfact")[:3]
    records[2]["case_id"] = records[0]["case_id"]
    path = write_json(tmp_path, records)
    with pytest.raises(DataError, match="duplicate") as exc:
        load_requests("counterfact", path)
    assert_names(exc, path, 2, "case_id")
    assert len(load_requests("counterfact", path, skip_invalid=True)) == 2
    rome = write_json(tmp_path, [rome_record()], "rome.json")
    with pytest.raises(DataError, match="counterfact_rome"):
        load_requests("counterfact", rome)


# -- limit / offset ------------------------------------------------------------------------------
def test_limit_and_offset_select_by_position_before_validation(tmp_path):
    everything = [r.case_id for r in load_requests("counterfact")]
    assert [r.case_id for r in load_requests("counterfact", limit=5)] == everything[:5]
    assert [r.case_id for r in load_requests("counterfact", offset=10, limit=3)] == everything[10:13]
    assert len(load_requests("counterfact", offset=495)) == 5
    assert len(load_requests("counterfact", offset=600)) == 0
    assert len(load_requests("counterfact", limit=0)) == 0
    records = raw("counterfact")[:6]
    records[2]["target_new"] = ""
    path = write_json(tmp_path, records)
    window = load_requests("counterfact", path, offset=1, limit=3, skip_invalid=True)
    assert [r.case_id for r in window] == [str(records[i]["case_id"]) for i in (1, 3)]
    assert [s.index for s in window.skipped] == [2] and window.offset == 1 and window.total == 6
    assert len(load_requests("counterfact", path, offset=3)) == 3  # the bad record is outside the window
    with pytest.raises(ValueError):
        load_requests("counterfact", offset=-1)
    with pytest.raises(ValueError):
        load_requests("counterfact", limit=-2)


# -- ROME layout ---------------------------------------------------------------------------------
def rome_record(case_id: int = 0) -> dict:
    return {
        "case_id": case_id,
        "pararel_idx": 2796,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "relation_id": "P103",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
            "subject": "Danielle Darrieux",
        },
        "paraphrase_prompts": ["Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
                               "An album was recorded for Capitol Nashville. Danielle Darrieux spoke the language"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is", "The native language of Montesquieu is"],
        "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"],
    }


def test_rome_layout(tmp_path):
    second = rome_record(1)
    second["requested_rewrite"]["target_new"] = " German"  # a plain string is accepted too (stripped)
    second["neighborhood_prompts"] = [{"prompt": "Where is Paris?", "answer": "France"}]
    del second["generation_prompts"]
    path = write_json(tmp_path, [rome_record(0), second])
    a, b = load_requests("counterfact_rome", path)
    assert (a.case_id, a.prompt, a.subject, a.target_new, a.target_true) == (
        "0", "The mother tongue of {} is", "Danielle Darrieux", "English", "French")
    assert a.rewrite_prompt == "The mother tongue of Danielle Darrieux is"
    assert len(a.paraphrase_prompts) == 2 and a.generation_prompts == ("Danielle Darrieux's mother tongue is",)
    assert a.neighborhood == (QA("The mother tongue of Léon Blum is", "French"),
                              QA("The native language of Montesquieu is", "French"))
    assert b.target_new == "German" and b.generation_prompts == ()
    assert b.neighborhood == (QA("Where is Paris?", "France"),)
    assert (a.relation_id, a.target_new_id, a.target_true_id) == ("P103", "Q1860", "Q150")
    assert a.attribute_prompts == ("J. R. R. Tolkien is a native speaker of",)
    assert (b.target_new_id, b.target_true_id) == (None, "Q150")  # a plain-string target has no id


def test_rome_layout_keeps_every_prompt(tmp_path):
    """ROME's records hold 2 paraphrase, 10 neighbourhood, ~10 attribute and ~10 generation prompts:
    all of them reach the request, in file order."""
    record = rome_record(0)
    for field, n in (("paraphrase_prompts", 3), ("neighborhood_prompts", 10), ("attribute_prompts", 9),
                     ("generation_prompts", 11)):
        record[field] = [f"{field} {i} of Danielle Darrieux" for i in range(n)]
    record["requested_rewrite"]["relation_id"] = 103  # an integer id is read as a string
    (r,) = load_requests("counterfact_rome", write_json(tmp_path, [record]))
    assert r.paraphrase_prompts == tuple(record["paraphrase_prompts"])
    assert [qa.prompt for qa in r.neighborhood] == record["neighborhood_prompts"]
    assert r.attribute_prompts == tuple(record["attribute_prompts"])
    assert r.generation_prompts == tuple(record["generation_prompts"])
    assert r.relation_id == "103"


ROME_BAD = {
    "missing nested": (lambda r: _drop(r["requested_rewrite"], "subject"), "requested_rewrite.subject", "missing"),
    "missing target str": (lambda r: _drop(r["requested_rewrite"]["target_true"], "str"),
                           "requested_rewrite.target_true.str", "missing"),
    "no template": (lambda r: r["requested_rewrite"].__setitem__("prompt", "The mother tongue is"),
                    "requested_rewrite.prompt", "exactly one"),
    "empty target": (lambda r: r["requested_rewrite"]["target_new"].__setitem__("str", ""),
                     "requested_rewrite.target_new.str", "empty"),
    "wrong type": (_set("paraphrase_prompts", 3), "paraphrase_prompts", "expected a string or a list"),
    "missing list": (lambda r: _drop(r, "neighborhood_prompts"), "neighborhood_prompts", "missing"),
    "bad relation id": (lambda r: r["requested_rewrite"].__setitem__("relation_id", ["P103"]),
                        "requested_rewrite.relation_id", "id"),
    "bad target id": (lambda r: r["requested_rewrite"]["target_new"].__setitem__("id", ""),
                      "requested_rewrite.target_new.id", "id"),
}


@pytest.mark.parametrize("case", sorted(ROME_BAD))
def test_rome_invalid(tmp_path, case):
    mutate, field, reason = ROME_BAD[case]
    records = [rome_record(i) for i in range(3)]
    mutate(records[2])
    path = write_json(tmp_path, records)
    with pytest.raises(DataError, match=reason) as exc:
        load_requests("counterfact_rome", path)
    assert_names(exc, path, 2, field)
    assert len(load_requests("counterfact_rome", path, skip_invalid=True)) == 2


# -- user JSONL / CSV ----------------------------------------------------------------------------
USER = [
    {"case_id": "a", "prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football",
     "target_true": "basketball", "paraphrase_prompts": ["LeBron James is a professional"],
     "neighborhood_prompts": ["Michael Jordan plays the sport of"], "generation_prompts": ["LeBron James is"]},
    {"prompt": "The capital of France is", "subject": "France", "target_new": "Lyon", "target_true": "Paris",
     "neighborhood": [{"prompt": "The capital of Spain is", "answer": "Madrid"}],
     "portability_prompts": ["The Eiffel Tower stands in"], "portability_answers": ["Lyon"]},
    {"prompt": "{} is made by", "subject": "iPhone", "target_new": " Nokia"},
]


def write_jsonl(tmp_path: Path, records: list) -> Path:
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    return path


def write_csv(tmp_path: Path, records: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or sorted({k for r in records for k in r})
    path = tmp_path / "edits.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for r in records:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return path


def check_user(loaded: LoadedData) -> None:
    a, b, c = loaded
    assert (a.case_id, b.case_id, c.case_id) == ("a", "1", "2")
    assert a.neighborhood == (QA("Michael Jordan plays the sport of", "basketball"),)
    assert a.paraphrase_prompts == ("LeBron James is a professional",) and a.generation_prompts == ("LeBron James is",)
    assert b.prompt == "The capital of {} is" and b.rewrite_prompt == "The capital of France is"
    assert b.neighborhood == (QA("The capital of Spain is", "Madrid"),)
    assert b.portability == (QA("The Eiffel Tower stands in", "Lyon"),)
    assert c.target_new == "Nokia" and c.target_true is None and c.neighborhood == ()


def test_user_jsonl(tmp_path):
    path = write_jsonl(tmp_path, USER)
    check_user(load_requests("jsonl", path))
    check_user(load_requests("user", path))


def test_user_csv(tmp_path):
    path = write_csv(tmp_path, USER)
    check_user(load_requests("csv", path))
    check_user(load_requests("user", path))


def test_user_json_array_and_unknown_extension(tmp_path):
    check_user(load_requests("user", write_json(tmp_path, USER, "edits.json")))
    odd = write_json(tmp_path, USER, "edits.txt")
    with pytest.raises(DataError, match="extension"):
        load_requests("user", odd)


USER_BAD = {
    "missing field": (lambda r: _drop(r, "subject"), "subject", "missing"),
    "subject not in prompt": (_set("prompt", "The capital of Italy is"), "prompt", "does not contain the subject"),
    "empty target": (_set("target_new", ""), "target_new", "missing|empty"),
    "wrong type": (_set("paraphrase_prompts", [["nested"]]), "paraphrase_prompts[0]", "expected a string"),
    "two templates": (_set("prompt", "{} and {} is"), "prompt", "exactly one"),
    "unknown field": (_set("paraphrase_prompt", ["typo"]), "paraphrase_prompt", "unknown"),
    "both neighborhood forms": (_set("neighborhood_prompts", ["x"]), "neighborhood_prompts", "not both"),
    "portability without answers": (lambda r: _drop(r, "portability_answers"), "portability_answers", "missing"),
    "true id without true target": (lambda r: (_drop(r, "target_true"), r.update(target_true_id="Q90")),
                                    "target_true_id", "without target_true"),
}


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
@pytest.mark.parametrize("case", sorted(USER_BAD))
def test_user_invalid(tmp_path, fmt, case):
    mutate, field, reason = USER_BAD[case]
    records = copy.deepcopy(USER)
    mutate(records[1])
    if fmt == "jsonl":
        path = write_jsonl(tmp_path, records)
    else:
        if case == "unknown field":  # CSV: an unknown column is a file-level error
            path = write_csv(tmp_path, records)
            with pytest.raises(DataError, match="unknown column") as exc:
                load_requests("csv", path, skip_invalid=True)
            assert (exc.value.index, exc.value.field) == (None, field)
            return
        path = write_csv(tmp_path, records)
    with pytest.raises(DataError, match=reason) as exc:
        load_requests(fmt, path)
    assert_names(exc, path, 1, field)
    loaded = load_requests(fmt, path, skip_invalid=True)
    assert [r.case_id for r in loaded] == ["a", "2"] and loaded.skipped[0].index == 1


IDS = {"relation_id": "P36", "target_new_id": " Q456", "target_true_id": 90}  # an integer id, a padded one


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_user_ids_reach_the_request(tmp_path, fmt):
    """relation_id, target_new_id and target_true_id (optional) are read as stripped text, as the
    ROME layout's ids; records without them keep None."""
    records = copy.deepcopy(USER)
    records[1].update(IDS)
    records[0]["relation_id"] = "P641"
    path = write_jsonl(tmp_path, records) if fmt == "jsonl" else write_csv(tmp_path, records)
    a, b, c = load_requests(fmt, path)
    assert (b.relation_id, b.target_new_id, b.target_true_id) == ("P36", "Q456", "90")
    assert (a.relation_id, a.target_new_id, a.target_true_id) == ("P641", None, None)
    assert (c.relation_id, c.target_new_id, c.target_true_id) == (None, None, None)


@pytest.mark.parametrize("field,value", [("relation_id", ["P36"]), ("target_new_id", "  "), ("target_true_id", True),
                                         ("relation_id", 3.5), ("target_new_id", {"id": "Q1"})])
def test_user_bad_ids_name_file_line_and_field(tmp_path, field, value):
    records = copy.deepcopy(USER)
    records[1][field] = value
    path = write_jsonl(tmp_path, records)
    with pytest.raises(DataError, match="expected a non-empty string or integer id") as exc:
        load_requests("jsonl", path)
    assert_names(exc, path, 1, field)
    assert exc.value.line == 2 and f": line 2 (record 2): field {field!r}" in str(exc.value)


def test_user_malformed_lines_and_cells(tmp_path):
    path = write_jsonl(tmp_path, [USER[0], "{broken", USER[2]])
    with pytest.raises(DataError, match=r"line 2 \(record 2\): not valid JSON") as exc:
        load_requests("jsonl", path)
    assert_names(exc, path, 1, None)
    assert exc.value.line == 2
    assert len(load_requests("jsonl", path, skip_invalid=True)) == 2
    path = tmp_path / "cells.csv"
    path.write_text('prompt,subject,target_new,paraphrase_prompts\n'
                    '{} is made by,iPhone,Nokia,"[not json"\n'
                    '{} is made by,iPhone,Nokia,one single paraphrase\n'
                    '{} is made by,iPhone,Nokia,,extra\n', encoding="utf-8")
    with pytest.raises(DataError, match="JSON array") as exc:
        load_requests("csv", path)
    assert_names(exc, path, 0, "paraphrase_prompts")
    assert exc.value.line == 2 and ": line 2 (record 1): field 'paraphrase_prompts'" in str(exc.value)
    loaded = load_requests("csv", path, skip_invalid=True)
    assert [r.paraphrase_prompts for r in loaded] == [("one single paraphrase",)]
    assert [(s.index, s.reason) for s in loaded.skipped][1] == (2, "more cells than columns in the header")


def test_shipped_user_examples_agree():
    jsonl, csv_ = load_requests("jsonl"), load_requests("csv")
    assert len(jsonl) == 3 and jsonl.requests == csv_.requests


def test_line_numbers_count_blank_lines_and_multiline_cells(tmp_path):
    """Errors name the 1-based line where the bad record starts, whatever precedes it."""
    path = write_jsonl(tmp_path, [USER[0], "", USER[2], {"prompt": "{} is made by", "target_new": "Nokia"}])
    with pytest.raises(DataError) as exc:
        load_requests("jsonl", path)
    assert (exc.value.line, exc.value.index, exc.value.field) == (4, 2, "subject")
    path = tmp_path / "multi.csv"
    path.write_text('prompt,subject,target_new\n'
                    '"{} is made\nby",iPhone,Nokia\n'
                    '{} is made by,,Nokia\n', encoding="utf-8")
    with pytest.raises(DataError) as exc:
        load_requests("csv", path)
    assert (exc.value.line, exc.value.index, exc.value.field) == (4, 1, "subject")
