"""The files of an Editor checkpoint: names, the manifest (``editor.json``) and how the files are bound together.

``Editor.save_checkpoint`` writes ``delta.safetensors``, ``algorithm_state.safetensors``,
``memory.safetensors`` and, last, ``editor.json`` with the edit count, the algorithm's name and
every file's checksum; ``Editor.load_checkpoint`` reads them back through ``read_manifest`` and
``check_belongs`` (docs/restore.md).
"""
from __future__ import annotations

import json
from pathlib import Path

from harness.safefiles import CheckedFile
from harness.snapshot import SnapshotError

CHECKPOINT_FORMAT = "harness-checkpoint-v2"
DELTA_FILE, STATE_FILE, MANIFEST_FILE = "delta.safetensors", "algorithm_state.safetensors", "editor.json"
MEMORY_FILE = "memory.safetensors"  # absent from checkpoints written before algorithms had memory


class CheckpointError(SnapshotError):
    """A checkpoint cannot be loaded (names the file); the model and the algorithm were left as they were."""


def read_manifest(path: Path) -> dict:
    """``editor.json``, parsed and type-checked; ``CheckpointError`` naming it otherwise."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint's manifest ({type(exc).__name__}: {exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{path}: checkpoint format {found!r}, expected {CHECKPOINT_FORMAT!r} (checkpoints "
                              "of older harness versions carry no checksums and cannot be verified)")
    n, algo, sums = manifest.get("n_edits"), manifest.get("algorithm"), manifest.get("checksums")
    if not (isinstance(n, int) and n >= 0 and isinstance(algo, str) and isinstance(sums, dict)):
        raise CheckpointError(f"{path}: expected n_edits (an int >= 0), algorithm (a name) and checksums (a dict)")
    return manifest


def check_belongs(manifest: dict, path: Path, delta: CheckedFile, state: CheckedFile) -> None:
    """The delta and the state are the files ``editor.json`` was written with, and the counts agree."""
    for f in (delta, state):
        if manifest["checksums"].get(f.path.name) != f.checksum:
            raise CheckpointError(f"{f.path}: not the file {path} was saved with (its checksum differs)")
    if delta.metadata.get("n_edits") != str(manifest["n_edits"]):
        raise CheckpointError(f"{delta.path}: holds {delta.metadata.get('n_edits')} edit(s), "
                              f"{path} says {manifest['n_edits']}")
