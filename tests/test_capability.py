"""The ``capability`` family: perplexity equals exp of the mean NLL computed by hand, multiple-choice
accuracy by length-normalised log-likelihood, NaN without tasks, clear errors for bad task files,
and the retention table and plot of a sequential run carrying ``perplexity``."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from harness.cli import compose_config, to_config
from harness.probes import build_probes
from harness.probes.capability import DEFAULT_CORPUS, load_tasks
from harness.probes.scorer import score_pairs
from harness.results import read_rows
from harness.runner import ModelCache, run
from harness.types import EditRequest

SAMPLE_TASKS = DEFAULT_CORPUS.parent / "capability-mc-example.jsonl"
REQUESTS = [EditRequest(case_id=str(i), prompt="{} plays the", subject=s, target_new="piano", target_true="guitar")
            for i, s in enumerate(["Toko Yasuda", "Miles Davis"])]


def nll_by_hand(model, ids: list[int]) -> tuple[float, int]:
    """Summed next-token NLL of one window (float64 log-softmax) and the number of predicted tokens."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    logp = torch.log_softmax(logits, -1)
    return -sum(logp[i, t].item() for i, t in enumerate(ids[1:])), len(ids) - 1


def test_perplexity_is_exp_of_the_mean_nll_by_hand(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    text = DEFAULT_CORPUS.read_text(encoding="utf-8")
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) > 300  # the tiny model's context is 256: the default text needs two windows
    suite = build_probes(["perplexity"], capability_max_tokens=300)
    got = suite.measure(model, tok, REQUESTS)
    # windows of the context length (256), then the rest (44 tokens); each window's first token unpredicted
    (a, n), (b, m) = nll_by_hand(model, ids[:256]), nll_by_hand(model, ids[256:300])
    assert n + m == 298
    want = math.exp((a + b) / (n + m))
    assert [r["perplexity"] for r in got.metrics] == [pytest.approx(want, rel=1e-5)] * 2  # same for every case
    assert 1.0 < want < 2 * tok.vocab_size  # a random model: near the vocabulary size, not more

    # a user corpus by path, read up to max_tokens (short: one window)
    corpus = tmp_path / "c.txt"
    corpus.write_text("The river runs to the sea. The sea is wide and deep.", encoding="utf-8")
    short = tok(corpus.read_text(), add_special_tokens=False).input_ids[:10]
    s, k = nll_by_hand(model, short)
    own = build_probes(["capability"], capability_corpus=str(corpus), capability_max_tokens=10)
    assert own.measure(model, tok, REQUESTS[:1]).metrics[0]["perplexity"] == pytest.approx(math.exp(s / k), rel=1e-5)


def test_mc_accuracy_on_three_questions(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    questions = load_tasks(SAMPLE_TASKS)
    assert len(questions) == 3
    pairs = [(q.question, c) for q in questions for c in q.choices]
    scores = dict(zip(pairs, score_pairs(model, tok, pairs)))
    # the expected value by hand: lowest mean NLL per choice token
    picked = [min(range(len(q.choices)), key=lambda j: scores[(q.question, q.choices[j])].nll) for q in questions]
    want = sum(p == q.answer for p, q in zip(picked, questions)) / 3
    suite = build_probes(["mc_accuracy"], capability_tasks=str(SAMPLE_TASKS))
    rows = suite.measure(model, tok, REQUESTS).metrics
    assert [list(r) for r in rows] == [["mc_accuracy"]] * 2 and rows[0]["mc_accuracy"] == want == rows[1]["mc_accuracy"]

    # answers rewritten to the model's own picks: accuracy 1; to another choice each: 0
    for answers, acc in ((picked, 1.0), ([(p + 1) % 3 for p in picked], 0.0)):
        path = tmp_path / f"t{acc}.jsonl"
        path.write_text("\n".join(json.dumps({"question": q.question, "choices": list(q.choices), "answer": a})
                                  for q, a in zip(questions, answers)) + "\n", encoding="utf-8")
        got = build_probes(["mc_accuracy"], capability_tasks=str(path)).measure(model, tok, REQUESTS[:1])
        assert got.metrics[0]["mc_accuracy"] == acc


def test_mc_accuracy_is_nan_without_tasks(tiny) -> None:
    model, tok = tiny
    rows = build_probes(["capability"], capability_max_tokens=32).measure(model, tok, REQUESTS).metrics
    assert all(math.isnan(r["mc_accuracy"]) and math.isfinite(r["perplexity"]) for r in rows)


@pytest.mark.parametrize("line, field", [('{"question": "q", "choices": ["a"], "answer": 0}', "choices"),
                                         ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "answer"),
                                         ('{"choices": ["a", "b"], "answer": 0}', "question"),
                                         ("not json", "not JSON")])
def test_a_bad_task_line_names_file_line_and_field(tmp_path: Path, line: str, field: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "ok", "choices": ["a", "b"], "answer": 1}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{field}"):
        build_probes(["capability"], capability_tasks=str(path))
    with pytest.raises(FileNotFoundError, match="capability_corpus"):
        build_probes(["capability"], capability_corpus=str(tmp_path / "missing.txt"))


def test_sequential_retention_has_a_perplexity_column_and_curve(tmp_path: Path, monkeypatch) -> None:
    """A smoke sequential run with ``probes=with_capability``: ``retention.csv`` holds ``perplexity``
    (and ``mc_accuracy``) at every retention point, and ``retention.png`` draws a perplexity line."""
    from matplotlib.figure import Figure

    drawn: list[set[str]] = []
    save = Figure.savefig

    def recording_savefig(fig, *args, **kw):
        drawn.append({line.get_label() for ax in fig.axes for line in ax.get_lines()})
        return save(fig, *args, **kw)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    ov = ["experiment=smoke_sequential", "threads=1", "data.limit=4", "probes=with_capability",
          "probes.metrics=[efficacy_score,capability]", "probes.capability_max_tokens=64",
          f"probes.capability_tasks={SAMPLE_TASKS}"]
    run(to_config(compose_config(ov)), tmp_path / "run", ov, cache=ModelCache(), progress=False)
    ret = read_rows(tmp_path / "run" / "retention.csv")
    assert [r["n_edits"] for r in ret] == ["2", "4"]
    assert all(float(r["perplexity"]) > 1.0 and 0.0 <= float(r["mc_accuracy"]) <= 1.0 for r in ret)
    assert (tmp_path / "run" / "retention.png").stat().st_size > 1000
    assert drawn and "perplexity" in drawn[-1] and "mc_accuracy" in drawn[-1]
