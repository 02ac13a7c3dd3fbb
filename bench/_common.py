"""What the SmolLM2 benchmark scripts share: the model, CounterFact requests, configured algorithms."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

from harness.algorithms import get_algorithm
from harness.cli import compose_config, to_config
from harness.config import validate
from harness.data import load_requests
from harness.models import load_model
from harness.types import EditRequest

# The development data (full CounterFact and zsRE files): ``../shared/data`` beside the repository.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_file(name: str) -> Path:
    """A file of the development data beside the repository (``../shared/data/<name>``).

    Raises:
        SystemExit: the file is not there (the message names the path and says how to give another).
    """
    path = SHARED_DATA / name
    if not path.is_file():
        raise SystemExit(f"development data not found: {path} (../shared/data beside the repository); "
                         "give a data file with --data")
    return path


def smollm2_and_requests(n: int, data: Optional[str] = None, threads: int = 0) -> tuple[Any, Any, list[EditRequest]]:
    """SmolLM2 (fp32, CPU) and the first ``n`` CounterFact requests of ``data`` (None: the shipped sample).

    ``threads`` > 0 sets torch's thread count first; quiet logging.
    """
    logging.basicConfig(level=logging.WARNING)
    if threads:
        torch.set_num_threads(threads)
    model, tok = load_model("smollm2", device="cpu", dtype="float32")
    return model, tok, list(load_requests("counterfact", data, limit=n).requests)


def configured(name: str, **changes: Any):
    """Algorithm ``name`` with the hyperparameters the runs compose for the default model (SmolLM2),
    ``changes`` applied (blocks as mappings: ``target={"num_grad_steps": 4}`` changes that key only).

    Using the shipped config keeps the statistics cache key (C, P) the same as the runs'.
    """
    hp = validate(to_config(compose_config([f"algorithm={name}"])))
    return get_algorithm(name)(hp, **changes)
