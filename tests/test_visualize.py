"""Overlay pictures: size, red/green contours, slice choice, folder rendering and the LSMSv2_visualize CLI."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib.image import imread

from lsms_nnunet.evaluation.evaluate import EvaluationInputError
from lsms_nnunet.evaluation.visualize import (OVERLAY_HEIGHT_PX, OVERLAY_WIDTH_PX, _slice_to_show, render_overlay,
                                              visualize_folder)
from text_conditioning.expressions import Expression, ExpressionsError, save_expressions


def _color_pixel_counts(png: Path) -> tuple[int, int]:
    """Numbers of clearly red and clearly green pixels (a grayscale image has neither)."""
    rgb = imread(str(png))[..., :3]
    red = (rgb[..., 0] > 0.8) & (rgb[..., 1] < 0.3) & (rgb[..., 2] < 0.3)
    green = (rgb[..., 1] > 0.8) & (rgb[..., 0] < 0.3) & (rgb[..., 2] < 0.3)
    return int(red.sum()), int(green.sum())


def _ct_like_volume(shape=(6, 32, 32)) -> np.ndarray:
    generator = np.random.default_rng(0)
    return (generator.normal(40.0, 20.0, size=shape) - 1000.0 * (np.indices(shape)[2] < 4)).astype(np.float32)


def test_render_overlay_3d_draws_prediction_red_and_reference_green(tmp_path):
    image = _ct_like_volume()
    reference = np.zeros(image.shape, dtype=bool)
    reference[3, 10:20, 10:20] = True
    prediction = np.zeros(image.shape, dtype=bool)
    prediction[3, 12:24, 8:18] = True
    out_png = tmp_path / "pictures" / "case-e0.png"
    render_overlay(image, prediction, reference, "the largest hypodense lesion in the right lobe " * 6, out_png,
                   spacing=(2.5, 0.8, 0.8))
    picture = imread(str(out_png))
    assert picture.shape[:2] == (OVERLAY_HEIGHT_PX, OVERLAY_WIDTH_PX)
    red, green = _color_pixel_counts(out_png)
    assert red > 50 and green > 50
    assert picture[..., :3].std() > 0.05
    assert [path.name for path in out_png.parent.iterdir()] == ["case-e0.png"]


def test_render_overlay_2d_without_reference_has_no_green(tmp_path):
    image = _ct_like_volume((1, 32, 40))[0]
    prediction = np.zeros(image.shape, dtype=bool)
    prediction[5:15, 5:15] = True
    out_png = tmp_path / "two_d.png"
    render_overlay(image, prediction, None, "a lesion", out_png)
    red, green = _color_pixel_counts(out_png)
    assert red > 50 and green == 0
    with pytest.raises(ValueError, match="prediction mask has shape"):
        render_overlay(image, prediction[:10], None, "a lesion", out_png)


def test_slice_choice_prefers_reference_then_prediction_then_middle():
    prediction = np.zeros((9, 4, 4), dtype=bool)
    reference = np.zeros((9, 4, 4), dtype=bool)
    assert _slice_to_show(prediction, reference) == 4
    prediction[2, :2, :2] = True
    assert _slice_to_show(prediction, reference) == 2
    reference[6, :1, :1] = True
    reference[7, :2, :1] = True
    assert _slice_to_show(prediction, reference) == 7
    assert _slice_to_show(prediction, None) == 2


@pytest.fixture()
def folders(tmp_path):
    spacing_xyz = (0.8, 0.8, 2.5)
    for name in ("imagesTs", "labelsTs", "predictions"):
        (tmp_path / name).mkdir()
    region_map = np.zeros((6, 32, 32), dtype=np.uint8)
    region_map[2:4, 8:14, 8:14] = 1
    region_map[3:5, 20:26, 18:24] = 2
    arrays = {tmp_path / "imagesTs" / "case_a_0000.nii.gz": _ct_like_volume(),
              tmp_path / "labelsTs" / "case_a.nii.gz": region_map,
              tmp_path / "predictions" / "case_a-e0.nii.gz": (region_map == 1).astype(np.uint8),
              tmp_path / "predictions" / "case_a-e1.nii.gz": (region_map == 1).astype(np.uint8)}
    for path, array in arrays.items():
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing_xyz)
        sitk.WriteImage(image, str(path))
    expressions_file = tmp_path / "expressions.json"
    save_expressions(expressions_file, [Expression("case_a-e0", "case_a", "the upper lesion", (1,)),
                                        Expression("case_a-e1", "case_a", "the lower lesion", (2,))])
    return tmp_path, expressions_file


def test_visualize_folder_selects_ids_and_limits_count(folders):
    root, expressions_file = folders
    written = visualize_folder(root / "imagesTs", root / "predictions", expressions_file, root / "pictures",
                               ref_dir=root / "labelsTs")
    assert [path.name for path in written] == ["case_a-e0.png", "case_a-e1.png"]
    assert all(count > 0 for count in _color_pixel_counts(written[1]))
    only = visualize_folder(root / "imagesTs", root / "predictions", expressions_file, root / "only",
                            ids=["case_a-e1"])
    assert [path.name for path in only] == ["case_a-e1.png"]
    first = visualize_folder(root / "imagesTs", root / "predictions", expressions_file, root / "first", max_count=1)
    assert [path.name for path in first] == ["case_a-e0.png"]
    with pytest.raises(ExpressionsError, match="nope"):
        visualize_folder(root / "imagesTs", root / "predictions", expressions_file, root / "x", ids=["nope"])


def test_visualize_folder_lists_missing_files_first(folders):
    root, expressions_file = folders
    (root / "predictions" / "case_a-e1.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="1 prediction file\\(s\\) missing .*case_a-e1"):
        visualize_folder(root / "imagesTs", root / "predictions", expressions_file, root / "pictures")
    assert not (root / "pictures").exists()


def test_visualize_cli(folders):
    root, expressions_file = folders
    command = [sys.executable, "-c", "from lsms_nnunet.evaluation.visualize import visualize_entry; "
                                     "visualize_entry()",
               "-i", str(root / "imagesTs"), "-pred", str(root / "predictions"), "-e", str(expressions_file),
               "-o", str(root / "cli"), "-ref", str(root / "labelsTs"), "--ids", "case_a-e0"]
    result = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in (root / "cli").iterdir()) == ["case_a-e0.png"]
    assert imread(str(root / "cli" / "case_a-e0.png")).shape[:2] == (OVERLAY_HEIGHT_PX, OVERLAY_WIDTH_PX)


def test_visualize_folder_rejects_a_prediction_on_another_grid(folders):
    root, expressions_file = folders
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 32, 30), dtype=np.uint8)),
                    str(root / "predictions" / "case_a-e1.nii.gz"))
    with pytest.raises(EvaluationInputError, match="case_a-e1.nii.gz has shape .*case_a_0000.nii.gz"):
        visualize_folder(root / "imagesTs", root / "predictions", expressions_file, root / "pictures")
    with pytest.raises(EvaluationInputError, match="at least 1"):
        visualize_folder(root / "imagesTs", root / "predictions", expressions_file, root / "pictures", max_count=0)
