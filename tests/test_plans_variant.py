"""LSMSv2_plans_variant: a derived plans file (capped features, other batch or patch size) on the same data."""
import json
import os
import subprocess
import sys

import pytest

from conftest import FAST_NNUNET_ENV, run_command

DATASET = "Dataset519_PlansVariant"


@pytest.fixture()
def preprocessed(tmp_path):
    folder = tmp_path / "pre" / DATASET
    folder.mkdir(parents=True)
    plans = {"plans_name": "nnUNetPlans", "dataset_name": DATASET, "configurations": {
        "2d": {"data_identifier": "nnUNetPlans_2d", "batch_size": 2, "patch_size": [96, 96],
               "architecture": {"arch_kwargs": {"features_per_stage": [32, 64, 128, 256, 512]}}},
        "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 2, "patch_size": [32, 128, 128],
                       "architecture": {"arch_kwargs": {"features_per_stage": [32, 64, 128],
                                                        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]]}}},
        "3d_cascade_fullres": {"inherits_from": "3d_fullres"}}}
    (folder / "nnUNetPlans.json").write_text(json.dumps(plans), encoding="utf-8")
    env = {**FAST_NNUNET_ENV, "nnUNet_preprocessed": str(tmp_path / "pre"), "nnUNet_raw": str(tmp_path / "raw"),
           "nnUNet_results": str(tmp_path / "res")}
    return folder, env


def test_variant_caps_features_and_sets_batch_keeping_the_data(preprocessed):
    folder, env = preprocessed
    result = run_command(["LSMSv2_plans_variant", "-d", "519", "-p", "nnUNetPlans_cpu", "--max_features", "64",
                          "--batch_size", "8"], env)
    assert "-p nnUNetPlans_cpu" in result.stdout
    variant = json.loads((folder / "nnUNetPlans_cpu.json").read_text(encoding="utf-8"))
    assert variant["plans_name"] == "nnUNetPlans_cpu"
    configuration = variant["configurations"]["2d"]
    assert configuration["architecture"]["arch_kwargs"]["features_per_stage"] == [32, 64, 64, 64, 64]
    assert configuration["batch_size"] == 8
    assert configuration["data_identifier"] == "nnUNetPlans_2d"  # no second preprocessing
    assert variant["configurations"]["3d_cascade_fullres"] == {"inherits_from": "3d_fullres"}
    assert json.loads((folder / "nnUNetPlans.json").read_text(encoding="utf-8"))["configurations"]["2d"][
        "batch_size"] == 2  # the source is untouched


def test_variant_sets_a_patch_smaller_than_the_case(preprocessed):
    folder, env = preprocessed
    run_command(["LSMSv2_plans_variant", "-d", "519", "-p", "nnUNetPlans_patch", "-c", "3d_fullres",
                 "--patch_size", "32", "64", "64"], env)
    configurations = json.loads((folder / "nnUNetPlans_patch.json").read_text(encoding="utf-8"))["configurations"]
    assert configurations["3d_fullres"]["patch_size"] == [32, 64, 64]
    assert configurations["3d_fullres"]["data_identifier"] == "nnUNetPlans_3d_fullres"
    assert configurations["2d"]["patch_size"] == [96, 96]


@pytest.mark.parametrize("arguments, message", [
    (["-p", "nnUNetPlans_x"], "nothing to change"),
    (["-p", "nnUNetPlans", "--batch_size", "4"], "would overwrite the source plans"),
    (["-p", "nnUNetPlans_x", "--max_features", "0"], "--max_features must be a positive integer"),
    (["-p", "nnUNetPlans_x", "--batch_size", "2", "--source_plans", "Missing"], "Missing.json is missing"),
    (["-p", "nnUNetPlans_x", "-c", "3d_fullres", "--patch_size", "32", "62", "64"], "--patch_size 32 64 64"),
    (["-p", "nnUNetPlans_x", "-c", "3d_lowres", "--patch_size", "32", "64", "64"], "no configuration '3d_lowres'"),
])
def test_bad_requests_are_refused_with_the_fix(preprocessed, arguments, message):
    folder, env = preprocessed
    result = subprocess.run([sys.executable, "-c", "from lsms_nnunet.planning.variants import plans_variant_entry; "
                             "plans_variant_entry()", "-d", "519", *arguments],
                            env={**os.environ, **env}, capture_output=True, text=True,
                            encoding="utf-8")
    assert result.returncode != 0
    assert message in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["nnUNetPlans.json"]
