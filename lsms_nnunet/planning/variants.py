"""Derived plans: nnU-Net's plans with a smaller network or batch, reusing the same preprocessed data.

The way nnU-Net users make plan variants by hand (copy nnUNetPlans.json, edit, train with `-p`), as a function and
as `LSMSv2_plans_variant`: used for fast CPU tests and short benchmarks. The `data_identifier` is kept, so nothing is
preprocessed twice.
"""
from __future__ import annotations

import argparse
import json
from copy import deepcopy
from pathlib import Path

from text_conditioning.io import write_json_atomically
from lsms_nnunet.cli import console_entry


def make_plans_variant(dataset_name_or_id: str | int, plans_name: str, max_features: int | None = None,
                       batch_size: int | None = None, source_plans: str = "nnUNetPlans") -> Path:
    """Write `<plans_name>.json` next to `<source_plans>.json` with features capped and/or another batch size."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    folder = Path(nnUNet_preprocessed) / maybe_convert_to_dataset_name(dataset_name_or_id)
    source = folder / f"{source_plans}.json"
    if not source.is_file():
        available = sorted(p.stem for p in folder.glob("*Plans*.json")) if folder.is_dir() else []
        raise FileNotFoundError(f"{source} is missing (plans there: {available or 'none'}). Fix: name existing plans, "
                                f"or run nnUNetv2_plan_and_preprocess (or LSMSv2_plan_and_preprocess) for this "
                                f"dataset first.")
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
    write_json_atomically(target, variant, indent=4)
    return target


@console_entry
def plans_variant_entry() -> None:
    """LSMSv2_plans_variant: make_plans_variant from the command line, refusing changes that do nothing or overwrite."""
    parser = argparse.ArgumentParser(
        description="Write a plans variant next to nnUNetPlans.json (features capped and/or another batch size) that "
                    "reuses the preprocessed data; train it with -p NAME. E.g. a CPU-sized network: "
                    "--max_features 64 --batch_size 8.")
    parser.add_argument("-d", required=True, help="dataset name or id (planned and preprocessed)")
    parser.add_argument("-p", required=True, help="name of the new plans, e.g. nnUNetPlans_cpu")
    parser.add_argument("--max_features", type=int, default=None, help="cap on the features of every stage")
    parser.add_argument("--batch_size", type=int, default=None, help="batch size of every configuration")
    parser.add_argument("--source_plans", default="nnUNetPlans", help="plans to derive from (default nnUNetPlans)")
    args = parser.parse_args()
    for name in ("max_features", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be a positive integer, got {value}.")
    if args.max_features is None and args.batch_size is None:
        parser.error("nothing to change: give --max_features and/or --batch_size.")
    if args.p == args.source_plans:
        parser.error(f"-p {args.p} would overwrite the source plans; choose another name.")
    target = make_plans_variant(args.d, args.p, args.max_features, args.batch_size, args.source_plans)
    print(f"Wrote {target}; train it with -p {args.p}.")
