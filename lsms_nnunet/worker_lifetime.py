"""Worker processes that exit when the training or the prediction that started them dies.

batchgenerators' multi-process augmenters, and nnU-Net's prediction preprocessing workers, stop when their parent ends
normally, but a SIGKILLed parent runs no clean-up: its workers live on (reparented to PID 1, each keeping its
memory), retrying to put a batch on a queue that nobody reads. Each worker here asks the kernel to kill it when its
parent dies (Linux `prctl(PR_SET_PDEATHSIG)`) and exits at once if the parent is already gone:
- `exit_with_trainer` wraps an augmenter's `transform`, which each worker calls on every batch before it can block;
- `preprocessing_workers_die_with_parent` starts nnU-Net's prediction preprocessing workers with
  `preprocess_until_parent_dies` as their target.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from multiprocessing.managers import SyncManager
from typing import Callable, Iterator

from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from nnunetv2.inference import data_iterators

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


NNUNET_PREPROCESSING_WORKER = data_iterators.preprocess_fromfiles_save_to_queue


def preprocess_until_parent_dies(*args, **kwargs) -> None:
    """nnU-Net's prediction preprocessing worker (`preprocess_fromfiles_save_to_queue`), armed first."""
    die_with_parent()
    NNUNET_PREPROCESSING_WORKER(*args, **kwargs)


def manager_that_dies_with_parent() -> SyncManager:
    """`multiprocessing.Manager()` whose server process (a fork of its parent, as large) is armed first."""
    manager = SyncManager(ctx=multiprocessing.get_context())
    manager.start(initializer=die_with_parent)
    return manager


def preprocessing_workers_die_with_parent(iterator: Iterator[dict]) -> Iterator[dict]:
    """The items of nnU-Net's `preprocessing_iterator_fromfiles`, whose processes die with this one.

    That generator starts a manager server and its workers at its first item, with no hook for either (nnU-Net
    2.8): the two names it starts them with are swapped for ours around that first `next` only (the worker target
    is pickled by name into the spawned workers).
    """
    swapped = {"preprocess_fromfiles_save_to_queue": preprocess_until_parent_dies,
               "Manager": manager_that_dies_with_parent}
    originals = {name: getattr(data_iterators, name) for name in swapped}
    for name, replacement in swapped.items():
        setattr(data_iterators, name, replacement)
    try:
        first = next(iterator, None)
    finally:
        for name, original in originals.items():
            setattr(data_iterators, name, original)
    if first is not None:
        yield first
        yield from iterator
