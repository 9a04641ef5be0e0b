"""LSMS configurations reuse nnUNetPlans' preprocessed data wherever preprocessing would write the same arrays."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from lsms_nnunet.planning.lsms_block import resolved_configuration

# What decides the content of a configuration's preprocessed data (DefaultPreprocessor reads exactly these), at the
# level of the plans and of the configuration.
PLANS_PREPROCESSING_KEYS = ("transpose_forward", "image_reader_writer", "foreground_intensity_properties_per_channel")
CONFIGURATION_PREPROCESSING_KEYS = ("preprocessor_name", "normalization_schemes", "use_mask_for_norm",
                                    "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_seg",
                                    "resampling_fn_seg_kwargs")
PREPROCESSED_CASE_SUFFIXES = (".b2nd", "_seg.b2nd", ".pkl")


def share_preprocessed_data(plans: dict, nnunet_plans: dict) -> dict[str, str]:
    """Point LSMS configurations at nnU-Net's preprocessed data wherever preprocessing would produce the same data.

    nnU-Net names a configuration's data folder `<plans_name>_<configuration>` (its data_identifier), so LSMS plans
    would otherwise preprocess the whole dataset a second time. Memory-aware planning changes patch, batch and
    network, never spacing, normalization or resampling, so 2d and 3d_fullres (whose spacing comes from the
    fingerprint alone) always match nnU-Net's; 3d_lowres matches only if its spacing came out the same. A
    configuration is shared only when every preprocessing input is equal to that of an nnUNetPlans configuration
    (same spacing, normalization, resampling, preprocessor, transpose, reader and intensity statistics), so the
    shared data are exactly what preprocessing these plans would write. (nnU-Net's blosc2 chunking is tuned to the
    patch of the plans that wrote the data; another patch size reads the same arrays, only the chunk fit differs,
    as with nnU-Net's own ResEnc presets, which share data the same way.)

    Both plans must be JSON-like (lists, not numpy arrays). Returns {configuration: data_identifier now shared}.
    """
    if any(plans.get(key) != nnunet_plans.get(key) for key in PLANS_PREPROCESSING_KEYS):
        return {}
    candidates = [resolved_configuration(nnunet_plans, name) for name in nnunet_plans["configurations"]]
    shared = {}
    for name, configuration in plans["configurations"].items():
        if "inherits_from" in configuration:  # follows its parent's data
            continue
        match = next((candidate for candidate in candidates if _same_preprocessing(configuration, candidate)), None)
        if match is not None:
            configuration["data_identifier"] = match["data_identifier"]
            shared[name] = match["data_identifier"]
    return shared


def _same_preprocessing(configuration: Mapping, other: Mapping) -> bool:
    """Every preprocessing input equal: same spacing (to float precision) and the same preprocessing keys."""
    spacing, other_spacing = configuration.get("spacing"), other.get("spacing")
    if spacing is None or other_spacing is None or len(spacing) != len(other_spacing):
        return False
    return (np.allclose(spacing, other_spacing, rtol=1e-6, atol=0)
            and all(configuration.get(key) == other.get(key) for key in CONFIGURATION_PREPROCESSING_KEYS))


def preprocessed_configurations(dataset_name: str, plans: Mapping, case_identifiers: Sequence[str]) -> set[str]:
    """Configurations whose data folder already holds every training case (data, segmentation and properties)."""
    root = Path(os.environ["nnUNet_preprocessed"]) / dataset_name
    done = set()
    for name in plans["configurations"]:
        folder = root / resolved_configuration(plans, name)["data_identifier"]
        if all((folder / f"{case}{suffix}").is_file()
               for case in case_identifiers for suffix in PREPROCESSED_CASE_SUFFIXES):
            done.add(name)
    return done
