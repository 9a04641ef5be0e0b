"""Where a training step's time goes: data loading, each network component forward and backward, loss terms, update.

One trainer step runs under `torch.profiler` with a `record_function` scope around every component module (entered by
forward pre-hooks, left by forward hooks). Forward time of a component is the time of its scope minus the scopes
nested in it. Backward time is attributed through autograd's sequence numbers: every backward node carries the
sequence number of the forward op that created it, and that op lies in exactly one innermost scope. So "SVLA visual
branch" is the forward and the backward of the strip convolutions, whatever order autograd runs them in.
Data loading and augmentation (`next(dataloader)`) and the optimiser step are timed around the trainer's calls.

On CPU (autograd's engine runs on the calling thread) the attribution is exact up to the profiler's own overhead;
on CUDA the times are host-side launch times unless the device is synchronised, so there a profile is a rough guide
and the step time (measured without the profiler) is the figure to compare.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

SCOPE_PREFIX = "lsms_profile::"
BACKWARD_EVENT = "autograd::engine::evaluate_function: "
DATA, OPTIMISER, OTHER = "data loading + augmentation", "optimiser step", "other (trainer, autograd overhead)"


def component_modules(network: nn.Module, loss: nn.Module) -> dict[str, list[nn.Module]]:
    """The components a step is split into, each a list of modules (an LSMS network or any nnU-Net U-Net)."""
    components: dict[str, list[nn.Module]] = defaultdict(list)
    encoder = getattr(network, "encoder", None)
    if encoder is not None:
        if getattr(encoder, "stem", None) is not None:
            components["encoder stem"].append(encoder.stem)
        for index, stage in enumerate(encoder.stages):
            components[f"encoder stage {index}"].append(stage)
    for block in getattr(network, "svla", {}).values():
        components["SVLA block (modulation)"].append(block)
        if block.visual is not None:
            components["SVLA visual branch"].append(block.visual)
        if block.language is not None:
            components["SVLA language branch"].append(block.language)
    for name in ("text_adapter", "prompt_decoder"):
        if getattr(network, name, None) is not None:
            components["text path (adapter, prompt decoder)"].append(getattr(network, name))
    decoder = getattr(network, "decoder", None)
    if decoder is not None:
        components["decoder"].append(decoder)
        components["output heads"].extend(decoder.seg_layers)
    components["finding heads"].extend(getattr(network, "finding_heads", []))
    for name in ("voxel_projection", "sentence_projection"):
        if getattr(network, name, None) is not None:
            components["contrastive projections"].append(getattr(network, name))
    components["loss (total)"].append(loss)
    for name, label in (("segmentation_loss", "loss: Dice + CE (deep supervision)"),
                        ("contrastive", "loss: vision-language contrastive"),
                        ("loss", "loss: Dice + CE (deep supervision)")):  # nnU-Net's DeepSupervisionWrapper
        module = getattr(loss, name, None)
        if isinstance(module, nn.Module):
            components[label].append(module)
    return {name: modules for name, modules in components.items() if modules}


@contextmanager
def _scoped(components: dict[str, list[nn.Module]]) -> Iterator[None]:
    """A profiler scope named after its component around every forward call of the components' modules."""
    handles, open_scopes = [], []

    def enter(name):
        def pre_hook(module, inputs):
            scope = record_function(SCOPE_PREFIX + name)
            scope.__enter__()
            open_scopes.append(scope)
        return pre_hook

    def leave(module, inputs, output):
        open_scopes.pop().__exit__(None, None, None)

    for name, modules in components.items():
        for module in modules:
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _innermost_scope(event) -> str | None:
    while event is not None:
        if event.name.startswith(SCOPE_PREFIX):
            return event.name[len(SCOPE_PREFIX):]
        event = event.cpu_parent
    return None


def _nested_scope_time(event) -> float:
    """Total time of the scopes directly nested in `event` (not of scopes nested in those)."""
    total = 0.0
    for child in event.cpu_children:
        total += child.cpu_time_total if child.name.startswith(SCOPE_PREFIX) else _nested_scope_time(child)
    return total


def attribute_events(events) -> dict[str, dict[str, float]]:
    """{component: {"forward_ms", "backward_ms"}} from a profiler's events (see the module docstring)."""
    times: dict[str, dict[str, float]] = defaultdict(lambda: {"forward_ms": 0.0, "backward_ms": 0.0})
    component_of_sequence: dict[int, str] = {}
    for event in events:
        if event.name.startswith(SCOPE_PREFIX):
            times[event.name[len(SCOPE_PREFIX):]]["forward_ms"] += (event.cpu_time_total
                                                                    - _nested_scope_time(event)) / 1e3
        elif event.sequence_nr >= 0 and not event.name.startswith(BACKWARD_EVENT):
            scope = _innermost_scope(event)
            if scope is not None:
                component_of_sequence.setdefault(event.sequence_nr, scope)
    for event in events:
        if event.name.startswith(BACKWARD_EVENT):
            component = component_of_sequence.get(event.sequence_nr, OTHER)
            times[component]["backward_ms"] += event.cpu_time_total / 1e3
    return dict(times)


def profile_train_step(trainer) -> dict:
    """Profile one `trainer.train_step` on the next training batch; returns {"components": {name: {"forward_ms",
    "backward_ms", "total_ms"}}, "step_ms"} with data loading and the optimiser step among the components."""
    network = trainer.network.module if hasattr(trainer.network, "module") else trainer.network
    network = getattr(network, "_orig_mod", network)
    components = component_modules(network, trainer.loss)
    optimiser_step, optimiser_ms = trainer.optimizer.step, []

    def timed_step(*args, **kwargs):
        start = time.perf_counter()
        try:
            return optimiser_step(*args, **kwargs)
        finally:
            optimiser_ms.append((time.perf_counter() - start) * 1e3)

    start = time.perf_counter()
    batch = next(trainer.dataloader_train)
    data_ms = (time.perf_counter() - start) * 1e3
    trainer.optimizer.step = timed_step
    try:
        with _scoped(components), profile(activities=[ProfilerActivity.CPU]) as profiler:
            start = time.perf_counter()
            trainer.train_step(batch)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            step_ms = (time.perf_counter() - start) * 1e3
    finally:
        del trainer.optimizer.step  # back to the class's method
    times = attribute_events(profiler.events())
    times[DATA] = {"forward_ms": data_ms, "backward_ms": 0.0}
    times[OPTIMISER] = {"forward_ms": sum(optimiser_ms), "backward_ms": 0.0}
    accounted = sum(t["forward_ms"] for t in times.values() if t is not times[DATA]) + \
        sum(t["backward_ms"] for t in times.values())
    times.setdefault(OTHER, {"forward_ms": 0.0, "backward_ms": 0.0})
    times[OTHER]["forward_ms"] += max(step_ms - accounted, 0.0)
    return {"step_ms": step_ms + data_ms,
            "components": {name: {**t, "total_ms": t["forward_ms"] + t["backward_ms"]} for name, t in times.items()}}


def merge_profiles(profiles: list[dict]) -> dict:
    """The median forward and backward time of each component over several profiled steps (the first steps pay for
    warm-up); a component's total is the sum of its two medians, so the table adds up."""
    names = dict.fromkeys(name for p in profiles for name in p["components"])
    zero = {"forward_ms": 0.0, "backward_ms": 0.0}

    def median(values):
        return float(torch.tensor(values).median().item())

    components = {}
    for name in names:
        times = {key: median([p["components"].get(name, zero)[key] for p in profiles]) for key in zero}
        components[name] = {**times, "total_ms": times["forward_ms"] + times["backward_ms"]}
    return {"step_ms": median([p["step_ms"] for p in profiles]), "components": components}
