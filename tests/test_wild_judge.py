"""The optional LLM judge of the ``wild`` family (harness/probes/judge.py): the documented prompt,
verdicts equal to the judge's own log-probabilities of " yes" against " no", batched equal to one by
one, 0/1 values under their own protocol and version, the judge loaded once per suite, no judge
metrics without a judge, and a missing judge path refused before any model loads."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.cli import compose_config, to_config
from harness.modelcache import ModelCache
from harness.probes import build_probes, probes_from_config
from harness.probes.judge import JUDGE_PROMPT, judge_prompt, verdicts
from harness.runsetup import SetupError, setup_run
from harness.types import QA, EditRequest

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics" / "wild.md"
ITEMS = [("The capital of France is", "Paris", "Paris"), ("The capital of France is", "Paris", "London"),
         ("Who wrote Hamlet?", "Shakespeare", "William Shakespeare"), ("Jimi Hendrix plays the", "guitar", ""),
         ("Danielle Darrieux spoke", "English", "French and English")]
REQUEST = EditRequest(case_id="a", prompt="The mother tongue of {} is", subject="Danielle Darrieux",
                      target_new="English", paraphrase_prompts=("Danielle Darrieux spoke", "Darrieux's language is"),
                      neighborhood=(QA("The mother tongue of Jean Gabin is", "French"),),
                      portability=(QA("The language of Darrieux's films is", "English"),))


@pytest.fixture(scope="module")
def model_tok():
    from harness.models import load_model

    return load_model("tiny", device="cpu", dtype="float32")


def test_the_prompt_is_the_documented_one() -> None:
    assert judge_prompt(" Who wrote Hamlet? ", "Shakespeare", "Marlowe\n") == (
        "Question: Who wrote Hamlet?\nGold answer: Shakespeare\nModel answer: Marlowe\n"
        "Is the model answer correct? Answer yes or no:")
    doc = DOC.read_text(encoding="utf-8")
    assert all(line in doc for line in JUDGE_PROMPT.splitlines())


def _logprob(model, tok, prompt: str, word: str) -> float:
    """Sum of log P(word tokens | prompt), one unpadded forward pass (independent of the scorer)."""
    head = tok(prompt).input_ids
    whole = tok(prompt + " " + word).input_ids
    assert whole[:len(head)] == head
    with torch.no_grad():
        logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return sum(logp[i - 1, whole[i]].item() for i in range(len(head), len(whole)))


def test_verdicts_are_the_judges_yes_against_no_batched_or_not(model_tok) -> None:
    model, tok = model_tok
    batched = verdicts(model, tok, ITEMS, batch_size=8)
    assert batched == [verdicts(model, tok, [item], batch_size=1)[0] for item in ITEMS]
    assert set(batched) <= {0.0, 1.0}
    for item, v in zip(ITEMS, batched):
        p = judge_prompt(*item)
        assert v == float(_logprob(model, tok, p, "yes") > _logprob(model, tok, p, "no"))


def test_the_family_reports_judge_verdicts_with_their_protocol(model_tok) -> None:
    model, tok = model_tok
    probes = build_probes(["wild"], batch_size=3, wild_judge="tiny")
    infos = {i.name: i for i in probes.infos()}
    for part in ("rewrite", "rephrase", "locality", "portability"):
        info = infos[f"wild_{part}_judge"]
        assert (info.protocol, info.version, info.bounds) == ("wild_judge", 1, (0.0, 1.0))
    pre = probes.measure(model, tok, [REQUEST])
    row, extra = pre.metrics[0], pre.extras[0]
    wild = next(f for f in probes.families if f.name == "wild")
    judge = wild._judge
    assert judge is not None and extra["wild_judge"] == "tiny"
    # the row's values are the judge's verdicts on the generated answers
    text = extra["wild_text"]
    jm, jt = judge
    assert row["wild_rewrite_judge"] == verdicts(jm, jt, [(REQUEST.rewrite_prompt, "English", text["rewrite"][0])])[0]
    rephrase = verdicts(jm, jt, [(p, "English", t) for p, t in zip(REQUEST.paraphrase_prompts, text["rephrase"])])
    assert row["wild_rephrase_judge"] == pytest.approx(sum(rephrase) / 2)
    assert row["wild_rewrite_judge"] in (0.0, 1.0) and row["wild_portability_judge"] in (0.0, 1.0)
    # locality: the reference's answer is the gold one
    post = probes.measure(model, tok, [REQUEST], reference=pre)
    assert post.metrics[0] == row and wild._judge is judge  # loaded once per suite
    alone = [probes.measure(model, tok, [r]).metrics[0] for r in (REQUEST, REQUEST)]
    assert alone == [row, row]


def test_without_a_judge_there_are_no_judge_metrics() -> None:
    names = {i.name for i in build_probes(["wild"]).infos()}
    assert "wild_rewrite_em" in names and not any(n.endswith("_judge") for n in names)
    with pytest.raises(ValueError, match="probes.wild_judge"):
        build_probes(["wild_rewrite_judge"])
    assert [i.name for i in build_probes(["wild_rewrite_judge"], wild_judge="tiny").infos()] == ["wild_rewrite_judge"]


class _NoModels(ModelCache):
    def get(self, cfg):
        raise AssertionError("a model was loaded")


def test_a_missing_judge_path_is_refused_before_any_model_loads(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-judge")
    with pytest.raises(FileNotFoundError, match="probes.wild_judge"):
        probes_from_config(to_config(compose_config(["probes=with_wild", f"probes.wild_judge={missing}"])).probes)
    ov = ["experiment=smoke", "probes=with_wild", f"probes.wild_judge={missing}"]
    with pytest.raises(SetupError, match="probes.wild_judge.*no-judge"):
        setup_run(to_config(compose_config(ov)), tmp_path / "run", ov, cache=_NoModels())
