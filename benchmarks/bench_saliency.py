"""Saliency throughput: the batched torch detectors vs OpenCV contrib's per-image loop.

The baseline is what the official SaliencyMix code does, measured in the same process: for
every image of the batch, convert the tensor to a uint8 BGR array, call
``cv2.saliency.*.computeSaliency``, and stack the maps back into a tensor. Both sides start
from the same float RGB batch and end with a ``[B,H,W]`` tensor. Repeats alternate between
the two so that load from other processes hits both alike; each side reports its median.

With `--device cuda` the torch detectors run on the card, on the batch already there (where a
training batch is), each timing between synchronisations; OpenCV has no GPU path, so the
baseline stays the CPU loop on the host copy of the same batch. `device_name` names what ran
the torch side, `baseline_device_name` the CPU of the OpenCV side.

    python benchmarks/bench_saliency.py [--threads 1,2] [--repeats 5] [--device cpu|cuda]

One JSON line per (threads, detector, size, batch); ``speedup`` = opencv_s / torch_s. Both
1 and 2 threads by default on this 2-core machine: OpenCV's fine-grained loop is serial C++, so
1 thread is the per-core comparison and 2 threads what a training process gets from the batch.
``loadavg_1m`` records how busy the machine was: other processes distort both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.saliency import get_detector  # noqa: E402
from smix.devices import device_name  # noqa: E402

CASES = ((32, 256), (224, 64))
OPENCV = {"fine_grained": "StaticSaliencyFineGrained_create",
          "spectral_residual": "StaticSaliencySpectralResidual_create"}


def synthetic_batch(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth colour blobs plus noise in 0..255, [B,3,S,S]: photo-like, made here, no files."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 6, 6, generator=g) * 255
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic",
                                             align_corners=False)
    return (smooth + 12 * torch.randn(smooth.shape, generator=g)).clamp(0, 255).round()


def opencv_loop(detector: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The per-image OpenCV baseline, tensor in and tensor out."""
    import cv2

    algo = getattr(cv2.saliency, OPENCV[detector])()

    def run(images: torch.Tensor) -> torch.Tensor:
        bgr = images.round().clamp(0, 255).to(torch.uint8).flip(1).permute(0, 2, 3, 1).numpy()
        maps = [algo.computeSaliency(np.ascontiguousarray(img))[1] for img in bgr]
        return torch.from_numpy(np.stack(maps))

    return run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_times(fns: list[Callable[[], object]], repeats: int,
                 device: torch.device) -> list[float]:
    """Median wall time of each function after one warm-up, repeats interleaved; on CUDA the
    device's queue is drained before each clock read."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, acc in zip(fns, times):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            acc.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cores = min(2, os.cpu_count() or 1)
    parser.add_argument("--threads", default=",".join(str(n) for n in range(1, cores + 1)),
                        help="comma-separated torch/OpenCV thread counts (default: 1,2)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the torch detectors run (OpenCV always runs on the CPU)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    device = torch.device(args.device)

    import cv2

    for threads in (int(n) for n in args.threads.split(",")):
        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
        for detector in OPENCV:
            ours, theirs = get_detector(detector), opencv_loop(detector)
            for size, batch in CASES:
                images = synthetic_batch(batch, size)
                on_device = images.to(device)
                torch_s, opencv_s = median_times(
                    [lambda: ours(on_device), lambda: theirs(images)], args.repeats, device)
                print(json.dumps({
                    "bench": "saliency", "device": device.type,
                    "device_name": device_name(device),
                    "baseline": "OpenCV per-image loop on the CPU (same process)",
                    "baseline_device_name": device_name("cpu"), "detector": detector,
                    "size": size, "batch": batch,
                    "torch_s": round(torch_s, 5), "opencv_s": round(opencv_s, 5),
                    "speedup": round(opencv_s / torch_s, 2), "threads": threads,
                    "repeats": args.repeats, "loadavg_1m": round(os.getloadavg()[0], 2),
                    "torch": torch.__version__, "opencv": cv2.__version__,
                }), flush=True)


if __name__ == "__main__":
    main()
