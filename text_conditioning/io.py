"""Atomic file writes, shared by every writer of the project: readers see the old file or the complete new one.

Why one helper: nnU-Net and the LSMS commands read files that other runs may be writing (plans, prompts, text
caches, checkpoints, predictions, benchmark records). A run killed mid-write must never leave a truncated file under
the real name. It lives in `text_conditioning` because that is the bottom layer (no nnU-Net import), so both the text
side and `lsms_nnunet` can use it.
"""
from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp", sole_writer: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` for writers that take a file name; renamed onto `path` on success.

    The temporary file sits in the target's folder, so the rename stays on one file system and is atomic. `suffix`
    keeps the ending that some writers read to choose a format (".nii.gz" for SimpleITK, ".npz" for numpy). A writer
    may write nothing (nnU-Net saves checkpoints on rank 0 only); `path` then stays as it was. On an error the
    temporary file is removed and `path` is untouched.

    Temporary names are unique per write, so concurrent writers never share one. `sole_writer=True` (one process
    owns `path`, as a training owns its checkpoints) uses one fixed name instead, so the temporary file that a
    SIGKILLed run left is deleted by the next write rather than piling up (checkpoints are hundreds of MB).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = "partial" if sole_writer else f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temporary = path.with_name(f".{path.name}.{tag}{suffix}")
    temporary.unlink(missing_ok=True)  # only a killed run's leftover can be there
    try:
        yield temporary
        if temporary.exists():
            _flush_to_disk(temporary)
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see atomic_path)."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically (UTF-8 always: a C locale must not change what is written)."""
    write_bytes_atomically(path, text.encode("utf-8"))


def write_json_atomically(path: str | os.PathLike, content: Any, indent: int | None = 1, ensure_ascii: bool = False,
                          **dumps_options: Any) -> None:
    """Write `content` as JSON plus a final newline to `path` atomically; the defaults are the project's JSON style
    (readable, texts unescaped), other json.dumps options pass through (e.g. allow_nan=False for results)."""
    text = json.dumps(content, indent=indent, ensure_ascii=ensure_ascii, **dumps_options)
    write_text_atomically(path, text + "\n")


def _flush_to_disk(path: Path) -> None:
    """fsync before the rename, so a crash after it cannot leave the new name pointing at unwritten blocks."""
    with open(path, "rb") as written:
        os.fsync(written.fileno())
