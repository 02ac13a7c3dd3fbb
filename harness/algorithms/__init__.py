"""Edit algorithms: the registry and the built-in plugins (one module each)."""
from __future__ import annotations

import importlib

from harness.algorithms.base import (
    AlgorithmError,
    EditAlgorithm,
    add_deltas,
    available,
    create,
    get_algorithm,
    register,
)
from harness.algorithms.hparams import make_hparams

# Built-in modules register themselves on import.
_BUILTIN = ("none", "direct", "finetune", "lora", "rome", "memit", "alphaedit", "emmet", "pmet", "grace",
            "ike", "wise", "kn", "ultraedit")
for _mod in _BUILTIN:
    importlib.import_module(f"harness.algorithms.{_mod}")

__all__ = ["AlgorithmError", "EditAlgorithm", "add_deltas", "available", "create", "get_algorithm",
           "make_hparams", "register"]
