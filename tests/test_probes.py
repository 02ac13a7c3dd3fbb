"""Probes: tokenization offsets, the batched scorer against plain forwards, metric formulas, SmolLM2."""
from __future__ import annotations

import math

import pytest
import torch

from harness.models import load_model, tiny_model
from harness.probes import build_probes, counterfact, easyedit, encode_pairs, score_pairs, summarize
from harness.probes.scorer import PairScore
from harness.types import QA, EditRequest

PAIRS = [
    ("The mother tongue of Danielle Darrieux is", "French"),
    ("The mother tongue of Danielle Darrieux is", "English"),
    ("The capital of France is", "Paris"),
    ("The capital of France is", "the city of Lyon"),
    ("Toko Yasuda plays the", "piano"),
    ("Toko Yasuda plays the", "guitar solo"),
]


def llama_style_tokenizer():
    """A SentencePiece-like tokenizer (metaspace, BOS prepended), trained in-process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    text = " ".join(p + " " + t for p, t in PAIRS) + " The quick brown fox jumps over the lazy dog. " * 3
    bpe.train_from_iterator([text] * 4, trainer=trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tok(request):
    return tiny_model("gpt2")[1] if request.param == "gpt2" else llama_style_tokenizer()


def test_offsets_decode_to_the_target(tok):
    bos = tok("a").input_ids[0] if tok("a").input_ids != tok("a", add_special_tokens=False).input_ids else None
    for enc, (prompt, target) in zip(encode_pairs(tok, PAIRS), PAIRS):
        assert tok.decode(list(enc.target_ids)).strip() == target
        assert enc.prompt_ids == tuple(tok(prompt).input_ids)
        if bos is not None:  # BOS once, at the start, never before the target
            assert enc.prompt_ids[0] == bos and bos not in enc.target_ids
        full = tok(prompt + " " + target).input_ids
        assert list(enc.prompt_ids + enc.target_ids) == list(full) or enc.boundary_merge


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_scores_equal_one_forward_per_pair(arch):
    model, tok = tiny_model(arch, n_layers=2)
    got = score_pairs(model, tok, PAIRS, batch_size=4)
    for (prompt, target), enc, res in zip(PAIRS, encode_pairs(tok, PAIRS), got):
        ids = torch.tensor([list(enc.prompt_ids + enc.target_ids)])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        n, start = len(enc.target_ids), len(enc.prompt_ids) - 1
        want = [float(logp[start + j, t]) for j, t in enumerate(enc.target_ids)]
        arg = [int(logp[start + j].argmax()) for j in range(n)]
        assert res.target_ids == enc.target_ids
        assert max(abs(a - b) for a, b in zip(res.logprobs, want)) < 1e-5, (prompt, target)
        assert list(res.argmax) == arg


def _score(logprobs, target_ids=(1, 2), argmax=None):
    return PairScore(tuple(target_ids[:len(logprobs)]), tuple(logprobs), tuple(argmax or target_ids[:len(logprobs)]))


def test_counterfact_formulas_by_hand():
    req = EditRequest(case_id="0", prompt="{} speaks", subject="Anna", target_new="English", target_true="French",
                      paraphrase_prompts=("Anna's language is", "Anna talks"),
                      neighborhood=(QA("Bob speaks", "French"), QA("Carl speaks", "German")))
    ln = math.log
    s = {("Anna speaks", "English"): _score([ln(0.5), ln(0.5)]),  # P = 0.5 (geometric mean per token)
         ("Anna speaks", "French"): _score([ln(0.2)]),
         ("Anna's language is", "English"): _score([ln(0.1)]),
         ("Anna's language is", "French"): _score([ln(0.3)]),
         ("Anna talks", "English"): _score([ln(0.4)]),
         ("Anna talks", "French"): _score([ln(0.4)]),  # a tie is a failure
         ("Bob speaks", "French"): _score([ln(0.6)]),
         ("Bob speaks", "English"): _score([ln(0.1)]),
         ("Carl speaks", "German"): _score([ln(0.05)]),
         ("Carl speaks", "English"): _score([ln(0.25)])}
    assert set(counterfact.pairs(req, set(counterfact.INFOS))) == set(s)
    m = counterfact.compute(req, s, set(counterfact.INFOS))
    assert m["efficacy_score"] == 1.0 and m["efficacy_magnitude"] == pytest.approx(0.3)
    assert m["paraphrase_score"] == 0.0 and m["paraphrase_magnitude"] == pytest.approx((-0.2 + 0.0) / 2)
    assert m["neighborhood_score"] == 0.5 and m["neighborhood_magnitude"] == pytest.approx((0.5 - 0.2) / 2)
    assert "score" not in m
    assert counterfact.harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    assert counterfact.harmonic_mean([1.0, 0.0]) == 0.0 and math.isnan(counterfact.harmonic_mean([1.0, math.nan]))


def test_easyedit_token_accuracy_and_locality_agreement_by_hand():
    req = EditRequest(case_id="0", prompt="{} speaks", subject="Anna", target_new="English", target_true="French",
                      paraphrase_prompts=("Anna talks",), neighborhood=(QA("Bob speaks", "French"),),
                      portability=(QA("Anna's country is", "UK"),))
    s = {("Anna speaks", "English"): PairScore((5, 6, 7), (-1.0, -1.0, -1.0), (5, 9, 7)),
         ("Anna talks", "English"): PairScore((5, 6), (-1.0, -1.0), (8, 8)),
         ("Bob speaks", "French"): PairScore((3, 4), (-1.0, -1.0), (3, 2)),
         ("Anna's country is", "UK"): PairScore((11,), (-1.0,), (11,))}
    wanted = set(easyedit.INFOS)
    assert set(easyedit.pairs(req, wanted)) == set(s)
    m, extras = easyedit.compute(req, s, wanted)
    assert m["rewrite_acc"] == pytest.approx(2 / 3) and m["rephrase_acc"] == 0.0 and m["portability_acc"] == 1.0
    assert m["locality_acc"] == 1.0  # no reference: agreement with itself
    pre = {easyedit.LOCALITY_KEY: [[3, 9]]}  # agreement with the pre-edit argmax, not with the answer
    m2, _ = easyedit.compute(req, s, wanted, reference=pre)
    assert m2["locality_acc"] == 0.5
    assert extras[easyedit.LOCALITY_KEY] == [[3, 2]]


def test_summarize_score_is_harmonic_mean_of_means():
    rows = [{"efficacy_score": 1.0, "paraphrase_score": 1.0, "neighborhood_score": 0.0},
            {"efficacy_score": 1.0, "paraphrase_score": 0.0, "neighborhood_score": 1.0}]
    table = summarize(rows)
    assert table["efficacy_score"]["mean"] == 1.0 and table["paraphrase_score"]["count"] == 2
    assert table["score"]["mean"] == pytest.approx(3 / (1 + 2 + 2))


def test_measure_is_batched_consistently(tiny):
    """Scoring requests together or one at a time gives the same metrics."""
    from harness.data import load_requests

    model, tok = tiny
    reqs = list(load_requests("counterfact", limit=6).requests)
    probes = build_probes(batch_size=8)
    together = probes.measure(model, tok, reqs).metrics
    alone = [probes.measure(model, tok, [r]).metrics[0] for r in reqs]
    for a, b in zip(together, alone):
        for k in a:
            assert (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == pytest.approx(b[k], abs=1e-6), k


def test_scores_and_fluency_ignore_the_tokenizer_padding_side(tiny):
    """The scorer and the generations pad by hand: ``tok.padding_side`` changes nothing."""
    from harness.data import load_requests

    model, tok = tiny
    reqs = list(load_requests("counterfact", limit=4).requests)
    probes = build_probes(batch_size=8, fluency=True, fluency_max_new_tokens=4)
    out = {}
    for side in ("right", "left"):
        tok.padding_side = side
        out[side] = probes.measure(model, tok, reqs).metrics
    for right, left in zip(out["right"], out["left"]):
        assert right.keys() == left.keys() and "fluency" in right
        for k in right:
            assert (math.isnan(right[k]) and math.isnan(left[k])) or left[k] == pytest.approx(right[k], abs=1e-5), k


@pytest.mark.slow
def test_unedited_smollm2_low_efficacy_high_neighborhood(smollm2):
    from harness.data import load_requests

    model, tok = smollm2
    reqs = list(load_requests("counterfact", limit=20).requests)
    table = summarize(build_probes().measure(model, tok, reqs).metrics)
    assert table["efficacy_score"]["mean"] < 0.5
    assert table["neighborhood_score"]["mean"] > 0.6
    assert table["locality_acc"]["mean"] == 1.0
