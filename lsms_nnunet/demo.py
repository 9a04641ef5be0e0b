"""`LSMSv2_demo`: the whole workflow on the embedded default, with the same commands a user types.

synthetic referring dataset -> nnU-Net planning/preprocessing + text encoding (offline MiniLM) -> stock
`nnUNetv2_train -tr LSMSTrainer_quick` -> stock `nnUNetv2_predict` with the companion expressions file ->
`LSMSv2_evaluate` -> `LSMSv2_visualize`. Every command is printed before it runs, so the demo doubles as a tutorial.
Re-running continues where it stopped (finished steps are skipped).
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lsms_nnunet.cli import console_entry


def _run(command: list[str], env: dict) -> None:
    print(f"\n$ {shlex.join(command)}", flush=True)
    executable = shutil.which(command[0], path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                 env.get("PATH", "")]))
    started = time.perf_counter()
    subprocess.run([executable or command[0], *command[1:]], env=env, check=True)
    print(f"[{command[0]}: {time.perf_counter() - started:.0f} s]", flush=True)


def _summary_lines(summary: Path) -> list[str]:
    """The headline rows of LSMSv2_evaluate's summary.md (mean Dice, no-target accuracy)."""
    wanted = ("| Expressions ", "| Mean Dice ", "| No-target accuracy ")
    return [line for line in summary.read_text(encoding="utf-8").splitlines() if line.startswith(wanted)]


@console_entry
def demo_entry() -> None:
    parser = argparse.ArgumentParser(description="Run the LSMS workflow end to end on a synthetic referring dataset.")
    parser.add_argument("--workdir", default="lsms_demo", help="Folder for nnUNet_raw/_preprocessed/_results "
                        "(used unless those variables are already set). Default: ./lsms_demo")
    parser.add_argument("-d", type=int, default=501, help="Dataset id (default 501).")
    parser.add_argument("--dim", type=int, choices=(2, 3), default=2)
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("-tr", default="LSMSTrainer_quick", help="Trainer (default LSMSTrainer_quick: 10 x 50 its).")
    parser.add_argument("-device", default="cpu")
    args = parser.parse_args()

    import lsms_nnunet_ext_hook  # noqa: F401  (the stock commands find LSMSTrainer from an editable install too)

    started = time.perf_counter()

    workdir = Path(args.workdir).resolve()
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env.setdefault(name, str(workdir / name))
        Path(env[name]).mkdir(parents=True, exist_ok=True)
    env.setdefault("nnUNet_def_n_proc", str(min(4, os.cpu_count() or 1)))
    configuration = "2d" if args.dim == 2 else "3d_fullres"
    raw = Path(env["nnUNet_raw"])
    datasets = sorted(raw.glob(f"Dataset{args.d:03d}_*"))
    if not datasets:
        _run(["LSMSv2_make_synthetic", "-d", str(args.d), "--dim", str(args.dim), "--cases", str(args.cases)], env)
        datasets = sorted(raw.glob(f"Dataset{args.d:03d}_*"))
    dataset = datasets[0]
    preprocessed = Path(env["nnUNet_preprocessed"]) / dataset.name
    if not (preprocessed / "lsms_text" / "prompts.json").is_file():
        _run(["LSMSv2_plan_and_preprocess", "-d", str(args.d), "-c", configuration, "--verify_dataset_integrity"],
             {**env, "nnUNet_n_proc_DA": env.get("nnUNet_n_proc_DA", "1") or "1"})
    model = Path(env["nnUNet_results"]) / dataset.name / f"{args.tr}__nnUNetPlans__{configuration}"
    if not (model / "fold_0" / "checkpoint_final.pth").is_file():
        resume = ["--c"] if (model / "fold_0" / "checkpoint_latest.pth").is_file() else []
        # augmentation in the main process: with the quick trainer's seed, the training (and so the figures) repeat
        _run(["nnUNetv2_train", str(args.d), configuration, "0", "-tr", args.tr, "-device", args.device, *resume],
             {**env, "nnUNet_n_proc_DA": env.get("nnUNet_n_proc_DA", "0")})
    predictions = workdir / "predictions"
    # nnU-Net's default of 3 preprocessing + 3 export processes only contends on a small CPU
    workers = str(min(3, max(1, (os.cpu_count() or 2) // 2)))
    _run(["nnUNetv2_predict", "-i", str(dataset / "imagesTs"), "-o", str(predictions), "-d", str(args.d), "-c",
          configuration, "-tr", args.tr, "-f", "0", "-device", args.device, "-npp", workers, "-nps", workers], env)
    expressions = dataset / "imagesTs" / "expressions.json"
    _run(["LSMSv2_evaluate", "-ref", str(dataset / "labelsTs"), "-pred", str(predictions), "-e", str(expressions)], env)
    _run(["LSMSv2_visualize", "-i", str(dataset / "imagesTs"), "-pred", str(predictions), "-e", str(expressions),
          "-ref", str(dataset / "labelsTs"), "-o", str(workdir / "overlays"), "--max", "8"], env)
    print("\nTest images (imagesTs), answered by the trained fold 0:")
    print("\n".join(_summary_lines(predictions / "summary.md")))
    print(f"Done in {(time.perf_counter() - started) / 60:.1f} minutes. Masks: {predictions}  metrics: "
          f"{predictions / 'summary.md'}  pictures: {workdir / 'overlays'}")
