"""The README workflow with the stock nnU-Net commands, on tiny synthetic referring datasets (2D and 3D).

make synthetic -> LSMSv2_plan_and_preprocess (nnU-Net planning + the real embedded text encoder) -> stock
nnUNetv2_train -tr LSMSTrainer_test -> stock nnUNetv2_predict with a companion expressions.json -> LSMSv2_evaluate.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from plans.variants import make_plans_variant

DATASETS = {
    "2d": dict(dataset_id=511, dim=2, shape=("64", "64"), cases=5),
    "3d_fullres": dict(dataset_id=512, dim=3, shape=("16", "32", "32"), cases=5),
}


@pytest.fixture(scope="module", params=sorted(DATASETS))
def trained(request, run, nnunet_dirs):
    """A referring dataset made, planned, encoded and trained for one fold with the stock nnU-Net command."""
    configuration = request.param
    spec = DATASETS[configuration]
    dataset = spec["dataset_id"]
    run("LSMSv2_make_synthetic", "-d", dataset, "--dim", spec["dim"], "--cases", spec["cases"], "--test-cases", 2,
        "--shape", *spec["shape"], "--seed", 3)
    run("LSMSv2_plan_and_preprocess", "-d", dataset, "-c", configuration, "-np", 1, "--verify_dataset_integrity",
        nnUNet_n_proc_DA="1")
    make_plans_variant(dataset, "nnUNetPlans_tiny", max_features=16, batch_size=2)
    train = run("nnUNetv2_train", dataset, configuration, 0, "-tr", "LSMSTrainer_test", "-p", "nnUNetPlans_tiny",
                "-device", "cpu", nnUNet_n_proc_DA="0")
    raw = next(Path(nnunet_dirs["nnUNet_raw"]).glob(f"Dataset{dataset}_*"))
    model = next(Path(nnunet_dirs["nnUNet_results"]).glob(f"Dataset{dataset}_*")) / \
        f"LSMSTrainer_test__nnUNetPlans_tiny__{configuration}"
    return dict(dataset=dataset, configuration=configuration, raw=raw, model=model, train_log=train.stdout)


def test_stock_train_writes_per_expression_validation(trained):
    summary = json.loads((trained["model"] / "fold_0" / "validation" / "summary.json").read_text())
    expressions = json.loads((trained["raw"] / "expressions.json").read_text())["expressions"]
    splits = json.loads((trained["model"].parent.parent.parent / "nnUNet_preprocessed" /
                         trained["raw"].name / "splits_final.json").read_text())
    validation_cases = set(splits[0]["val"])
    expected = {e["id"] for e in expressions if e["case"] in validation_cases}
    assert {m["id"] for m in summary["metric_per_expression"]} == expected
    assert 0.0 <= summary["aggregate"]["mean_dice"] <= 1.0
    assert (trained["model"] / "fold_0" / "checkpoint_final.pth").is_file()
    dataset_json = json.loads((trained["model"] / "dataset.json").read_text())
    assert dataset_json["labels"] == {"background": 0, "target": 1}


def test_checkpoint_records_text_encoder(trained):
    import torch

    checkpoint = torch.load(trained["model"] / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                            weights_only=False)
    card = checkpoint["network_weights"]["_extra_state"]
    assert card["mode"] == "referring"
    assert card["text_encoder"]["name"] == "all-MiniLM-L6-v2"
    assert card["text_encoder"]["sha256"] == "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    assert card["text_encoder"]["dim"] == 384


def test_stock_predict_with_companion_file_then_evaluate(trained, run, tmp_path):
    images = trained["raw"] / "imagesTs"
    out = tmp_path / "predictions"
    run("nnUNetv2_predict", "-i", images, "-o", out, "-d", trained["dataset"], "-c", trained["configuration"],
        "-tr", "LSMSTrainer_test", "-p", "nnUNetPlans_tiny", "-f", 0, "-device", "cpu", "-npp", 1, "-nps", 1)
    expressions = json.loads((images / "expressions.json").read_text())["expressions"]
    assert expressions
    for expression in expressions:
        mask_file = out / f"{expression['id']}.nii.gz"
        image = sitk.ReadImage(str(images / f"{expression['case']}_0000.nii.gz"))
        mask = sitk.ReadImage(str(mask_file))
        assert mask.GetSize() == image.GetSize()
        assert np.allclose(mask.GetSpacing(), image.GetSpacing())
        assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}
    index = json.loads((out / "expressions_index.json").read_text())
    assert {e["id"] for e in index["expressions"]} == {e["id"] for e in expressions}
    run("LSMSv2_evaluate", "-ref", trained["raw"] / "labelsTs", "-pred", out, "-e", images / "expressions.json")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["aggregate"]["n_expressions"] == len(expressions)
