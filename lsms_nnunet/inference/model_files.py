"""Reading model files without running code from them (nnU-Net's own loader unpickles without restriction).

`load_checkpoint_safely` reads a checkpoint with `torch.load(weights_only=True)`; `screen_checkpoint` refuses, with
the file and the fix, one that would run code, cannot be read, or was trained for another dataset or network than the
model folder it sits in, before nnU-Net's loader sees it.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import torch

UNREADABLE = (RuntimeError, EOFError, pickle.UnpicklingError, OSError)


def numpy_scalar_globals() -> list:
    """What nnU-Net's checkpoints need beyond tensors and plain containers: its `logging` lists and `_best_ema` hold
    numpy scalars. Rebuilding a scalar or a dtype runs no user code, unlike the arbitrary globals of full pickle."""
    return [np._core.multiarray.scalar, np.dtype,
            *(getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType"))]


def load_checkpoint_safely(path: str | os.PathLike, **load_arguments) -> dict:
    """`torch.load(weights_only=True)` of an nnU-Net/LSMS checkpoint: tensors, plain containers, the model card (plain
    dicts/lists/strings/numbers) and numpy scalars only, so a shared model file cannot run code when the plugin
    reads it. (nnU-Net's own loader, used by nnUNetv2_train --c and nnUNetv2_predict, is unrestricted.)"""
    with torch.serialization.safe_globals(numpy_scalar_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, **load_arguments)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint that cannot be read without running code from it, or cannot be read at all."""


def screen_checkpoint(path: str | os.PathLike, configuration: str | None = None) -> None:
    """Refuse a checkpoint that `load_checkpoint_safely` cannot read, before an unrestricted loader (nnU-Net's) runs
    whatever a pickled object in it asks for; with `configuration`, also one whose training (nnU-Net's `init_args`)
    had another dataset or network than the plans of its model folder (`fold_X/..`), which nnU-Net would load
    without a word or fail on with a size-mismatch traceback."""
    try:
        checkpoint = load_checkpoint_safely(path, mmap=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"{path} holds objects beyond tensors, numbers and strings ({str(error).splitlines()[0][:160]}): loading "
            f"it would run code from the file. Fix: use a model from a source you trust, re-exported by its "
            f"training; do not load this file.") from None
    except UNREADABLE as error:
        raise UnsafeCheckpointError(
            f"{path} is not a readable checkpoint ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:160] if str(error) else 'no detail'}). Fix: copy the model folder again, "
            f"or retrain this fold.") from None
    if configuration is not None:
        refuse_foreign_checkpoint(Path(path), checkpoint, configuration)


def refuse_foreign_checkpoint(path: Path, checkpoint: dict, configuration: str) -> None:
    """Refuse a checkpoint trained on another dataset, or with another network, than its model folder's plans."""
    plans_file = path.parent.parent / "plans.json"
    trained_plans = checkpoint.get("init_args", {}).get("plans")
    if not plans_file.is_file() or not isinstance(trained_plans, dict):
        return  # nothing to compare: nnU-Net's loader reports a missing plans.json itself
    folder_plans = json.loads(plans_file.read_text(encoding="utf-8"))
    fix = (f"Fix: put back this fold's own checkpoint (or the whole model folder as exported), or retrain this "
           f"fold; a checkpoint does not move between model folders.")
    trained_on, folder_of = trained_plans.get("dataset_name"), folder_plans.get("dataset_name")
    if trained_on != folder_of:
        raise UnsafeCheckpointError(f"{path} was trained on {trained_on}, but sits in a model folder of {folder_of} "
                                    f"({plans_file}). {fix}")
    trained_network = _architecture(trained_plans, configuration)
    if trained_network is not None and trained_network != _architecture(folder_plans, configuration):
        raise UnsafeCheckpointError(f"{path} was trained with another network than {plans_file} plans for "
                                    f"{configuration} (architecture or patch differ). {fix}")


def _architecture(plans: dict, configuration: str) -> dict | None:
    """The network-defining entries of a configuration (json-normalised: tuples and lists compare equal)."""
    entry = plans.get("configurations", {}).get(configuration)
    if entry is None:
        return None
    return json.loads(json.dumps({key: entry.get(key) for key in ("architecture", "patch_size")}))
