"""Safe files: deltas and checkpoints that refuse to load when anything is off, and touch nothing then.

Corruptions are real: bytes flipped in the data section or the header of the written file, a file
cut short, garbage, a file from another checkpoint. Each must be refused with an error naming the
file (and the tensor), and the model and the algorithm must be exactly as before.
"""
from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from harness import EditRequest, Editor, apply_delta
from harness.algorithms.base import AlgorithmError, EditAlgorithm
from harness.editor import CheckpointError
from harness.models import tiny_model
from harness.safefiles import DELTA_FORMAT, STATE_FORMAT, read_checked, write_checked
from harness.snapshot import SnapshotError, bit_equal
from harness.types import EditReport

REQ = EditRequest("0", "The mother tongue of {} is", "Danielle Darrieux", "English", "French")
DOWN = "model.layers.{}.mlp.down_proj.weight"


class Counting(EditAlgorithm):
    """Test algorithm: adds seeded noise (or ``fill``) to two down-projections; state is a counter."""

    name = "counting"

    def __init__(self, fill=None):
        super().__init__()
        self.fill, self.calls, self.counter = fill, 0, torch.zeros(3)

    def targets(self, model, requests):
        return {DOWN.format(0), DOWN.format(1)}

    def apply(self, model, tok, requests):
        self.calls += 1
        self.counter += 1
        g = torch.Generator().manual_seed(self.calls)
        with torch.no_grad():
            for n in sorted(self.targets(model, requests)):
                p = model.get_parameter(n)
                p.add_(torch.randn(p.shape, generator=g)) if self.fill is None else p.fill_(self.fill)
        return EditReport()

    def state_dict(self):
        return {"counter": self.counter}

    def load_state_dict(self, state):
        if set(state) != {"counter"} or state["counter"].shape != (3,):
            raise AlgorithmError(f"counting: expected a 'counter' of shape (3,), got {sorted(state)}")
        self.counter = state["counter"].clone()


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _unchanged(model, ref):
    return all(bit_equal(p, ref[n]) for n, p in model.named_parameters())


def _edited_editor(n_edits=2, fill=None):
    model, tok = tiny_model(seed=0)
    editor = Editor(model, tok, Counting(fill), keep_original_weight=False)
    for _ in range(n_edits):
        editor.edit(REQ)
    return editor


def _data_start(path):
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + header_len


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------------------------
# deltas


def test_delta_round_trip_and_format(tmp_path):
    editor = _edited_editor()
    path = tmp_path / "delta.safetensors"
    editor.save_delta(path)
    f = read_checked(path, DELTA_FORMAT)
    assert f.metadata["n_edits"] == "2" and sorted(f.tensors) == [DOWN.format(0), DOWN.format(1)]
    assert all(f.metadata["base:" + n] and f.metadata["sha256:" + n] for n in f.tensors)
    fresh, _ = tiny_model(seed=0)
    assert apply_delta(fresh, path) == [DOWN.format(0), DOWN.format(1)]
    assert _unchanged(fresh, _state(editor.model))


def test_bit_flipped_payload_is_refused_naming_tensor_and_file(tmp_path):
    path = tmp_path / "delta.safetensors"
    _edited_editor().save_delta(path)
    _flip(path, _data_start(path) + 5)  # a byte of the first tensor's data (names sort: layers.0 first)
    fresh, _ = tiny_model(seed=0)
    base = _state(fresh)
    with pytest.raises(SnapshotError, match=rf"{path}.*tensor 'model\.layers\.0\.mlp\.down_proj\.weight' "
                                            r"does not match its checksum"):
        apply_delta(fresh, path)
    assert _unchanged(fresh, base)


def test_bit_flipped_metadata_is_refused(tmp_path):
    path = tmp_path / "delta.safetensors"
    _edited_editor().save_delta(path)
    data = path.read_bytes()
    assert data.count(b'"n_edits":"2"') == 1
    path.write_bytes(data.replace(b'"n_edits":"2"', b'"n_edits":"3"'))
    with pytest.raises(SnapshotError, match=rf"{path}: the metadata does not match its checksum"):
        apply_delta(tiny_model(seed=0)[0], path)


def test_nan_delta_is_refused_and_nothing_is_written(tmp_path):
    path = tmp_path / "delta.safetensors"
    _edited_editor(n_edits=1, fill=float("nan")).save_delta(path)
    fresh, _ = tiny_model(seed=0)
    base = _state(fresh)
    with pytest.raises(SnapshotError, match=r"down_proj\.weight' has non-finite values"):
        apply_delta(fresh, path)
    with pytest.raises(SnapshotError, match="non-finite"):
        apply_delta(fresh, path, check_base=False)
    assert _unchanged(fresh, base)


def test_a_bad_later_tensor_keeps_earlier_ones_from_being_written(tmp_path):
    model, _ = tiny_model(seed=0)
    base = _state(model)
    good = base[DOWN.format(0)] + 1
    bad = torch.full_like(base[DOWN.format(1)], float("inf"))
    path = tmp_path / "delta.safetensors"
    write_checked(path, {DOWN.format(0): good, DOWN.format(1): bad}, {"format": DELTA_FORMAT})
    with pytest.raises(SnapshotError, match=r"layers\.1\.mlp\.down_proj\.weight' has non-finite"):
        apply_delta(model, path, check_base=False)
    assert _unchanged(model, base)


def test_missing_base_is_refused_unless_check_base_false(tmp_path):
    model, _ = tiny_model(seed=0)
    new = model.get_parameter(DOWN.format(1)).detach() * 2
    path = tmp_path / "delta.safetensors"
    write_checked(path, {DOWN.format(1): new}, {"format": DELTA_FORMAT})
    with pytest.raises(SnapshotError, match=rf"{path}: no base fingerprint for 'model\.layers\.1.*check_base=False"):
        apply_delta(model, path)
    assert apply_delta(model, path, check_base=False) == [DOWN.format(1)]
    assert bit_equal(model.get_parameter(DOWN.format(1)), new)


def test_v1_files_only_with_check_base_false(tmp_path):
    model, _ = tiny_model(seed=0)
    new = model.get_parameter(DOWN.format(0)).detach() + 0.5
    path = tmp_path / "old.safetensors"
    save_file({DOWN.format(0): new.contiguous()}, str(path), metadata={"format": "harness-delta-v1"})
    with pytest.raises(SnapshotError, match=rf"{path}: a harness-delta-v1 file .* check_base=False"):
        apply_delta(model, path)
    apply_delta(model, path, check_base=False)
    assert bit_equal(model.get_parameter(DOWN.format(0)), new)


def _truncated(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _garbage(path):
    path.write_bytes(b"not a safetensors file at all" * 10)


def _header_garbage(path):
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe\x00{"
    path.write_bytes(bytes(data))


def _missing(path):
    path.unlink()


@pytest.mark.parametrize("damage", [_truncated, _garbage, _header_garbage, _missing], ids=lambda f: f.__name__)
def test_unreadable_file_error_names_it(tmp_path, damage):
    path = tmp_path / "delta.safetensors"
    _edited_editor(n_edits=1).save_delta(path)
    damage(path)
    fresh, _ = tiny_model(seed=0)
    base = _state(fresh)
    with pytest.raises(SnapshotError, match=rf"{path}: cannot read the file"):
        apply_delta(fresh, path)
    assert _unchanged(fresh, base)


# ----------------------------------------------------------------------------------------------
# checkpoints


def _checkpoint(tmp_path):
    editor = _edited_editor()
    ckpt = tmp_path / "ckpt"
    editor.save_checkpoint(ckpt)
    return ckpt


def _fresh_editor(counter=(5.0, 6.0, 7.0)):
    model, tok = tiny_model(seed=0)
    algo = Counting()
    algo.counter = torch.tensor(counter)
    return Editor(model, tok, algo, keep_original_weight=False)


def test_checkpoint_round_trip(tmp_path):
    ckpt = _checkpoint(tmp_path)
    manifest = json.loads((ckpt / "editor.json").read_text())
    assert manifest["n_edits"] == 2 and manifest["algorithm"] == "counting"
    assert read_checked(ckpt / "algorithm_state.safetensors", STATE_FORMAT).checksum == \
        manifest["checksums"]["algorithm_state.safetensors"]
    editor = _fresh_editor()
    editor.load_checkpoint(ckpt)
    assert editor.n_edits == 2 and editor.algorithm.counter.tolist() == [2.0, 2.0, 2.0]
    assert sorted(editor.originals.names) == [DOWN.format(0), DOWN.format(1)]
    editor.restore()
    assert _unchanged(editor.model, _state(tiny_model(seed=0)[0]))


def _flip_delta(ckpt):
    path = ckpt / "delta.safetensors"
    _flip(path, _data_start(path) + 100)
    return "delta.safetensors", "does not match its checksum"


def _flip_state(ckpt):
    path = ckpt / "algorithm_state.safetensors"
    _flip(path, _data_start(path))
    return "algorithm_state.safetensors", "does not match its checksum"


def _truncate_state(ckpt):
    _truncated(ckpt / "algorithm_state.safetensors")
    return "algorithm_state.safetensors", "cannot read the file"


def _garbage_manifest(ckpt):
    (ckpt / "editor.json").write_text('{"n_edits": 2, "algor')
    return "editor.json", "cannot read the checkpoint's manifest"


def _manifest_count(ckpt):
    m = json.loads((ckpt / "editor.json").read_text())
    m["n_edits"] = 3
    (ckpt / "editor.json").write_text(json.dumps(m))
    return "delta.safetensors", r"holds 2 edit\(s\), .*editor\.json says 3"


def _other_algorithm(ckpt):
    m = json.loads((ckpt / "editor.json").read_text())
    m["algorithm"] = "rome"
    (ckpt / "editor.json").write_text(json.dumps(m))
    return "editor.json", "made by algorithm 'rome', this Editor runs 'counting'"


def _old_format(ckpt):
    (ckpt / "editor.json").write_text(json.dumps({"n_edits": 2, "algorithm": "counting"}))
    return "editor.json", "checkpoint format None, expected 'harness-checkpoint-v2'"


def _refused_state(ckpt):
    path = ckpt / "algorithm_state.safetensors"
    checksum = write_checked(path, {"counter": torch.zeros(4)}, {"format": STATE_FORMAT})
    m = json.loads((ckpt / "editor.json").read_text())
    m["checksums"]["algorithm_state.safetensors"] = checksum
    (ckpt / "editor.json").write_text(json.dumps(m))
    return "algorithm_state.safetensors", "counting does not accept this state: counting: expected a 'counter'"


def _state_from_elsewhere(ckpt):
    write_checked(ckpt / "algorithm_state.safetensors", {"counter": torch.ones(3)}, {"format": STATE_FORMAT})
    return "algorithm_state.safetensors", "not the file .*editor.json was saved with"


def _missing_delta(ckpt):
    (ckpt / "delta.safetensors").unlink()
    return "delta.safetensors", "cannot read the file"


@pytest.mark.parametrize("corrupt", [_flip_delta, _flip_state, _truncate_state, _garbage_manifest, _manifest_count,
                                     _other_algorithm, _old_format, _refused_state, _state_from_elsewhere,
                                     _missing_delta], ids=lambda f: f.__name__)
def test_corrupt_checkpoint_leaves_model_and_algorithm_untouched(tmp_path, corrupt):
    ckpt = _checkpoint(tmp_path)
    culprit, message = corrupt(ckpt)
    editor = _fresh_editor()
    base = _state(editor.model)
    counter = editor.algorithm.counter
    with pytest.raises(CheckpointError, match=rf"{ckpt / culprit}.*{message}"):
        editor.load_checkpoint(ckpt)
    assert _unchanged(editor.model, base)
    assert editor.algorithm.counter.tolist() == [5.0, 6.0, 7.0]
    assert editor.n_edits == 0 and len(editor.originals) == 0
    if corrupt is not _refused_state:  # refused by the algorithm: it was tried, and its state put back
        assert editor.algorithm.counter is counter
    editor.edit(REQ)  # the Editor still works, and still sees the base model as its own


def test_checkpoint_files_from_another_checkpoint_are_refused(tmp_path):
    a = _checkpoint(tmp_path)
    b = tmp_path / "other"
    _edited_editor(n_edits=3).save_checkpoint(b)
    shutil.copy(b / "delta.safetensors", a / "delta.safetensors")
    with pytest.raises(CheckpointError, match=rf"{a / 'delta.safetensors'}: not the file"):
        _fresh_editor().load_checkpoint(a)
