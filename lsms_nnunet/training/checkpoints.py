"""Checkpoints that survive a kill: written atomically, and read with a fallback when one is unreadable.

nnU-Net's `save_checkpoint` writes `checkpoint_latest.pth` in place, so a kill during the write leaves a truncated
file and `nnUNetv2_train --c` then dies with "PytorchStreamReader failed reading zip archive".
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from text_conditioning.io import atomic_path

from lsms_nnunet.inference.model_files import UNREADABLE, load_checkpoint_safely

#: The checkpoint `--c` may continue from when one cannot be read (nnU-Net tries final, latest, best in this order).
#: An unreadable checkpoint_final has no fallback: --val would silently validate an unfinished model.
FALLBACK = {"checkpoint_latest.pth": "checkpoint_best.pth"}


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
