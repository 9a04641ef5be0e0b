"""Shared fixtures: nnU-Net folders in a temporary directory, fast single-process settings, no network."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

FAST_NNUNET_ENV = {
    "nnUNet_def_n_proc": "1",   # nnU-Net's default worker pools cost tens of seconds on 2 cores
    "nnUNet_compile": "0",
    "HF_HUB_OFFLINE": "1",      # prove that nothing needs the internet
    "TRANSFORMERS_OFFLINE": "1",
    "OMP_NUM_THREADS": "2",
}


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: trains or benchmarks models end to end (minutes); the fast tier is "
                                       "pytest -m 'not slow'")


@pytest.fixture(scope="session")
def nnunet_dirs(tmp_path_factory) -> dict:
    """nnUNet_raw / _preprocessed / _results and a text cache, set in os.environ for in-process calls too."""
    root = tmp_path_factory.mktemp("nnunet")
    env = {name: str(root / name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    env["LSMS_TEXT_CACHE"] = str(root / "text_cache")
    for folder in env.values():
        Path(folder).mkdir()
    env.update(FAST_NNUNET_ENV)
    os.environ.update(env)
    return env


def run_command(args: list, env: dict, timeout: int = 900, **extra_env) -> subprocess.CompletedProcess:
    """Run an installed console script the way a user would; fail with its output if it fails."""
    executable = shutil.which(args[0]) or str(Path(sys.executable).parent / args[0])
    result = subprocess.run([executable, *map(str, args[1:])], env={**os.environ, **env, **extra_env},
                            capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.fixture(scope="session")
def run(nnunet_dirs):
    def _run(*args, timeout: int = 900, **extra_env):
        return run_command(list(args), nnunet_dirs, timeout=timeout, **extra_env)
    return _run


REFERRING_2D, TINY_PLANS = 511, "nnUNetPlans_tiny"


@pytest.fixture(scope="session")
def referring_2d(run, nnunet_dirs) -> dict:
    """A tiny synthetic 2D referring dataset (5 training and 2 test cases, 64 x 64, held-out wordings), planned,
    preprocessed, text-encoded and with tiny plans (TINY_PLANS): made once for every module that trains on it. Each
    module trains its own trainers or plans there, so no module sees another's models."""
    from lsms_nnunet.planning.variants import make_plans_variant

    run("LSMSv2_make_synthetic", "-d", REFERRING_2D, "--dim", 2, "--cases", 5, "--test_cases", 2, "--shape", 64, 64,
        "--seed", 3, "--heldout_phrasing")
    run("LSMSv2_plan_and_preprocess", "-d", REFERRING_2D, "-c", "2d", "-np", 1, "--verify_dataset_integrity",
        nnUNet_n_proc_DA="0")  # as exported for seeded benchmarks: nnU-Net's own planner would crash on it
    make_plans_variant(REFERRING_2D, TINY_PLANS, max_features=16, batch_size=2)
    raw = next(Path(nnunet_dirs["nnUNet_raw"]).glob(f"Dataset{REFERRING_2D}_*"))
    return dict(dataset=REFERRING_2D, raw=raw, preprocessed=Path(nnunet_dirs["nnUNet_preprocessed"]) / raw.name,
                results=Path(nnunet_dirs["nnUNet_results"]) / raw.name)


@pytest.fixture(scope="session")
def run_failing(nnunet_dirs):
    """Run a command that must fail; returns its combined output for checking the message."""
    def _run(*args, timeout: int = 900, **extra_env) -> str:
        executable = shutil.which(args[0]) or str(Path(sys.executable).parent / args[0])
        result = subprocess.run([executable, *map(str, args[1:])], env={**os.environ, **nnunet_dirs, **extra_env},
                                capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout)
        assert result.returncode != 0, f"{args[0]} should have failed:\n{result.stdout[-3000:]}"
        return result.stdout + result.stderr
    return _run


def assert_scores_follow_from_voxel_counts(per_expression: list[dict], aggregate: dict) -> None:
    """Each Dice recomputed from the entry's own voxel counts (Dice = 2I / (I + U); both empty = 1), and the
    aggregate recomputed from the entries: checks the arithmetic, where a range check like 0 <= Dice <= 1 cannot
    fail."""
    import pytest

    for entry in per_expression:
        intersection, union = entry["intersection_voxels"], entry["union_voxels"]
        expected = 2 * intersection / (intersection + union) if union else 1.0
        assert entry["dice"] == pytest.approx(expected), entry
    assert aggregate["n_expressions"] == len(per_expression)
    assert aggregate["mean_dice"] == pytest.approx(sum(e["dice"] for e in per_expression) / len(per_expression))
    assert aggregate["mIoU"] == pytest.approx(sum(e["iou"] for e in per_expression) / len(per_expression))


def child_processes(pid: int) -> list[int]:
    """The live children of a process (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def process_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def assert_outlived_by_none(workers: list[int], what: str, wait_s: float = 10) -> None:
    """After their parent was killed: every worker exits within wait_s (survivors are killed, then reported)."""
    deadline = time.monotonic() + wait_s
    while any(map(process_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = [pid for pid in workers if process_alive(pid)]
    for pid in survivors:  # clean up before failing
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"{what} {survivors} outlived their killed parent"
