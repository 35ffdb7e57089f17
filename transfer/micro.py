"""Micro-batches: a preset's batch is the *effective* batch, whatever the device holds.

An iteration of `batch` images (per process) is split into micro-batches of at most
`micro_batch` images; each one's loss is weighted by its share of the batch, gradients accumulate,
and the optimiser steps once. Faster R-CNN's losses are means over the anchors and RoIs sampled
per image (a fixed number per image: 256 and 512 at VOC sizes), so the weighted sum equals the
big batch's loss exactly, and the learning rate stays the recipe's: changing only `micro_batch`
changes memory, not the optimisation. (Peer: mmengine's `accumulative_counts`; detectron2 has
none.) What still differs: images are padded to the largest one of their micro-batch, not of the
whole batch — the same as detectron2 splitting a batch over several GPUs.

The RPN and RoI samplers draw from the global RNG image after image, so a different split would
draw different anchors: `ImageSeeds` gives each image its own seed (run seed, iteration, process,
position in the batch) for both samplers, making the draws independent of the split.

`micro_batch=auto` probes: one training step on one image at the largest training size with the
full number of sampled RoIs, its peak memory measured (CUDA: the allocator's peak; CPU: the process's peak RSS, reset through
/proc/self/clear_refs), then as many images as fit in the free memory times a safety margin.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import math
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from smix.dist import even_slices
from smix.errors import UserError

# Share of the free memory a micro-batch may use: CUDA's allocator peak is exact; on a CPU the
# data-loader workers, the allocator's fragmentation and other processes need headroom.
MARGIN = {"cuda": 0.85, "cpu": 0.6}
_STREAMS = {"rpn": 1, "roi": 2}


def split(n: int, micro_batch: int) -> list[slice]:
    """`n` images in the fewest micro-batches of at most `micro_batch`, sizes as equal as can be."""
    return even_slices(n, max(1, micro_batch))


def oom_error(micro_batch: int, iteration: int) -> UserError:
    """The one line a CUDA out-of-memory ends a run with."""
    smaller = f"micro_batch={max(1, micro_batch // 2)}" if micro_batch > 1 else "smaller min_size"
    return UserError(f"CUDA out of memory in iteration {iteration + 1} with micro_batch="
                     f"{micro_batch}; rerun with --resume and {smaller} (the effective batch and "
                     "the learning rate stay the same)")


# --- memory -------------------------------------------------------------------------------------

def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_available() -> int | None:
    """Room left under a cgroup v2 memory limit (containers), if there is one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def available_bytes(device: torch.device) -> int | None:
    """Memory a training step may still take: CUDA free + the allocator's cached free blocks;
    CPU: MemAvailable, bounded by the cgroup's limit. None where it cannot be known."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    known = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    return min(known) if known else None


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def peak_bytes(step: Callable[[], None], device: torch.device) -> int | None:
    """Peak memory `step` adds on top of what is in use before it (None: not measurable)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    gc.collect()  # garbage freed during the step would hide part of its peak
    try:
        base = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    step()
    return max(0, _status_kib("VmHWM") - base)


@dataclasses.dataclass(frozen=True)
class MicroChoice:
    """The micro-batch a run uses and how it was chosen (written to metrics.json)."""

    micro_batch: int
    batch: int  # images per process and iteration
    source: str  # "set" or "auto"
    probe_size: tuple[int, int] | None = None
    probe_peak_bytes: int | None = None
    available_bytes: int | None = None
    margin: float | None = None

    def describe(self) -> str:
        sizes = [s.stop - s.start for s in split(self.batch, self.micro_batch)]
        line = (f"micro_batch={self.micro_batch} ({self.source}): {self.batch} images per "
                f"iteration in {len(sizes)} pass{'es' if len(sizes) > 1 else ''} "
                f"{tuple(sizes) if len(sizes) > 1 else ''}".rstrip())
        if self.source == "auto" and self.probe_peak_bytes is not None:
            h, w = self.probe_size or (0, 0)
            line += (f"; one image at {h}x{w} peaked at {self.probe_peak_bytes / 2**30:.2f} GiB, "
                     f"{self.available_bytes / 2**30:.1f} GiB free x {self.margin} margin")
        elif self.source == "auto":
            line += "; memory could not be measured here, so one image per pass"
        return line


@contextlib.contextmanager
def all_proposals(rpn: Any) -> Iterator[None]:
    """The RPN's NMS switched off (torchvision's and detectron2's RPN both read `nms_thresh`):
    the probe then feeds the RoI heads their full `post_nms_topk` proposals and samples the full
    `roi_batch` RoIs per image, the most a training image can cost. (A fresh detector on a
    synthetic image keeps few proposals after NMS: measured, 137 RoIs instead of 512, and a
    probe a third of the true per-image cost.)"""
    saved = rpn.nms_thresh
    rpn.nms_thresh = 1.0
    try:
        yield
    finally:
        rpn.nms_thresh = saved


def largest_train_size(min_sizes: Sequence[int], max_size: int) -> tuple[int, int]:
    """(height, width) of the largest training input: the largest shorter side, the longer side
    at the cap (a very wide image), both within `max_size`."""
    return min(max(min_sizes), max_size), max_size


def choose(setting: int | None, batch: int, device: torch.device, probe: Callable[[], None],
           probe_size: tuple[int, int], sharing: int = 1) -> MicroChoice:
    """A set micro-batch (checked), or `auto`: probe one image, fit as many as the free memory
    (split between `sharing` processes on one CPU) allows, balanced over the passes."""
    if setting is not None:
        if setting > batch:
            raise UserError(f"micro_batch={setting} exceeds the {batch} images each process "
                            "trains on per iteration")
        return MicroChoice(setting, batch, "set")
    peak = peak_bytes(probe, device)
    free = available_bytes(device)
    if peak is None or free is None:
        return MicroChoice(1, batch, "auto", probe_size)
    if device.type != "cuda":
        free //= max(1, sharing)
    margin = MARGIN["cuda" if device.type == "cuda" else "cpu"]
    fit = max(1, min(batch, int(free * margin // max(peak, 1))))
    fit = split(batch, fit)[0].stop  # the same number of passes, sizes balanced
    return MicroChoice(fit, batch, "auto", probe_size, peak, free, margin)


def announce(choice: MicroChoice) -> None:
    print(f"smix transfer: {choice.describe()}", file=sys.stderr, flush=True)


# --- per-image sampling seeds -----------------------------------------------------------------

def image_seed(seed: int, stream: int, key: Sequence[int]) -> int:
    return int(np.random.SeedSequence([seed, stream, *key]).generate_state(1)[0])


class ImageSeeds:
    """Seeds for a detector's per-image sampling calls, handed out in image order.

    `wrap(stream, fn)` returns `fn` run under its image's seed (inside a forked RNG, so the
    caller's RNG is untouched); `images(seed, keys)` opens a forward pass over the images with
    those keys. Outside such a pass (evaluation, the memory probe) `fn` runs as it is.
    """

    def __init__(self) -> None:
        self._queues: dict[str, collections.deque[int]] | None = None
        self._devices: list[torch.device] = []

    @contextlib.contextmanager
    def images(self, seed: int, keys: Sequence[Sequence[int]], device: torch.device
               ) -> Iterator[None]:
        """A forward pass over the images `keys` name (e.g. (iteration, rank, position))."""
        self._queues = {name: collections.deque(image_seed(seed, sid, k) for k in keys)
                        for name, sid in _STREAMS.items()}
        self._devices = [device] if device.type == "cuda" else []
        try:
            yield
        finally:
            self._queues = None

    def wrap(self, stream: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def seeded(*args: Any, **kwargs: Any) -> Any:
            if self._queues is None:
                return fn(*args, **kwargs)
            queue = self._queues[stream]
            if not queue:
                raise RuntimeError(f"more {stream} sampling calls than images in the pass")
            with torch.random.fork_rng(devices=self._devices):
                torch.manual_seed(queue.popleft())
                return fn(*args, **kwargs)
        return seeded

