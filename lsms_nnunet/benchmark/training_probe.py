"""Peak memory and seconds per training step of one benchmark variant, measured in a fresh process.

The process builds the trainer exactly as `nnUNetv2_train` does and runs a few training steps on real batches (each
step: next batch, forward, backward, optimiser step, as in nnU-Net's epoch loop). It reports
- its peak memory: the resident set size high-water mark on CPU (`ru_maxrss`, interpreter and libraries included, the
  same for every variant), or `torch.cuda.max_memory_allocated` on CUDA;
- the median time of the steps after the warm-up steps. Probes of all variants run minutes apart, so on a shared
  machine they see more similar load than trainings that run hours apart;
- with `--profile_steps N`, where those steps' time goes (step_profile.py): the median over N profiled steps.
Its trainer writes only into a throw-away `nnUNet_results`, so the benchmark's trained models are never touched.
Data augmentation runs in-process (`nnUNet_n_proc_DA=0`) so its memory and time are counted too.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

PROBE_RESULT_PREFIX = "LSMS_TRAINING_PROBE "
DEFAULT_WARM_UP_STEPS, DEFAULT_TIMED_STEPS = 2, 5


def probe_training(dataset_name: str, configuration: str, fold: int, trainer_name: str, plans: str, device: str,
                   environment: dict, warm_up_steps: int = DEFAULT_WARM_UP_STEPS,
                   timed_steps: int = DEFAULT_TIMED_STEPS, profile_steps: int = 0) -> dict:
    """Run the probe in a subprocess; returns {"peak_bytes", "kind", "seconds_per_step", "warm_up_steps",
    "timed_steps"}, and "profile" (step_profile.merge_profiles) when profile_steps > 0."""
    with tempfile.TemporaryDirectory(prefix="lsms_training_probe_") as results_folder:
        command = [sys.executable, "-m", "lsms_nnunet.benchmark.training_probe", dataset_name, configuration,
                   str(fold), "-tr", trainer_name, "-p", plans, "-device", device,
                   "--warm_up_steps", str(warm_up_steps), "--timed_steps", str(timed_steps),
                   "--profile_steps", str(profile_steps)]
        completed = subprocess.run(command, env={**environment, "nnUNet_results": results_folder,
                                                 "nnUNet_n_proc_DA": "0"},
                                   capture_output=True, text=True, encoding="utf-8", errors="replace")
    lines = [line for line in completed.stdout.splitlines() if line.startswith(PROBE_RESULT_PREFIX)]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"The training probe for {trainer_name} failed ({completed.returncode}):\n"
                           f"{completed.stdout[-3000:]}\n{completed.stderr[-5000:]}")
    return json.loads(lines[-1][len(PROBE_RESULT_PREFIX):])


def _peak_cpu_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


def main() -> None:
    parser = argparse.ArgumentParser(description="Peak memory and step time of a few training steps of one trainer "
                                                 "(internal to LSMSv2_benchmark).")
    parser.add_argument("dataset")
    parser.add_argument("configuration")
    parser.add_argument("fold", type=int)
    parser.add_argument("-tr", required=True)
    parser.add_argument("-p", required=True)
    parser.add_argument("-device", choices=("cpu", "cuda"), required=True)
    parser.add_argument("--warm_up_steps", type=int, default=DEFAULT_WARM_UP_STEPS)
    parser.add_argument("--timed_steps", type=int, default=DEFAULT_TIMED_STEPS)
    parser.add_argument("--profile_steps", type=int, default=0)
    args = parser.parse_args()
    if args.warm_up_steps < 0 or args.timed_steps < 1 or args.profile_steps < 0:
        parser.error("--warm_up_steps and --profile_steps must be >= 0 and --timed_steps >= 1")

    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    device = torch.device(args.device)
    trainer = get_trainer_from_args(args.dataset, args.configuration, args.fold, args.tr, args.p, device=device)
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    durations = []
    for step in range(args.warm_up_steps + args.timed_steps):
        start = time.perf_counter()
        trainer.train_step(next(trainer.dataloader_train))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warm_up_steps:
            durations.append(time.perf_counter() - start)
    if device.type == "cuda":
        memory = {"peak_bytes": int(torch.cuda.max_memory_allocated(device)), "kind": "cuda_max_memory_allocated"}
    else:
        memory = {"peak_bytes": _peak_cpu_bytes(), "kind": "cpu_max_rss"}
    result = {**memory, "seconds_per_step": statistics.median(durations), "warm_up_steps": args.warm_up_steps,
              "timed_steps": args.timed_steps}
    if args.profile_steps:
        from lsms_nnunet.benchmark.step_profile import merge_profiles, profile_train_step

        result["profile"] = merge_profiles([profile_train_step(trainer) for _ in range(args.profile_steps)])
    print(PROBE_RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
