"""Causal tracing (``harness.trace``, ``python -m harness.trace``) on the tiny models, and once on SmolLM2.

The identities checked here hold for any causal LM, so the tiny model's random "facts" do: with no
noise nothing changes; restoring the embeddings of the subject, or the last block's output at every
token, gives the clean run back; the last block's output matters only at the last token.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from harness.algorithms.locate import subject_last_index
from harness.data import load_requests
from harness.models import model_spec, num_layers
from harness.trace import TOKEN_GROUPS, TraceOptions, peak, run_trace, token_groups
from harness.trace.cli import main
from harness.trace.patch import (
    clean_run,
    corrupted_prefix,
    corrupted_run,
    restored_probs,
    trace_record,
    window_layers,
)
from harness.trace.prompts import encode_trace_prompt, make_noise, noise_std, subject_token_range
from harness.types import EditRequest

TEMPLATE, SUBJECT = "The mother tongue of {} is", "Danielle Darrieux"


def _prompt(tok, answer: str | None = "French"):
    return encode_trace_prompt(tok, TEMPLATE, SUBJECT, answer)


def _noise(prompt, samples: int = 3, std: float = 0.5, seed: int = 0) -> torch.Tensor:
    start, end = prompt.subject
    return make_noise(samples, end - start, 64, std, seed)


def _all_modules(model) -> list[str]:
    spec = model_spec(model)
    return [spec.embed] + [t.format(layer) for t in (spec.layer, spec.mlp, spec.attn)
                           for layer in range(num_layers(model))]


def test_subject_token_range_on_a_known_tokenization(tiny) -> None:
    _, tok = tiny
    ids, start, end = subject_token_range(tok, TEMPLATE, SUBJECT)
    assert ids == tok(TEMPLATE.replace("{}", SUBJECT))["input_ids"]
    assert tok.decode(ids[start:end]) == " " + SUBJECT  # the token carrying the space counts
    assert tok.decode(ids[:start]) == "The mother tongue of"
    assert end - 1 == subject_last_index(tok, TEMPLATE, SUBJECT)
    ids, start, end = subject_token_range(tok, "{} plays the sport of", "LeBron James")
    assert start == 0 and tok.decode(ids[:end]) == "LeBron James"
    with pytest.raises(ValueError, match="exactly one"):
        subject_token_range(tok, "no slot", SUBJECT)


def test_token_groups() -> None:
    # "Toko Yasuda, the" as 7 tokens with the subject in 0..4: "," first after, " the" last
    assert token_groups(7, (0, 5)) == {"first_subject": [0], "middle_subject": [1, 2, 3], "last_subject": [4],
                                       "first_after": [5], "further": [], "last": [6]}
    # one-token subject in the middle of 9 tokens: both first and last subject token
    g = token_groups(9, (2, 3))
    assert g["first_subject"] == g["last_subject"] == [2] and g["middle_subject"] == []
    assert g["first_after"] == [3] and g["further"] == [4, 5, 6, 7] and g["last"] == [8]
    # subject right before the last token: no first subsequent token apart from the last
    assert token_groups(4, (0, 3))["first_after"] == []
    assert {name for name, _ in TOKEN_GROUPS} == set(g)
    with pytest.raises(ValueError, match="not inside"):
        token_groups(3, (1, 5))


def test_window_layers_follow_rome() -> None:
    assert list(window_layers(12, 30, 10)) == list(range(7, 17))
    assert list(window_layers(0, 30, 10)) == list(range(0, 5))
    assert list(window_layers(29, 30, 10)) == list(range(24, 30))
    assert list(window_layers(4, 30, 1)) == [4]


def test_restoring_the_subject_embeddings_or_the_last_block_recovers_the_clean_run(tiny) -> None:
    model, tok = tiny
    spec, prompt = model_spec(model), _prompt(tok)
    clean = clean_run(model, spec, prompt.ids, _all_modules(model))
    p_clean = float(clean.probs[prompt.answer_id])
    noise = _noise(prompt)
    corrupt = corrupted_run(model, spec, prompt, noise)
    assert abs(corrupt.p - p_clean) > 1e-6  # the noise does change the answer's probability
    n_tok, last = len(prompt.ids), spec.layer.format(num_layers(model) - 1)
    sets = [[(spec.embed, t) for t in range(*prompt.subject)],
            [(spec.layer.format(layer), t) for layer in range(num_layers(model)) for t in range(n_tok)],
            [(last, t) for t in range(n_tok)], []]
    p = restored_probs(model, spec, prompt, clean, noise, sets)
    # the same kernels on more rows: equal up to float rounding (bit-equal on this machine)
    assert p[:3].tolist() == pytest.approx([p_clean] * 3, rel=1e-6, abs=1e-9)
    assert float(p[3]) == pytest.approx(corrupt.p, rel=1e-6)


def test_zero_noise_gives_zero_effect_everywhere(tiny) -> None:
    model, tok = tiny
    prompt = _prompt(tok)
    trace = trace_record(model, model_spec(model), prompt, _noise(prompt, std=0.0), window=2)
    assert trace.p_corrupt == pytest.approx(trace.p_clean, rel=1e-6)
    for kind, scores in trace.scores.items():
        assert torch.allclose(scores, torch.full_like(scores, trace.p_corrupt), rtol=0, atol=1e-7), kind


def test_grid_identities_with_cache_and_replay(tiny) -> None:
    """The cached, replayed grid: the last block's output matters at the last token only (p_clean there)."""
    model, tok = tiny
    spec, prompt = model_spec(model), _prompt(tok)
    noise = _noise(prompt)
    x = torch.tensor([prompt.ids])
    before = model(input_ids=x).logits
    trace = trace_record(model, spec, prompt, noise, window=1, max_rows=3)  # one layer per forward
    # the model is left as it was: no hook, no replayed forward
    assert torch.equal(model(input_ids=x).logits, before)
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, name
        assert "forward" not in module.__dict__, name
    start, n_tok = prompt.subject[0], len(prompt.ids)
    res = trace.scores["residual"]
    assert set(trace.scores) == {"residual", "mlp", "attn"}
    assert res.shape == (n_tok, num_layers(model))
    assert float(res[-1, -1]) == pytest.approx(trace.p_clean, rel=1e-5)
    assert torch.allclose(res[:-1, -1], torch.full((n_tok - 1,), trace.p_corrupt), rtol=1e-5, atol=0)
    assert torch.equal(res[:start], torch.full((start, res.shape[1]), trace.p_corrupt))  # not traced
    # a middle point, recomputed with the full sequence and no replay: same value
    t = start + 2
    clean = clean_run(model, spec, prompt.ids, _all_modules(model))
    for kind, template in (("residual", spec.layer), ("mlp", spec.mlp), ("attn", spec.attn)):
        full = restored_probs(model, spec, prompt, clean, noise, [[(template.format(0), t)]])
        assert float(full[0]) == pytest.approx(float(trace.scores[kind][t, 0]), rel=1e-5), kind
    assert abs(float(res[t, 0]) - trace.p_corrupt) > 1e-9  # a real effect, not a no-op
    # replay refuses what it would silently lose
    prefix = corrupted_prefix(model, spec, prompt, noise, t)
    corrupt = corrupted_run(model, spec, prompt, noise)
    with pytest.raises(ValueError, match="replayed"):
        restored_probs(model, spec, prompt, clean, noise, [[(spec.mlp.format(0), t)]], start=t, prefix=prefix,
                       replay=corrupt, skip=1)
    with pytest.raises(ValueError, match="runs tokens"):
        restored_probs(model, spec, prompt, clean, noise, [[(spec.layer.format(0), t - 1)]], start=t,
                       prefix=prefix)


def test_gpt2_and_the_predicted_answer(tiny_gpt2) -> None:
    model, tok = tiny_gpt2
    spec, prompt = model_spec(model), _prompt(tok, answer=None)
    trace = trace_record(model, spec, prompt, _noise(prompt), window=2)
    assert trace.prompt.answer_id == trace.predicted
    assert float(trace.scores["residual"][-1, -1]) == pytest.approx(trace.p_clean, rel=1e-5)


def test_noise_is_seeded_and_scaled(tiny) -> None:
    model, tok = tiny
    spec = model_spec(model)
    std = noise_std(model, spec, tok, [SUBJECT, "LeBron James"])
    emb = model.model.embed_tokens.weight
    ids = tok(SUBJECT, add_special_tokens=False)["input_ids"] + tok("LeBron James", add_special_tokens=False)["input_ids"]
    assert std == pytest.approx(float(emb[ids].std()), rel=1e-6)
    a, b = make_noise(4, 3, 64, 2.0, 7), make_noise(4, 3, 64, 2.0, 7)
    assert torch.equal(a, b) and not torch.equal(a, make_noise(4, 3, 64, 2.0, 8))
    assert float(make_noise(64, 8, 64, 2.0, 0).std()) == pytest.approx(2.0, rel=0.05)


def _requests(n: int) -> list[EditRequest]:
    return load_requests("counterfact", limit=n).requests


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_run_trace_writes_tables_and_heatmaps(tiny, tmp_path) -> None:
    model, tok = tiny
    reqs = _requests(2)
    opts = TraceOptions(n=2, samples=2, window=2)
    result = run_trace(model, tok, reqs, opts, tmp_path, progress=False)
    n_layers = num_layers(model)
    rows = _read(tmp_path / "trace.csv")
    assert list(rows[0]) == ["record", "kind", "token_group", "layer", "effect"]
    expected = 0
    for rec in result.records:
        groups = token_groups(int(rec["n_tokens"]), (int(rec["subject_start"]), int(rec["subject_end"])))
        expected += sum(1 for g in groups.values() if g) * 3 * n_layers
    assert len(rows) == expected
    assert {r["record"] for r in rows} == {r.case_id for r in reqs}
    summary = _read(tmp_path / "trace_summary.csv")
    assert {(r["kind"], r["token_group"]) for r in summary if r["token_group"] == "last"} == \
        {(k, "last") for k in ("residual", "mlp", "attn")}
    last = [r for r in summary if r["kind"] == "residual" and r["token_group"] == "last"]
    assert {int(r["n"]) for r in last} == {2}
    # the mean over records is the mean of the per-record rows
    cell = [float(r["effect"]) for r in rows if (r["kind"], r["token_group"], r["layer"]) == ("mlp", "last", "0")]
    assert float(next(r["effect"] for r in summary if (r["kind"], r["token_group"], r["layer"]) ==
                      ("mlp", "last", "0"))) == pytest.approx(sum(cell) / 2)
    for kind in ("residual", "mlp", "attn"):
        assert (tmp_path / f"trace_{kind}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert 0 <= result.peaks[kind][0] < n_layers
        assert result.peaks[kind] == peak(result.summary, kind)
    meta = json.loads((tmp_path / "trace.json").read_text())
    assert meta["n_records"] == 2 and meta["noise_std"] == pytest.approx(result.noise_std) and result.noise_std > 0
    recs = _read(tmp_path / "trace_records.csv")
    assert recs[0]["answer"] == tok.decode(tok(" " + reqs[0].target_true)["input_ids"][:1])


def test_seeded_runs_are_identical(tiny, tmp_path) -> None:
    model, tok = tiny
    reqs, opts = _requests(1), TraceOptions(n=1, samples=2, window=2, kinds=("residual",))
    run_trace(model, tok, reqs, opts, tmp_path / "a", seed=3, progress=False)
    run_trace(model, tok, reqs, opts, tmp_path / "b", seed=3, progress=False)
    run_trace(model, tok, reqs, opts, tmp_path / "c", seed=4, progress=False)
    a, b, c = ((tmp_path / d / "trace.csv").read_text() for d in "abc")
    assert a == b and a != c


def test_options_parse_and_errors() -> None:
    opts, rest = TraceOptions.parse(["n=3", "kinds=mlp,attn", "noise_std=null", "model=tiny", "data.offset=2"])
    assert (opts.n, opts.kinds, opts.noise_std) == (3, ("mlp", "attn"), None)
    assert rest == ["model=tiny", "data.offset=2"]
    with pytest.raises(ValueError, match="samples"):
        TraceOptions.parse(["samples=many"])
    with pytest.raises(ValueError, match="kinds"):
        TraceOptions(kinds=("mlp", "embed"))
    with pytest.raises(ValueError, match="answer"):
        TraceOptions(answer="false")


def test_answer_true_needs_a_true_object(tiny, tmp_path) -> None:
    model, tok = tiny
    req = EditRequest(case_id="x", prompt=TEMPLATE, subject=SUBJECT, target_new="English")
    with pytest.raises(ValueError, match="case x: no true object"):
        run_trace(model, tok, [req], TraceOptions(n=1, samples=1), tmp_path, progress=False)


def test_cli_prints_the_peak_and_the_override(tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    assert main(["model=tiny", "n=2", "samples=2", "window=1", f"out={out}", "threads=1", "data.offset=1"]) == 0
    text = capsys.readouterr().out
    layer = json.loads((out / "trace.json").read_text())["peaks_last_subject"]["mlp"]["layer"]
    assert f"algorithm=rome algorithm.hparams.layer={layer}" in text
    assert {p.name for p in out.iterdir()} >= {"trace.csv", "trace_summary.csv", "trace_records.csv", "trace.json",
                                                "trace_residual.png", "trace_mlp.png", "trace_attn.png"}


@pytest.mark.slow
def test_smollm2_two_records(smollm2, tmp_path) -> None:
    """On the real model, for two facts it knows, the corruption hurts the true object and
    restoring states brings it back."""
    model, tok = smollm2
    known = [EditRequest(case_id="french", prompt=TEMPLATE, subject=SUBJECT, target_new="English",
                         target_true="French"),
             EditRequest(case_id="paris", prompt="The capital of {} is", subject="France", target_new="Rome",
                         target_true="Paris")]
    result = run_trace(model, tok, known, TraceOptions(n=2, samples=3), tmp_path, progress=False)
    p_clean = sum(r["p_clean"] for r in result.records) / 2
    p_corrupt = sum(r["p_corrupt"] for r in result.records) / 2
    assert p_clean > 0.2 and p_corrupt < p_clean / 2
    last = [r for r in result.summary if r["kind"] == "residual" and r["token_group"] == "last"]
    # restoring the last block at the last token restores the clean probability
    assert max(last, key=lambda r: r["layer"])["effect"] == pytest.approx(p_clean - p_corrupt, rel=1e-4)
    assert all(0 <= result.peaks[k][0] < num_layers(model) for k in ("residual", "mlp", "attn"))
