"""The ``wild`` probe family (generation-based evaluation, harness/probes/wild.py): SQuAD-style
normalisation, EM and F1 by hand; greedy decoding batched with left padding and the KV cache equals
an uncached one-prompt-at-a-time loop; the stop rules (newline, EOS, budget); locality against the
reference's generations; the context types; the family and its config file."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from harness.cli import compose_config, to_config
from harness.probes import build_probes, probes_from_config
from harness.probes.wild import (INSTRUCTION, WildSettings, answer_budget, answer_text, encode_prompt, exact_match,
                                 greedy_answers, normalize, token_f1)
from harness.types import QA, EditRequest


@pytest.fixture(scope="module")
def model_tok():
    from harness.models import load_model

    return load_model("tiny", device="cpu", dtype="float32")


# ----------------------------------------------------------------------------------------------
# normalisation, EM, F1


@pytest.mark.parametrize("text,norm", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  an  apple,  a pear ", "apple pear"),
    ("Theatre", "theatre"),              # articles only as whole words
    ("U.S.A.", "usa"),
    ("", ""),
])
def test_normalize_is_squad_style(text: str, norm: str) -> None:
    assert normalize(text) == norm


def test_exact_match_and_f1_by_hand() -> None:
    assert exact_match("the city of Lyon.", "City of Lyon") == 1.0
    assert exact_match("Lyon, France", "Lyon") == 0.0
    # pred {lyon, france}, gold {city, of, lyon}: 1 common -> P 1/2, R 1/3, F1 = 2/5
    assert token_f1("Lyon, France", "the city of Lyon") == pytest.approx(0.4)
    assert token_f1("piano piano", "piano") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("guitar", "piano") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("the", "") == 1.0  # both empty after normalisation
    assert token_f1("", "piano") == 0.0 and exact_match("", "piano") == 0.0


# ----------------------------------------------------------------------------------------------
# greedy decoding


def reference_greedy(model: nn.Module, tok, ids: list[int], budget: int) -> str:
    """One prompt, no padding, no cache: the full sequence re-run for every new token."""
    new: list[int] = []
    with torch.no_grad():
        while len(new) < budget:
            t = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(t)
            if t == tok.eos_token_id or "\n" in tok.decode([t]):
                break
    return answer_text(tok, new)


def test_batched_greedy_equals_one_at_a_time_and_uncached(model_tok) -> None:
    model, tok = model_tok
    texts = ["The capital of France is", "Toko Yasuda plays the", "A", "Danielle Darrieux's mother tongue is"]
    prompts = [encode_prompt(tok, t, "question-only") for t in texts]
    budgets = [3, 9, 6, 12]
    batched = greedy_answers(model, tok, prompts, budgets, batch_size=4)
    alone = [greedy_answers(model, tok, [p], [b])[0] for p, b in zip(prompts, budgets)]
    uncached = [reference_greedy(model, tok, p, b) for p, b in zip(prompts, budgets)]
    assert batched == alone == uncached
    assert any(batched)  # the tiny model does say something


class Scripted(nn.Module):
    """A causal LM that emits a fixed token sequence, one token per forward call (counted)."""

    def __init__(self, script: list[int], vocab: int) -> None:
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, 0
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, cache=None):
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab)
        logits[:, -1, self.script[min(self.calls, len(self.script) - 1)]] = 1.0
        self.calls += 1
        return SimpleNamespace(logits=logits, cache=(cache or 0) + 1)


def ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False).input_ids)


def test_stop_rule_newline(model_tok) -> None:
    _, tok = model_tok
    script = ids(tok, "ab") + ids(tok, "\n") + ids(tok, "cd")
    model = Scripted(script, len(tok))
    assert greedy_answers(model, tok, [ids(tok, "Q")], [10]) == ["ab"]
    assert model.calls == len(ids(tok, "ab")) + 1  # the newline token ends the answer and the batch


def test_stop_rule_budget(model_tok) -> None:
    _, tok = model_tok
    script = ids(tok, "abc def ghi jkl")
    assert len(script) >= 4
    model = Scripted(script, len(tok))
    assert greedy_answers(model, tok, [ids(tok, "Q")], [3]) == [tok.decode(script[:3]).strip()]
    assert model.calls == 3


def test_stop_rule_eos(model_tok) -> None:
    _, tok = model_tok
    model = Scripted(ids(tok, "xy") + [tok.eos_token_id] + ids(tok, "zz"), len(tok))
    assert greedy_answers(model, tok, [ids(tok, "Q")], [10]) == ["xy"]
    assert model.calls == len(ids(tok, "xy")) + 1


def test_budget_is_target_tokens_plus_margin(model_tok) -> None:
    _, tok = model_tok
    n = len(tok(" the city of Lyon", add_special_tokens=False).input_ids)
    assert answer_budget(tok, "the city of Lyon", 0) == n and answer_budget(tok, "the city of Lyon", 5) == n + 5


# ----------------------------------------------------------------------------------------------
# contexts


def test_contexts(model_tok) -> None:
    _, tok = model_tok
    assert encode_prompt(tok, "Who?", "question-only") == list(tok("Who?").input_ids)
    assert encode_prompt(tok, "Who?", "qa-instruction") == list(tok(f"{INSTRUCTION}\nQ: Who?\nA:").input_ids)
    with pytest.raises(ValueError, match="chat template"):
        encode_prompt(tok, "Who?", "chat-template")
    chat = copy.deepcopy(tok)
    chat.chat_template = ("{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}Bot:{% endif %}")
    assert encode_prompt(chat, "Who?", "chat-template") == ids(tok, "User: Who?\nBot:")
    with pytest.raises(ValueError, match="context"):
        WildSettings(context="chat")
    with pytest.raises(ValueError, match="margin"):
        WildSettings(margin=-1)


# ----------------------------------------------------------------------------------------------
# the family

REQUEST = EditRequest(case_id="a", prompt="The mother tongue of {} is", subject="Danielle Darrieux",
                      target_new="English", paraphrase_prompts=("Danielle Darrieux spoke",),
                      neighborhood=(QA("The mother tongue of Jean Gabin is", "French"),
                                    QA("Jimi Hendrix plays the", "guitar")))


def test_locality_compares_with_the_reference_generation(model_tok) -> None:
    model, tok = model_tok
    probes = build_probes(["wild"])
    pre = probes.measure(model, tok, [REQUEST])
    texts = pre.extras[0]["wild_locality_text"]
    assert len(texts) == 2 and pre.extras[0]["wild_context"] == "question-only"
    post = probes.measure(model, tok, [REQUEST], reference=pre)  # unchanged model
    assert post.metrics[0]["wild_locality_em"] == post.metrics[0]["wild_locality_f1"] == 1.0
    # a reference that generated something else for the first prompt: half the prompts agree
    other = copy.deepcopy(pre)
    other.extras[0]["wild_locality_text"] = ["zzz qqq", texts[1]]
    moved = probes.measure(model, tok, [REQUEST], reference=other).metrics[0]
    assert moved["wild_locality_em"] == pytest.approx(0.5 if normalize(texts[0]) != "zzz qqq" else 1.0)
    # rewrite and rephrase are scored against the target, from the generated text
    rewrite = pre.extras[0]["wild_text"]["rewrite"][0]
    assert pre.metrics[0]["wild_rewrite_em"] == exact_match(rewrite, "English")
    assert math.isnan(pre.metrics[0]["wild_portability_em"])  # no portability prompts
    bad = copy.deepcopy(pre)
    del bad.extras[0]["wild_locality_text"]
    with pytest.raises(ValueError, match="wild_locality_text"):
        probes.measure(model, tok, [REQUEST], reference=bad)


def test_the_config_file_names_the_family_and_its_settings() -> None:
    cfg = to_config(compose_config(["probes=with_wild", "probes.wild_context=qa-instruction"]))
    probes = probes_from_config(cfg.probes)
    wild = next(f for f in probes.families if f.name == "wild")
    assert wild.settings == WildSettings(context="qa-instruction", margin=5)
    assert {"efficacy_score", "rewrite_acc", "wild_rewrite_em"} <= {i.name for i in probes.infos()}
    assert "wild" not in {f.name for f in build_probes().families}  # off unless named
