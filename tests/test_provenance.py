"""run.json records where a run's key statistics came from (``provenance``: the ``stats.*`` keys
of the edit reports, and AlphaEdit's kept null-space dimension per layer), equal to what the rows'
reports say; algorithms without statistics record an empty mapping."""
from __future__ import annotations

import json

import pytest

from harness.cli import compose_config, to_config
from harness.results import read_rows
from harness.runner import ModelCache, provenance, run


def _run(tmp_path, algorithm, *extra):
    ov = ["experiment=smoke", "threads=1", "data.limit=2", f"algorithm={algorithm}",
          f"algorithm.hparams.stats.cache_dir={tmp_path / 'stats'}", "algorithm.hparams.stats.n_samples=4",
          "algorithm.hparams.stats.seq_len=16", *extra]
    run(to_config(compose_config(ov)), tmp_path / "run", ov, cache=ModelCache(), progress=False)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    return record, read_rows(tmp_path / "run" / "cases.csv")


def test_alphaedit_run_json_records_stats_and_nullspace(tmp_path):
    record, rows = _run(tmp_path, "alphaedit", "algorithm.hparams.layers=[1]", "keep_original_weight=false")
    prov = record["provenance"]
    assert prov["stats.kind"] == "model" and prov["stats.source"] == "model"
    assert prov["stats.n_sequences"] == 4 and prov["stats.n_tokens"] > 0
    assert isinstance(prov["nullspace_dim.1"], int) and prov["nullspace_dim.1"] >= 0
    assert not any(k.startswith("cp_trace") for k in prov)  # only the declared prefixes
    reports = [json.loads(r["report"])["info"] for r in rows if r["report"]]
    assert reports and all(r["nullspace_dim.1"] == prov["nullspace_dim.1"] for r in reports)
    assert "config" in record  # the config is still there, unchanged for resumes


def test_runs_without_statistics_record_none(tmp_path):
    ov = ["experiment=smoke", "threads=1", "data.limit=1"]
    run(to_config(compose_config(ov)), tmp_path / "run", ov, cache=ModelCache(), progress=False)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["provenance"] == {}


def test_provenance_reads_the_declared_prefixes_of_the_last_report():
    rows = [{"report": json.dumps({"info": {"stats.kind": "model", "other": 1}})},
            {"report": ""}, {"report": float("nan")},
            {"report": json.dumps({"info": {"stats.kind": "jsonl", "nullspace_dim.3": 7}})}]
    assert provenance(rows, ("stats.",)) == {"stats.kind": "jsonl"}
    assert provenance(rows, ("stats.", "nullspace_dim.")) == {"nullspace_dim.3": 7, "stats.kind": "jsonl"}
    assert provenance(rows, ()) == {}
