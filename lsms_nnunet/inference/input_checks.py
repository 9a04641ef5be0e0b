"""The images of a prediction, checked before any is segmented (LSMSPredictor calls `check_input_images` once).

Each image is read once more than nnU-Net would (its preprocessing workers read it again): the price of refusing a
NaN image, or warning about a constant or differently oriented one, before any mask is written.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from lsms_nnunet.preprocessing.image_checks import (nonfinite_voxel_count, refuse_nonfinite, warn_if_constant,
                                                    warn_if_orientation_differs)

ALLOW_NONFINITE_ENV = "LSMS_ALLOW_NONFINITE"  # set by LSMSv2_predict --allow_nonfinite


def input_files_by_case(source: str | Sequence[Sequence[str]], file_ending: str) -> dict[str, list[str]]:
    """Channel files per case, from an input folder (`<case>_XXXX<ending>`) or nnU-Net's list of lists."""
    if isinstance(source, str):
        names = sorted(name for name in os.listdir(source) if name.endswith(file_ending))
        grouped: dict[str, list[str]] = {}
        for name in names:
            grouped.setdefault(name[: -len(file_ending) - 5], []).append(os.path.join(source, name))
        return grouped
    return {os.path.basename(files[0])[: -len(file_ending) - 5]: list(files) for files in source}


def check_input_images(source: str | Sequence[Sequence[str]], dataset_json: Mapping, reader,
                       known_directions: Sequence[Sequence[float]]) -> None:
    """Refuse images with NaN/infinite voxels (unless LSMS_ALLOW_NONFINITE is set: then warn with the counts), warn
    about constant images and about directions unlike the training data's."""
    nonfinite = {}
    for case, files in input_files_by_case(source, dataset_json["file_ending"]).items():
        image, properties = reader.read_images(files)
        if count := nonfinite_voxel_count(image):
            nonfinite[case] = count
        warn_if_constant(case, image)
        warn_if_orientation_differs(case, properties, known_directions)
    if os.environ.get(ALLOW_NONFINITE_ENV):
        if nonfinite:
            print(f"WARNING: predicting anyway ({ALLOW_NONFINITE_ENV} / --allow_nonfinite) on images with NaN or "
                  f"infinite voxels: {nonfinite}. Their masks may be meaningless.")
        return
    refuse_nonfinite(nonfinite, "repair or remove these images (e.g. replace NaN by the background value), or pass "
                                "--allow_nonfinite to LSMSv2_predict (LSMS_ALLOW_NONFINITE=1 for nnUNetv2_predict) "
                                "to predict anyway.")
