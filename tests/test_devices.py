"""Models spread over devices: no code assumes one ``model.device``; every tensor is used where its
parameter lives. On CPU the single-device assumption is tested by taking ``model.device`` away;
the real split (accelerate's ``dispatch_model`` over two GPUs) runs where there are two GPUs."""
from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel

from harness import EditRequest, Editor, create_algorithm
from harness.algorithms import available
from harness.cli import compose_config, to_config
from harness.models import tiny_model
from harness.runner import ModelCache, run
from harness.snapshot import bit_equal

from conftest import tiny_hparams

REQS = [EditRequest(case_id="1", prompt="The mother tongue of {} is", subject="Danielle Darrieux",
                    target_new="English", target_true="French"),
        EditRequest(case_id="2", prompt="{} plays the", subject="Toko Yasuda", target_new="piano",
                    target_true="guitar")]
LOCATED = ("rome", "memit", "alphaedit")


@pytest.fixture
def no_model_device(monkeypatch):
    """``model.device`` (one device for a whole model) raises while the test runs."""
    def refuse(self):
        raise AssertionError("code read model.device: a model spread over devices has no single device")

    monkeypatch.setattr(PreTrainedModel, "device", property(refuse))


@pytest.mark.parametrize("name", [n for n in LOCATED + ("ft", "lora") if n in available()])
def test_algorithms_never_read_model_device(name, tmp_path, no_model_device):
    model, tok = tiny_model("llama", n_layers=2)
    algo = create_algorithm(name, tiny_hparams(name, tmp_path))
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = Editor(model, tok, algo, probes=None, keep_original_weight=False)
    editor.edit(REQS)
    assert any(not bit_equal(p, base[n]) for n, p in model.named_parameters())
    editor.restore()


def test_a_run_with_probes_never_reads_model_device(tmp_path, no_model_device):
    ov = ["experiment=smoke_sequential", "threads=1", "data.limit=4"]
    result = run(to_config(compose_config(ov)), tmp_path, ov, cache=ModelCache(), progress=False)
    assert result.n_errors == 0 and result.n_cases == 4


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices for a real split")


@two_gpus
@pytest.mark.parametrize("name", LOCATED)
def test_split_model_edits_like_one_device(name, tmp_path):
    """The tiny Llama with its blocks on cuda:0 and cuda:1 edits like the same model on cuda:0."""
    from accelerate import dispatch_model

    edits = {}
    for split in (False, True):
        model, tok = tiny_model("llama", n_layers=4)
        if split:
            dmap = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
                    "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}
            model = dispatch_model(model, device_map=dmap)
        else:
            model = model.to("cuda:0")
        hp = {**tiny_hparams(name, tmp_path), **({"layer": 2} if name == "rome" else {"layers": [1, 2]})}
        algo = create_algorithm(name, hp)
        base = {n: p.detach().clone() for n, p in model.named_parameters()}
        editor = Editor(model, tok, algo, probes=None, keep_original_weight=False)
        torch.manual_seed(0)
        editor.edit(REQS)
        edits[split] = {n: (p.detach() - base[n]).cpu() for n, p in model.named_parameters()
                        if not bit_equal(p, base[n])}
        assert all(p.device == base[n].device for n, p in model.named_parameters())  # nothing moved
        editor.restore()
        assert all(bit_equal(p, base[n]) for n, p in model.named_parameters())
    assert edits[True].keys() == edits[False].keys() and edits[True]
    for n, d in edits[False].items():
        assert float((edits[True][n] - d).norm() / d.norm()) < 1e-4, n


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: bench_gpu.py would run the benchmark")
def test_gpu_benchmark_says_clearly_there_is_no_gpu():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(root / "bench" / "bench_gpu.py")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
