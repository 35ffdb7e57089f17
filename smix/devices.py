"""Moving small host values to the device without making the host wait for it.

A blocking host-to-device copy (`tensor.to("cuda")`, `torch.tensor(..., device="cuda")`)
synchronises the host with the device's stream: the CPU waits until the GPU has drained every
queued kernel, so the next step's kernels are queued late. Random draws made on the host (a
mixer's λ, permutation and boxes) and constants (normalisation, filter taps) reach the device
here instead: from pinned memory with `non_blocking=True`, which only enqueues the copy.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch


def upload(t: torch.Tensor, device: torch.device | str,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """`t` on `device` (and in `dtype`), enqueued without a host-device synchronisation.

    Values are those of `t.to(device, dtype)`; on CUDA the host tensor is first copied into
    pinned memory, whose reuse the caching host allocator defers until the copy has run."""
    device = torch.device(device)
    if dtype is not None:
        t = t.to(dtype)  # converted where it is: a cross-device cast would stage unpinned
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        # pin_memory refuses views whose elements share storage (expand, broadcast)
        t = t.contiguous().pin_memory()
    return t.to(device, non_blocking=True)


@functools.lru_cache(maxsize=64)
def constant(values: tuple, dtype: torch.dtype, device: torch.device | str,
             shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A small constant tensor on `device`, uploaded once per (values, dtype, device)."""
    t = torch.tensor(values, dtype=dtype)
    return upload(t if shape is None else t.view(shape), device)


def channel_constant(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-channel values as a [1,C,1,1] tensor of `like`'s dtype and device (cached)."""
    return constant(tuple(float(v) for v in values), like.dtype, like.device,
                    (1, len(values), 1, 1))


def device_name(device: torch.device | str) -> str:
    """What a benchmark ran on, for its JSON line: the card's name, or the CPU's model and
    the cores this process may use."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    except OSError:
        pass
    import os
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} ({cores} cores)"
