"""harness: an experiment harness for editing the weights of language models.

Public API::

    from harness import Editor, EditRequest, create_algorithm, load_model, build_probes

Threads: unless the environment says otherwise, OpenMP's worker threads sleep instead of spinning
while they wait (``OMP_WAIT_POLICY=PASSIVE``). It must be set before torch loads its OpenMP runtime,
hence here. Spinning threads on cores that other processes keep busy made CPU work about seven times
slower than sleeping ones in ``bench/bench_threads.py`` (two threads, two busy processes beside).
"""
import os as _os
import sys as _sys

if "torch" not in _sys.modules:  # too late once torch is loaded: the runtime read the environment then
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from harness.algorithms import EditAlgorithm, available, create as create_algorithm, get_algorithm, register
from harness.editor import CheckpointError, EditOutcome, Editor, RestoreError, apply_delta
from harness.models import load_model, model_spec
from harness.snapshot import SnapshotError, WeightsCopy, fingerprint
from harness.types import QA, EditReport, EditRequest

__all__ = [
    "QA", "CheckpointError", "EditAlgorithm", "EditOutcome", "EditReport", "EditRequest", "Editor", "RestoreError", "SnapshotError",
    "WeightsCopy", "apply_delta", "available", "create_algorithm", "fingerprint", "get_algorithm", "load_model",
    "model_spec", "register",
]
