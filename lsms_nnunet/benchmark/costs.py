"""What a benchmarked model costs, measured in the benchmark's own run on the machine that trained it.

- parameters: trainable (the network) and frozen (the text encoder whose embeddings LSMS reads);
- GFLOPs of one forward pass on one planned patch (batch 1, inference, no deep-supervision heads), counted by
  torch's FlopCounterMode;
- training seconds per iteration, from the epoch timestamps nnU-Net logs in every checkpoint;
- inference seconds per case and per expression on the preprocessed validation cases;
- peak memory and seconds per training step of a fresh process running a few training steps (`training_probe`),
  and where a step's time goes (`step_profile`);
- inference seconds for E = 1, 4, 16, 64 expressions on one image, against one vanilla prediction of that image.
"""
from __future__ import annotations

import statistics
import time
from functools import lru_cache
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from text_conditioning.encoders import EncoderIdentity, TextEncoder

WARM_UP_CALLS = 2  # the first calls pay for lazy allocations and kernel selection
EXPRESSION_COUNTS = (1, 4, 16, 64)
TIMED_CALLS = 3


def parameter_counts(network: nn.Module) -> dict:
    """Trainable and non-trainable parameters of a network (shared tensors counted once)."""
    unique = {id(p): p for p in network.parameters()}.values()
    return {"trainable": int(sum(p.numel() for p in unique if p.requires_grad)),
            "non_trainable": int(sum(p.numel() for p in unique if not p.requires_grad))}


@lru_cache(maxsize=4)
def text_encoder_parameters(identity: EncoderIdentity) -> int:
    """Parameters of the frozen text encoder, loaded once per process (they run once per new text, not per patch)."""
    model = TextEncoder(identity.name, max_tokens=identity.max_tokens).model
    return int(sum(p.numel() for p in model.parameters()))


def forward_gflops(forward: Callable[[], object]) -> float:
    """GFLOPs of one call of `forward` (a closure over the network and its inputs), without gradients."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        forward()
    return counter.get_total_flops() / 1e9


def seconds_per_iteration(epoch_start_timestamps: Sequence[float], epoch_end_timestamps: Sequence[float],
                          iterations_per_epoch: int) -> float:
    """Median epoch wall time over the iterations of an epoch; the first epoch (warm-up) is left out when others exist.

    An epoch's time includes its validation iterations and checkpoint save, the same share for every variant.
    """
    durations = [end - start for start, end in zip(epoch_start_timestamps, epoch_end_timestamps)]
    if not durations:
        raise ValueError("The checkpoint logs no finished epoch, so there is no training time to measure.")
    steady = durations[1:] if len(durations) > 1 else durations
    return statistics.median(steady) / iterations_per_epoch


def time_cases(predict_case: Callable[[str], object], cases: Sequence[str], expressions_per_case: Mapping[str, int],
               description: str) -> dict:
    """Seconds per case and per expression of `predict_case`, after untimed warm-up calls on the first case."""
    if not cases:
        raise ValueError("No validation case to time inference on.")
    for _ in range(WARM_UP_CALLS):
        predict_case(cases[0])
    seconds = []
    for case in tqdm(list(cases), desc=description, unit="case"):
        start = time.perf_counter()
        predict_case(case)
        seconds.append(time.perf_counter() - start)
    expressions = sum(expressions_per_case[case] for case in cases)
    return {"cases": len(cases), "expressions": int(expressions),
            "seconds_per_case": float(np.mean(seconds)),
            "seconds_per_expression": float(np.sum(seconds) / expressions) if expressions else None}


def median_seconds(call: Callable[[], object]) -> float:
    """Median wall time of TIMED_CALLS calls after WARM_UP_CALLS untimed ones."""
    for _ in range(WARM_UP_CALLS):
        call()
    seconds = []
    for _ in range(TIMED_CALLS):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def texts_for_counts(texts: Sequence[str], counts: Sequence[int] = EXPRESSION_COUNTS) -> dict[int, list[str]]:
    """E texts per count E: the given texts in order, repeated as often as needed (repeats cost the same work as
    new texts: nothing is deduplicated between the expressions of an image)."""
    if not texts:
        raise ValueError("No text to time inference with.")
    return {count: [texts[i % len(texts)] for i in range(count)] for count in counts}
