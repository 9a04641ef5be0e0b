"""Benchmark step 2: train each variant and fold with the stock `nnUNetv2_train` in a subprocess, at the shared budget.

Resumable: a finished training is never redone or touched, an interrupted one continues with `--c`; one started with
another budget or other case-level settings is refused, so one table never mixes them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from lsms_nnunet.benchmark.preparation import BenchmarkSetup, BenchmarkSetupError, say
from lsms_nnunet.benchmark.variants import Variant
from lsms_nnunet.selection.settings import CaseLevelSettings


PROGRESS_POLL_SECONDS = 2.0


class TrainingFailedError(RuntimeError):
    """An `nnUNetv2_train` subprocess failed (the message holds the end of its log)."""


def is_finished(fold_folder: Path) -> bool:
    return (fold_folder / "checkpoint_final.pth").is_file() and (fold_folder / "validation" / "summary.json").is_file()


def recorded_budget(fold_folder: Path) -> tuple[int, int] | None:
    """(epochs, iterations per epoch) that nnU-Net recorded in debug.json when the training started."""
    debug_file = fold_folder / "debug.json"
    if not debug_file.is_file():
        return None
    debug = json.loads(debug_file.read_text(encoding="utf-8"))
    return int(debug["num_epochs"]), int(debug["num_iterations_per_epoch"])


def check_budget(setup: BenchmarkSetup, fold_folder: Path) -> None:
    budget = recorded_budget(fold_folder)
    if budget is not None and budget != (setup.epochs, setup.iterations):
        raise BenchmarkSetupError(
            f"{fold_folder} was trained with a budget of {budget[0]} epochs x {budget[1]} iterations, but this run "
            f"asks for {setup.epochs} x {setup.iterations}; results would mix budgets. Fix: rerun with --epochs "
            f"{budget[0]} --iterations {budget[1]}, or move {fold_folder.parent} away to retrain.")
    # nnU-Net's debug.json holds the trainer's attributes as text, an LSMS trainer's case-level settings among them
    debug_file = fold_folder / "debug.json"
    recorded = json.loads(debug_file.read_text(encoding="utf-8")).get("case_level_settings") \
        if debug_file.is_file() else None
    asked = setup.case_level_settings or CaseLevelSettings()  # the budget trainers' own: the defaults
    if recorded is not None and recorded != repr(asked):
        raise BenchmarkSetupError(
            f"{fold_folder} fits its case-level stage with {recorded}, but this run asks for {asked}; results would "
            f"mix settings. Fix: rerun with the --case_level_settings of that run (none: the defaults), or move "
            f"{fold_folder.parent} away to retrain.")


def resume_flags(fold_folder: Path) -> tuple[list[str], str]:
    """The `nnUNetv2_train` flags that finish an unfinished fold folder, and what they do."""
    if (fold_folder / "checkpoint_final.pth").is_file():
        return ["--val"], "final validation only (--val)"
    if (fold_folder / "checkpoint_latest.pth").is_file():
        return ["--c"], "continuing an interrupted training (--c)"
    return [], "training"


def nnunet_command(name: str) -> str:
    return shutil.which(name) or str(Path(sys.executable).parent / name)


def run_with_epoch_progress(command: list[str], log_file: Path, environment: dict, epochs: int | None,
                            description: str) -> int:
    """Run `command` with its output appended to `log_file`, showing finished epochs (nnU-Net's "Epoch time:" lines)."""
    with open(log_file, "a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(command)}\n")
        log.flush()
        with open(log_file, encoding="utf-8", errors="replace") as reader, \
                tqdm(total=epochs, desc=description, unit="epoch") as progress:
            reader.seek(0, os.SEEK_END)
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
            unfinished_line = ""
            while True:
                finished = process.poll() is not None
                lines = (unfinished_line + reader.read()).split("\n")
                unfinished_line = lines.pop()
                finished_epochs = sum("Epoch time:" in line for line in lines)
                if finished_epochs:
                    progress.update(finished_epochs)
                if finished:
                    return process.returncode
                time.sleep(PROGRESS_POLL_SECONDS)


def train_variant(setup: BenchmarkSetup, variant: Variant, fold: int) -> str:
    """Train (or finish) one variant and fold with the stock `nnUNetv2_train`; returns what was done."""
    fold_folder = setup.fold_folder(variant, fold)
    check_budget(setup, fold_folder)
    if is_finished(fold_folder):
        return "finished earlier, left untouched"
    extra, action = resume_flags(fold_folder)
    log_file = setup.output_folder / "logs" / f"{variant.name}__fold_{fold}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    command = [nnunet_command("nnUNetv2_train"), setup.dataset_name, setup.configuration, str(fold),
               "-tr", variant.trainer, "-p", setup.plans, "-device", setup.device, *extra]
    say(f"{variant.name} fold {fold}: {action}: {' '.join(command[1:])} (log: {log_file})")
    start = time.perf_counter()
    returncode = run_with_epoch_progress(command, log_file, setup.training_environment(),
                                         setup.epochs if not extra else None, f"{variant.name} fold {fold}")
    if returncode != 0 or not is_finished(fold_folder):
        tail = log_file.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise TrainingFailedError(f"{' '.join(command)} failed (exit code {returncode}). End of {log_file}:\n{tail}\n"
                                  f"Fix the cause and rerun LSMSv2_benchmark: it continues where it stopped.")
    return f"{action} done in {time.perf_counter() - start:.0f} s"
