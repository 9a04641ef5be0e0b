"""`LSMSv2_benchmark_plain`: LSMS beside vanilla nnU-Net on a plain lesion task — Dice per label at equal budget.

Both trainers (`nnUNetTrainer_budget`, `LSMSTrainer_budget`) train the same folds with the stock `nnUNetv2_train` and
the same epochs x iterations; the numbers come from nnU-Net's own `validation/summary.json` of each fold (same format
for both) and the epoch timestamps in the final checkpoints. Finished trainings are reused, never redone.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

from lsms_nnunet.benchmark.training_runner import nnunet_command, resume_flags
from lsms_nnunet.benchmark.costs import seconds_per_iteration
from lsms_nnunet.training.checkpoints import load_checkpoint_safely
from lsms_nnunet.training.variants import BUDGET_EPOCHS_ENV, BUDGET_ITERATIONS_ENV
from lsms_nnunet.cli import console_entry

TRAINERS = ("nnUNetTrainer_budget", "LSMSTrainer_budget")


def benchmark_plain_task(dataset: str, configuration: str, folds: list[int], epochs: int, iterations: int,
                         plans: str = "nnUNetPlans", device: str = "cpu") -> dict:
    """Train (or reuse) both trainers on `folds`; Dice per label and s/iteration for each."""
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    name = maybe_convert_to_dataset_name(dataset)
    environment = {**os.environ, BUDGET_EPOCHS_ENV: str(epochs), BUDGET_ITERATIONS_ENV: str(iterations)}
    results = {}
    for trainer in TRAINERS:
        per_fold = []
        for fold in folds:
            fold_folder = Path(nnUNet_results) / name / f"{trainer}__{plans}__{configuration}" / f"fold_{fold}"
            if not (fold_folder / "validation" / "summary.json").is_file():
                extra, action = resume_flags(fold_folder)
                print(f"{trainer} fold {fold}: {action}", flush=True)
                subprocess.run([nnunet_command("nnUNetv2_train"), name, configuration, str(fold), "-tr", trainer, "-p",
                                plans, "-device", device, *extra], env=environment, check=True)
            summary = json.loads((fold_folder / "validation" / "summary.json").read_text(encoding="utf-8"))
            logging = load_checkpoint_safely(fold_folder / "checkpoint_final.pth")["logging"]
            per_fold.append({"dice_per_label": {k: v["Dice"] for k, v in summary["mean"].items()},
                             "foreground_dice": summary["foreground_mean"]["Dice"],
                             "s_per_iteration": seconds_per_iteration(logging["epoch_start_timestamps"],
                                                                      logging["epoch_end_timestamps"], iterations)})
        labels = per_fold[0]["dice_per_label"]
        results[trainer] = {
            "dice_per_label": {k: sum(f["dice_per_label"][k] for f in per_fold) / len(per_fold) for k in labels},
            "foreground_dice": sum(f["foreground_dice"] for f in per_fold) / len(per_fold),
            "s_per_iteration": sum(f["s_per_iteration"] for f in per_fold) / len(per_fold)}
    return {"dataset": name, "configuration": configuration, "folds": folds, "epochs": epochs,
            "iterations": iterations, "results": results}


def format_plain_table(report: dict) -> str:
    labels = list(report["results"][TRAINERS[0]]["dice_per_label"])
    vanilla_speed = report["results"][TRAINERS[0]]["s_per_iteration"]
    lines = [f"{report['dataset']} {report['configuration']}, folds {report['folds']}, budget {report['epochs']} x "
             f"{report['iterations']} iterations",
             "| trainer | " + " | ".join(f"Dice label {label}" for label in labels) + " | mean | s/iter | vs vanilla |",
             "|---" * (len(labels) + 4) + "|"]
    for trainer, result in report["results"].items():
        lines.append(f"| {trainer} | " + " | ".join(f"{result['dice_per_label'][k]:.4f}" for k in labels) +
                     f" | {result['foreground_dice']:.4f} | {result['s_per_iteration']:.3f} | "
                     f"{result['s_per_iteration'] / vanilla_speed:.2f}x |")
    return "\n".join(lines)


@console_entry
def benchmark_plain_entry() -> None:
    import lsms_nnunet_ext_hook  # noqa: F401

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-d", required=True)
    parser.add_argument("-c", required=True)
    parser.add_argument("--folds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("-p", default="nnUNetPlans")
    parser.add_argument("-device", default="cpu")
    args = parser.parse_args()
    report = benchmark_plain_task(args.d, args.c, args.folds, args.epochs, args.iterations, args.p, args.device)
    print(format_plain_table(report))
