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
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from harness.algorithms.base import AlgorithmError, EditAlgorithm
from harness.models import num_layers
from harness.probes.base import Measurement, ProbeSuite
from harness.signature import StateSignature
from harness.snapshot import SnapshotError, WeightsCopy, fingerprint_hex
from harness.types import EditReport, EditRequest

log = logging.getLogger(__name__)


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


def _clone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


class Editor:
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
        self._base_state = _clone_state(algorithm.state_dict())

    # ------------------------------------------------------------------------------------------
    def evaluate(self, requests: Sequence[EditRequest], reference: Measurement | None = None) -> Measurement:
        """Run the probes on the model as it stands."""
        if self.probes is None:
            raise RuntimeError("this Editor has no probes")
        return self.probes.measure(self.model, self.tok, list(requests), reference=reference)

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

        targets = self.declared_targets(batch)
        self.weights_copy = WeightsCopy.take(self.model, targets, offload=self.offload_snapshot)
        state_before = _clone_state(self.algorithm.state_dict())
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
            if rolling_back:
                self._put_back(self.weights_copy, state_before)
            else:
                self._keep(targets)
            timings["restore"] = time.perf_counter() - t
            t = time.perf_counter()
            self._check_untouched(exclude=set() if rolling_back else targets)
            timings["verify"] = time.perf_counter() - t
        if not self.keep_original_weight:
            self.n_edits += len(batch)
        return EditOutcome(batch, tuple(sorted(targets)), report, pre, post, timings, self.weights_copy.nbytes)

    # ------------------------------------------------------------------------------------------
    def _put_back(self, snap: WeightsCopy, state: dict[str, torch.Tensor]) -> None:
        snap.restore(self.model)
        self.algorithm.load_state_dict(state)
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
    def restore(self) -> None:
        """Return to the base model (and the algorithm's initial state), verified bit for bit."""
        self.originals.restore(self.model)
        self.originals.verify(self.model)
        self.algorithm.load_state_dict(_clone_state(self._base_state))
        self._check_untouched(exclude=set(self.originals.names))  # now bit-equal to their verified originals
        self.originals = WeightsCopy()
        self.n_edits = 0

    def save_delta(self, path: str | Path) -> list[str]:
        """Write the edited tensors (only those touched so far) to a safetensors file.

        The file holds each edited parameter's current value, and in its metadata the fingerprint
        of the base value it replaces, so ``apply_delta`` reproduces the edited model exactly and
        refuses a different base.

        Returns:
            The names written.
        """
        params = dict(self.model.named_parameters())
        names = self.originals.names
        meta = {"format": "harness-delta-v1", "n_edits": str(self.n_edits)}
        for n in names:
            meta["base:" + n] = fingerprint_hex(self.originals.tensors[n])
        save_file({n: params[n].detach().contiguous().cpu() for n in names}, str(path), metadata=meta)
        return names

    def save_checkpoint(self, directory: str | Path) -> None:
        """Save what a sequential run needs to resume: delta, originals, algorithm state, edit count."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.save_delta(d / "delta.safetensors.tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.algorithm.state_dict().items()},
                  str(d / "algorithm_state.safetensors.tmp"))
        (d / "editor.json.tmp").write_text(json.dumps({"n_edits": self.n_edits, "algorithm": self.algorithm.name}))
        for name in ("delta.safetensors", "algorithm_state.safetensors", "editor.json"):  # editor.json last
            (d / (name + ".tmp")).replace(d / name)

    def load_checkpoint(self, directory: str | Path) -> None:
        """Put a checkpoint onto this Editor's model, which must be the base model."""
        d = Path(directory)
        names = apply_delta(self.model, d / "delta.safetensors", originals=self.originals)
        state = load_file(str(d / "algorithm_state.safetensors"))
        self.algorithm.load_state_dict(state)
        self.n_edits = int(json.loads((d / "editor.json").read_text())["n_edits"])
        if self.verify_untouched:
            self._expected.refresh(self.model, names)


def apply_delta(model: nn.Module, path: str | Path, originals: WeightsCopy | None = None,
                check_base: bool = True) -> list[str]:
    """Put a ``save_delta`` file onto a copy of the base model, in place.

    Args:
        originals: when given, the replaced base values are added to it (so the edit can be undone).
        check_base: refuse when a parameter's current value is not the base the delta was made from.

    Returns:
        The names written.

    Raises:
        SnapshotError: naming the parameter whose name, shape, dtype or base value does not fit.
    """
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    delta = WeightsCopy.load(path, model)
    params = dict(model.named_parameters())
    if check_base:
        for n in delta.names:
            want = meta.get("base:" + n)
            have = fingerprint_hex(params[n])
            if want is not None and want != have:
                raise SnapshotError(f"{path}: parameter {n!r} of this model is not the base the delta was made from")
    if originals is not None:
        originals.add(model, delta.names)
    delta.restore(model)
    return delta.names
