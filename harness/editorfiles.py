"""The Editor's files: the edited weights as a delta, the algorithm's memory beside it, checkpoints.

``EditorFiles`` is the part of ``harness.editor.Editor`` that writes and reads files (kept apart so
the edit/restore logic reads on its own). Every file is checked (``harness.safefiles``): tensors carry
a sha256, a delta the fingerprint of each base value it replaces, a memory file its structure as JSON
in the checked metadata. ``load_checkpoint`` and ``apply_delta`` validate everything before they touch
the model or the algorithm, and raise ``CheckpointError`` / ``SnapshotError`` naming the file otherwise.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from harness.algorithms.memory import MemoryState, check_memory
from harness.checkpointfiles import (CHECKPOINT_FORMAT, DELTA_FILE, MANIFEST_FILE, MEMORY_FILE, STATE_FILE,
                                     CheckpointError, check_belongs, read_manifest)
from harness.fingerprints import fingerprint_hex
from harness.safefiles import (DELTA_FORMAT, STATE_FORMAT, memory_path, read_checked, read_delta, read_memory,
                               write_checked, write_delta, write_memory)
from harness.snapshot import SnapshotError

__all__ = ["EditorFiles", "clone_state"]


def clone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached copies of an algorithm's state tensors."""
    return {k: v.detach().clone() for k, v in state.items()}


class EditorFiles:
    """Delta, memory and checkpoint files of an ``Editor`` (a mixin: it uses the Editor's model,
    algorithm, originals, edit count, expected signature and base memory)."""

    model: Any
    algorithm: Any
    originals: Any
    n_edits: int
    keep_original_weight: bool
    verify_untouched: bool
    _expected: Any
    _base_memory: MemoryState

    def save_delta(self, path: str | Path) -> list[str]:
        """Write the edited tensors (only those touched so far) to a checked safetensors file.

        The file (``harness.safefiles``, format ``harness-delta-v2``) holds each edited parameter's
        current value with its sha256, and the fingerprint of the base value it replaces, so
        ``apply_delta`` reproduces the edited model exactly and refuses a corrupt file or another base.
        When the algorithm holds memory, it is written beside it (``memory_path(path)``, format
        ``harness-memory-v1``) and a stale memory file there is removed; ``Editor.apply_delta`` puts
        both on a base model.

        Returns:
            The names written.
        """
        names = self._save_delta(path)[0]
        memory, side = self.algorithm.memory_state(), memory_path(path)
        if memory.empty:
            side.unlink(missing_ok=True)
        else:
            write_memory(side, memory, self.algorithm.name, self.n_edits)
        return names

    def apply_delta(self, path: str | Path) -> list[str]:
        """Put a ``save_delta`` file, and the memory file beside it if any, onto this Editor's model.

        The model must be the base (this Editor holds no edits); the algorithm must be the one that
        made the memory. Everything is checked before anything is written; afterwards the edits
        count as this Editor's (``restore()`` undoes them), and the memory is attached.

        Returns:
            The parameter names written.

        Raises:
            RuntimeError: this Editor already holds edits, or is in single-edit mode.
            SnapshotError: a file at fault (named), or another algorithm's memory; nothing written then.
        """
        if self.keep_original_weight:
            raise RuntimeError("apply_delta keeps the edits: use an Editor with keep_original_weight=False")
        if len(self.originals) or not self.algorithm.memory_state().equals(self._base_memory):
            raise RuntimeError("apply_delta needs the base model: this Editor holds edits; call restore() first")
        delta = read_delta(self.model, path, check_base=True)
        side = memory_path(path)
        memory = read_memory(side, self.algorithm.name) if side.exists() else None
        if memory is not None:
            self._load_memory(memory.state, memory.path)
        names = write_delta(self.model, delta.tensors, self.originals)
        self.n_edits = int(delta.metadata.get("n_edits", "0"))
        if self.verify_untouched:
            self._expected.refresh(self.model, names)
        self.algorithm.attach(self.model)
        return names

    def _load_memory(self, memory: MemoryState, path: Path) -> None:
        """Give the algorithm ``memory`` (checked); ``CheckpointError`` naming ``path`` when refused."""
        before = self.algorithm.memory_state().clone()
        try:
            check_memory(memory, str(path))
            self.algorithm.load_memory(memory)
        except Exception as exc:  # whatever the algorithm refuses with: put its memory back, name the file
            self.algorithm.load_memory(before)
            raise CheckpointError(f"{path}: {self.algorithm.name} does not accept this memory: {exc}") from exc

    def _save_delta(self, path: str | Path) -> tuple[list[str], str]:
        with self.detached():
            params = dict(self.model.named_parameters())
        names = self.originals.names
        meta = {"format": DELTA_FORMAT, "n_edits": str(self.n_edits)}
        meta.update({"base:" + n: fingerprint_hex(self.originals.tensors[n]) for n in names})
        return names, write_checked(path, {n: params[n] for n in names}, meta)

    def save_checkpoint(self, directory: str | Path) -> None:
        """Save what a sequential run needs to resume: delta, algorithm state, memory, edit count.

        ``editor.json`` is written last and records the checksums of the other files.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _, delta_sum = self._save_delta(d / (DELTA_FILE + ".tmp"))
        state_sum = write_checked(d / (STATE_FILE + ".tmp"), self.algorithm.state_dict(), {"format": STATE_FORMAT})
        memory_sum = write_memory(d / (MEMORY_FILE + ".tmp"), self.algorithm.memory_state(), self.algorithm.name,
                                  self.n_edits)
        manifest = {"format": CHECKPOINT_FORMAT, "n_edits": self.n_edits, "algorithm": self.algorithm.name,
                    "checksums": {DELTA_FILE: delta_sum, STATE_FILE: state_sum, MEMORY_FILE: memory_sum}}
        (d / (MANIFEST_FILE + ".tmp")).write_text(json.dumps(manifest, indent=1))
        for name in (DELTA_FILE, STATE_FILE, MEMORY_FILE, MANIFEST_FILE):  # editor.json last
            (d / (name + ".tmp")).replace(d / name)

    def load_checkpoint(self, directory: str | Path) -> None:
        """Put a checkpoint onto this Editor's model, which must be the base model.

        The algorithm is prepared first (on the base model), so nothing it derives from the model
        is computed on the checkpoint's edited weights. Then everything is validated before the
        model or the algorithm is touched: ``editor.json`` parses and names this Editor's algorithm;
        the delta and the algorithm state match their checksums and the ones ``editor.json``
        recorded; the delta's values are finite and its bases are this model's; the edit counts
        agree; the algorithm accepts the state (tried on the algorithm, and its previous state put
        back if it refuses).

        Raises:
            CheckpointError: naming the file at fault; the model and the algorithm are then as they were.
        """
        self.prepare()
        d = Path(directory)
        manifest = read_manifest(d / MANIFEST_FILE)
        if manifest["algorithm"] != self.algorithm.name:
            raise CheckpointError(f"{d / MANIFEST_FILE}: the checkpoint was made by algorithm "
                                  f"{manifest['algorithm']!r}, this Editor runs {self.algorithm.name!r}")
        try:
            delta = read_delta(self.model, d / DELTA_FILE, check_base=True)
            state = read_checked(d / STATE_FILE, STATE_FORMAT)
            # checkpoints written before memories existed have no memory file: no memory
            memory = read_memory(d / MEMORY_FILE, self.algorithm.name) if MEMORY_FILE in manifest["checksums"] else None
        except SnapshotError as exc:
            raise CheckpointError(str(exc)) from exc
        check_belongs(manifest, d / MANIFEST_FILE, delta, state)
        if memory is not None and manifest["checksums"][MEMORY_FILE] != memory.checksum:
            raise CheckpointError(f"{memory.path}: not the file {d / MANIFEST_FILE} was saved with (its checksum differs)")
        self._load_memory(memory.state if memory is not None else MemoryState(), d / MEMORY_FILE)
        before = clone_state(self.algorithm.state_dict())
        try:
            self.algorithm.load_state_dict(clone_state(state.tensors))
        except Exception as exc:  # whatever the algorithm refuses with: put its state back, name the file
            self.algorithm.load_state_dict(before)
            self.algorithm.load_memory(self._base_memory.clone())
            raise CheckpointError(f"{state.path}: {self.algorithm.name} does not accept this state: {exc}") from exc
        try:
            names = write_delta(self.model, delta.tensors, self.originals)
        except BaseException:
            self.algorithm.load_state_dict(before)
            self.algorithm.load_memory(self._base_memory.clone())
            raise
        self.n_edits = manifest["n_edits"]
        if self.verify_untouched:
            self._expected.refresh(self.model, names)
        if not self.keep_original_weight:
            self.algorithm.attach(self.model)
