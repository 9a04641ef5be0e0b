"""Derived plans: nnU-Net's plans with a smaller network or batch, reusing the same preprocessed data.

The way nnU-Net users make plan variants by hand (copy nnUNetPlans.json, edit, train with `-p`), as a function: used
for fast CPU tests and short benchmarks. The `data_identifier` is kept, so nothing is preprocessed twice.
"""
from __future__ import annotations

import json
import os
from copy import deepcopy
from pathlib import Path


def make_plans_variant(dataset_name_or_id: str | int, plans_name: str, max_features: int | None = None,
                       batch_size: int | None = None, source_plans: str = "nnUNetPlans") -> Path:
    """Write `<plans_name>.json` next to `<source_plans>.json` with features capped and/or another batch size."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    folder = Path(nnUNet_preprocessed) / maybe_convert_to_dataset_name(dataset_name_or_id)
    source = folder / f"{source_plans}.json"
    if not source.is_file():
        raise FileNotFoundError(f"{source} is missing. Fix: run nnUNetv2_plan_and_preprocess (or "
                                f"LSMSv2_plan_and_preprocess) for this dataset first.")
    plans = json.loads(source.read_text(encoding="utf-8"))
    variant = deepcopy(plans)
    variant["plans_name"] = plans_name
    for configuration in variant["configurations"].values():
        if "architecture" in configuration and max_features is not None:
            kwargs = configuration["architecture"]["arch_kwargs"]
            kwargs["features_per_stage"] = [min(f, max_features) for f in kwargs["features_per_stage"]]
        if batch_size is not None and "batch_size" in configuration:
            configuration["batch_size"] = batch_size
    target = folder / f"{plans_name}.json"
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(variant, indent=4), encoding="utf-8")
    os.replace(tmp, target)
    return target
