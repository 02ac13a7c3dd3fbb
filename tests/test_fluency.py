"""The fluency metric (protocol ``generation`` version 2, ROME's semantics) and its tokenizer:
entropy by hand, NLTK-compatible words, 100 tokens in total with no EOS stop, every generation
prompt, the papers' x100 scale; ``fluency_short`` keeps version 1."""
from __future__ import annotations

import math

import pytest
import torch

from harness.probes import METRICS, build_probes
from harness.probes.fluency import generate, measure, measure_short, sample_ids
from harness.probes.ngrams import generation_entropy, ngram_entropy, nltk_words, regex_words, sentences
from harness.types import EditRequest

nltk = pytest.importorskip("nltk")

REAL = [  # CounterFact-style generation prompts and a GPT-2-like continuation
    "Danielle Darrieux's mother tongue is French, and she's worked in films since the 1930s",
    "Where Danielle Darrieux is from, people speak the language of (in) \"France\"; it's known",
    "The Eiffel Tower is located in the city of Paris, which isn't far from Versailles, e.g. by car",
    "Edwin of Northumbria's religious values strongly emphasize Christianity -- he was baptised in 627",
]


def test_ngram_entropy_by_hand():
    toks = "a b c a b c".split()
    # bigrams ab, bc, ca, ab, bc: 2/5, 2/5, 1/5; trigrams abc, bca, cab, abc: 2/4, 1/4, 1/4
    h2 = -(2 * 0.4 * math.log2(0.4) + 0.2 * math.log2(0.2))
    assert ngram_entropy(toks, 2) == pytest.approx(h2)
    assert ngram_entropy(toks, 3) == pytest.approx(1.5)
    assert generation_entropy("a b c a b c") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.5) / 2)
    assert generation_entropy("one") == 0.0 and ngram_entropy([], 2) == 0.0


@pytest.mark.parametrize("text", REAL)
def test_words_equal_nltk_word_tokenize_on_one_sentence(text):
    # word_tokenize(preserve_line=True) is NLTK's tokenizer without the Punkt sentence split
    assert nltk_words(text) == nltk.word_tokenize(text, preserve_line=True)


def test_words_split_sentences_as_punkt_would():
    text = 'He said, "It\'s fine." Then he left! Did she? Yes. The end.'
    assert sentences(text) == ['He said, "It\'s fine."', "Then he left!", "Did she?", "Yes.", "The end."]
    assert nltk_words(text) == ["He", "said", ",", "``", "It", "'s", "fine", ".", "''", "Then", "he", "left", "!",
                                "Did", "she", "?", "Yes", ".", "The", "end", "."]
    # the regex words of version 1 differ (contractions, quotes), hence the new version
    assert regex_words("It's fine.") == ["It", "'", "s", "fine", "."]


def _request(n_prompts: int) -> EditRequest:
    return EditRequest("c0", "{} plays", "LeBron James", "football",
                       generation_prompts=tuple(f"Prompt number {i} says" for i in range(n_prompts)))


class _Calls:
    """Counts the output layer's forward calls and the rows they carry; optionally forces EOS."""

    def __init__(self, model, eos: int | None = None):
        self.calls, self.rows, self.eos = 0, [], eos
        self.handle = model.get_output_embeddings().register_forward_hook(self)

    def __call__(self, module, args, out):
        self.calls += 1
        self.rows.append(out.shape[0])
        if self.eos is not None:
            out = out.clone()
            out[..., self.eos] += 100.0
        return out


def test_generation_fills_max_length_without_stopping_at_eos(tiny):
    model, tok = tiny
    prompts = ["The capital of France is", "A much longer prompt about the Eiffel Tower and Paris"]
    lengths = [len(tok(p).input_ids) for p in prompts]
    max_length = max(lengths) + 6
    calls = _Calls(model, eos=tok.eos_token_id)
    try:
        texts = generate(model, tok, prompts, max_length=max_length)
        assert calls.calls == max_length - min(lengths)  # one step per token of the longest budget: no EOS stop
        calls.calls = 0
        generate(model, tok, prompts, max_new_tokens=8)
        assert calls.calls == 1  # version 1 stops at the (forced) EOS
    finally:
        calls.handle.remove()
    assert all(t.startswith(p) for t, p in zip(texts, prompts))
    # without the forced EOS, each text holds exactly max_length tokens, prompt included
    ids = sample_ids(model, tok, prompts, max_length=max_length)
    assert [len(i) for i in ids] == [max_length, max_length]
    assert [i[:n] for i, n in zip(ids, lengths)] == [tok(p).input_ids for p in prompts]
    # a prompt at or past the limit is returned as it is
    assert generate(model, tok, prompts[1:], max_length=lengths[1]) == prompts[1:]


def test_fluency_uses_every_prompt_on_the_papers_scale(tiny):
    model, tok = tiny
    reqs = [_request(3), _request(1)]
    calls = _Calls(model)
    try:
        values = measure(model, tok, reqs, max_length=30, seed=3)
    finally:
        calls.handle.remove()
    assert calls.rows[0] == 4  # all 3 + 1 generation prompts, in one batch
    texts = generate(model, tok, [p for r in reqs for p in r.generation_prompts], seed=3, max_length=30)
    expected = [100 * sum(generation_entropy(t) for t in texts[:3]) / 3, 100 * generation_entropy(texts[3])]
    assert values == pytest.approx(expected)
    assert all(v > 100 for v in values)  # x100: bits would be below ~10 here
    capped = generate(model, tok, [r.generation_prompts[0] for r in reqs], seed=3, max_length=30)
    assert measure(model, tok, reqs, max_length=30, seed=3, max_prompts=1) == \
        pytest.approx([100 * generation_entropy(t) for t in capped])


def test_fluency_short_keeps_version_1(tiny):
    model, tok = tiny
    reqs = [_request(3)]
    out = build_probes(["fluency", "fluency_short"], fluency_max_length=30, fluency_short_max_new_tokens=6).measure(
        model, tok, reqs).metrics[0]
    texts = generate(model, tok, list(reqs[0].generation_prompts[:2]), max_new_tokens=6)
    assert out["fluency_short"] == pytest.approx(sum(generation_entropy(t, regex_words) for t in texts) / 2)
    assert out["fluency_short"] == pytest.approx(measure_short(model, tok, reqs, 6)[0])
    assert (METRICS["fluency"].protocol, METRICS["fluency"].version) == ("generation", 2)
    assert (METRICS["fluency_short"].protocol, METRICS["fluency_short"].version) == ("generation", 1)


def test_rng_of_the_caller_is_untouched(tiny):
    model, tok = tiny
    torch.manual_seed(1)
    before = torch.rand(1)
    torch.manual_seed(1)
    measure(model, tok, [_request(1)], max_length=20)
    assert torch.rand(1) == before
