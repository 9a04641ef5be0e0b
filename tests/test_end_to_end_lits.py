"""Real CT through the whole pipeline: the LiTS demo volume as a plain task (liver + tumour), trained briefly by
vanilla nnU-Net and by LSMS, both predicted with the stock command (sequentially: its worker processes are tested on
the synthetic datasets); and as a referring dataset through LSMS."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lsms_nnunet.planning.variants import make_plans_variant

from conftest import assert_scores_follow_from_voxel_counts

pytestmark = pytest.mark.slow  # trains models end to end

PLAIN_ID, REFERRING_ID = 516, 517


def test_lits_plain_task_with_both_trainers(run, nnunet_dirs, tmp_path):
    run("LSMSv2_make_lits", "-d", PLAIN_ID, "--mode", "plain", "--cases", 5, "--crop", 32, 48, 48)
    run("LSMSv2_plan_and_preprocess", "-d", PLAIN_ID, "-c", "3d_fullres", "-np", 1, nnUNet_n_proc_DA="1")
    make_plans_variant(PLAIN_ID, "nnUNetPlans_tiny", max_features=16, batch_size=2)
    raw = next(Path(nnunet_dirs["nnUNet_raw"]).glob(f"Dataset{PLAIN_ID}_*"))
    image = sorted((raw / "imagesTr").glob("*_0000.nii.gz"))[0]
    images = tmp_path / "images"
    images.mkdir()
    (images / image.name).write_bytes(image.read_bytes())
    reference = sitk.ReadImage(str(image))
    for trainer in ("nnUNetTrainer_test", "LSMSTrainer_test"):
        run("nnUNetv2_train", PLAIN_ID, "3d_fullres", 0, "-tr", trainer, "-p", "nnUNetPlans_tiny", "-device", "cpu",
            nnUNet_n_proc_DA="0")
        out = tmp_path / trainer
        run("nnUNetv2_predict", "-i", images, "-o", out, "-d", PLAIN_ID, "-c", "3d_fullres", "-tr", trainer, "-p",
            "nnUNetPlans_tiny", "-f", 0, "-device", "cpu", "-npp", 0, "-nps", 0)
        prediction = sitk.ReadImage(str(out / image.name.replace("_0000", "")))
        assert prediction.GetSize() == reference.GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= {0, 1, 2}
        summary = json.loads((Path(nnunet_dirs["nnUNet_results"]) / raw.name / f"{trainer}__nnUNetPlans_tiny__3d_fullres"
                              / "fold_0" / "validation" / "summary.json").read_text(encoding="utf-8"))
        assert set(summary["mean"]) == {"1", "2"}


def test_lits_referring_dataset_trains_with_lsms(run, nnunet_dirs):
    run("LSMSv2_make_lits", "-d", REFERRING_ID, "--mode", "referring", "--cases", 5, "--crop", 32, 48, 48)
    run("LSMSv2_plan_and_preprocess", "-d", REFERRING_ID, "-c", "3d_fullres", "-np", 1, "--verify_dataset_integrity",
        nnUNet_n_proc_DA="1")
    make_plans_variant(REFERRING_ID, "nnUNetPlans_tiny", max_features=16, batch_size=2)
    run("nnUNetv2_train", REFERRING_ID, "3d_fullres", 0, "-tr", "LSMSTrainer_test", "-p", "nnUNetPlans_tiny", "-device",
        "cpu", nnUNet_n_proc_DA="0")
    raw = next(Path(nnunet_dirs["nnUNet_raw"]).glob(f"Dataset{REFERRING_ID}_*"))
    summary = json.loads((Path(nnunet_dirs["nnUNet_results"]) / raw.name /
                          "LSMSTrainer_test__nnUNetPlans_tiny__3d_fullres" / "fold_0" / "validation" /
                          "summary.json").read_text(encoding="utf-8"))
    assert summary["aggregate"]["n_expressions"] > 0
    assert_scores_follow_from_voxel_counts(summary["metric_per_expression"], summary["aggregate"])
