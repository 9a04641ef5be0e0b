"""Checkpoints that survive a kill: written atomically, and read with a fallback when one is unreadable.

nnU-Net's `save_checkpoint` writes `checkpoint_latest.pth` in place, so a kill during the write leaves a truncated
file and `nnUNetv2_train --c` then dies with "PytorchStreamReader failed reading zip archive".
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from text_conditioning.io import atomic_path

#: The checkpoint `--c` may continue from when one cannot be read (nnU-Net tries final, latest, best in this order).
#: An unreadable checkpoint_final has no fallback: --val would silently validate an unfinished model.
FALLBACK = {"checkpoint_latest.pth": "checkpoint_best.pth"}
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


def save_atomically(save: Callable[[str], None], filename: str | os.PathLike) -> None:
    """Call `save(temporary path)`, then rename the file onto `filename`: readers see the old or the new file.

    `save` may write nothing (nnU-Net: other DDP ranks, checkpointing disabled); the training is the only writer of
    its checkpoints, so a killed run's temporary file is replaced by the next save instead of piling up.
    """
    with atomic_path(filename, suffix="", sole_writer=True) as temporary:
        save(str(temporary))


def candidates(filename: str | os.PathLike) -> list[Path]:
    """`filename`, then its fallbacks that exist."""
    chain = [Path(filename)]
    while chain[-1].name in FALLBACK:
        chain.append(chain[-1].with_name(FALLBACK[chain[-1].name]))
    return [chain[0]] + [path for path in chain[1:] if path.is_file()]


def readable_checkpoint(filename: str | os.PathLike, log: Callable[[str], None]) -> str:
    """The first readable file of `candidates(filename)`; every unreadable one is reported through `log`.

    Memory-mapped, so the tensors are not read twice: nnU-Net's `load_checkpoint` loads the file chosen (it cannot
    take a loaded dict in 2.8.1). A truncated file has no zip central directory and fails here.
    """
    problems = []
    for path in candidates(filename):
        try:
            checkpoint = load_checkpoint_safely(path, mmap=True)
        except UNREADABLE as error:
            problems.append(f"{path} ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")
            log(f"WARNING: checkpoint {problems[-1]} is unreadable (a kill while it was written?).")
            continue
        if problems:
            log(f"Continuing from {path} (epoch {checkpoint.get('current_epoch')}) instead.")
        return str(path)
    raise RuntimeError(f"No readable checkpoint to continue from: {'; '.join(problems)}. Fix: delete the unreadable "
                       f"file(s) and rerun with --c to continue from an older checkpoint if one is left, or train "
                       f"again without --c.")
