"""Cost in every row: peak memory per call (harness/memory.py) beside the time columns, and the
summary's totals and per-edit means (harness.results.cost_summary)."""
from __future__ import annotations

import math
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from harness import memory
from harness.cli import compose_config, to_config
from harness.memory import PeakMemory
from harness.results import cost_summary, read_rows
from harness.runner import ModelCache, run

MB = 1024 * 1024
CPU = [torch.device("cpu")]
linux_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")


def _hold(mb: int, seconds: float = 0.0) -> None:
    x = torch.ones(mb * MB // 4)  # touched, so resident
    time.sleep(seconds)
    del x


@linux_proc
def test_rss_peak_is_the_blocks_own_not_the_processes():
    with PeakMemory(CPU) as big:
        _hold(200)
    with PeakMemory(CPU) as small:
        _hold(20)
    if big.peak.kind != "rss":
        pytest.skip("/proc/self/clear_refs cannot be written here (the sampled fallback is tested below)")
    assert big.peak.peak_bytes - big.peak.start_bytes >= 190 * MB
    # the high-water mark was reset: the second block does not inherit the first one's peak
    assert small.peak.peak_bytes - small.peak.start_bytes < 100 * MB
    cells = big.peak.cells()
    assert cells["mem_kind"] == "rss" and cells["mem_increase_mb"] >= 190 and cells["mem_peak_mb"] > 190


@linux_proc
def test_sampled_rss_fallback_sees_a_held_allocation(monkeypatch):
    monkeypatch.setattr(memory, "_reset_hwm", lambda: False)
    with PeakMemory(CPU, interval=0.005) as m:
        _hold(150, seconds=0.2)
    assert m.peak.kind == "rss_sampled"
    assert m.peak.peak_bytes - m.peak.start_bytes >= 140 * MB


def test_process_peak_where_there_is_no_proc(monkeypatch):
    monkeypatch.setattr(memory, "_STATUS", Path("/nonexistent/status"))
    with PeakMemory(CPU) as m:
        pass
    assert m.peak.kind == "rss_process" and m.peak.peak_bytes > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_allocator_peak():
    dev = torch.device("cuda", 0)
    with PeakMemory([dev, torch.device("cpu")]) as m:
        x = torch.ones(64 * MB // 4, device=dev)
        del x
    assert m.peak.kind == "cuda" and m.peak.peak_bytes - m.peak.start_bytes >= 64 * MB


def test_cost_summary_counts_each_call_once():
    rows = [  # one call of 2 requests, one of 1 (failed), a retention pass over 2 cases
        {"point": "edit", "status": "ok", "batch_size": "2", "pre_batch_size": "2", "time_pre_s": "1.0",
         "time_edit_s": "4.0", "time_probe_s": "2.0", "time_restore_s": "0.5", "time_verify_s": "0.1",
         "time_prepare_s": "3.0", "mem_kind": "rss", "mem_peak_mb": "900", "mem_increase_mb": "50"},
        {"point": "edit", "status": "ok", "batch_size": "2", "pre_batch_size": "2", "time_pre_s": "1.0",
         "time_edit_s": "4.0", "time_probe_s": "2.0", "time_restore_s": "0.5", "time_verify_s": "0.1",
         "time_prepare_s": "", "mem_kind": "rss", "mem_peak_mb": "900", "mem_increase_mb": "50"},
        {"point": "edit", "status": "error", "batch_size": "1", "pre_batch_size": "1", "time_pre_s": "0.5"},
        {"point": "retention", "status": "ok", "batch_size": "2", "time_probe_s": "6.0", "mem_kind": "rss",
         "mem_peak_mb": "950", "mem_increase_mb": "20"},
        {"point": "retention", "status": "ok", "batch_size": "2", "time_probe_s": "6.0", "mem_kind": "rss",
         "mem_peak_mb": "950", "mem_increase_mb": "20"},
    ]
    c = cost_summary(rows)
    assert (c["pre_s_total"], c["edit_s_total"], c["probe_s_total"]) == (1.5, 4.0, 2.0)
    assert c["retention_s_total"] == 6.0
    assert c["total_s"] == pytest.approx(1.5 + 4.0 + 2.0 + 0.5 + 0.1 + 6.0 + 3.0)
    assert c["edit_s_per_edit"] == 2.0 and c["total_s_per_edit"] == pytest.approx(17.1 / 2)
    assert (c["mem_kind"], c["mem_peak_mb"], c["mem_increase_mb_max"]) == ("rss", 950.0, 50.0)
    empty = cost_summary([])
    assert empty["total_s"] == 0 and math.isnan(empty["total_s_per_edit"]) and math.isnan(empty["mem_peak_mb"])


@pytest.mark.parametrize("experiment,n_edit_rows", [("smoke", 3), ("smoke_sequential", 4)])
def test_every_row_and_the_summary_carry_the_cost(tmp_path: Path, experiment: str, n_edit_rows: int):
    ov = [f"experiment={experiment}", "threads=1", "data.limit=4" if experiment == "smoke_sequential"
          else "data.limit=3"]
    run(to_config(compose_config(ov)), tmp_path, ov, cache=ModelCache(), progress=False)
    rows = read_rows(tmp_path / "cases.csv")
    edits = [r for r in rows if r["point"] == "edit"]
    assert len(edits) == n_edit_rows
    measured = [r for r in rows if r["mem_kind"]]
    assert measured == rows  # edit and retention rows alike
    assert all(float(r["mem_peak_mb"]) > 50 and float(r["mem_increase_mb"]) >= 0 for r in rows)
    summary = pd.read_csv(tmp_path / "summary.csv")
    first = summary.iloc[0]
    expected = sum(float(r["time_edit_s"]) / float(r["batch_size"]) for r in edits)
    assert first["edit_s_total"] == pytest.approx(expected, abs=1e-3)
    assert first["mem_peak_mb"] == pytest.approx(max(float(r["mem_peak_mb"]) for r in rows))
    assert first["total_s"] >= first["edit_s_total"] + first["probe_s_total"] > 0
    if experiment == "smoke_sequential":
        assert any(r["point"] == "retention" for r in rows) and first["retention_s_total"] > 0
