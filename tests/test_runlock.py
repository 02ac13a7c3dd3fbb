"""One writer per run directory (``harness.runlock``), on its own and wired into the runner and CLI.

Real processes throughout: the CLI twice on one directory, a holder killed with SIGKILL, a lock
left by a process that has exited. Plus resume dropping duplicate rows older runs left behind.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cli import compose_config, to_config
from harness.results import ResumeError, read_rows
from harness.runlock import LOCK_NAME, Holder, RunLock, RunLockedError
from harness.runner import ModelCache, run

REPO = Path(__file__).resolve().parent.parent
SMOKE = ["model=tiny", "algorithm=direct", "experiment=smoke", "threads=1"]
# The CLI, with `direct` holding its first edit until the file $GO exists, so a second process can
# be started while the first one certainly holds the run directory.
GATED = """
import os, time
from pathlib import Path
from harness.algorithms.direct import Direct

_apply = Direct.apply
def _gated_apply(self, model, tok, requests):
    go = Path(os.environ["GO"])
    t0 = time.time()
    while not go.exists() and time.time() - t0 < 300:
        time.sleep(0.05)
    return _apply(self, model, tok, requests)
Direct.apply = _gated_apply

from harness.cli import main
main()
"""


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1", **extra}


def run_in_process(overrides: list[str], out: Path, cache: ModelCache):
    return run(to_config(compose_config(overrides)), out, overrides, cache=cache, progress=False)


def dead_pid() -> int:
    """The pid of a child process that has exited (and been reaped)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    return int(child.stdout)


def write_lock(run_dir: Path, pid: int, host: str) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps({"pid": pid, "host": host, "since": "2020-01-01T00:00:00+00:00",
                                "command": "python -m harness"}))
    return path


# ----------------------------------------------------------------------------------------------
# the lock itself


def test_second_lock_is_refused_and_release_frees_it(tmp_path: Path) -> None:
    with RunLock(tmp_path / "run") as lock:
        held = Holder.parse((tmp_path / "run" / LOCK_NAME).read_text())
        assert lock.held and held is not None and (held.pid, held.host) == (os.getpid(), socket.gethostname())
        with pytest.raises(RunLockedError, match=rf"run is in use by pid {os.getpid()} on ") as err:
            RunLock(tmp_path / "run").acquire()
        assert err.value.holder == held and err.value.run_dir == tmp_path / "run"
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    with pytest.raises(ValueError):
        with RunLock(tmp_path / "run"):
            raise ValueError("released on exceptions too")
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    RunLock(tmp_path / "run").acquire().release()


def test_lock_of_a_sigkilled_holder_is_taken_over(tmp_path: Path, caplog) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from harness.runlock import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(300)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env=env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid} "):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert Holder.parse((tmp_path / LOCK_NAME).read_text()).pid == holder.pid  # left behind
    with caplog.at_level(logging.WARNING), RunLock(tmp_path):
        assert Holder.parse((tmp_path / LOCK_NAME).read_text()).pid == os.getpid()
    assert f"taking over the lock of pid {holder.pid}" in caplog.text and "is gone" in caplog.text


def test_lock_from_another_host_is_refused_with_a_hint(tmp_path: Path) -> None:
    path = write_lock(tmp_path, os.getpid(), "elsewhere.example")
    with pytest.raises(RunLockedError, match=r"pid \d+ on elsewhere\.example since 2020.*delete .*\.lock") as err:
        RunLock(tmp_path).acquire()
    assert err.value.holder.host == "elsewhere.example" and path.exists()  # not taken, not deleted


# ----------------------------------------------------------------------------------------------
# wired into the runner and the CLI


def test_second_cli_process_is_refused_and_rows_are_not_duplicated(tmp_path: Path) -> None:
    out, go = tmp_path / "run", tmp_path / "go"
    args = [sys.executable, "-c", GATED, *SMOKE, "data.limit=3", f"hydra.run.dir={out}"]
    first = subprocess.Popen(args, cwd=REPO, env=env(GO=str(go)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        t0 = time.time()
        while not ((out / LOCK_NAME).exists() and (out / "cases.csv").exists()):
            assert first.poll() is None, first.stdout.read()[-3000:]
            assert time.time() - t0 < 240, "the first run never started"
            time.sleep(0.05)
        second = subprocess.run(args, cwd=REPO, env=env(GO=str(go)), capture_output=True, text=True, timeout=240)
        assert first.poll() is None, "the first run ended before the second one was refused"
    finally:
        go.touch()
    out_first, _ = first.communicate(timeout=240)
    assert first.returncode == 0, out_first[-3000:]
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"is in use by pid {first.pid} on {socket.gethostname()}" in second.stderr
    assert str(out) in second.stderr and "Traceback" not in second.stderr + second.stdout
    rows = read_rows(out / "cases.csv")
    assert sorted(r["case_id"] for r in rows) == sorted({r["case_id"] for r in rows}) and len(rows) == 3
    assert not (out / LOCK_NAME).exists()


def test_runner_takes_over_a_stale_lock_and_releases_on_errors(tmp_path: Path, caplog) -> None:
    cache = ModelCache()
    pid = dead_pid()
    write_lock(tmp_path, pid, socket.gethostname())
    with caplog.at_level(logging.WARNING):
        res = run_in_process([*SMOKE, "data.limit=1"], tmp_path, cache)
    assert res.n_written == 1 and f"taking over the lock of pid {pid}" in caplog.text
    assert not (tmp_path / LOCK_NAME).exists()
    with pytest.raises(ResumeError):  # another config: refused after the lock was taken ...
        run_in_process([*SMOKE, "data.limit=1", "probes.batch_size=7"], tmp_path, cache)
    assert not (tmp_path / LOCK_NAME).exists()  # ... and released


def test_resume_drops_duplicate_rows_and_summary_counts_each_case_once(tmp_path: Path, caplog) -> None:
    cache = ModelCache()
    ov = [*SMOKE, "data.limit=3"]
    run_in_process(ov, tmp_path, cache)
    cases = tmp_path / "cases.csv"
    data = cases.read_bytes()
    header_end = data.index(b"\n") + 1
    cases.write_bytes(data + data[header_end:])  # what two writers at once used to leave
    assert len(read_rows(cases)) == 6
    with caplog.at_level(logging.WARNING):
        res = run_in_process(ov, tmp_path, cache)
    assert "dropped 3 duplicate row(s)" in caplog.text
    assert res.n_written == 0 and res.n_cases == 3 and cases.read_bytes() == data
    assert {r["count"] for r in read_rows(tmp_path / "summary.csv") if r["excluded"] == "0"} == {"3"}
    assert {r["n_cases"] for r in read_rows(tmp_path / "summary.csv")} == {"3"}
