"""Checks of image content that nnU-Net does not make: non-finite voxels, constant images, orientation.

nnU-Net segments whatever array it reads. An all-NaN or constant image still gets lesion masks, NaNs in training
images poison the intensity fingerprint (CT normalisation clips to NaN percentiles), and an image stored with another
direction matrix than the training data is a mirrored or transposed array to the network (flips are undone for
referring models by preprocessing/orientation.py; axis order and rotation are only warned about). Callers pass what
nnU-Net's reader returned; only NIfTI files are read once more, for non-finite voxels (`nonfinite_voxel_count`).
"""
from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

DIRECTION_DECIMALS = 3  # direction cosines written by different tools differ in the last digits only


class ImageContentError(ValueError):
    """Images whose content cannot be segmented meaningfully as it is (e.g. NaN or infinite voxels)."""


NIFTI_ENDINGS = (".nii", ".nii.gz")


def nonfinite_voxel_count(image: np.ndarray, files: Sequence[str | Path] = ()) -> int:
    """How many voxels are NaN or infinite: in the array a reader returned or, for NIfTI `files`, in the files
    themselves (SimpleITK's NIfTI reader turns NaN and infinite voxels into 0, so its array cannot tell)."""
    count = int(image.size - np.count_nonzero(np.isfinite(image)))
    return count or sum(_nonfinite_in_nifti(Path(file)) for file in files if str(file).endswith(NIFTI_ENDINGS))


def _nonfinite_in_nifti(path: Path) -> int:
    import nibabel

    stored = nibabel.load(str(path))
    if stored.get_data_dtype().kind != "f":  # integer voxels cannot be NaN or infinite
        return 0
    data = np.asanyarray(stored.dataobj)
    return int(data.size - np.count_nonzero(np.isfinite(data)))


def warn_if_constant(case: str, image: np.ndarray) -> None:
    """A constant image carries no structure: any mask the network draws on it is an artefact, so say so."""
    finite = image[np.isfinite(image)]
    if finite.size and finite.min() == finite.max():
        warnings.warn(f"Image of case {case!r} is constant (every voxel is {float(finite.min())}): there is nothing to "
                      "segment and any mask is meaningless. Fix: check the file (an empty export or a wrong channel?).",
                      stacklevel=2)


def refuse_nonfinite(counts: Mapping[str, int], fix: str) -> None:
    """One error naming every case with NaN/infinite voxels and how many, so nothing is silently segmented."""
    if not counts:
        return
    listed = ", ".join(f"{case} ({count} voxels)" for case, count in list(counts.items())[:10])
    more = f" and {len(counts) - 10} more" if len(counts) > 10 else ""
    raise ImageContentError(f"{len(counts)} image(s) contain NaN or infinite voxels: {listed}{more}. Fix: {fix}")


def direction_of(properties: Mapping) -> tuple[float, ...] | None:
    """The direction matrix (row-major, rounded) that SimpleITK-based readers record; None for other readers."""
    direction = properties.get("sitk_stuff", {}).get("direction")
    return None if direction is None else tuple(round(float(v), DIRECTION_DECIMALS) + 0.0 for v in direction)


def training_directions(preprocessed_folder: str | Path) -> list[list[float]]:
    """The distinct direction matrices of the preprocessed training cases (nnU-Net keeps the reader's properties in
    `<case>.pkl`), recorded in the model card so prediction can warn about differently oriented inputs."""
    directions = []
    for properties_file in sorted(Path(preprocessed_folder).glob("*.pkl")):
        with open(properties_file, "rb") as file:
            direction = direction_of(pickle.load(file))  # nnU-Net's own preprocessing output, read by nnU-Net too
        if direction is not None and list(direction) not in directions:
            directions.append(list(direction))
    return directions


def _up_to_flips(direction: Sequence[float]) -> list[float]:
    """A direction matrix with each index axis turned to point along its dominant patient axis: flips are undone for
    referring models (preprocessing/orientation.py), so only axis order and rotation remain to compare."""
    dim = int(round(len(direction) ** 0.5))
    matrix = np.reshape(np.asarray(direction, dtype=float), (dim, dim))
    signs = np.sign(matrix[np.argmax(np.abs(matrix), axis=0), np.arange(dim)])
    return [round(float(v), DIRECTION_DECIMALS) + 0.0 for v in (matrix * signs).ravel()]


def warn_if_orientation_differs(case: str, properties: Mapping, known_directions: Sequence[Sequence[float]]) -> None:
    """nnU-Net never reorients. Flips are undone for referring models, but an image whose axes are ordered or rotated
    unlike every training image is a transposed or rotated array to the network, which turns "left" into "upper".
    Warn; the arrays may still be right."""
    direction = direction_of(properties)
    if direction is None or not known_directions or \
            _up_to_flips(direction) in [_up_to_flips(d) for d in known_directions]:
        return
    warnings.warn(f"Image of case {case!r} has direction matrix {list(direction)}, the training data "
                  f"{' or '.join(str(list(d)) for d in known_directions)}: its axes are ordered or rotated unlike "
                  "the training images and nnU-Net does not reorient, so sides and positions in the expressions "
                  "(left/right, upper/lower) may be answered wrongly. Fix: resample the image to the training "
                  "orientation (e.g. SimpleITK DICOMOrient) before predicting.", stacklevel=2)
