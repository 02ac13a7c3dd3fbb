"""harness: an experiment harness for editing the weights of language models.

Public API::

    from harness import Editor, EditRequest, create_algorithm, load_model, build_probes
"""
from harness.algorithms import EditAlgorithm, available, create as create_algorithm, get_algorithm, register
from harness.editor import EditOutcome, Editor, RestoreError, apply_delta
from harness.models import load_model, model_spec
from harness.snapshot import SnapshotError, WeightsCopy, fingerprint
from harness.types import QA, EditReport, EditRequest

__all__ = [
    "QA", "EditAlgorithm", "EditOutcome", "EditReport", "EditRequest", "Editor", "RestoreError", "SnapshotError",
    "WeightsCopy", "apply_delta", "available", "create_algorithm", "fingerprint", "get_algorithm", "load_model",
    "model_spec", "register",
]
