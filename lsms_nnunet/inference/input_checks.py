"""The images of a prediction, checked before any is segmented (LSMSPredictor calls `check_input_images` once).

Each image is read once more than nnU-Net would (its preprocessing workers read it again): the price of refusing a
NaN image or a case with the wrong channel files, or warning about a constant or differently oriented one, before any
mask is written.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from lsms_nnunet.preprocessing.image_checks import (nonfinite_voxel_count, refuse_nonfinite, warn_if_constant,
                                                    warn_if_orientation_differs)

ALLOW_NONFINITE_ENV = "LSMS_ALLOW_NONFINITE"  # for the stock nnUNetv2_predict (LSMSv2_predict: --allow_nonfinite)


def input_files_by_case(source: str | Sequence[Sequence[str]], file_ending: str) -> dict[str, list[str]]:
    """Channel files per case, from an input folder (`<case>_XXXX<ending>`) or nnU-Net's list of lists."""
    if isinstance(source, str):
        names = sorted(name for name in os.listdir(source) if name.endswith(file_ending))
        grouped: dict[str, list[str]] = {}
        for name in names:
            grouped.setdefault(name[: -len(file_ending) - 5], []).append(os.path.join(source, name))
        return grouped
    return {os.path.basename(files[0])[: -len(file_ending) - 5]: list(files) for files in source}


class InputChannelsError(ValueError):
    """Cases whose channel files do not match the model's channels (nnU-Net would die in a worker, "RAM was full")."""


def refuse_wrong_channels(files_by_case: Mapping[str, Sequence[str]], channel_names: Mapping[str, str],
                          file_ending: str) -> None:
    """Every case needs exactly the files `_0000` ... `_{n-1}` of the model's n channels."""
    expected = [f"_{index:04d}{file_ending}" for index in range(len(channel_names))]
    wrong = {case: [os.path.basename(f) for f in files] for case, files in files_by_case.items()
             if sorted(os.path.basename(f)[len(case):] for f in files) != expected}
    if not wrong:
        return
    case, names = next(iter(wrong.items()))
    raise InputChannelsError(
        f"{len(wrong)} case(s) do not have the model's {len(channel_names)} channel(s) {dict(channel_names)}, e.g. "
        f"{case}: {names} (expected {[case + suffix for suffix in expected]}). Fix: give each case exactly these "
        f"channel files; move extra ones (e.g. a second modality or a mask named _0001) out of the input folder.")


def check_input_images(source: str | Sequence[Sequence[str]], dataset_json: Mapping, reader,
                       known_directions: Sequence[Sequence[float]], allow_nonfinite: bool = False) -> None:
    """Refuse cases with other channels than the model's, and images with NaN/infinite voxels (unless
    `allow_nonfinite` or LSMS_ALLOW_NONFINITE is set: then warn with the counts); warn about constant images and
    about directions unlike the training data's."""
    files_by_case = input_files_by_case(source, dataset_json["file_ending"])
    refuse_wrong_channels(files_by_case, dataset_json["channel_names"], dataset_json["file_ending"])
    nonfinite = {}
    for case, files in files_by_case.items():
        image, properties = reader.read_images(files)
        if count := nonfinite_voxel_count(image, files):
            nonfinite[case] = count
        warn_if_constant(case, image)
        warn_if_orientation_differs(case, properties, known_directions)
    if allow_nonfinite or os.environ.get(ALLOW_NONFINITE_ENV):
        if nonfinite:
            print(f"WARNING: predicting anyway ({ALLOW_NONFINITE_ENV} / --allow_nonfinite) on images with NaN or "
                  f"infinite voxels: {nonfinite}. Their masks may be meaningless.")
        return
    refuse_nonfinite(nonfinite, "repair or remove these images (e.g. replace NaN by the background value), or pass "
                                "--allow_nonfinite to LSMSv2_predict (LSMS_ALLOW_NONFINITE=1 for nnUNetv2_predict) "
                                "to predict anyway.")
