"""The run loop, its tables, resume after SIGKILL, sweeps and collect, on the tiny model.

In-process runs compose the real config (Hydra compose API) and call ``harness.runner.run``;
the kill/resume and launcher tests run ``python -m harness`` in a subprocess. The tiny model's
facts are random: only the mechanics are checked.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from harness.algorithms.direct import Direct
from harness.cli import compose_config, to_config
from harness.collect import collect
from harness.models import load_model
from harness.results import ResumeError, RowTable, read_rows
from harness.runner import ModelCache, run
from harness.snapshot import bit_equal, model_digest

REPO = Path(__file__).resolve().parent.parent
SMOKE = ["experiment=smoke", "threads=1"]
SEQ = ["experiment=smoke_sequential", "threads=1"]
CASE_COLUMNS = {"run_id", "model", "algorithm", "case_id", "subject", "prompt", "target_new", "target_true", "step",
                "point", "status", "error", "batch_size", "time_pre_s", "time_edit_s", "time_probe_s",
                "time_restore_s", "time_prepare_s", "snapshot_bytes", "delta_norm", "probe_versions"}
# The CLI in a subprocess, with `direct` slowed down by SLOW_S seconds per call so a kill lands
# mid-run (same config as an in-process run, which can then resume it).
SLOW = """
import os, time
from harness.algorithms.direct import Direct

_apply = Direct.apply
def _slow_apply(self, model, tok, requests):
    time.sleep(float(os.environ.get("SLOW_S", "0")))
    return _apply(self, model, tok, requests)
Direct.apply = _slow_apply

from harness.cli import main
main()
"""


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    """One tiny model for the in-process runs of this module (reuse is itself under test)."""
    return ModelCache()


def cfg_of(overrides: list[str]):
    return to_config(compose_config(overrides))


def run_in_process(overrides: list[str], out: Path, cache: ModelCache):
    return run(cfg_of(overrides), out, overrides, cache=cache, progress=False)


def cli(args: list[str], slow_s: float = 0.0, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLOW_S": str(slow_s), "HYDRA_FULL_ERROR": "1"}
    return subprocess.Popen([sys.executable, "-c", SLOW, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def wait_for(cond, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed:\n" + proc.stdout.read()[-3000:])
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.02)


def n_data_lines(path: Path) -> int:
    return max(path.read_bytes().count(b"\n") - 1, 0) if path.exists() else 0


def base_params() -> dict[str, torch.Tensor]:
    model, _ = load_model("tiny", device="cpu", dtype="float32", tiny=dict(cfg_of(SMOKE).model.tiny))
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def assert_unique_keys(rows: list[dict]) -> None:
    keys = [(r["case_id"], r["point"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys))


# ----------------------------------------------------------------------------------------------
# tables


def test_row_table_resume_dedup_and_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    t = RowTable(path, ["k", "v"], ["k"])
    assert t.append({"k": 1, "v": "a,b\nc"}) and not t.append({"k": 1, "v": "other"})
    with open(path, "ab") as f:
        f.write(b"2,torn")  # what a SIGKILL in the middle of a write leaves
    t2 = RowTable(path, ["k", "v"], ["k"])
    assert [r["k"] for r in t2.rows] == ["1"] and t2.has({"k": 1})
    assert t2.append({"k": 2, "v": "x"})
    assert [r["k"] for r in read_rows(path)] == ["1", "2"]
    with pytest.raises(ResumeError):
        RowTable(path, ["k", "v", "w"], ["k"])


def test_end_to_end_tables_and_rerun(tmp_path: Path, cache: ModelCache) -> None:
    ov = [*SMOKE, "data.limit=3"]
    res = run_in_process(ov, tmp_path, cache)
    assert (res.n_cases, res.n_errors, res.n_written) == (3, 0, 3)
    cases = pd.read_csv(tmp_path / "cases.csv")
    assert CASE_COLUMNS | {"override.experiment", "override.data.limit"} <= set(cases.columns)
    for m in ("efficacy_score", "paraphrase_score", "neighborhood_score", "rewrite_acc", "locality_acc"):
        assert {f"pre_{m}", f"post_{m}"} <= set(cases.columns)
    assert (cases["status"] == "ok").all() and (cases["snapshot_bytes"] > 0).all()
    assert (cases["delta_norm"] > 0).all() and cases["override.data.limit"].eq(3).all()
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert {"phase", "metric", "mean", "sem", "count", "version"} <= set(summary.columns)
    assert {"pre", "post"} == set(summary["phase"]) and "score" in set(summary["metric"])
    again = run_in_process(ov, tmp_path, cache)
    assert again.n_written == 0 and len(read_rows(tmp_path / "cases.csv")) == 3
    with pytest.raises(ResumeError):
        run_in_process([*ov, "probes.batch_size=7"], tmp_path, cache)


def test_model_and_pre_measurements_are_reused(tmp_path: Path) -> None:
    cache = ModelCache()
    run_in_process([*SMOKE, "algorithm=none", "data.limit=2"], tmp_path / "a", cache)
    model = cache.current.model
    run_in_process([*SMOKE, "data.limit=2"], tmp_path / "b", cache)
    assert cache.current.model is model
    a, b = pd.read_csv(tmp_path / "a" / "cases.csv"), pd.read_csv(tmp_path / "b" / "cases.csv")
    assert (b["time_pre_s"] == 0).all()  # measured once, in run a
    assert a["pre_efficacy_magnitude"].tolist() == b["pre_efficacy_magnitude"].tolist()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # a model that is not its loaded self is reloaded
    run_in_process([*SMOKE, "data.limit=1"], tmp_path / "c", cache)
    assert cache.current.model is not model


def test_failing_case_is_recorded_and_run_goes_on(tmp_path: Path, cache: ModelCache) -> None:
    bad = ["algorithm.hparams.ops.0.kind=set_row", "algorithm.hparams.ops.0.index=100000",
           "algorithm.hparams.ops.0.value=1.0"]
    res = run_in_process([*SMOKE, "data.limit=2", *bad], tmp_path, cache)
    rows = read_rows(tmp_path / "cases.csv")
    assert res.n_errors == 2 and all(r["status"] == "error" and "IndexError" in r["error"] for r in rows)
    assert all(r["pre_efficacy_score"] != "" and r["post_efficacy_score"] == "" for r in rows)
    assert model_digest(cache.current.model) == cache.current.digest  # restored


def test_keyboard_interrupt_restores_and_resumes(tmp_path: Path, cache: ModelCache, monkeypatch) -> None:
    calls = {"n": 0}
    real = Direct.apply

    def flaky(self, model, tok, requests):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, model, tok, requests)

    monkeypatch.setattr(Direct, "apply", flaky)
    ov = [*SMOKE, "data.limit=4"]
    with pytest.raises(KeyboardInterrupt):
        run_in_process(ov, tmp_path, cache)
    assert len(read_rows(tmp_path / "cases.csv")) == 2
    assert model_digest(cache.current.model) == cache.current.digest
    monkeypatch.setattr(Direct, "apply", real)
    run_in_process(ov, tmp_path, cache)
    rows = read_rows(tmp_path / "cases.csv")
    assert len(rows) == 4
    assert_unique_keys(rows)


# ----------------------------------------------------------------------------------------------
# saved models, sequential runs


def test_saved_model_single_equals_base_sequential_differs(tmp_path: Path, cache: ModelCache) -> None:
    base = base_params()
    run_in_process([*SMOKE, "data.limit=2", "save_model=true"], tmp_path / "single", cache)
    saved = load_file(str(tmp_path / "single" / "model" / "model.safetensors"))
    assert saved and all(bit_equal(t, base[n]) for n, t in saved.items())
    assert load_file(str(tmp_path / "single" / "delta.safetensors")) == {}

    out = tmp_path / "seq"
    run_in_process([*SEQ, "data.limit=4", "save_model=true", "eval.outlier_factor=0.5"], out, cache)
    saved = load_file(str(out / "model" / "model.safetensors"))
    changed = [n for n, t in saved.items() if not bit_equal(t, base[n])]
    assert changed == ["model.layers.0.mlp.down_proj.weight"]
    delta = load_file(str(out / "delta.safetensors"))
    assert bit_equal(delta[changed[0]], saved[changed[0]])
    ret = pd.read_csv(out / "retention.csv")
    assert ret["n_edits"].tolist() == [2, 4] and {"step_norm", "outlier", "total_norm", "score"} <= set(ret.columns)
    assert ret["outlier"].tolist() == [False, True]  # equal steps, factor 0.5: the second is "> 0.5x median"
    assert (out / "retention.png").stat().st_size > 0 and (out / "checkpoint" / "runner.json").exists()
    rows = read_rows(out / "cases.csv")
    assert_unique_keys(rows)
    assert sum(r["point"] == "retention" for r in rows) == 2 + 4
    phases = set(pd.read_csv(out / "summary.csv")["phase"])
    assert {"pre", "post", "retention@2", "retention@4", "final"} <= phases
    assert model_digest(cache.current.model) == cache.current.digest  # back to base for the next job


def test_sequential_sigkill_resume_is_bit_exact(tmp_path: Path, cache: ModelCache) -> None:
    ov = [*SEQ, "data.limit=10", "batch_size=2", "eval.retention_at=[4]", "save_model=true"]
    straight = tmp_path / "straight"
    run_in_process(ov, straight, cache)

    killed = tmp_path / "killed"
    proc = cli([*ov, f"hydra.run.dir={killed}"], slow_s=0.4)
    wait_for(lambda: (killed / "checkpoint" / "runner.json").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.csv").exists(), "killed too late to test anything"
    run_in_process(ov, killed, cache)  # the same command, resumed

    for name in ("delta.safetensors", "model/model.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(killed / name))
        assert a.keys() == b.keys() and all(bit_equal(a[k], b[k]) for k in a)
    rows = read_rows(killed / "cases.csv")
    assert_unique_keys(rows)
    assert sum(r["point"] == "edit" for r in rows) == 10
    assert pd.read_csv(killed / "retention.csv")["n_edits"].tolist() == [4, 10]


def test_single_sigkill_rerun_runs_each_case_once(tmp_path: Path, cache: ModelCache) -> None:
    ov = [*SMOKE, "data.limit=12"]
    proc = cli([*ov, f"hydra.run.dir={tmp_path}"], slow_s=0.25)
    wait_for(lambda: n_data_lines(tmp_path / "cases.csv") >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert n_data_lines(tmp_path / "cases.csv") < 12, "killed too late to test anything"
    with open(tmp_path / "cases.csv", "ab") as f:
        f.write(b"tmp/x,tiny,dir")  # and a torn row, as a kill mid-write leaves
    run_in_process(ov, tmp_path, cache)  # the same command, rerun
    rows = read_rows(tmp_path / "cases.csv")
    assert len(rows) == 12 and len({r["case_id"] for r in rows}) == 12


# ----------------------------------------------------------------------------------------------
# sweeps


@pytest.mark.parametrize("launcher", ["local", pytest.param("submitit_local", marks=pytest.mark.slow)])
def test_multirun_writes_one_dir_per_job_and_collect_gathers(tmp_path: Path, launcher: str) -> None:
    args = ["-m", "model=tiny", "algorithm=none,direct", "data.limit=2", "device=cpu", "threads=1",
            f"hydra/launcher={launcher}", f"hydra.sweep.dir={tmp_path}"]
    if launcher == "submitit_local":
        args.append("hydra.launcher.timeout_min=10")
    finish(cli(args), timeout=300)
    dirs = sorted(p.parent for p in tmp_path.rglob("cases.csv"))
    assert len(dirs) == 2 and all((d / "summary.csv").exists() and (d / ".hydra").is_dir() for d in dirs)
    df = collect(tmp_path)
    assert (tmp_path / "collected.csv").exists()
    assert df["run_dir"].nunique() == 2 and set(df["override.algorithm"]) == {"none", "direct"}
    assert {"metric", "phase", "mean", "sem", "count", "seconds_per_edit"} <= set(df.columns)


def test_inspect_marks_targets(capsys) -> None:
    from harness.inspect import main

    assert main([*SMOKE, "--targets-only"]) == 0
    out = capsys.readouterr().out
    assert "* model.layers.0.mlp.down_proj.weight" in out.replace("  ", " ") and "snapshot 32.0 KiB" in out


def test_collect_compares_sequential_runs(tmp_path: Path, cache: ModelCache) -> None:
    from harness.collect import collect_retention, plot_retention_comparison

    for name, extra in (("a", []), ("b", ["algorithm.hparams.ops.0.scale=0.05"])):
        run_in_process([*SEQ, "data.limit=4", *extra], tmp_path / name, cache)
    ret = collect_retention(tmp_path)
    assert (tmp_path / "retention_collected.csv").exists()
    assert sorted(ret["run_dir"].unique()) == ["a", "b"] and ret["n_edits"].tolist() == [2, 4, 2, 4]
    pre = pd.read_csv(tmp_path / "a" / "cases.csv").query("point == 'edit'")["pre_efficacy_score"].mean()
    assert ret["base_efficacy_score"].tolist() == [pytest.approx(pre)] * 4
    png = plot_retention_comparison(ret, tmp_path / "cmp.png")
    assert png is not None and png.stat().st_size > 1000
