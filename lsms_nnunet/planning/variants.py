"""Derived plans: nnU-Net's plans with a smaller network, batch or patch, reusing the same preprocessed data.

The way nnU-Net users make plan variants by hand (copy nnUNetPlans.json, edit, train with `-p`), as a function and
as `LSMSv2_plans_variant`: used for fast CPU tests and short benchmarks. The `data_identifier` is kept, so nothing is
preprocessed twice.
"""
from __future__ import annotations

import argparse
import json
from copy import deepcopy
from pathlib import Path

import numpy as np

from text_conditioning.io import write_json_atomically
from lsms_nnunet.cli import console_entry


def make_plans_variant(dataset_name_or_id: str | int, plans_name: str, max_features: int | None = None,
                       batch_size: int | None = None, source_plans: str = "nnUNetPlans",
                       patch_size: tuple[int, ...] | None = None, configuration: str | None = None) -> Path:
    """Write `<plans_name>.json` next to `<source_plans>.json` with features capped, another batch size and/or
    another patch size (of `configuration`, or of every configuration with as many axes: a patch smaller than the
    case is what makes sliding-window inference and whole-case questions real on small synthetic data)."""
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
    for values in variant["configurations"].values():
        if "architecture" in values and max_features is not None:
            kwargs = values["architecture"]["arch_kwargs"]
            kwargs["features_per_stage"] = [min(f, max_features) for f in kwargs["features_per_stage"]]
        if batch_size is not None and "batch_size" in values:
            values["batch_size"] = batch_size
    if patch_size is not None:
        _set_patch_size(variant, source, tuple(int(size) for size in patch_size), configuration)
    target = folder / f"{plans_name}.json"
    write_json_atomically(target, variant, indent=4)
    return target


def _set_patch_size(plans: dict, source: Path, patch_size: tuple[int, ...], configuration: str | None) -> None:
    """Give the chosen configurations `patch_size`, refusing one their network's downsampling cannot divide."""
    chosen = [configuration] if configuration is not None else [
        name for name, values in plans["configurations"].items() if len(values.get("patch_size", ())) == len(patch_size)]
    if configuration is not None and configuration not in plans["configurations"]:
        raise ValueError(f"{source} has no configuration {configuration!r} (it has "
                         f"{sorted(plans['configurations'])}). Fix: name one of those.")
    if not chosen:
        raise ValueError(f"No configuration of {source} has a {len(patch_size)}D patch. Fix: give as many sizes as the "
                         f"configuration has axes.")
    for name in chosen:
        values = plans["configurations"][name]
        if "patch_size" not in values:
            raise ValueError(f"Configuration {name!r} of {source} inherits its patch size. Fix: name the configuration "
                             f"it inherits from.")
        strides = np.asarray(values["architecture"]["arch_kwargs"]["strides"], dtype=int).reshape(-1, len(patch_size))
        divisor = strides.prod(axis=0)
        if len(values["patch_size"]) != len(patch_size) or np.any(np.asarray(patch_size) % divisor):
            raise ValueError(f"Patch size {patch_size} does not fit configuration {name!r} of {source}: its network "
                             f"downsamples each axis by {tuple(int(d) for d in divisor)}, so every size must be a "
                             f"multiple of that. Fix: e.g. --patch_size "
                             f"{' '.join(str(int(d) * max(1, round(s / d))) for s, d in zip(patch_size, divisor))}.")
        values["patch_size"] = list(patch_size)


@console_entry
def plans_variant_entry() -> None:
    """LSMSv2_plans_variant: make_plans_variant from the command line, refusing changes that do nothing or overwrite."""
    parser = argparse.ArgumentParser(
        description="Write a plans variant next to nnUNetPlans.json (features capped, another batch size and/or "
                    "another patch size) that reuses the preprocessed data; train it with -p NAME. E.g. a CPU-sized "
                    "network: --max_features 64 --batch_size 8; a 3D patch smaller than the case: -c 3d_fullres "
                    "--patch_size 32 64 64.")
    parser.add_argument("-d", required=True, help="dataset name or id (planned and preprocessed)")
    parser.add_argument("-p", required=True, help="name of the new plans, e.g. nnUNetPlans_cpu")
    parser.add_argument("--max_features", type=int, default=None, help="cap on the features of every stage")
    parser.add_argument("--batch_size", type=int, default=None, help="batch size of every configuration")
    parser.add_argument("--patch_size", type=int, nargs="+", default=None,
                        help="patch size in array order, e.g. 32 64 64 (a multiple of the network's downsampling)")
    parser.add_argument("-c", default=None, help="configuration whose patch size changes (default: every "
                                                 "configuration with as many axes)")
    parser.add_argument("--source_plans", default="nnUNetPlans", help="plans to derive from (default nnUNetPlans)")
    args = parser.parse_args()
    for name in ("max_features", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be a positive integer, got {value}.")
    if args.patch_size is not None and min(args.patch_size) < 1:
        parser.error(f"--patch_size must be positive sizes, got {args.patch_size}.")
    if args.max_features is None and args.batch_size is None and args.patch_size is None:
        parser.error("nothing to change: give --max_features, --batch_size and/or --patch_size.")
    if args.p == args.source_plans:
        parser.error(f"-p {args.p} would overwrite the source plans; choose another name.")
    try:
        target = make_plans_variant(args.d, args.p, args.max_features, args.batch_size, args.source_plans,
                                    args.patch_size, args.c)
    except ValueError as error:
        parser.error(str(error))
    print(f"Wrote {target}; train it with -p {args.p}.")
