"""The Editor: snapshot -> apply -> probe -> restore (single-edit mode) or accumulate (sequential mode).

Single-edit mode (``keep_original_weight=True``): before each edit the Editor clones exactly the
parameters the algorithm declares (``weights_copy``) and the algorithm's state; after the probes it
restores both in a ``finally`` block, so an exception or Ctrl-C anywhere leaves the model as it was,
and verifies the restore: every target equals its snapshot bit for bit, and nothing else about the
model changed (``harness.signature.StateSignature``: every parameter and buffer, the module tree,
hooks, training and ``requires_grad`` flags, gradients). Violations raise ``RestoreError`` saying
what differs.

Sequential mode (``keep_original_weight=False``): edits accumulate. A step that raises is rolled
back to the state before that step. The Editor keeps the original value of every parameter touched
so far, so ``restore()`` returns to the base model at any time, ``save_delta`` writes the edited
tensors, and ``save_checkpoint``/``load_checkpoint`` let a sequential run resume bit for bit.

Memory (structural edits, ``harness.algorithms.memory``): an algorithm may install hooks or module
wrappers and declare a context transform. The Editor clones the algorithm's ``MemoryState`` before
each edit and always verifies the model with the memory detached, so anything ``detach`` does not
remove is a change outside the declared memory and raises ``RestoreError``. Single-edit mode
detaches and restores the memory in ``finally``; sequential mode attaches it again after the check
(or the memory from before a failed step), ``restore()`` removes it. The probes get the algorithm's
context. Checkpoints hold ``memory.safetensors`` (tensors, the structure as JSON in the checked
metadata); ``save_delta`` writes the same beside the delta (``memory_path``) when there is memory,
and ``Editor.apply_delta`` puts both on a base model.

Files are written and read by ``harness.editorfiles`` (``EditorFiles``, the Editor's base class) and
checked (``harness.safefiles``): every tensor carries a sha256, a delta the fingerprint of each base
value it replaces. ``load_checkpoint`` validates every file of a checkpoint before it touches the
model or the algorithm, and raises ``CheckpointError`` naming the file otherwise.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from harness.algorithms.base import AlgorithmError, EditAlgorithm
from harness.algorithms.memory import MemoryState
from harness.checkpointfiles import CHECKPOINT_FORMAT, CheckpointError
from harness.editorfiles import EditorFiles, clone_state
from harness.models import num_layers
from harness.probes.base import Measurement, ProbeSuite
from harness.safefiles import apply_delta, memory_path
from harness.signature import StateSignature
from harness.snapshot import SnapshotError, WeightsCopy
from harness.types import EditReport, EditRequest

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "EditOutcome", "Editor", "RestoreError", "apply_delta", "memory_path"]



class RestoreError(SnapshotError):
    """The model is not what it should be after a restore, or an edit changed something undeclared."""


@dataclass
class EditOutcome:
    """Everything one ``Editor.edit`` call produced.

    Attributes:
        requests: the batch that was edited.
        targets: the declared parameter names.
        report: the algorithm's report.
        pre, post: probe measurements before and after the edit (None without probes).
        timings: seconds for ``pre``, ``edit``, ``probe``, ``restore`` (copy back and bit-compare the
            targets) and ``verify`` (the whole-model ``StateSignature`` and its comparison).
        snapshot_bytes: size of the snapshot taken for this edit.
    """

    requests: tuple[EditRequest, ...]
    targets: tuple[str, ...]
    report: EditReport
    pre: Measurement | None = None
    post: Measurement | None = None
    timings: dict[str, float] = field(default_factory=dict)
    snapshot_bytes: int = 0


def _hold_state(algorithm: EditAlgorithm) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The algorithm's state as it is now, for a rollback: clones, or, for an algorithm that
    replaces its state rather than writing into it (``state_replaced``), the tensors themselves
    and their version counters (no copy of state that can be gigabytes at 7B widths)."""
    state = algorithm.state_dict()
    if not algorithm.state_replaced:
        return clone_state(state), {}
    return dict(state), {k: v._version for k, v in state.items()}


class Editor(EditorFiles):
    """Applies an edit algorithm to a model under exact snapshot/restore.

    Args:
        model, tok: a causal LM and its tokenizer.
        algorithm: any registered ``EditAlgorithm`` instance.
        probes: a probe suite (``measure``), or None to skip evaluation.
        keep_original_weight: True restores after every edit; False lets edits accumulate.
        offload_snapshot: keep snapshots on the CPU instead of the parameters' device.
        verify_untouched: record the model's whole state (``StateSignature``) after each edit to prove
            nothing undeclared changed.
    """

    def __init__(self, model: nn.Module, tok, algorithm: EditAlgorithm, probes: ProbeSuite | None = None,
                 keep_original_weight: bool = True, offload_snapshot: bool = False,
                 verify_untouched: bool = True) -> None:
        self.model = model
        self.tok = tok
        self.algorithm = algorithm
        self.probes = probes
        self.keep_original_weight = keep_original_weight
        self.offload_snapshot = offload_snapshot
        self.verify_untouched = verify_untouched
        self.weights_copy: WeightsCopy | None = None  # snapshot of the latest edit
        self.originals = WeightsCopy()  # base values of every parameter touched so far (sequential)
        self.n_edits = 0  # requests applied and kept (sequential mode)
        self._expected = StateSignature.take(model) if verify_untouched else StateSignature()
        self._base_state = clone_state(algorithm.state_dict())
        self._base_memory = algorithm.memory_state().clone()
        self.prepared = False  # algorithm.prepare has run on the base model
        self.prepare_seconds = 0.0

    def prepare(self) -> float:
        """Run the algorithm's ``prepare`` on the base model, once (later calls are free).

        The Editor calls it before the first edit and before a checkpoint is loaded, so whatever
        the algorithm derives from the model (templates, statistics, projectors) comes from the
        unedited model, never from an edited one.

        Returns:
            Seconds spent now (0.0 when already prepared).

        Raises:
            RuntimeError: the model already holds edits made through this Editor.
            RestoreError: ``prepare`` changed the model.
        """
        if self.prepared:
            return 0.0
        if len(self.originals):
            raise RuntimeError(f"{self.algorithm.name}: prepare must run on the base model, but this Editor's "
                               f"model holds {self.n_edits} edit(s); call restore() first")
        t = time.perf_counter()
        self.algorithm.prepare(self.model, self.tok)
        self._check_untouched(exclude=set())
        self.prepared = True
        self.prepare_seconds = time.perf_counter() - t
        return self.prepare_seconds

    # ------------------------------------------------------------------------------------------
    def evaluate(self, requests: Sequence[EditRequest], reference: Measurement | None = None) -> Measurement:
        """Run the probes on the model as it stands."""
        if self.probes is None:
            raise RuntimeError("this Editor has no probes")
        context = self.algorithm.context()
        extra = {} if context is None else {"context": context}
        return self.probes.measure(self.model, self.tok, list(requests), reference=reference, **extra)

    def declared_targets(self, requests: Sequence[EditRequest]) -> set[str]:
        """The algorithm's declared targets, checked to be parameter names of the model."""
        targets = set(self.algorithm.targets(self.model, list(requests)))
        params = dict(self.model.named_parameters())
        unknown = sorted(targets - params.keys())
        if unknown:
            raise AlgorithmError(f"{self.algorithm.name} declared targets that are not parameters of this model "
                                 f"({num_layers(self.model)} layers): {unknown}; check its layer/module hyperparameters")
        return targets

    def edit(self, requests: EditRequest | Sequence[EditRequest], pre: Measurement | None = None,
             evaluate: bool = True) -> EditOutcome:
        """Edit the model for a batch of requests, probe it, and restore or keep the edit.

        Args:
            requests: one request or a batch (one ``apply`` call).
            pre: pre-edit measurement of these requests, if already known (reused, not recomputed).
            evaluate: run the probes (pre and post) when the Editor has probes.

        Returns:
            An ``EditOutcome``.

        Raises:
            Whatever the algorithm or a probe raised, after the model was restored;
            ``RestoreError`` when the restore does not verify or anything outside the declared
            targets' values changed (parameters, buffers, hooks, flags, the module tree).
        """
        batch = (requests,) if isinstance(requests, EditRequest) else tuple(requests)
        probing = evaluate and self.probes is not None
        timings: dict[str, float] = {}
        t = time.perf_counter()
        if probing and pre is None:
            pre = self.evaluate(batch)
        timings["pre"] = time.perf_counter() - t
        timings["prepare"] = self.prepare()

        targets = self.declared_targets(batch)
        self.weights_copy = WeightsCopy.take(self.model, targets, offload=self.offload_snapshot)
        state_before, versions = _hold_state(self.algorithm)
        memory_before = self.algorithm.memory_state().clone()
        ok = False
        report, post = EditReport(), None
        try:
            t = time.perf_counter()
            report = self.algorithm.apply(self.model, self.tok, list(batch))
            timings["edit"] = time.perf_counter() - t
            t = time.perf_counter()
            if probing:
                post = self.evaluate(batch, reference=pre)
            timings["probe"] = time.perf_counter() - t
            ok = True
        finally:
            t = time.perf_counter()
            rolling_back = self.keep_original_weight or not ok
            self.algorithm.detach(self.model)
            if rolling_back:
                self._put_back(self.weights_copy, state_before, versions, memory_before)
            else:
                self._keep(targets)
            timings["restore"] = time.perf_counter() - t
            t = time.perf_counter()
            self._check_untouched(exclude=set() if rolling_back else targets)
            if not self.keep_original_weight:
                self.algorithm.attach(self.model)  # the memory persists (the one before a failed step)
            timings["verify"] = time.perf_counter() - t
        if not self.keep_original_weight:
            self.n_edits += len(batch)
        return EditOutcome(batch, tuple(sorted(targets)), report, pre, post, timings, self.weights_copy.nbytes)

    # ------------------------------------------------------------------------------------------
    def _put_back(self, snap: WeightsCopy, state: dict[str, torch.Tensor], versions: dict[str, int],
                  memory: MemoryState) -> None:
        snap.restore(self.model)
        written = sorted(k for k, v in versions.items() if state[k]._version != v)
        if written:
            raise RestoreError(f"{self.algorithm.name} declares state_replaced but wrote into its state "
                               f"{written} in place; the state before the edit is lost")
        self.algorithm.load_state_dict(state)
        self.algorithm.load_memory(memory)
        bad = snap.mismatches(self.model)
        if bad:
            raise RestoreError(f"restore verification failed for {bad}")

    def _keep(self, targets: set[str]) -> None:
        for name in targets:  # the snapshot holds base values of names touched for the first time
            if name not in self.originals:
                self.originals.tensors[name] = self.weights_copy.tensors[name]

    def _check_untouched(self, exclude: set[str]) -> None:
        """Compare the model with the expected signature, ignoring the values of ``exclude``; adopt it if equal."""
        if not self.verify_untouched:
            return
        now = StateSignature.take(self.model)
        diffs = self._expected.differences(now, ignore_values=exclude)
        if diffs:
            raise RestoreError(f"{self.algorithm.name}: the model changed outside the declared targets: "
                               + "; ".join(diffs))
        self._expected = now

    # ------------------------------------------------------------------------------------------
    @contextmanager
    def detached(self) -> Iterator[None]:
        """The model without the algorithm's memory inside the block (its parameter names as the base's);
        the memory is attached again afterwards in sequential mode."""
        self.algorithm.detach(self.model)
        try:
            yield
        finally:
            if not self.keep_original_weight:
                self.algorithm.attach(self.model)

    def restore(self) -> None:
        """Return to the base model (and the algorithm's initial state and memory), verified bit for bit."""
        self.algorithm.detach(self.model)
        self.originals.restore(self.model)
        self.originals.verify(self.model)
        self.algorithm.load_state_dict(clone_state(self._base_state))
        self.algorithm.load_memory(self._base_memory.clone())
        self._check_untouched(exclude=set(self.originals.names))  # now bit-equal to their verified originals
        self.originals = WeightsCopy()
        self.n_edits = 0
