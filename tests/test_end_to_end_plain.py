"""A plain lesion task (no expressions.json): LSMS is a drop-in beside vanilla nnU-Net with nnU-Net's own tools.

Both trainers train fold 0 with the stock command, predict with the stock command (ordinary label maps, and
per-class probabilities with --save_probabilities), are scored by nnUNetv2_evaluate_folder, and
nnUNetv2_find_best_configuration runs over both (it needs the validation npz files from training with --npz).
"""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lsms_nnunet.planning.variants import make_plans_variant

pytestmark = pytest.mark.slow  # trains models end to end

DATASET = 513
TRAINERS = ("nnUNetTrainer_test", "LSMSTrainer_test")


def _write_split_validating_every_label(raw: Path, preprocessed: Path) -> None:
    """Fold 0 validates on the first cases whose labels together cover every class (nnU-Net's own split gives one
    case, which may lack a class: a class absent and never predicted makes the foreground mean NaN for every model,
    and nnUNetv2_find_best_configuration (2.8) then fails to rank them)."""
    cases = sorted(p.name[: -len(".nii.gz")] for p in (raw / "labelsTr").glob("*.nii.gz"))
    validation, covered = [], set()
    for case in cases:
        validation.append(case)
        covered |= set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / f"{case}.nii.gz")))))
        if covered >= {1, 2, 3, 4}:
            break
    assert covered >= {1, 2, 3, 4} and len(validation) < len(cases), "the generated cases do not cover every class"
    splits = [{"train": [c for c in cases if c not in validation], "val": validation}]
    (preprocessed / "splits_final.json").write_text(json.dumps(splits), encoding="utf-8")


@pytest.fixture(scope="module")
def plain_models(run, nnunet_dirs):
    run("LSMSv2_make_synthetic", "-d", DATASET, "--dim", 2, "--plain", "--cases", 5, "--test_cases", 2,
        "--shape", 64, 64, "--seed", 5)
    run("LSMSv2_plan_and_preprocess", "-d", DATASET, "-c", "2d", "-np", 1, nnUNet_n_proc_DA="1")
    make_plans_variant(DATASET, "nnUNetPlans_tiny", max_features=16, batch_size=2)
    raw = next(Path(nnunet_dirs["nnUNet_raw"]).glob(f"Dataset{DATASET}_*"))
    _write_split_validating_every_label(raw, Path(nnunet_dirs["nnUNet_preprocessed"]) / raw.name)
    for trainer in TRAINERS:
        run("nnUNetv2_train", DATASET, "2d", 0, "-tr", trainer, "-p", "nnUNetPlans_tiny", "-device", "cpu", "--npz",
            nnUNet_n_proc_DA="0")
    results = next(Path(nnunet_dirs["nnUNet_results"]).glob(f"Dataset{DATASET}_*"))
    return dict(raw=raw, results=results)


@pytest.fixture(scope="module")
def stock_predictions(plain_models, run, tmp_path_factory):
    """The folder of a trainer's label maps and probabilities for the test images (nnUNetv2_predict
    --save_probabilities), predicted once per trainer: tests that compare another way of predicting only read it."""
    folders = {}

    def predicted(trainer: str) -> Path:
        if trainer not in folders:
            folders[trainer] = tmp_path_factory.mktemp(f"stock_predictions_{trainer}")
            run("nnUNetv2_predict", "-i", plain_models["raw"] / "imagesTs", "-o", folders[trainer], "-d", DATASET,
                "-c", "2d", "-tr", trainer, "-p", "nnUNetPlans_tiny", "-f", 0, "-device", "cpu", "-npp", 1, "-nps", 1,
                "--save_probabilities")
        return folders[trainer]
    return predicted


def test_validation_summary_has_nnunet_format(plain_models):
    summaries = {t: json.loads((plain_models["results"] / f"{t}__nnUNetPlans_tiny__2d" / "fold_0" / "validation" /
                                "summary.json").read_text(encoding="utf-8")) for t in TRAINERS}
    vanilla, lsms = summaries["nnUNetTrainer_test"], summaries["LSMSTrainer_test"]
    assert set(lsms) == set(vanilla)
    assert set(lsms["mean"]) == set(vanilla["mean"]) == {"1", "2", "3", "4"}
    assert set(lsms["mean"]["1"]) == set(vanilla["mean"]["1"])
    model = plain_models["results"] / "LSMSTrainer_test__nnUNetPlans_tiny__2d"
    assert json.loads((model / "dataset.json").read_text(encoding="utf-8"))["labels"]["metastasis"] == 4


@pytest.mark.parametrize("trainer", TRAINERS)
def test_stock_predict_writes_label_maps_and_probabilities(plain_models, stock_predictions, run, tmp_path, trainer):
    images = plain_models["raw"] / "imagesTs"
    out = stock_predictions(trainer)
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in images.glob("*_0000.nii.gz"))
    for case in cases:
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(plain_models["raw"] / "labelsTs" / f"{case}.nii.gz")))
        assert prediction.shape == reference.shape
        assert set(np.unique(prediction)) <= {0, 1, 2, 3, 4}
        probabilities = np.load(out / f"{case}.npz")["probabilities"]
        assert probabilities.shape[0] == 5
        assert np.allclose(probabilities.sum(0), 1, atol=1e-3)
        assert np.array_equal(probabilities.argmax(0), prediction.reshape(probabilities.shape[1:]))
    run("nnUNetv2_evaluate_folder", plain_models["raw"] / "labelsTs", out, "-djfile", out / "dataset.json",
        "-pfile", out / "plans.json", "-o", tmp_path / "summary.json")
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["mean"]) == {"1", "2", "3", "4"}


def test_find_best_configuration_runs_over_both_trainers(plain_models, run):
    run("nnUNetv2_find_best_configuration", DATASET, "-c", "2d", "-tr", *TRAINERS, "-p", "nnUNetPlans_tiny", "-f", 0,
        "-np", 1)
    inference = json.loads((plain_models["results"] / "inference_information.json").read_text(encoding="utf-8"))
    for trainer in TRAINERS:
        model = f"{trainer}__nnUNetPlans_tiny__2d"
        validation = json.loads((plain_models["results"] / model / "fold_0" / "validation" / "summary.json")
                                .read_text(encoding="utf-8"))
        # nnU-Net ranks each model by its own final-validation summary
        assert np.isfinite(validation["foreground_mean"]["Dice"])
        assert inference["all_results"][model] == pytest.approx(validation["foreground_mean"]["Dice"])
    assert any(k.startswith("ensemble___") for k in inference["all_results"])
    assert inference["best_model_or_ensemble"]["selected_model_or_models"]


def test_plain_benchmark_reports_both_trainers(plain_models, run):
    output = run("LSMSv2_benchmark_plain", "-d", DATASET, "-c", "2d", "-p", "nnUNetPlans_tiny", "--epochs", 1,
                 "--iterations", 2, nnUNet_n_proc_DA="0").stdout
    rows = [line for line in output.splitlines() if line.startswith("| nnUNetTrainer_budget") or
            line.startswith("| LSMSTrainer_budget")]
    assert len(rows) == 2
    assert all(len(row.split("|")) == 10 for row in rows)  # name, 4 labels, mean, s/iter, ratio


def test_sequential_and_numpy_entries_predict_a_plain_lsms_model(plain_models, stock_predictions, run, tmp_path):
    import torch
    import lsms_nnunet_ext_hook  # noqa: F401  (nnU-Net finds the trainer named in the checkpoint)
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    images = plain_models["raw"] / "imagesTs"
    run("nnUNetv2_predict", "-i", images, "-o", tmp_path / "sequential", "-d", DATASET, "-c", "2d", "-tr",
        "LSMSTrainer_test", "-p", "nnUNetPlans_tiny", "-f", 0, "-device", "cpu", "-npp", 0, "-nps", 0)
    image_file = sorted(images.glob("*_0000.nii.gz"))[0]
    case = image_file.name[: -len("_0000.nii.gz")]
    multiprocess = stock_predictions("LSMSTrainer_test")  # -npp 1 -nps 1
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(multiprocess / f"{case}.nii.gz")))
    sequential = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "sequential" / f"{case}.nii.gz")))
    assert np.array_equal(sequential, expected)

    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False)
    predictor.initialize_from_trained_model_folder(
        str(plain_models["results"] / "LSMSTrainer_test__nnUNetPlans_tiny__2d"), (0,), "checkpoint_final.pth")
    image, properties = SimpleITKIO().read_images([str(image_file)])
    single = predictor.predict_single_npy_array(image, properties)
    assert np.array_equal(single.reshape(expected.shape), expected)
    listed = predictor.predict_from_list_of_npy_arrays([image], None, [properties], None, num_processes=1)
    assert np.array_equal(np.asarray(listed[0]).reshape(expected.shape), expected)
