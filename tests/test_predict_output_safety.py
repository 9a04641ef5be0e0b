"""Referring prediction never writes over, or among, its input images (issue 13, item 1).

The checks run in `LSMSPredictor.predict_from_files` before any model is used, so no trained model is needed here.
"""
import json

import pytest
import torch

from lsms_nnunet.inference.predictor import LSMSPredictor, UnsafeOutputError

ENDING = ".nii.gz"


class PastTheChecks(Exception):
    """Raised by the stub network when the prediction gets past the output checks (to encoding the texts)."""


class _StubNetwork:
    @property
    def model_card(self) -> dict:
        raise PastTheChecks


@pytest.fixture
def predictor() -> LSMSPredictor:
    predictor = LSMSPredictor(device=torch.device("cpu"))
    predictor.dataset_json = {"file_ending": ENDING}
    predictor.network = _StubNetwork()
    return predictor


def _images(folder, expression_ids: list[str]) -> dict:
    """An input folder with two images and a companion expressions.json; returns its files' contents."""
    folder.mkdir()
    for case in ("case", "other"):
        (folder / f"{case}_0000{ENDING}").write_bytes(f"image of {case}".encode())
    expressions = [{"id": expression_id, "case": "case", "text": "the largest lesion"}
                   for expression_id in expression_ids]
    (folder / "expressions.json").write_text(json.dumps({"format": "lsms-expressions", "version": 1,
                                                         "expressions": expressions}))
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def _contents(folder) -> dict:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.mark.parametrize("output", [".", "masks", "masks/deeper"])
def test_output_folder_in_the_input_folder_is_refused(predictor, tmp_path, output):
    images = tmp_path / "images"
    before = _images(images, ["q1"])
    with pytest.raises(UnsafeOutputError, match="Fix: pass an output folder \\(-o\\) outside"):
        predictor.predict_from_files(str(images), str(images / output))
    assert _contents(images) == before


def test_expression_id_named_like_an_input_image_is_refused(predictor, tmp_path):
    images = tmp_path / "images"
    before = _images(images, ["q1", "case_0000"])
    with pytest.raises(UnsafeOutputError, match=r"expressions.json: expression ids \['case_0000'\] .* "
                                                r"case_0000\.nii\.gz\). Fix: rename these ids"):
        predictor.predict_from_files(str(images), str(tmp_path / "out"))
    assert _contents(images) == before
    assert not (tmp_path / "out").exists()


def test_safe_output_gets_past_the_checks(predictor, tmp_path):
    images = tmp_path / "images"
    _images(images, ["q1", "case_mask"])
    with pytest.raises(PastTheChecks):
        predictor.predict_from_files(str(images), str(tmp_path / "images_out"))  # a sibling, not inside
