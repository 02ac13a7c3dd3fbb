"""Errors arrive early, once, and with a non-zero exit; one bad case never stops the others.

* Impossible settings (a layer the model lacks, a misspelled ``+key``, a malformed data record) are
  one clear message and exit 2 before any row or ``run.json`` is written, without a traceback.
* A run in which every case errored exits 1.
* A case too long for the model, or whose pre-edit measurement raises, is one error row; the run
  goes on. ``retry_errors=true`` reruns error rows on resume.
* A model with non-finite logits gives ``status=nonfinite`` rows with empty metrics, not scores of 0.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness.cli import compose_config, to_config
from harness.config import ConfigError
from harness.data import load_requests
from harness.probes import build_probes
from harness.probes.suite import BatchedProbes
from harness.results import as_float, read_rows
from harness.runner import ModelCache, run
from harness.snapshot import model_digest
from harness.types import EditRequest

REPO = Path(__file__).resolve().parent.parent
SMOKE = ["experiment=smoke", "threads=1"]
USER = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English",
        "target_true": "French"}


def harness_cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *SMOKE, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kw)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def in_process(overrides: list[str], out: Path, cache: ModelCache | None = None):
    return run(to_config(compose_config([*SMOKE, *overrides])), out, overrides, cache=cache or ModelCache(),
               progress=False)


# ----------------------------------------------------------------------------------------------
# before any row


def test_impossible_layer_is_one_error_before_any_row(tmp_path: Path) -> None:
    res = harness_cli("algorithm=ft", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "error: model: ft: layer 20 out of range (model has 2 layers)" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run.json").exists() and not (tmp_path / "cases.csv").exists()
    fixed = harness_cli("algorithm=ft", "algorithm.hparams.layers=[1]", "algorithm.hparams.num_steps=2",
                        "data.limit=1", f"hydra.run.dir={tmp_path}")  # fixing the setting just works
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert len(read_rows(tmp_path / "cases.csv")) == 1


def test_data_error_names_line_and_field_before_the_model_loads(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "edits.jsonl", [USER, USER | {"target_new": "Italian"}, {**USER, "subject": ""}])
    res = harness_cli("data=jsonl", f"data.path={data}", f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{data}: line 3 (record 3): field 'subject': empty" in res.stderr
    assert "data.skip_invalid=true" in res.stderr
    assert "loaded tiny" not in res.stdout + res.stderr  # the model was never loaded
    assert not (tmp_path / "run" / "run.json").exists()


def test_misspelled_plus_key_is_refused_with_the_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'algorithm\.hparams\.num_step'.*num_steps"):
        to_config(compose_config(["algorithm=ft", "+algorithm.hparams.num_step=1"]))
    with pytest.raises(ConfigError, match=r"unknown key 'data\.limt'"):
        to_config(compose_config(["+data.limt=3"]))
    cfg = to_config(compose_config(["model=tiny", "+model.tiny.extra=3"]))  # untyped nodes accept keys
    assert cfg.model.tiny["extra"] == 3


def test_every_case_failing_exits_non_zero(tmp_path: Path) -> None:
    res = harness_cli("data.limit=2", "max_prompt_tokens=3", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 1, res.stderr[-3000:]
    assert "every case failed (2 error row(s)" in res.stderr
    rows = read_rows(tmp_path / "cases.csv")
    assert [r["status"] for r in rows] == ["error", "error"]
    assert all("over the limit of 3 (max_prompt_tokens)" in r["error"] for r in rows)


def test_interrupt_before_any_case_says_so(tmp_path: Path) -> None:
    slow = ("import time\nfrom harness.editor import Editor\n_p = Editor.prepare\n"
            "def prepare(self):\n    print('preparing', flush=True)\n    time.sleep(60)\n    return _p(self)\n"
            "Editor.prepare = prepare\nfrom harness.cli import main\nmain()\n")
    proc = subprocess.Popen([sys.executable, "-c", slow, *SMOKE, f"hydra.run.dir={tmp_path}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    t0 = time.time()
    while "preparing" not in (proc.stdout.readline() or "") and time.time() - t0 < 120:
        pass
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "no case had finished" in err and "cases.csv" not in err


# ----------------------------------------------------------------------------------------------
# per-case isolation


def test_too_long_case_is_one_error_row_and_the_run_goes_on(tmp_path: Path) -> None:
    long = {**USER, "paraphrase_prompts": ["word " * 400 + "Danielle Darrieux speaks"]}  # tiny context: 256
    data = write_jsonl(tmp_path / "edits.jsonl", [USER, long, USER | {"target_new": "Italian"}])
    res = in_process(["data=jsonl", f"data.path={data}"], tmp_path / "run")
    rows = {r["case_id"]: r for r in read_rows(tmp_path / "run" / "cases.csv")}
    assert (res.n_cases, res.n_errors) == (3, 1)
    assert rows["1"]["status"] == "error" and rows["0"]["status"] == rows["2"]["status"] == "ok"
    assert "field 'paraphrase_prompts[0]'" in rows["1"]["error"]
    assert "over the limit of 256 (the model's context length)" in rows["1"]["error"]


def test_failing_pre_measurement_is_isolated_and_retry_errors_reruns(tmp_path: Path, monkeypatch) -> None:
    real = BatchedProbes.measure
    ids = [r.case_id for r in load_requests("counterfact", limit=3)]
    bad = ids[1]

    def flaky(self, model, tok, requests, reference=None):
        if any(r.case_id == bad for r in requests):
            raise RuntimeError("probe exploded")
        return real(self, model, tok, requests, reference)

    monkeypatch.setattr(BatchedProbes, "measure", flaky)
    cache = ModelCache()
    first = in_process(["data.limit=3"], tmp_path, cache)
    rows = {r["case_id"]: r for r in read_rows(tmp_path / "cases.csv")}
    assert (first.n_cases, first.n_errors) == (3, 1)
    assert "pre-edit measurement failed: RuntimeError: probe exploded" in rows[bad]["error"]
    assert rows[ids[0]]["status"] == rows[ids[2]]["status"] == "ok"

    monkeypatch.setattr(BatchedProbes, "measure", real)
    again = in_process(["data.limit=3"], tmp_path, cache)  # a plain resume keeps the error row
    assert again.n_written == 0 and again.n_errors == 1
    retried = in_process(["data.limit=3", "retry_errors=true"], tmp_path, cache)
    rows = read_rows(tmp_path / "cases.csv")
    assert retried.n_written == 1 and retried.n_errors == 0
    assert sorted(r["case_id"] for r in rows) == sorted(ids) and all(r["status"] == "ok" for r in rows)


def test_retry_errors_is_refused_for_sequential_runs(tmp_path: Path) -> None:
    from harness.runner import SetupError

    with pytest.raises(SetupError, match="retry_errors"):
        in_process(["keep_original_weight=false", "retry_errors=true"], tmp_path)


# ----------------------------------------------------------------------------------------------
# non-finite logits


def test_nonfinite_logits_are_flagged_not_scored_zero(tmp_path: Path, tiny) -> None:
    model, tok = tiny
    req = EditRequest(case_id="0", prompt="The mother tongue of {} is", subject="Danielle Darrieux",
                      target_new="English", target_true="French", paraphrase_prompts=("Darrieux speaks",))
    probes = build_probes()
    ok = probes.measure(model, tok, [req])
    assert ok.extras[0]["nonfinite"] is False and ok.metrics[0]["efficacy_score"] in (0.0, 1.0)
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    bad = probes.measure(model, tok, [req])
    assert bad.extras[0]["nonfinite"] is True
    assert all(v != v for v in bad.metrics[0].values())  # every metric NaN, none 0.0

    cache = ModelCache()
    cfg = to_config(compose_config([*SMOKE, "data.limit=2"]))
    loaded = cache.get(cfg)
    with torch.no_grad():
        loaded.model.model.norm.weight[0] = float("inf")
    loaded.digest = model_digest(loaded.model)
    res = run(cfg, tmp_path, ["data.limit=2"], cache=cache, progress=False)
    rows = read_rows(tmp_path / "cases.csv")
    assert [r["status"] for r in rows] == ["nonfinite", "nonfinite"] and res.n_errors == 0
    assert all(math.isnan(as_float(r["post_efficacy_score"])) and math.isnan(as_float(r["pre_rewrite_acc"]))
               for r in rows)
    summary = {(r["phase"], r["metric"]): r for r in read_rows(tmp_path / "summary.csv")}
    post = summary[("post", "efficacy_score")]
    assert (post["count"], post["excluded"], post["n_nonfinite"], post["n_errors"]) == ("0", "2", "2", "0")
