"""`LSMSv2_demo`, the README's first command, end to end on a small dataset with the 1 x 2-iteration trainer."""
import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_the_workflow_and_ends_with_the_test_images_scores(run, tmp_path):
    output = run("LSMSv2_demo", "--workdir", tmp_path / "demo", "-d", 599, "--cases", 6, "-tr", "LSMSTrainer_test",
                 nnUNet_raw=str(tmp_path / "raw"), nnUNet_preprocessed=str(tmp_path / "preprocessed"),
                 nnUNet_results=str(tmp_path / "results")).stdout
    steps = [line.split()[1] for line in output.splitlines() if line.startswith("$ ")]
    assert steps == ["LSMSv2_make_synthetic", "LSMSv2_plan_and_preprocess", "nnUNetv2_train", "nnUNetv2_predict",
                     "LSMSv2_evaluate", "LSMSv2_visualize"]
    lines = output.strip().splitlines()
    tail = lines[lines.index("Test images (imagesTs), answered by the trained fold 0:") + 1:]
    assert [row.split("|")[1].strip() for row in tail[:-1]] == ["Expressions", "Mean Dice", "No-target accuracy"]
    assert tail[-1].startswith("Done in ") and " minutes. Masks: " in tail[-1]
    assert any((tmp_path / "demo" / "overlays").glob("*.png"))
