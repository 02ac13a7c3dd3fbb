"""Probes: tokenization offsets, the batched scorer against plain forwards, metric formulas, SmolLM2."""
from __future__ import annotations

import math

import pytest
import torch

from harness.models import tiny_model
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
    probes = build_probes(batch_size=8, fluency=True, fluency_max_length=40, fluency_max_prompts=2,
                          fluency_short=True, fluency_short_max_new_tokens=4)
    out = {}
    for side in ("right", "left"):
        tok.padding_side = side
        out[side] = probes.measure(model, tok, reqs).metrics
    for right, left in zip(out["right"], out["left"]):
        assert right.keys() == left.keys() and {"fluency", "fluency_short"} <= right.keys()
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


# ----------------------------------------------------------------------------------------------
# the registry and the metadata


def test_register_probe_refuses_bad_names_classes_and_clashes():
    from harness.probes import MetricInfo, ProbeFamily, get_probe, register_probe

    def family(metric: str, module: str = "someone_elses.plugin", qualname: str = "Fam") -> type:
        return type(qualname, (ProbeFamily,), {"__module__": module, "__qualname__": qualname,
                                               "METRICS": (MetricInfo(metric, "x", 1, unit="fraction"),)})

    with pytest.raises(ValueError, match="lowercase snake case"):
        register_probe("Bad-Name")
    with pytest.raises(TypeError, match="ProbeFamily subclass"):
        register_probe("plain")(object)
    with pytest.raises(ValueError, match=r"'counterfact' is already registered to harness\.probes\.counterfact\."
                                         r"CounterFact; cannot register someone_elses\.plugin\.CounterFact"):
        register_probe("counterfact")(family("cf_new", qualname="CounterFact"))
    with pytest.raises(ValueError, match=r"\['rewrite_acc'\] already taken by family 'easyedit'"):
        register_probe("clash")(family("rewrite_acc"))
    with pytest.raises(ValueError, match=r"\['fluency'\] already taken by family 'fluency'"):
        register_probe("clash")(family("fluency"))  # also a family name: configs could not tell them apart
    with pytest.raises(ValueError, match="'score' is a metric of family 'counterfact'"):
        register_probe("score")(family("score_plus"))
    with pytest.raises(TypeError, match="non-empty tuple of MetricInfo"):
        register_probe("empty")(type("Empty", (ProbeFamily,), {}))
    assert get_probe("counterfact").__module__ == "harness.probes.counterfact"
    with pytest.raises(KeyError, match="unknown probe family 'nope'; registered: capability, consistency, counterfact, easyedit, fluency, fluency_short"):
        get_probe("nope")


def test_a_reloaded_family_registers_again():
    from harness.probes import ProbeFamily, get_probe, register_probe, registry

    old = get_probe("easyedit")
    again = type(old.__name__, (ProbeFamily,), {"__module__": old.__module__, "__qualname__": old.__qualname__,
                                                 "METRICS": old.METRICS})
    try:
        assert register_probe("easyedit")(again) is again and get_probe("easyedit") is again
    finally:
        registry.PROBES.classes["easyedit"] = old


@pytest.mark.parametrize("kwargs,match", [
    (dict(version="1"), "version must be an int"),
    (dict(version=True), "version must be an int"),
    (dict(unit=""), "unit must be a non-empty string"),
    (dict(aggregate="median"), "aggregate must be one of"),
    (dict(aggregate="hmean"), "an hmean aggregate needs inputs"),
    (dict(inputs=("a",)), "a mean metric has none"),
    (dict(higher_is_better="yes"), "higher_is_better must be a bool"),
    (dict(bounds=(1.0, 0.0)), "bounds must be"),
])
def test_metric_info_refuses_malformed_fields(kwargs, match):
    from harness.probes import MetricInfo

    fields = {"version": 1, "unit": "fraction", **kwargs}
    with pytest.raises(ValueError, match=f"metric 'm': .*{match}"):
        MetricInfo("m", "p", fields.pop("version"), **fields)


def test_summaries_aggregate_from_the_metadata():
    """An ``hmean`` metric is the harmonic mean of its inputs' means whatever it is called; the
    built-in ``score`` is just one."""
    from harness.probes import MetricInfo

    rows = [{"a": 1.0, "b": 0.5}, {"a": 1.0, "b": math.nan}]
    agg = MetricInfo("both", "p", 1, unit="fraction", aggregate="hmean", inputs=("a", "b"))
    table = summarize(rows, infos=[agg])
    assert table["both"]["mean"] == pytest.approx(2 / (1 + 2)) and table["both"]["count"] == 1
    assert table["both"]["excluded"] == 1 and "score" not in table


def test_suites_are_chosen_by_family_and_metric_names():
    from harness.probes import METRICS, get_probe

    assert build_probes().metrics == tuple(get_probe("counterfact").declared()) + tuple(get_probe("easyedit").declared())
    assert build_probes(["easyedit"]).metrics == ("rewrite_acc", "rephrase_acc", "locality_acc", "portability_acc")
    mixed = build_probes(["locality_acc", "counterfact", "efficacy_score"], fluency=True)
    assert [f.name for f in mixed.families] == ["counterfact", "easyedit", "fluency"]  # registry order
    assert mixed.metrics[:2] == ("locality_acc", "efficacy_score") and mixed.metrics[-1] == "fluency"
    assert mixed.families[1].wanted == {"locality_acc"}
    assert build_probes(["score"]).row_metrics() == ["efficacy_score", "paraphrase_score", "neighborhood_score"]
    assert list(METRICS)[:2] == ["efficacy_score", "efficacy_magnitude"] and METRICS["fluency"].unit == "bits x100"
    with pytest.raises(ValueError, match=r"unknown probe family or metric \['effcacy_score'\]; families: "):
        build_probes(["effcacy_score"])


def test_family_settings_from_keywords_and_mappings():
    fl = build_probes(["fluency"], fluency_max_length=3, fluency_max_prompts=2).families[0]
    assert (fl.settings.max_length, fl.settings.max_prompts) == (3, 2)
    fl = build_probes(["fluency"], settings={"fluency": {"max_length": 5}}).families[0]
    assert (fl.settings.max_length, fl.settings.max_prompts) == (5, None)
    fs = build_probes(["fluency_short"], fluency_short_max_new_tokens=3).families[0]  # longest family name wins
    assert (fs.name, fs.settings.max_new_tokens, fs.settings.max_prompts) == ("fluency_short", 3, 2)
    assert "fluency" not in build_probes(fluency=False, fluency_max_length=7).metrics  # settings alone add nothing
    with pytest.raises(TypeError, match="unexpected keyword 'fluency_max_new_token'"):
        build_probes(fluency_max_new_token=3)
    with pytest.raises(TypeError, match=r"probe family 'fluency': unknown setting\(s\) \['tokens'\]"):
        build_probes(["fluency"], settings={"fluency": {"tokens": 3}})
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        build_probes(["fluency_short"], fluency_short_max_new_tokens=0)
    with pytest.raises(ValueError, match="fluency: max_length must be >= 1"):
        build_probes(["fluency"], fluency_max_length=0)
    with pytest.raises(ValueError, match=r"settings for unknown probe family \['fluent'\]"):
        build_probes(settings={"fluent": {}})


def test_values_do_not_depend_on_how_the_config_orders_families(tiny):
    """Families run in registry order, so the scorer sees the same pairs in the same order."""
    from harness.data import load_requests

    model, tok = tiny
    reqs = list(load_requests("counterfact", limit=3).requests)
    a = build_probes(["counterfact", "easyedit"]).measure(model, tok, reqs).metrics
    b = build_probes(["easyedit", "counterfact"]).measure(model, tok, reqs).metrics
    assert [list(r) for r in a] == [list(r) for r in b]
    assert all(x[k] == y[k] or (math.isnan(x[k]) and math.isnan(y[k])) for x, y in zip(a, b) for k in x)


def test_summary_table_and_csv_carry_direction_and_unit(tmp_path):
    from harness.results import read_rows, summary_table, write_summary

    rows = [{"point": "edit", "status": "ok", "pre_efficacy_score": "0.0", "post_efficacy_score": "1.0",
             "pre_fluency": "3.5", "post_fluency": "3.0", "edit_s": "1"}]
    out = write_summary(tmp_path / "s.csv", rows, ["efficacy_score", "fluency"], {"run_id": "r"},
                        {"efficacy_score": 1, "fluency": 1})
    back = read_rows(tmp_path / "s.csv")
    assert [(r["metric"], r["direction"], r["unit"]) for r in back if r["phase"] == "post"] == \
        [("efficacy_score", "↑", "fraction"), ("fluency", "↑", "bits x100")]
    text = summary_table(out)
    assert "efficacy_score ↑  fraction" in text and "fluency ↑" in text and "bits" in text
