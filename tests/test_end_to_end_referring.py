"""The README workflow with the stock nnU-Net commands, on tiny synthetic referring datasets (2D: conftest's, and 3D).

make synthetic -> LSMSv2_plan_and_preprocess (nnU-Net planning + the real embedded text encoder) -> stock
nnUNetv2_train -tr LSMSTrainer_test -> stock nnUNetv2_predict with a companion expressions.json -> LSMSv2_evaluate.
"""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from lsms_nnunet.network.prompting import MODEL_CARD_PLANS_KEY
from lsms_nnunet.planning.variants import make_plans_variant
from lsms_nnunet.selection.stage import STAGE_FILE, STAGE_STATE_KEY, CaseLevelStage, weights_identity
from lsms_nnunet.training.checkpoints import load_checkpoint_safely
from lsms_nnunet.training.variants import BUDGET_CASE_LEVEL_ENV, LSMSTrainer_test

from conftest import TINY_PLANS, assert_outlived_by_none, assert_scores_follow_from_voxel_counts, child_processes

pytestmark = pytest.mark.slow  # trains models end to end

MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
DATASET_3D = 512


def _train(dataset: int, raw: Path, configuration: str, run, nnunet_dirs) -> dict:
    """Fold 0 of a planned and encoded referring dataset trained with the stock nnU-Net command."""
    run("nnUNetv2_train", dataset, configuration, 0, "-tr", "LSMSTrainer_test", "-p", TINY_PLANS, "-device", "cpu",
        nnUNet_n_proc_DA="0")
    model = Path(nnunet_dirs["nnUNet_results"]) / raw.name / f"LSMSTrainer_test__{TINY_PLANS}__{configuration}"
    return dict(dataset=dataset, configuration=configuration, raw=raw, model=model)


@pytest.fixture(scope="module")
def trained_models(run, nnunet_dirs, referring_2d) -> dict:
    run("LSMSv2_make_synthetic", "-d", DATASET_3D, "--dim", 3, "--cases", 5, "--test_cases", 2, "--shape", 16, 32, 32,
        "--seed", 3)
    run("LSMSv2_plan_and_preprocess", "-d", DATASET_3D, "-c", "3d_fullres", "-np", 1, "--verify_dataset_integrity",
        nnUNet_n_proc_DA="0")
    make_plans_variant(DATASET_3D, TINY_PLANS, max_features=16, batch_size=2)
    raw_3d = next(Path(nnunet_dirs["nnUNet_raw"]).glob(f"Dataset{DATASET_3D}_*"))
    return {"2d": _train(referring_2d["dataset"], referring_2d["raw"], "2d", run, nnunet_dirs),
            "3d_fullres": _train(DATASET_3D, raw_3d, "3d_fullres", run, nnunet_dirs)}


@pytest.fixture(params=["2d", "3d_fullres"])
def trained(request, trained_models) -> dict:
    return trained_models[request.param]


@pytest.fixture(scope="module")
def stock_predictions(trained_models, run, tmp_path_factory):
    """The folder of a model's answers to its test images' companion expressions (nnUNetv2_predict with
    _predict_args: a preprocessing and an export worker), predicted once per model: tests that compare another way of
    predicting with it only read it."""
    folders = {}

    def predicted(configuration: str) -> Path:
        if configuration not in folders:
            trained = trained_models[configuration]
            folders[configuration] = tmp_path_factory.mktemp(f"stock_predictions_{configuration}")
            run("nnUNetv2_predict", *_predict_args(trained, trained["raw"] / "imagesTs", folders[configuration]))
        return folders[configuration]
    return predicted


def test_stock_train_writes_per_expression_validation(trained):
    summary = json.loads((trained["model"] / "fold_0" / "validation" / "summary.json").read_text(encoding="utf-8"))
    expressions = json.loads((trained["raw"] / "expressions.json").read_text(encoding="utf-8"))["expressions"]
    splits = json.loads((Path(os.environ["nnUNet_preprocessed"]) / trained["raw"].name / "splits_final.json")
                        .read_text(encoding="utf-8"))
    validation_cases = set(splits[0]["val"])
    expected = {e["id"] for e in expressions if e["case"] in validation_cases}
    assert {m["id"] for m in summary["metric_per_expression"]} == expected
    assert_scores_follow_from_voxel_counts(summary["metric_per_expression"], summary["aggregate"])
    assert (trained["model"] / "fold_0" / "checkpoint_final.pth").is_file()
    log = next((trained["model"] / "fold_0").glob("training_log_*.txt")).read_text(encoding="utf-8")
    training_expressions = [e for e in expressions if e["case"] in set(splits[0]["train"])]
    # each expression over 2 candidate sets as written, and over the network's in up to phrase_variants rewrites
    rewrites = json.loads((Path(os.environ["nnUNet_preprocessed"]) / trained["raw"].name / "lsms_text" /
                           "prompts.json").read_text(encoding="utf-8"))["variants"]
    rewritten = [min(len(rewrites.get(e["text"], [])), LSMSTrainer_test.case_level_settings.phrase_variants)
                 for e in training_expressions]
    assert sum(rewritten) > 0  # the shipped table rewrites the synthetic wording
    assert f"case selector: fitting 3 selectors on {2 * len(training_expressions) + sum(rewritten)} examples" in log
    beside = CaseLevelStage.load(trained["model"] / "fold_0" / STAGE_FILE, MINILM_SHA256)  # the model's encoder
    weights = load_checkpoint_safely(trained["model"] / "fold_0" / "checkpoint_final.pth")["network_weights"]
    stage = CaseLevelStage.from_payload(weights["_extra_state"][STAGE_STATE_KEY], MINILM_SHA256, "the checkpoint")
    assert stage.settings == beside.settings == LSMSTrainer_test.case_level_settings  # what it was fitted with
    assert stage.fitted_on == beside.fitted_on == weights_identity(weights)  # and the weights it was fitted on
    verdict = next(iter(stage.verdicts.values()))  # judged on the training cases: all of them (tiny images)
    assert verdict.expressions == len(training_expressions)
    assert f"case selector: {verdict.describe()}" in log
    dataset_json = json.loads((trained["model"] / "dataset.json").read_text(encoding="utf-8"))
    assert dataset_json["labels"] == {"background": 0, "target": 1}


def test_checkpoint_records_text_encoder(trained):
    checkpoint = load_checkpoint_safely(trained["model"] / "fold_0" / "checkpoint_final.pth")  # the card is plain
    card = checkpoint["network_weights"]["_extra_state"]
    assert card["mode"] == "referring"
    assert card["text_encoder"]["name"] == "all-MiniLM-L6-v2"
    assert card["text_encoder"]["sha256"] == MINILM_SHA256
    assert card["text_encoder"]["dim"] == 384
    plans = json.loads((trained["model"] / "plans.json").read_text(encoding="utf-8"))
    card.pop(STAGE_STATE_KEY)  # fitted at validation, per fold
    assert plans["configurations"][trained["configuration"]][MODEL_CARD_PLANS_KEY] == card  # the card is in the plans


def test_model_folder_from_before_cards_in_plans_predicts_the_same(trained_models, stock_predictions, run, tmp_path):
    """A model folder whose plans.json has no card (written by an earlier lsms-nnunet) takes it from the checkpoint."""
    trained = trained_models["2d"]
    legacy = tmp_path / "results" / trained["model"].parent.name / trained["model"].name
    shutil.copytree(trained["model"], legacy)
    plans = json.loads((legacy / "plans.json").read_text(encoding="utf-8"))
    del plans["configurations"]["2d"][MODEL_CARD_PLANS_KEY]
    (legacy / "plans.json").write_text(json.dumps(plans), encoding="utf-8")
    images = trained["raw"] / "imagesTs"
    run("nnUNetv2_predict", *_predict_args(trained, images, tmp_path / "legacy", workers=0),
        nnUNet_results=str(tmp_path / "results"))
    for expression in json.loads((images / "expressions.json").read_text(encoding="utf-8"))["expressions"]:
        masks = [sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{expression['id']}.nii.gz")))
                 for folder in (stock_predictions("2d"), tmp_path / "legacy")]
        assert np.array_equal(*masks)


def test_stock_predict_with_companion_file_then_evaluate(trained, stock_predictions, run, tmp_path):
    images = trained["raw"] / "imagesTs"
    out = stock_predictions(trained["configuration"])
    expressions = json.loads((images / "expressions.json").read_text(encoding="utf-8"))["expressions"]
    assert expressions
    for expression in expressions:
        mask_file = out / f"{expression['id']}.nii.gz"
        image = sitk.ReadImage(str(images / f"{expression['case']}_0000.nii.gz"))
        mask = sitk.ReadImage(str(mask_file))
        assert mask.GetSize() == image.GetSize()
        assert np.allclose(mask.GetSpacing(), image.GetSpacing())
        assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}
    index = json.loads((out / "expressions_index.json").read_text(encoding="utf-8"))
    assert {e["id"] for e in index["expressions"]} == {e["id"] for e in expressions}
    run("LSMSv2_evaluate", "-ref", trained["raw"] / "labelsTs", "-pred", out, "-e", images / "expressions.json", "-o",
        tmp_path / "summary.json")  # the default, -pred/summary.json, in test_demo
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert summary["aggregate"]["n_expressions"] == len(expressions)


def test_stock_predict_answers_through_the_case_selector_in_the_checkpoint(trained_models, run, tmp_path):
    """nnUNetv2_predict takes each fold's case selector from its checkpoint (what nnUNetv2_export_model_to_zip packs);
    a model validated before checkpoints carried it uses case_selector.pt; with neither it says so and answers with
    the network alone."""
    trained = trained_models["2d"]
    images = trained["raw"] / "imagesTs"
    without_file = tmp_path / "results" / trained["model"].parent.name / trained["model"].name
    shutil.copytree(trained["model"], without_file)
    (without_file / "fold_0" / STAGE_FILE).unlink()
    checkpoint_file = without_file / "fold_0" / "checkpoint_final.pth"
    checkpoint = load_checkpoint_safely(checkpoint_file)
    verdicts = []
    for network_alone_dice in (0.0, 1.0):  # the verdict in the checkpoint decides who answers
        checkpoint["network_weights"]["_extra_state"][STAGE_STATE_KEY]["verdict"] = {
            "case_level_dice": 0.5, "network_alone_dice": network_alone_dice, "expressions": 10}
        torch.save(checkpoint, checkpoint_file)
        out = tmp_path / f"verdict_{network_alone_dice}"
        result = run("nnUNetv2_predict", *_predict_args(trained, images, out, workers=0),
                     nnUNet_results=str(tmp_path / "results"))
        said = result.stdout + result.stderr
        assert "no case selector" not in said  # taken from the checkpoint: the file beside it is gone
        verdicts.append(("answered by the network alone" in said,
                         {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in out.glob("*.nii.gz")}))
    assert [said for said, _ in verdicts] == [False, True]
    masks = [answer for _, answer in verdicts]
    assert masks[0].keys() == masks[1].keys() and any(not np.array_equal(masks[0][name], masks[1][name])
                                                      for name in masks[0])
    del checkpoint["network_weights"]["_extra_state"][STAGE_STATE_KEY]
    torch.save(checkpoint, checkpoint_file)
    result = run("nnUNetv2_predict", *_predict_args(trained, images, tmp_path / "neither", workers=0),
                 nnUNet_results=str(tmp_path / "results"))
    said = result.stdout + result.stderr
    assert "no case selector" in said and "LSMSv2_fit_case_level" in said


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and PR_SET_PDEATHSIG")
def test_a_killed_prediction_leaves_no_worker(trained_models, nnunet_dirs, tmp_path):
    """SIGKILL of nnUNetv2_predict while it answers: its preprocessing worker and nnU-Net's manager process (a fork
    of the predictor, as large) die with it."""
    trained = trained_models["2d"]
    images, test_images = tmp_path / "images", trained["raw"] / "imagesTs"
    images.mkdir()
    expressions = json.loads((test_images / "expressions.json").read_text(encoding="utf-8"))
    copies = []
    for copy in range(8):  # enough images that the worker is still busy when the first one is answered
        for image in test_images.glob("*_0000.nii.gz"):
            shutil.copy(image, images / f"copy{copy}_{image.name}")
        copies += [{**e, "id": f"copy{copy}_{e['id']}", "case": f"copy{copy}_{e['case']}"}
                   for e in expressions["expressions"]]
    (images / "expressions.json").write_text(json.dumps({**expressions, "expressions": copies}), encoding="utf-8")
    process = subprocess.Popen([shutil.which("nnUNetv2_predict"), *map(str, _predict_args(trained, images,
                                                                                         tmp_path / "out"))],
                               env={**os.environ, **nnunet_dirs, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    said = []
    for line in process.stdout:
        said.append(line)
        if line.startswith("Predicting "):
            break
    workers = child_processes(process.pid)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(workers) >= 2, f"expected nnU-Net's manager and a preprocessing worker, found {workers}:\n{''.join(said)}"
    assert_outlived_by_none(workers, "prediction workers")


def test_a_checkpoint_of_another_dataset_is_refused_by_both_predict_commands(trained_models, run_failing, tmp_path):
    """A checkpoint trained on another dataset (same network) in a copy of the 2D model's folder: nnU-Net would load
    it and answer without a word; the stock command and the twin refuse it, naming the file."""
    trained = trained_models["2d"]
    copy = tmp_path / "results" / trained["model"].parent.name / trained["model"].name
    shutil.copytree(trained["model"], copy)
    checkpoint = load_checkpoint_safely(copy / "fold_0" / "checkpoint_final.pth")
    checkpoint["init_args"]["plans"]["dataset_name"] = "Dataset999_Elsewhere"
    torch.save(checkpoint, copy / "fold_0" / "checkpoint_final.pth")
    for command in ("nnUNetv2_predict", "LSMSv2_predict"):
        said = run_failing(command, *_predict_args(trained, trained["raw"] / "imagesTs", tmp_path / command),
                           nnUNet_results=str(tmp_path / "results"))
        assert f"was trained on Dataset999_Elsewhere, but sits in a model folder of {trained['raw'].name}" in said
        assert str(copy / "fold_0" / "checkpoint_final.pth") in said
    assert not (tmp_path / "LSMSv2_predict").exists()  # (the stock command makes its -o folder before loading)


def test_the_case_level_stage_is_refitted_alone_with_other_settings(trained_models, run, run_failing, tmp_path):
    """LSMSv2_fit_case_level refits a trained fold's stage (no training, no validation) with the settings of a JSON
    file: the checkpoint and the file beside it carry the new stage and record its settings; stock prediction uses
    it. A stage fitted on checkpoint_final is refused for checkpoint_best, with the fix."""
    trained = trained_models["2d"]
    copy = tmp_path / "results" / trained["model"].parent.name / trained["model"].name
    shutil.copytree(trained["model"], copy)
    validation_before = (copy / "fold_0" / "validation" / "summary.json").read_bytes()
    settings = tmp_path / "settings.json"
    settings.write_text('{"ensemble_members": 2, "fit_steps": 40}')
    environment = dict(nnUNet_results=str(tmp_path / "results"))
    result = run("LSMSv2_fit_case_level", "-d", trained["dataset"], "-c", "2d", "-f", 0, "-tr", "LSMSTrainer_test",
                 "-p", TINY_PLANS, "-device", "cpu", "--settings", settings, **environment)
    assert "Expressions are answered by" in result.stdout and "Fitted in" in result.stdout
    weights = load_checkpoint_safely(copy / "fold_0" / "checkpoint_final.pth")["network_weights"]
    stage = CaseLevelStage.from_payload(weights["_extra_state"][STAGE_STATE_KEY], MINILM_SHA256, "the checkpoint")
    # the file's values over the trainer's own (LSMSTrainer_test's short fit)
    assert stage.settings == dataclasses.replace(LSMSTrainer_test.case_level_settings, ensemble_members=2, fit_steps=40)
    assert len(stage.selectors) == 2 and stage.fitted_on == weights_identity(weights)
    assert CaseLevelStage.load(copy / "fold_0" / STAGE_FILE, MINILM_SHA256).settings == stage.settings
    assert (copy / "fold_0" / "validation" / "summary.json").read_bytes() == validation_before  # not validated
    result = run("nnUNetv2_predict", *_predict_args(trained, trained["raw"] / "imagesTs", tmp_path / "out", workers=0),
                 **environment)
    assert "Expressions are answered by" in result.stdout + result.stderr
    best = load_checkpoint_safely(copy / "fold_0" / "checkpoint_best.pth")  # weights of another epoch
    name = next(key for key, value in best["network_weights"].items() if isinstance(value, torch.Tensor))
    best["network_weights"][name] = best["network_weights"][name] + 0.01
    best["network_weights"]["_extra_state"].pop(STAGE_STATE_KEY, None)
    torch.save(best, copy / "fold_0" / "checkpoint_best.pth")
    message = run_failing("nnUNetv2_predict", *_predict_args(trained, trained["raw"] / "imagesTs", tmp_path / "best"),
                          "-chk", "checkpoint_best.pth", **environment)
    assert "fitted on other weights" in message and "LSMSv2_fit_case_level" in message
    settings.write_text('{"logit_cieling": 6}')
    message = run_failing("LSMSv2_fit_case_level", "-d", trained["dataset"], "-c", "2d", "-f", 0, "-tr",
                          "LSMSTrainer_test", "-p", TINY_PLANS, "-device", "cpu", "--settings", settings,
                          **environment)
    assert "settings.json: unknown case-level setting" in message and "Traceback" not in message


def _predict_args(trained, images, out, workers: int = 1) -> list:
    """nnUNetv2_predict / LSMSv2_predict arguments; `workers=0` predicts sequentially, in the command's own process:
    for a tiny model, spawning the preprocessing and export workers costs as much as the prediction (the two ways
    answer alike: test_sequential_prediction_answers_like_the_multiprocess_one)."""
    return ["-i", images, "-o", out, "-d", trained["dataset"], "-c", trained["configuration"], "-tr",
            "LSMSTrainer_test", "-p", TINY_PLANS, "-f", 0, "-device", "cpu", "-npp", workers, "-nps", workers]


def test_twin_predict_with_expressions_elsewhere_and_ad_hoc_text(trained_models, run, tmp_path):
    """LSMSv2_predict's own options (on 2D; the 3D model answers LSMSv2_predict --text in the geometry test)."""
    trained = trained_models["2d"]
    images = tmp_path / "images"
    images.mkdir()
    case = sorted((trained["raw"] / "imagesTs").glob("*_0000.nii.gz"))[0]
    (images / case.name).write_bytes(case.read_bytes())
    case_id = case.name[: -len("_0000.nii.gz")]
    expressions = tmp_path / "my_expressions.json"
    expressions.write_text(json.dumps({"format": "lsms-expressions", "version": 1, "expressions": [
        {"id": "q1", "case": case_id, "text": "the largest lesion"},
        {"id": "q2", "case": case_id, "text": "all cysts"}]}))
    run("LSMSv2_predict", *_predict_args(trained, images, tmp_path / "from_file", workers=0), "-e", expressions)
    assert {p.name for p in (tmp_path / "from_file").glob("q*.nii.gz")} == {"q1.nii.gz", "q2.nii.gz"}
    run("LSMSv2_predict", *_predict_args(trained, images, tmp_path / "ad_hoc", workers=0), "--text",
        "the smallest lesion")
    assert (tmp_path / "ad_hoc" / f"{case_id}-text.nii.gz").is_file()
    # --continue_prediction: nothing is redone when every expression already has its mask
    before = (tmp_path / "from_file" / "q1.nii.gz").stat().st_mtime_ns
    run("LSMSv2_predict", *_predict_args(trained, images, tmp_path / "from_file", workers=0), "-e", expressions,
        "--continue_prediction")
    assert (tmp_path / "from_file" / "q1.nii.gz").stat().st_mtime_ns == before


def _folder_with_one_test_image(trained: dict, tmp_path: Path) -> tuple[Path, str]:
    """A fresh input folder holding a copy of the model's first test image; returns the folder and the case id."""
    images = tmp_path / "images"
    images.mkdir()
    case = sorted((trained["raw"] / "imagesTs").glob("*_0000.nii.gz"))[0]
    (images / case.name).write_bytes(case.read_bytes())
    return images, case.name[: -len("_0000.nii.gz")]


@pytest.mark.parametrize("problem, message", [
    ("missing", "needs expressions"),
    ("malformed", "expressions.json"),
    ("absent_image", "no image in"),
    ("unknown_encoder", "/nonexistent/encoder"),
    ("other_encoder", "different model"),
])
def test_bad_prediction_input_fails_clearly_and_writes_nothing(trained_models, run_failing, tmp_path, problem,
                                                               message):
    trained = trained_models["2d"]
    images, case_id = _folder_with_one_test_image(trained, tmp_path)
    good = {"format": "lsms-expressions", "version": 1,
            "expressions": [{"id": "q1", "case": case_id, "text": "the largest lesion"}]}
    extra = []
    if problem == "malformed":
        (images / "expressions.json").write_text('{"format": "lsms-expressions", "version": 1, "expressions": [')
    elif problem == "absent_image":
        good["expressions"].append({"id": "q2", "case": "not_there", "text": "the cyst"})
        (images / "expressions.json").write_text(json.dumps(good))
    elif problem in ("unknown_encoder", "other_encoder"):
        (images / "expressions.json").write_text(json.dumps(good))
        if problem == "unknown_encoder":
            extra = ["--text_encoder", "/nonexistent/encoder"]
        else:
            from tiny_text_encoder import make_tiny_text_encoder
            extra = ["--text_encoder", make_tiny_text_encoder(tmp_path / "tiny_encoder")]
    out = tmp_path / "out"
    output = run_failing("LSMSv2_predict", *_predict_args(trained, images, out), *extra)
    assert message in output
    assert not out.exists() or not any(out.iterdir())


def test_prediction_never_writes_over_the_input_images(trained_models, run_failing, tmp_path):
    trained = trained_models["2d"]
    images, case_id = _folder_with_one_test_image(trained, tmp_path)
    (images / "expressions.json").write_text(json.dumps({"format": "lsms-expressions", "version": 1, "expressions": [
        {"id": f"{case_id}_0000", "case": case_id, "text": "the largest lesion"}]}))
    before = {path.name: path.read_bytes() for path in images.iterdir()}
    output = run_failing("LSMSv2_predict", *_predict_args(trained, images, images))
    assert "is the input folder" in output and "Fix: pass an output folder (-o) outside" in output
    output = run_failing("LSMSv2_predict", *_predict_args(trained, images, tmp_path / "out"))
    assert f"would write masks named like input images in {images} (e.g. {case_id}_0000.nii.gz)" in output
    assert {path.name: path.read_bytes() for path in images.iterdir()} == before
    assert not (tmp_path / "out").exists()  # nothing written, and no empty output folder left behind


def test_sequential_prediction_answers_like_the_multiprocess_one(trained_models, stock_predictions, run, tmp_path):
    trained = trained_models["2d"]
    images = trained["raw"] / "imagesTs"
    run("nnUNetv2_predict", *_predict_args(trained, images, tmp_path / "sequential", workers=0))
    expressions = json.loads((images / "expressions.json").read_text(encoding="utf-8"))["expressions"]
    for expression in expressions:
        masks = [sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{expression['id']}.nii.gz")))
                 for folder in (tmp_path / "sequential", stock_predictions("2d"))]
        assert np.array_equal(*masks)
    index = json.loads((tmp_path / "sequential" / "expressions_index.json").read_text(encoding="utf-8"))
    assert {e["id"] for e in index["expressions"]} == {e["id"] for e in expressions}


def test_numpy_entries_refuse_a_referring_model_clearly(trained_models):
    import torch
    import lsms_nnunet_ext_hook  # noqa: F401  (nnU-Net finds the trainer named in the checkpoint)
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from text_conditioning.expressions import ExpressionsError

    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False)
    predictor.initialize_from_trained_model_folder(str(trained_models["2d"]["model"]), (0,), "checkpoint_final.pth")
    image, properties = np.zeros((1, 1, 64, 64), np.float32), {"spacing": [999.0, 1.0, 1.0]}
    with pytest.raises(ExpressionsError, match="predict_single_npy_array has no way to pass expressions.* Fix: "):
        predictor.predict_single_npy_array(image, properties)
    with pytest.raises(ExpressionsError, match="predict_from_list_of_npy_arrays has no way to pass expressions"):
        predictor.predict_from_list_of_npy_arrays([image], None, [properties], None, num_processes=1)


def test_geometry_round_trip_with_rotated_anisotropic_input(trained_models, run, tmp_path):
    trained = trained_models["3d_fullres"]
    source = sorted((trained["raw"] / "imagesTs").glob("*_0000.nii.gz"))[0]
    image = sitk.ReadImage(str(source))
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((-12.0, 30.5, 4.0))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))  # rotated 90 degrees in-plane
    images = tmp_path / "images"
    images.mkdir()
    sitk.WriteImage(image, str(images / source.name))
    case_id = source.name[: -len("_0000.nii.gz")]
    out = tmp_path / "out"
    run("LSMSv2_predict", *_predict_args(trained, images, out, workers=0), "--text", "the largest lesion")
    mask = sitk.ReadImage(str(out / f"{case_id}-text.nii.gz"))
    assert mask.GetSize() == image.GetSize()
    assert np.allclose(mask.GetSpacing(), image.GetSpacing())
    assert np.allclose(mask.GetOrigin(), image.GetOrigin())
    assert np.allclose(mask.GetDirection(), image.GetDirection())


def _stored_mirrored(image: sitk.Image) -> sitk.Image:
    """The same scan with its x axis stored reversed: every voxel keeps its physical place."""
    array = sitk.GetArrayFromImage(image)[..., ::-1]
    mirrored = sitk.GetImageFromArray(np.ascontiguousarray(array))
    mirrored.SetSpacing(image.GetSpacing())
    direction = np.reshape(image.GetDirection(), (3, 3)).copy()
    direction[:, 0] *= -1
    mirrored.SetDirection(tuple(direction.ravel()))
    mirrored.SetOrigin(image.TransformIndexToPhysicalPoint((image.GetSize()[0] - 1, 0, 0)))
    return mirrored


def test_a_scan_stored_mirrored_gets_the_same_physical_answer(trained_models, tmp_path):
    trained = trained_models["3d_fullres"]
    source = sorted((trained["raw"] / "imagesTs").glob("*_0000.nii.gz"))[0]
    image = sitk.ReadImage(str(source))
    images = tmp_path / "images"
    images.mkdir()
    sitk.WriteImage(image, str(images / "stored_0000.nii.gz"))
    sitk.WriteImage(_stored_mirrored(image), str(images / "mirrored_0000.nii.gz"))
    expressions = [{"id": f"{case}-left", "case": case, "text": "the lesion in the left lobe"}
                   for case in ("stored", "mirrored")]
    (images / "expressions.json").write_text(json.dumps({"format": "lsms-expressions", "version": 1,
                                                          "expressions": expressions}), encoding="utf-8")
    import lsms_nnunet_ext_hook  # noqa: F401  (nnU-Net finds the trainer named in the checkpoint)
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(trained["model"]), (0,), "checkpoint_final.pth")
    predictor.case_level = None  # the network's own voxel-wise answer, not a choice among candidates
    predictor.predict_from_files_sequential(str(images), str(tmp_path / "out"), save_probabilities=True)
    stored, mirrored = (np.load(tmp_path / "out" / f"{case}-left.npz")["probabilities"][1]
                        for case in ("stored", "mirrored"))
    assert not np.allclose(stored, stored[..., ::-1], atol=1e-3)  # the answer has a side: the check can fail
    assert np.allclose(mirrored[..., ::-1], stored, atol=1e-5)


def test_expression_batching_benchmark_runs(trained_models, run):
    trained = trained_models["2d"]
    output = run("LSMSv2_benchmark_expressions", "-d", trained["dataset"], "-c", "2d", "-tr", "LSMSTrainer_test",
                 "-p", TINY_PLANS, "-E", 1, 3).stdout
    rows = [line for line in output.splitlines() if line.startswith("| 1 |") or line.startswith("| 3 |")]
    assert len(rows) == 2
    for row in rows:  # each figure follows from the measured seconds (printed to the millisecond)
        expressions, batched, separate, batched_each, separate_each, speedup = (
            float(cell.strip().rstrip("x")) for cell in row.split("|")[1:7])
        assert batched_each == pytest.approx(batched / expressions, abs=0.0006)
        assert separate_each == pytest.approx(separate / expressions, abs=0.0006)
        rounding = 0.0005 * (1 / batched + separate / batched ** 2)  # of separate / batched, from the printed values
        assert speedup == pytest.approx(separate / batched, abs=rounding + 0.006)


@pytest.mark.parametrize("answered_by", ["case-level stage", "network alone"])
def test_expressions_answered_in_chunks_give_the_masks_of_one_pass(trained_models, tmp_path, monkeypatch,
                                                                   answered_by):
    """Prediction answers and exports an image's expressions chunk by chunk (memory follows a chunk): chunks of two
    give exactly the masks of all expressions at once."""
    import lsms_nnunet_ext_hook  # noqa: F401
    from lsms_nnunet.inference import predictor as predictor_module
    from lsms_nnunet.inference.predictor import LSMSPredictor

    trained = trained_models["2d"]
    predictor = LSMSPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(trained["model"]), (0,), "checkpoint_final.pth")
    if answered_by == "network alone":
        predictor.case_level = None
    assert answered_by == "network alone" or predictor.case_level is not None
    image = sorted((trained["raw"] / "imagesTs").glob("*_0000.nii.gz"))[0]
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    data, _, properties = preprocessor.run_case([str(image)], None, predictor.plans_manager,
                                                predictor.configuration_manager, predictor.dataset_json)
    texts = ["the largest lesion", "all lesions", "the lesion in the left lobe", "the smallest cyst", "no such thing"]
    ids = [f"q{i}" for i in range(len(texts))]
    predictor.export_answers(torch.from_numpy(data), properties, ids, texts, tmp_path / "one_pass")
    monkeypatch.setattr(predictor_module, "CHUNK_VOXELS", 1)
    predictor.expression_batch_size = 2
    assert len(predictor.expression_chunks(len(texts), data[0].size)) == 3
    predictor.export_answers(torch.from_numpy(data), properties, ids, texts, tmp_path / "chunks")
    for expression_id in ids:
        one_pass, chunked = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / folder / f"{expression_id}.nii.gz")))
                             for folder in ("one_pass", "chunks"))
        assert np.array_equal(one_pass, chunked), expression_id


def test_expression_memory_benchmark_measures_each_count_in_its_own_process(trained_models, run):
    trained = trained_models["2d"]
    output = run("LSMSv2_benchmark_expression_memory", "-d", trained["dataset"], "-c", "2d", "-tr",
                 "LSMSTrainer_test", "-p", TINY_PLANS, "-E", 1, 40).stdout
    rows = [[cell.strip() for cell in line.split("|")[1:5]] for line in output.splitlines()
            if line.startswith("| 1 |") or line.startswith("| 40 |")]
    assert [(row[0], row[1]) for row in rows] == [("1", "1"), ("40", "40")]  # every expression got its mask
    first, second = (float(row[2]) for row in rows)
    assert first > 100 and float(rows[1][3].rstrip("x")) == pytest.approx(second / first, abs=0.006)


def test_resume_validation_only_fold_ensemble_and_probabilities(trained_models, run, tmp_path):
    trained = trained_models["2d"]
    copy = tmp_path / "results" / trained["model"].parent.name / trained["model"].name  # validation refits the stage
    shutil.copytree(trained["model"], copy)
    environment = dict(nnUNet_results=str(tmp_path / "results"), nnUNet_n_proc_DA="0")
    common = [trained["dataset"], "2d", 0, "-tr", "LSMSTrainer_test", "-p", TINY_PLANS, "-device", "cpu"]
    summary_file = copy / "fold_0" / "validation" / "summary.json"
    summary_file.unlink()
    run("nnUNetv2_train", *common, "--val", **environment)  # loads the checkpoint (and its model card)
    assert json.loads(summary_file.read_text(encoding="utf-8"))["aggregate"]["n_expressions"] > 0
    run("nnUNetv2_train", *common, "--c", **environment)  # a finished training resumes as finished
    run("nnUNetv2_train", *common[:2], 1, *common[3:], **environment)
    out = tmp_path / "out"
    arguments = _predict_args(trained, trained["raw"] / "imagesTs", out)
    folds = arguments.index("-f")
    arguments[folds + 1: folds + 2] = [0, 1]  # two folds averaged
    run("nnUNetv2_predict", *arguments, "--save_probabilities", "-step_size", 0.7, **environment)
    expression = json.loads((trained["raw"] / "imagesTs" / "expressions.json").read_text(encoding="utf-8"))["expressions"][0]
    probabilities = np.load(out / f"{expression['id']}.npz")["probabilities"]
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{expression['id']}.nii.gz")))
    assert probabilities.shape[0] == 2 and probabilities[0].size == mask.size  # nnU-Net layout: 2D as [C, 1, X, Y]
    assert np.array_equal(probabilities.argmax(0).reshape(mask.shape), mask)


def test_lsms_plans_train_with_the_stock_command(trained_models, run):
    trained = trained_models["2d"]
    run("LSMSv2_plan_experiment", "-d", trained["dataset"], "-c", "2d", "-np", 1, nnUNet_n_proc_DA="1")
    run("nnUNetv2_train", trained["dataset"], "2d", 0, "-tr", "LSMSTrainer_test", "-p", "nnUNetLSMSPlans", "-device",
        "cpu", nnUNet_n_proc_DA="0")
    plans = json.loads((Path(os.environ["nnUNet_preprocessed"]) / trained["raw"].name / "nnUNetLSMSPlans.json")
                       .read_text(encoding="utf-8"))
    checkpoint = load_checkpoint_safely(trained["model"].parent / "LSMSTrainer_test__nnUNetLSMSPlans__2d" / "fold_0" /
                                        "checkpoint_final.pth")
    network = checkpoint["network_weights"]["_extra_state"]["network"]
    assert network["svla_stages"] == plans["configurations"]["2d"]["lsms"]["svla_stages"]


def test_a_case_position_model_trains_and_predicts_with_the_stock_commands(trained_models, run, tmp_path):
    """The opt-in case position on a 3D case wider than the patch: stock training (the loader appends the position
    channels), final validation and stock prediction (the predictor appends them before the sliding window)."""
    trained = trained_models["3d_fullres"]
    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / trained["raw"].name
    planned = json.loads((preprocessed / f"{TINY_PLANS}.json").read_text(encoding="utf-8"))
    patch = planned["configurations"]["3d_fullres"]["patch_size"]
    make_plans_variant(trained["dataset"], "nnUNetPlans_halfpatch", source_plans=TINY_PLANS,
                       patch_size=(patch[0], patch[1] // 2, patch[2] // 2), configuration="3d_fullres")
    trainer = "LSMSTrainer_budget_case_position"
    run("nnUNetv2_train", trained["dataset"], "3d_fullres", 0, "-tr", trainer, "-p", "nnUNetPlans_halfpatch",
        "-device", "cpu", nnUNet_n_proc_DA="0", LSMS_BUDGET_EPOCHS="1", LSMS_BUDGET_ITERATIONS="2",
        **{BUDGET_CASE_LEVEL_ENV: json.dumps(LSMSTrainer_test.case_level_settings.to_dict())})  # a short fit
    model = trained["model"].parent / f"{trainer}__nnUNetPlans_halfpatch__3d_fullres"
    checkpoint = load_checkpoint_safely(model / "fold_0" / "checkpoint_final.pth")
    assert checkpoint["network_weights"]["_extra_state"]["network"]["case_position"] is True
    summary = json.loads((model / "fold_0" / "validation" / "summary.json").read_text(encoding="utf-8"))
    assert summary["aggregate"]["n_expressions"] > 0
    images, out = trained["raw"] / "imagesTs", tmp_path / "predictions"
    run("nnUNetv2_predict", "-i", images, "-o", out, "-d", trained["dataset"], "-c", "3d_fullres", "-tr", trainer,
        "-p", "nnUNetPlans_halfpatch", "-f", 0, "-device", "cpu", "-npp", 0, "-nps", 0)
    expressions = json.loads((images / "expressions.json").read_text(encoding="utf-8"))["expressions"]
    for expression in expressions:
        image = sitk.ReadImage(str(images / f"{expression['case']}_0000.nii.gz"))
        assert sitk.ReadImage(str(out / f"{expression['id']}.nii.gz")).GetSize() == image.GetSize()
