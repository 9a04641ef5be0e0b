"""Measured CPU memory of one training step: how the planners' LSMS_COUNT_SCALE was calibrated, and how tests check it.

Kept out of the planners and the trainer: it needs torch.profiler's private event tree, which nothing at training or
prediction time should import.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.profiler import ProfilerActivity, profile

from lsms_nnunet.network import LSMSNet


def measure_training_step_peak_bytes(network: nn.Module, patch_size: Sequence[int], batch_size: int) -> int:
    """Peak CPU memory (bytes) allocated by one forward + backward pass on random data, above what was allocated
    before (parameters are not counted; their gradients, the batch and every activation are).

    torch's CPU allocations bypass Python's allocator (tracemalloc sees none of them), so this records every
    allocation and free with torch.profiler (profile_memory=True) and replays them in time order. LSMS networks get
    random text at their configured max_tokens; the loss is the mean of every output (and, with the contrastive
    heads, of the embeddings), so every output takes part in the backward pass.
    """
    from torch._C._profiler import _EventType  # the profiler's raw event tree; its public tables aggregate per op

    if batch_size < 1 or any(size < 1 for size in patch_size):
        raise ValueError(f"batch_size and patch_size must be positive, got {batch_size} and {list(patch_size)}.")
    first_conv = next((module for module in network.modules() if isinstance(module, _ConvNd)), None)
    if first_conv is None:
        raise ValueError(f"{type(network).__name__} has no convolution; cannot infer its input channels.")
    network.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        _forward_backward(network, torch.randn(batch_size, first_conv.in_channels, *patch_size))
    network.zero_grad(set_to_none=True)

    allocations = []
    pending = list(profiler.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
        pending.extend(event.children)
    allocated = peak = 0
    for _, size in sorted(allocations):
        allocated += size
        peak = max(peak, allocated)
    return peak


def _forward_backward(network: nn.Module, batch: torch.Tensor) -> None:
    """One training step's forward and backward with a loss that every output (and LSMS embedding) takes part in."""
    if isinstance(network, LSMSNet):
        config = network.config
        tokens = torch.randn(batch.shape[0], config.max_tokens, config.text_dim)
        mask = torch.ones(batch.shape[0], config.max_tokens, dtype=torch.bool)
        if config.contrastive:
            output, aux = network(batch, tokens, mask, return_aux=True)
            extra = aux["voxel_embedding"].mean() + aux["sentence_embedding"].mean()
        else:
            output, extra = network(batch, tokens, mask), 0
    else:
        output, extra = network(batch), 0
    outputs = output if isinstance(output, (list, tuple)) else [output]
    loss = sum(item.float().mean() for item in outputs) + extra
    loss.backward()
