"""IKE: demonstrations of the three types retrieved by BM25 from a pool without the evaluated case,
the edited fact in the context of every probed prompt, no weight changed, facts accumulating."""
from __future__ import annotations

import json

import pytest

from harness import EditRequest, Editor, create_algorithm
from harness.algorithms.ike import BM25, demonstration
from harness.models import tiny_model
from harness.signature import StateSignature
from harness.types import QA

REQ = EditRequest("7", "The mother tongue of {} is", "Danielle Darrieux", "English", "French",
                  paraphrase_prompts=("Danielle Darrieux speaks",), neighborhood=(QA("The sky is", "blue"),))


def test_bm25_ranks_the_shared_rare_term_first():
    index = BM25(["the cat sat", "the dog ran", "a zebra ran fast"])
    assert index.top("zebra", 1) == [2] and index.top("the dog", 2) == [1, 0]
    assert index.top("the dog", 2, allowed=[True, False, True]) == [0, 2]


def test_demonstration_types():
    assert demonstration(REQ, "copy").endswith("Prompt: The mother tongue of Danielle Darrieux is English\n\n")
    assert demonstration(REQ, "update").endswith("Prompt: Danielle Darrieux speaks English\n\n")
    assert demonstration(REQ, "retain").endswith("Prompt: The sky is blue\n\n")
    assert demonstration(REQ, "retain").startswith("New Fact: The mother tongue of Danielle Darrieux is English\n")


def _pool(tmp_path, n=6):
    records = [{"subject": f"Person {i}", "src": f"What language does Person {i} speak?", "rephrase": f"Person {i} speaks?",
                "alt": f"Lang{i}", "answers": ["x"], "loc": "nq question: sky colour", "loc_ans": "blue"}
               for i in range(n)]
    records.append({"subject": "Danielle Darrieux", "src": "What language does Danielle Darrieux speak?",
                    "rephrase": "Danielle Darrieux speaks?", "alt": "English", "answers": ["French"], "loc": "nq q",
                    "loc_ans": "a"})
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(records))
    return f"zsre:{path}"


def test_context_holds_the_fact_and_demos_from_the_pool_but_never_the_case(tmp_path):
    algo = create_algorithm("ike", {"k": 4, "ratio": [1, 1, 2], "pool": [_pool(tmp_path)]})
    model, tok = tiny_model("llama", n_layers=2)
    base = StateSignature.take(model)
    editor = Editor(model, tok, algo, keep_original_weight=False)
    out = editor.edit(REQ)
    assert out.report.info["retrieval"] == "bm25" and out.report.info["pool_size"] == 7
    assert out.targets == () and not base.differences(StateSignature.take(model))  # no weight changed
    text = algo.context()("Where does Danielle Darrieux live?")
    assert text.endswith("New Fact: The mother tongue of Danielle Darrieux is English\n"
                         "Prompt: Where does Danielle Darrieux live?")
    assert text.count("New Fact:") == 5 and "Danielle Darrieux speak?" not in text  # the case is never a demo
    kinds = [("speaks?" in d, "sky colour" in d) for d in text.split("\n\n")[:4]]
    assert kinds == [(False, True), (False, True), (True, False), (False, False)]  # retain, retain, update, copy

    other = EditRequest("8", "{} was born in", "Person 3", "Paris")
    editor.edit(other)  # facts accumulate; each prompt gets the most similar one
    assert algo.memory_state().structure["facts"][1]["target"] == "Paris"
    assert algo.context()("Person 3 was born in").endswith("New Fact: Person 3 was born in Paris\nPrompt: Person 3 was born in")
    assert "Person 3 speak" not in algo.context()("Person 3 was born in")  # Person 3 left the pool
    editor.restore()
    assert algo.context() is None and not base.differences(StateSignature.take(model))


def test_bad_pool_is_named(tmp_path):
    algo = create_algorithm("ike", {"pool": [f"zsre:{tmp_path / 'missing.json'}"]})
    with pytest.raises(Exception, match="pool entry"):
        algo.prepare(None, None)
