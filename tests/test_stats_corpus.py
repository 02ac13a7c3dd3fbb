"""Key statistics from a real corpus: seeded document sampling, the anchors' .npz, provenance."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from harness.algorithms import create
from harness.algorithms.corpus import file_digest, load_npz, read_corpus
from harness.algorithms.stats import StatsCache, StatsConfig, second_moments
from harness.models import model_spec
from harness.types import EditRequest


def _jsonl(path, n=40):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"{i} is document number {i} about topic {i % 7}"}) + "\n")
    return path


def test_jsonl_sampling_is_seeded_and_not_the_first_lines(tiny, tmp_path):
    _, tok = tiny
    path = _jsonl(tmp_path / "c.jsonl")
    first = [tok(f"{i} is document number {i} about topic {i % 7}")["input_ids"][:6] for i in range(5)]
    a = read_corpus(tok, path, 5, 6, seed=0)
    assert a == read_corpus(tok, path, 5, 6, seed=0)  # same seed, same documents
    assert a != first  # drawn at random, not the top of the file
    assert a != read_corpus(tok, path, 5, 6, seed=1)
    assert len({tuple(s) for s in a}) == 5 and all(len(s) == 6 for s in a)  # without replacement, truncated


def test_txt_chunks_are_sampled(tiny, tmp_path):
    _, tok = tiny
    path = tmp_path / "c.txt"
    path.write_text(" ".join(f"word{i}" for i in range(400)), encoding="utf-8")
    stream = tok(path.read_text(), add_special_tokens=False)["input_ids"]
    chunks = [stream[i:i + 8] for i in range(0, len(stream), 8)]
    got = read_corpus(tok, path, 4, 8, seed=3)
    assert got == read_corpus(tok, path, 4, 8, seed=3) and got != chunks[:4]
    assert all(c in chunks for c in got)


def test_bad_jsonl_line_is_named(tiny, tmp_path):
    _, tok = tiny
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine text here"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        read_corpus(tok, path, 5, 8)


def test_npz_round_trip_normalises_by_count(tiny, tmp_path, caplog):
    model, tok = tiny
    spec = model_spec(model)
    cfg = StatsConfig(source=str(_jsonl(tmp_path / "c.jsonl")), n_samples=20, seq_len=12, batch_size=8,
                      cache_dir=str(tmp_path / "cache"))
    record: dict = {}
    cov = second_moments(model, tok, spec, [1], cfg, record=record)[0][1]
    n_tok = record[1]["stats.n_tokens"]
    assert record[1]["stats.n_sequences"] == 20 and record[1]["stats.digest"] == file_digest(cfg.source)
    module = spec.mlp_out.format(1)
    # the anchors' layout: CombinedStat(mom2=SecondMoment()) -> keys mom2.mom2 (the sum) and mom2.count
    np.savez(tmp_path / f"{module}_float32_mom2_20.npz", **{"mom2.mom2": (cov * n_tok).numpy(),
                                                           "mom2.count": np.array(n_tok)})
    npz = StatsConfig(source=str(tmp_path / "{module}_float32_mom2_20.npz"))
    rec2: dict = {}
    got = second_moments(model, tok, spec, [1], npz, record=rec2)[0][1]
    torch.testing.assert_close(got, cov, rtol=1e-5, atol=1e-7)
    assert rec2[1]["stats.kind"] == "npz" and rec2[1]["stats.n_tokens"] == n_tok
    with pytest.raises(ValueError, match="wide"):
        np.savez(tmp_path / "small.npz", mom2=np.eye(3, dtype=np.float32), count=np.array(5))
        second_moments(model, tok, spec, [1], StatsConfig(source=str(tmp_path / "small.npz")))
    with pytest.raises(ValueError, match="expected 'mom2.mom2'"):
        np.savez(tmp_path / "other.npz", cov=np.eye(3))
        load_npz(tmp_path / "other.npz")


def test_model_source_warns(tiny, tmp_path, caplog):
    model, tok = tiny
    cfg = StatsConfig(n_samples=2, seq_len=4, cache_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        StatsCache().get(model, tok, model_spec(model), 0, cfg)
    assert "not comparable to the papers" in caplog.text


def test_a_small_corpus_keeps_its_sizes_and_warns(tiny, tmp_path, caplog):
    """Giving a corpus file does not switch the sizes to the anchors' (docs/algorithms/key-statistics.md):
    C rests on the sizes asked for, and a warning names them beside the anchors'."""
    model, tok = tiny
    cfg = StatsConfig(source=str(_jsonl(tmp_path / "c.jsonl")), n_samples=6, seq_len=5, cache_dir=str(tmp_path))
    record: dict = {}
    with caplog.at_level(logging.WARNING):
        second_moments(model, tok, model_spec(model), [0], cfg, record=record)
    assert record[0]["stats.n_sequences"] == 6 and record[0]["stats.n_tokens"] <= 30
    assert "at most 6 sequences of 5 tokens" in caplog.text and "100000" in caplog.text


def test_provenance_lands_in_the_report(tiny, tmp_path):
    model, tok = tiny
    corpus_file = _jsonl(tmp_path / "c.jsonl")
    alg = create("alphaedit", dict(
        layers=[0, 1], target={"num_grad_steps": 2}, templates={"length_params": [[4, 1]]},
        stats={"source": str(corpus_file), "n_samples": 16, "seq_len": 10, "batch_size": 8,
               "cache_dir": str(tmp_path / "stats")}))
    req = EditRequest("a", "{} plays the sport of", "LeBron James", "football", "basketball")
    report = alg.apply(model, tok, [req])
    info = report.info
    assert info["stats.kind"] == "corpus" and info["stats.source"] == str(corpus_file)
    assert info["stats.digest"] == file_digest(corpus_file)
    assert info["stats.n_sequences"] == 16 and info["stats.n_tokens"] > 16
    assert {"nullspace_dim.0", "nullspace_dim.1"} <= set(info)
