"""`LSMSv2_predict`'s own flags are checked before nnU-Net starts, and reach the predictor as arguments (no model
needed)."""
import json
import os
import sys
from pathlib import Path

import pytest

from lsms_nnunet.inference import predict_entry as entry
from lsms_nnunet.inference.predictor import LSMSPredictor, PredictionRequest


class _Loaded(Exception):
    """Stops the entry where it would load the model."""


def _run_until_the_model_loads(monkeypatch, tmp_path, *flags: str) -> dict:
    seen = {}

    def initialize(predictor, model_folder, folds, checkpoint_name):
        seen.update(predictor=predictor, model_folder=model_folder, folds=folds, checkpoint=checkpoint_name)
        raise _Loaded

    monkeypatch.setattr(LSMSPredictor, "initialize_from_trained_model_folder", initialize)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setattr(sys, "argv", ["LSMSv2_predict", "-i", "in", "-o", "out", "-d", "Dataset001_X", "-c", "2d",
                                      "-device", "cpu", *flags])
    import lsms_nnunet_ext_hook  # noqa: F401  (what a non-editable install's .pth already ran at start-up)

    environment = dict(os.environ)
    with pytest.raises(_Loaded):
        entry.predict_entry()
    assert dict(os.environ) == environment  # nothing handed over through the environment
    return seen


def test_expressions_file_text_encoder_and_nonfinite_flag_reach_the_predictor(monkeypatch, tmp_path):
    seen = _run_until_the_model_loads(monkeypatch, tmp_path, "-e", "elsewhere/expressions.json", "--text_encoder",
                                      "/models/encoder", "--allow_nonfinite", "-f", "0", "all", "-chk", "x.pth")
    assert seen["predictor"].request == PredictionRequest(
        expressions_file=os.path.abspath("elsewhere/expressions.json"), ad_hoc_text=None,
        text_encoder_source="/models/encoder", allow_nonfinite=True)
    assert seen["model_folder"] == str(tmp_path / "results" / "Dataset001_X" / "LSMSTrainer__nnUNetPlans__2d")
    assert seen["folds"] == [0, "all"] and seen["checkpoint"] == "x.pth"


def test_ad_hoc_text_reaches_the_predictor(monkeypatch, tmp_path):
    predictor = _run_until_the_model_loads(monkeypatch, tmp_path, "--text", "the largest cyst")["predictor"]
    assert predictor.request == PredictionRequest(ad_hoc_text="the largest cyst")
    assert not hasattr(LSMSPredictor, "request")  # per-run state lives on the instance, not the class


@pytest.mark.parametrize("text", ["\u0000", "\u200b", "\U0001F600", "\x1b[0m"])
def test_unusable_text_is_refused_before_prediction(monkeypatch, text):
    monkeypatch.setattr(sys, "argv", ["LSMSv2_predict", "-i", "in", "-o", "out", "-d", "1", "-c", "2d", "--text", text])
    with pytest.raises(SystemExit) as caught:
        entry.predict_entry()
    assert str(caught.value).startswith("--text ") and "Fix:" in str(caught.value)


def test_expressions_option_pointing_to_a_folder_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["LSMSv2_predict", "-i", "in", "-o", "out", "-d", "1", "-c", "2d", "-e",
                                      str(tmp_path)])
    with pytest.raises(SystemExit, match=r"is a folder\. Fix: point -e at the expressions file itself, e\.g\. -e "
                                         r".*expressions\.json"):
        entry.predict_entry()


def _refused_before_nnunets_loader(monkeypatch, results: Path):
    """Run LSMSv2_predict on Dataset001_X fold 0 in `results`; it must stop before nnU-Net's loader is reached."""
    monkeypatch.setattr(LSMSPredictor, "initialize_from_trained_model_folder",
                        lambda *args, **kwargs: pytest.fail("nnU-Net's loader was reached"))
    monkeypatch.setenv("nnUNet_results", str(results))
    monkeypatch.setattr(sys, "argv", ["LSMSv2_predict", "-i", "in", "-o", "out", "-d", "Dataset001_X", "-c", "2d",
                                      "-device", "cpu", "-f", "0"])
    with pytest.raises(SystemExit) as stopped:
        entry.predict_entry()
    return stopped


class _RunsCode:
    """A pickled object that runs code when unpickled (what a malicious shared model file can carry)."""

    def __reduce__(self):
        return (os.makedirs, (os.path.join(os.environ["LSMS_TEST_MARKER_DIR"], "code_ran"),))


@pytest.mark.parametrize("content", ["pickled object", "truncated"])
def test_a_checkpoint_that_would_run_code_or_is_damaged_is_refused_before_loading(monkeypatch, tmp_path, capsys,
                                                                                   content):
    import torch

    fold = tmp_path / "results" / "Dataset001_X" / "LSMSTrainer__nnUNetPlans__2d" / "fold_0"
    fold.mkdir(parents=True)
    monkeypatch.setenv("LSMS_TEST_MARKER_DIR", str(tmp_path))
    torch.save({"network_weights": {}, "trainer_name": "LSMSTrainer", "payload": _RunsCode()},
               fold / "checkpoint_final.pth")
    if content == "truncated":
        (fold / "checkpoint_final.pth").write_bytes((fold / "checkpoint_final.pth").read_bytes()[:100])
    stopped = _refused_before_nnunets_loader(monkeypatch, tmp_path / "results")
    assert stopped.value.code == 1 and not (tmp_path / "code_ran").exists()
    message = capsys.readouterr().err
    assert str(fold / "checkpoint_final.pth") in message and "Fix:" in message
    assert ("would run code" if content == "pickled object" else "not a readable checkpoint") in message


PLANS = {"dataset_name": "Dataset001_X", "configurations": {"2d": {
    "patch_size": [64, 64], "architecture": {"network_class_name": "PlainConvUNet", "arch_kwargs": {"n_stages": 5}}}}}


@pytest.mark.parametrize("trained_with, said", [
    ({**PLANS, "dataset_name": "Dataset002_Y"}, "was trained on Dataset002_Y, but sits in a model folder of "
                                                "Dataset001_X"),
    ({**PLANS, "configurations": {"2d": {**PLANS["configurations"]["2d"], "patch_size": [32, 32]}}},
     "was trained with another network than"),
])
def test_a_checkpoint_of_another_dataset_or_network_is_refused_before_loading(monkeypatch, tmp_path, capsys,
                                                                              trained_with, said):
    import torch

    model = tmp_path / "results" / "Dataset001_X" / "LSMSTrainer__nnUNetPlans__2d"
    (model / "fold_0").mkdir(parents=True)
    (model / "plans.json").write_text(json.dumps(PLANS), encoding="utf-8")
    torch.save({"network_weights": {}, "init_args": {"plans": trained_with, "configuration": "2d"}},
               model / "fold_0" / "checkpoint_final.pth")
    stopped = _refused_before_nnunets_loader(monkeypatch, tmp_path / "results")
    message = capsys.readouterr().err
    assert stopped.value.code == 1 and said in message
    assert str(model / "fold_0" / "checkpoint_final.pth") in message and "Fix:" in message


def test_a_refused_prediction_leaves_no_empty_output_folder(monkeypatch, tmp_path, capsys):
    from text_conditioning.expressions import ExpressionsError

    def refuse(*args, **kwargs):
        raise ExpressionsError("expressions.json: entry 0 names an unknown case. Fix: ...")

    monkeypatch.setattr(LSMSPredictor, "initialize_from_trained_model_folder", lambda *args, **kwargs: None)
    monkeypatch.setattr(LSMSPredictor, "predict_from_files", refuse)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setattr(sys, "argv", ["LSMSv2_predict", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "-d",
                                      "Dataset001_X", "-c", "2d", "-device", "cpu", "-f", "0"])
    with pytest.raises(SystemExit):
        entry.predict_entry()
    assert "unknown case" in capsys.readouterr().err and not (tmp_path / "out").exists()
    (tmp_path / "kept").mkdir()  # an output folder the user made is left as it was
    monkeypatch.setattr(sys, "argv", [*sys.argv[:4], str(tmp_path / "kept"), *sys.argv[5:]])
    with pytest.raises(SystemExit):
        entry.predict_entry()
    assert (tmp_path / "kept").is_dir()
