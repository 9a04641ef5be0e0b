"""The one atomic-write helper: the old or the complete new file, never a partial one, and nothing left beside."""
import json
import os

import pytest

from text_conditioning.io import atomic_path, write_bytes_atomically, write_json_atomically


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "plans.json"
    write_json_atomically(target, {"version": 1})
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as temporary:
            temporary.write_text('{"vers', encoding="utf-8")
            raise KeyboardInterrupt("killed mid-write")
    assert json.loads(target.read_text(encoding="utf-8")) == {"version": 1}
    assert os.listdir(tmp_path) == ["plans.json"]


def test_json_is_written_in_the_project_style_and_options_pass_through(tmp_path):
    target = tmp_path / "sub" / "results.json"
    write_json_atomically(target, {"text": "größte Läsion"})
    assert target.read_text(encoding="utf-8") == '{\n "text": "größte Läsion"\n}\n'
    with pytest.raises(ValueError):
        write_json_atomically(target, {"dice": float("nan")}, allow_nan=False)
    assert json.loads(target.read_text(encoding="utf-8")) == {"text": "größte Läsion"}


def test_writer_that_writes_nothing_leaves_the_target_alone(tmp_path):
    target = tmp_path / "checkpoint_latest.pth"
    write_bytes_atomically(target, b"epoch 1")
    with atomic_path(target, suffix="", sole_writer=True):
        pass  # nnU-Net's save_checkpoint on a non-zero DDP rank
    assert target.read_bytes() == b"epoch 1"


def test_sole_writer_replaces_the_temporary_a_killed_run_left(tmp_path):
    target = tmp_path / "checkpoint_latest.pth"
    leftover = tmp_path / ".checkpoint_latest.pth.partial"
    leftover.write_bytes(b"truncated")
    with atomic_path(target, suffix="", sole_writer=True) as temporary:
        assert temporary == leftover and not temporary.exists()
        temporary.write_bytes(b"epoch 2")
    assert target.read_bytes() == b"epoch 2" and sorted(os.listdir(tmp_path)) == ["checkpoint_latest.pth"]


def test_suffix_keeps_the_ending_a_writer_reads(tmp_path):
    with atomic_path(tmp_path / "case.nii.gz", suffix=".tmp.nii.gz") as temporary:
        assert temporary.name.endswith(".nii.gz") and temporary.parent == tmp_path
        temporary.write_bytes(b"image")
    assert (tmp_path / "case.nii.gz").read_bytes() == b"image"
