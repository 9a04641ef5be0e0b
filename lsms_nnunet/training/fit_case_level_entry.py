"""`LSMSv2_fit_case_level`: (re)fit the case-level stage of a trained fold, without training or validating again.

    LSMSv2_fit_case_level -d DATASET -c CONFIG -f FOLD [-tr LSMSTrainer] [-p nnUNetPlans]
                          [-chk checkpoint_final.pth] [--settings FILE] [-device cpu]

Loads the fold's checkpoint as `nnUNetv2_train --val` does, fits the stage on the fold's training cases with the
trainer's `CaseLevelSettings` (or those of `--settings FILE`, a JSON object of the fields to change), judges it
against the network alone, and stores it in that checkpoint and beside it (`case_selector.pt`), where
`nnUNetv2_predict`, `LSMSv2_predict` and `nnUNetv2_export_model_to_zip` find it.
"""
from __future__ import annotations

import argparse
import os
import time

from lsms_nnunet.cli import console_entry


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Fit the case-level stage of a trained LSMS fold (no training, no "
                                                 "validation).")
    parser.add_argument("-d", required=True, help="dataset name or id")
    parser.add_argument("-c", required=True, help="configuration, e.g. 2d or 3d_fullres")
    parser.add_argument("-f", required=True, help="fold (0-4 or all)")
    parser.add_argument("-tr", default="LSMSTrainer", help="trainer class (default LSMSTrainer)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint to fit on and store the stage in "
                                                                      "(default checkpoint_final.pth)")
    parser.add_argument("--settings", help="JSON file of CaseLevelSettings fields to change, e.g. "
                                           "{\"logit_ceiling\": 6.0}")
    parser.add_argument("-device", choices=("cuda", "cpu", "mps"), default="cuda", help="default cuda")
    return parser


@console_entry
def fit_case_level_entry() -> None:
    args = _parser().parse_args()
    if args.settings and not os.path.isfile(args.settings):
        raise SystemExit(f"--settings {args.settings} does not exist. Fix: point it at a JSON file of case-level "
                         f"settings, e.g. {{\"logit_ceiling\": 6.0}}.")
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    import lsms_nnunet_ext_hook  # noqa: F401  (registers the trainer folder in nnUNet_extTrainer)
    from lsms_nnunet.network.prompting import network_config_of
    from lsms_nnunet.selection.settings import CaseLevelSettings
    from lsms_nnunet.training.lsms_trainer import LSMSTrainer

    fold = args.f if args.f == "all" else int(args.f)
    trainer = get_trainer_from_args(args.d, args.c, fold, args.tr, args.p, device=torch.device(args.device))
    if not isinstance(trainer, LSMSTrainer):
        raise SystemExit(f"-tr {args.tr} is not an LSMS trainer: only LSMS models have a case-level stage.")
    if not network_config_of(trainer.model_card).case_selection:
        raise SystemExit(f"{args.tr} trains without a case-level stage (its network config has case_selection "
                         f"false). Fix: pick an LSMS trainer with it.")
    checkpoint = os.path.join(trainer.output_folder, args.chk)
    if not os.path.isfile(checkpoint):
        raise SystemExit(f"{checkpoint} does not exist. Fix: train the fold first (nnUNetv2_train {args.d} {args.c} "
                         f"{args.f} -tr {args.tr}), or name an existing checkpoint with -chk.")
    if args.settings:
        trainer.case_level_settings = CaseLevelSettings.from_json_file(args.settings, trainer.case_level_settings)
    trainer.load_checkpoint(checkpoint)
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    started = time.perf_counter()
    stage = trainer.fit_case_level_stage()
    print(f"{stage.describe()}\nFitted in {time.perf_counter() - started:.0f} s and stored in {checkpoint} and "
          f"{os.path.join(trainer.output_folder, 'case_selector.pt')}.")
