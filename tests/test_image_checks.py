"""Non-finite, constant and differently oriented images are reported before training or prediction (issue 13 items
7 and 8); no model needed."""
import json
import pickle
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from lsms_nnunet.inference import predictor as predictor_module
from lsms_nnunet.inference.input_checks import ALLOW_NONFINITE_ENV, InputChannelsError, check_input_images
from lsms_nnunet.inference.predictor import LSMSPredictor
from lsms_nnunet.preprocessing.encode_text import check_training_images
from lsms_nnunet.preprocessing.image_checks import ImageContentError, training_directions

ENDING = ".mha"  # MetaImage keeps NaN in what SimpleITK reads (NIfTI: see the NIfTI test)
FLIPPED = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
DATASET_JSON = {"file_ending": ENDING, "channel_names": {"0": "CT"}}


def _image(path, array, direction=None):
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.float32))
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))


def _folder(tmp_path, arrays: dict, direction=None):
    folder = tmp_path / "in"
    folder.mkdir()
    for case, array in arrays.items():
        _image(folder / f"{case}_0000{ENDING}", array, direction)
    return str(folder)


def _noise(seed=0):
    return np.random.default_rng(seed).normal(size=(4, 6, 6))


def test_nan_image_is_refused_with_case_and_count(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_NONFINITE_ENV, raising=False)
    broken = _noise()
    broken[0, 0, :3] = np.nan
    broken[1, 1, 1] = np.inf
    folder = _folder(tmp_path, {"good": _noise(1), "broken": broken, "empty": np.full((4, 6, 6), np.nan)})
    with pytest.raises(ImageContentError, match=r"2 image\(s\) contain NaN or infinite voxels: broken \(4 voxels\), "
                                                r"empty \(144 voxels\)\. Fix: .*--allow_nonfinite"):
        check_input_images(folder, DATASET_JSON, SimpleITKIO(), [])


def test_allow_nonfinite_predicts_with_a_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ALLOW_NONFINITE_ENV, "1")
    folder = _folder(tmp_path, {"empty": np.full((4, 6, 6), np.nan)})
    check_input_images(folder, DATASET_JSON, SimpleITKIO(), [])
    assert "{'empty': 144}" in capsys.readouterr().out


def test_constant_image_is_warned(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_NONFINITE_ENV, raising=False)
    folder = _folder(tmp_path, {"flat": np.full((4, 6, 6), 7.0)})
    with pytest.warns(UserWarning, match=r"Image of case 'flat' is constant \(every voxel is 7.0\)"):
        check_input_images(folder, DATASET_JSON, SimpleITKIO(), [])


def test_nan_in_nifti_is_refused_although_the_reader_returns_zeros(tmp_path, monkeypatch):
    """SimpleITK reads NaN and infinite NIfTI voxels as 0: the NIfTI files themselves are checked (issue 36)."""
    monkeypatch.delenv(ALLOW_NONFINITE_ENV, raising=False)
    (tmp_path / "in").mkdir()
    broken = _noise()
    broken[0, 0, :] = np.nan  # 6 voxels
    broken[1, 1, 1] = -np.inf
    _image(tmp_path / "in" / "broken_0000.nii.gz", broken)
    _image(tmp_path / "in" / "good_0000.nii.gz", _noise(1))
    assert np.isfinite(SimpleITKIO().read_images([str(tmp_path / "in" / "broken_0000.nii.gz")])[0]).all()
    with pytest.raises(ImageContentError, match=r"1 image\(s\) contain NaN or infinite voxels: broken \(7 voxels\)"):
        check_input_images(str(tmp_path / "in"), {**DATASET_JSON, "file_ending": ".nii.gz"}, SimpleITKIO(), [])


def test_axes_ordered_unlike_the_training_data_are_warned_but_flips_are_not(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_NONFINITE_ENV, raising=False)
    identity = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    transposed = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    folder = _folder(tmp_path, {"transposed": _noise()}, direction=transposed)
    with pytest.warns(UserWarning, match=r"case 'transposed' has direction matrix \[0.0, 1.0, .*the training data "
                                         r"\[1.0, 0.0, .*ordered or rotated .*\(left/right"):
        check_input_images(folder, DATASET_JSON, SimpleITKIO(), [identity])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_input_images(folder, DATASET_JSON, SimpleITKIO(), [identity, list(transposed)])
        (tmp_path / "flipped").mkdir()
        check_input_images(_folder(tmp_path / "flipped", {"mirrored": _noise()}, direction=FLIPPED), DATASET_JSON,
                           SimpleITKIO(), [identity])


def test_training_directions_come_from_the_preprocessed_properties(tmp_path):
    for case, direction in (("a", FLIPPED), ("b", FLIPPED), ("c", tuple(np.eye(3).ravel()))):
        with open(tmp_path / f"{case}.pkl", "wb") as file:
            pickle.dump({"sitk_stuff": {"direction": direction}}, file)
    assert training_directions(tmp_path) == [list(FLIPPED), [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]]
    assert all(type(v) is float for d in training_directions(tmp_path) for v in d)


def test_training_images_with_nan_are_refused_before_planning(tmp_path):
    raw = tmp_path / "Dataset001_x"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    broken = _noise()
    broken[0, 0, 0] = np.nan
    for case, array in (("ok", _noise()), ("bad", broken)):
        _image(raw / "imagesTr" / f"{case}_0000{ENDING}", array)
        _image(raw / "labelsTr" / f"{case}{ENDING}", np.zeros((4, 6, 6)))
    (raw / "dataset.json").write_text(json.dumps({**DATASET_JSON, "labels": {"background": 0, "x": 1},
                                                  "numTraining": 2}))
    with pytest.raises(ImageContentError, match=r"1 image\(s\) contain NaN .*: bad \(1 voxels\)\. Fix: repair"):
        check_training_images(raw)


class _PlainCard:
    model_card = {"mode": "plain", "training_directions": []}


class _Plans:
    image_reader_writer_class = SimpleITKIO


def test_predictor_checks_images_before_predicting(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_NONFINITE_ENV, raising=False)
    monkeypatch.setattr(predictor_module, "bind_label_prompts", lambda network: None)
    predictor = LSMSPredictor(device=torch.device("cpu"))
    predictor.dataset_json, predictor.network, predictor.plans_manager = DATASET_JSON, _PlainCard(), _Plans()
    folder = _folder(tmp_path, {"empty": np.full((4, 6, 6), np.nan)})
    with pytest.raises(ImageContentError, match=r"empty \(144 voxels\)"):
        predictor.predict_from_files(folder, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_extra_channel_for_a_one_channel_model_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_NONFINITE_ENV, raising=False)
    folder = _folder(tmp_path, {"good": _noise(), "two": _noise()})
    _image(tmp_path / "in" / f"two_0001{ENDING}", _noise(2))
    with pytest.raises(InputChannelsError, match=r"1 case\(s\) do not have the model's 1 channel\(s\) \{'0': 'CT'\}, "
                                                 r"e.g. two: \['two_0000.mha', 'two_0001.mha'\] \(expected "
                                                 r"\['two_0000.mha'\]\)\. Fix: "):
        check_input_images(folder, DATASET_JSON, SimpleITKIO(), [])
