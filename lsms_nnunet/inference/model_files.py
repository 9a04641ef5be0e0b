"""Reading model files without running code from them (nnU-Net's own loader unpickles without restriction).

`load_checkpoint_safely` reads a checkpoint with `torch.load(weights_only=True)`; `screen_checkpoint` refuses, with
the file and the fix, one that would run code or cannot be read, before nnU-Net's loader sees it.
"""
from __future__ import annotations

import os
import pickle

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


def screen_checkpoint(path: str | os.PathLike) -> None:
    """Refuse a checkpoint that `load_checkpoint_safely` cannot read, before an unrestricted loader (nnU-Net's) runs
    whatever a pickled object in it asks for."""
    try:
        load_checkpoint_safely(path, mmap=True)
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
