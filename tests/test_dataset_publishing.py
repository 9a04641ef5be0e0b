"""One way into nnUNet_raw for every dataset writer: a staging folder, published whole or not at all."""
import os

import pytest

from lsms_nnunet.datasets import geometry
from lsms_nnunet.datasets.geometry import staged_dataset


def _dataset(folder, text: str):
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(text)
    return folder


def test_a_finished_dataset_replaces_the_old_one_and_leaves_nothing_beside(tmp_path):
    old = _dataset(tmp_path / "Dataset007_Old", "old")
    with staged_dataset(tmp_path, tmp_path / "Dataset007_New", [old]) as staging:
        (staging / "dataset.json").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["Dataset007_New"]
    assert (tmp_path / "Dataset007_New" / "dataset.json").read_text() == "new"


def test_a_failed_writer_leaves_the_old_dataset_untouched(tmp_path):
    old = _dataset(tmp_path / "Dataset007_Old", "old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with staged_dataset(tmp_path, tmp_path / "Dataset007_New", [old]) as staging:
            (staging / "dataset.json").write_text("half")
            raise RuntimeError("writer failed")
    assert [p.name for p in tmp_path.iterdir()] == ["Dataset007_Old"]
    assert (old / "dataset.json").read_text() == "old"


def test_a_failed_swap_puts_the_old_dataset_back(tmp_path, monkeypatch):
    old = _dataset(tmp_path / "Dataset007_Old", "old")
    real_replace = os.replace

    def replace(source, target):
        if os.path.basename(str(target)) == "Dataset007_New":
            raise OSError("disk full")
        return real_replace(source, target)

    monkeypatch.setattr(geometry.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        with staged_dataset(tmp_path, tmp_path / "Dataset007_New", [old]) as staging:
            (staging / "dataset.json").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["Dataset007_Old"]
    assert (old / "dataset.json").read_text() == "old"
