"""A SIGKILLed sequential run resumes to exactly the run that was never interrupted, for every
registered algorithm (tiny model).

For each algorithm: a reference run goes through uninterrupted; a second run in another directory
is killed (SIGKILL, a real process) right after an edit was applied but before its rows were
written, resumed and killed again in the middle of writing a retention point's rows, then resumed
to the end. The final weights delta, the algorithm's state and memory (tensors and structure), every metric cell of ``cases.csv`` and
every cell of ``retention.csv`` must be bit-identical to the reference. Whatever an algorithm derives
from the base model (context templates, key statistics, projectors) must therefore be derived from
the base model on resume too, not from the checkpoint's edited weights.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness.algorithms import available
from harness.cli import compose_config, to_config
from harness.results import ResumeError, read_json, read_rows
from harness.safefiles import read_memory
from harness.runner import ModelCache, run

from conftest import as_overrides, tiny_hparams

REPO = Path(__file__).resolve().parent.parent
# The CLI in a real process that SIGKILLs itself at KILL_AT: "edit:K" right after the K-th edit
# call of this process returned (edit applied, rows not written), "row:N" right after its N-th row
# was written to a table.
KILLER = """
import os, signal, sys
from harness.editor import Editor
from harness.results import RowTable

kind, k = os.environ["KILL_AT"].split(":")
k, count = int(k), [0]

def die_at(n):
    count[0] += n
    if count[0] >= k:
        os.kill(os.getpid(), signal.SIGKILL)

if kind == "edit":
    _edit = Editor.edit
    def edit(self, *a, **kw):
        out = _edit(self, *a, **kw)
        die_at(1)
        return out
    Editor.edit = edit
else:
    _append = RowTable.append
    def append(self, row):
        wrote = _append(self, row)
        if wrote and self.path.name == "cases.csv":
            die_at(1)
        return wrote
    RowTable.append = append

from harness.cli import main
main()
"""
TIMING = ("_s", "_mb", "run_id", "snapshot_bytes", "report")  # columns that may differ between processes


def overrides(name: str, tmp_path: Path) -> list[str]:
    hp = tiny_hparams(name, tmp_path)
    return ["model=tiny", f"algorithm={name}", "device=cpu", "dtype=float32", "threads=1",
            "keep_original_weight=false", "batch_size=2", "data.limit=6", "eval.retention_at=[2,4]",
            *as_overrides(hp)]


def killed(ov: list[str], out: Path, kill_at: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_AT": kill_at}
    proc = subprocess.run([sys.executable, "-c", KILLER, *ov, f"hydra.run.dir={out}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-3000:]


def comparable(rows: list[dict]) -> dict[tuple, dict]:
    return {(r["case_id"], r["point"], r["step"]): {k: v for k, v in r.items() if not k.endswith(TIMING)}
            for r in rows}


@pytest.mark.parametrize("name", available())
def test_sigkilled_sequential_run_resumes_bit_identical(name: str, tmp_path: Path) -> None:
    if tiny_hparams(name, tmp_path) is None:
        pytest.skip(f"{name}: a third-party algorithm without tiny settings here")
    ov = overrides(name, tmp_path)
    cfg = to_config(compose_config(ov))
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    run(cfg, ref, ov, cache=ModelCache(), progress=False)

    killed(ov, resumed, "edit:2")  # step 2 applied in memory, its rows never written; checkpoint at step 1
    assert read_json(resumed / "checkpoint" / "runner.json")["position"] == 1
    killed(ov, resumed, "row:3")  # resumed, then killed while writing step 2's retention rows
    run(cfg, resumed, ov, cache=ModelCache(), progress=False)

    for file in ("delta.safetensors", "algorithm_state.safetensors", "memory.safetensors"):
        a, b = load_file(str(ref / "checkpoint" / file)), load_file(str(resumed / "checkpoint" / file))
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{file}: {key} differs"
    memory = [read_memory(d / "checkpoint" / "memory.safetensors", name) for d in (ref, resumed)]
    assert memory[0].state.structure_json() == memory[1].state.structure_json()  # IKE's facts, GRACE's labels
    a, b = comparable(read_rows(ref / "cases.csv")), comparable(read_rows(resumed / "cases.csv"))
    assert a.keys() == b.keys() and len(a) == 6 + 2 + 4 + 6  # 6 edit rows + retention of 2, 4 and 6 edits
    for key in a:
        assert a[key] == b[key], f"row {key} differs"
    assert read_rows(ref / "retention.csv") == read_rows(resumed / "retention.csv")


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, caplog) -> None:
    ov = ["experiment=smoke_sequential", "threads=1", "data.limit=8", "eval.retention_at=[2,4]"]
    cfg = to_config(compose_config(ov))
    cache = ModelCache()
    run(cfg, tmp_path, ov, cache=cache, progress=False)
    final = {k: v.clone() for k, v in load_file(str(tmp_path / "checkpoint" / "delta.safetensors")).items()}
    assert read_json(tmp_path / "checkpoint.old" / "runner.json")["position"] == 2
    blob = bytearray((tmp_path / "checkpoint" / "delta.safetensors").read_bytes())
    blob[-3] ^= 0xFF  # one flipped payload byte
    (tmp_path / "checkpoint" / "delta.safetensors").write_bytes(bytes(blob))
    rows = read_rows(tmp_path / "cases.csv")

    res = run(cfg, tmp_path, ov, cache=cache, progress=False)  # redoes steps 3-4 from checkpoint.old
    assert "trying the previous checkpoint" in caplog.text
    assert res.n_written == 0 and read_rows(tmp_path / "cases.csv") == rows
    again = load_file(str(tmp_path / "checkpoint" / "delta.safetensors"))
    assert all(torch.equal(final[k], again[k]) for k in final)

    for d in ("checkpoint", "checkpoint.old"):  # no usable checkpoint at all: refused, nothing touched
        (tmp_path / d / "editor.json").write_text("{")
    with pytest.raises(ResumeError, match="no usable checkpoint"):
        run(cfg, tmp_path, ov, cache=cache, progress=False)
    assert read_rows(tmp_path / "cases.csv") == rows
