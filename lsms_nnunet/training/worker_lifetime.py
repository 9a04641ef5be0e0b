"""Augmentation workers that exit when the trainer dies.

batchgenerators' multi-process augmenters stop their workers when the trainer ends normally, but a SIGKILLed trainer
runs no clean-up: its workers live on (reparented to PID 1, each keeping its memory), retrying to put a batch on a
queue that nobody reads. `exit_with_trainer` wraps an augmenter's `transform`, which each worker calls on every batch
before it can block on that queue: the first call in a worker asks the kernel to kill the worker when its parent dies
(Linux `prctl(PR_SET_PDEATHSIG)`) and exits at once if the parent is already gone.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from typing import Callable

from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies; exit now if the parent died already.

    SIGKILL, not SIGTERM: a forked worker inherits the trainer's signal handlers, and it holds nothing to save.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    parent = multiprocessing.parent_process()
    if parent is not None and not parent.is_alive():  # it died before the signal was armed
        os._exit(1)


class ExitWithParent:
    """An augmenter transform that arms `die_with_parent` in each worker process, then applies `inner` (if any)."""

    def __init__(self, inner: Callable | None = None) -> None:
        self.inner = inner
        self._creator_pid = os.getpid()
        self._armed_pid: int | None = None

    def __call__(self, **batch) -> dict:
        if self._armed_pid != os.getpid() and os.getpid() != self._creator_pid:  # never arm the trainer itself
            die_with_parent()
            self._armed_pid = os.getpid()
        return self.inner(**batch) if self.inner is not None else batch


def exit_with_trainer(*augmenters) -> None:
    """Make the worker processes of these augmenters exit when the trainer dies; call before their first batch."""
    for augmenter in augmenters:
        if isinstance(augmenter, (MultiThreadedAugmenter, NonDetMultiThreadedAugmenter)):
            augmenter.transform = ExitWithParent(augmenter.transform)
