"""What one loader worker spends per training image: full recipe, PIL half, tensor half (issue 14).

With the torch loader feeding a GPU, workers only decode, crop and flip (`train_transform(aug,
on_device=True)`); colour jitter, PCA lighting and normalisation run batched on the device
(`finish_on_device`). That half now reads images as tensors (`load_rgb_tensor`: torchvision's
libjpeg-turbo, then torch's uint8 antialiased resize); it read PIL images before. All three on
the same JPEGs (500x375, quality 90, as input_pipeline.py writes them), in one process, one
thread (as a DataLoader worker): the full per-image `imagenet` recipe (PIL), the uint8 half on
PIL images (the baseline: what a worker did before), the uint8 half on tensors (what it does
now). One JSON line: ms per image for each, the decodes alone, the speed-ups (the loader's
img/s scales with them while workers are the bottleneck), the largest pixel difference between
the two halves under the same draws, and, for reference, the batched finish on this CPU per
image (on a GPU it is a few kernels per batch).

    python benchmarks/worker_transform.py [--images 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*` from any cwd

from smix.checkpoint import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from smix.data import (  # noqa: E402
    TrainAug, finish_on_device, load_rgb, load_rgb_tensor, train_transform)
from smix.devices import device_name  # noqa: E402
from benchmarks.input_pipeline import write_jpegs  # noqa: E402


def per_image_ms(fn, paths: list[Path], repeats: int) -> float:
    """Median over repeats of the mean ms per image of `fn(path)`."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for p in paths:
            fn(p)
        runs.append((time.perf_counter() - start) * 1000 / len(paths))
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(Path(tmp), a.images, 1)
        paths = sorted(Path(tmp, "train").rglob("*.jpg"))
        aug = TrainAug("imagenet", 224, IMAGENET_MEAN, IMAGENET_STD)
        full, half = train_transform(aug), train_transform(aug, on_device=True)
        torch.manual_seed(0)
        t_full = per_image_ms(lambda p: full(load_rgb(p)), paths, a.repeats)
        t_pil = per_image_ms(lambda p: half(load_rgb(p)), paths, a.repeats)
        t_tensor = per_image_ms(lambda p: half(load_rgb_tensor(p)), paths, a.repeats)
        t_decode_pil = per_image_ms(load_rgb, paths, a.repeats)
        t_decode_tensor = per_image_ms(load_rgb_tensor, paths, a.repeats)
        diff = 0
        for k, p in enumerate(paths):  # the same draws: the same crop and flip, resampled twice
            torch.manual_seed(k)
            by_pil = half(load_rgb(p))
            torch.manual_seed(k)
            by_tensor = half(load_rgb_tensor(p))
            diff = max(diff, int((by_pil.int() - by_tensor.int()).abs().max()))
        batch = torch.stack([half(load_rgb_tensor(p)) for p in paths])
        gen = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        finish_on_device(batch, aug, gen)
        t_finish = (time.perf_counter() - start) * 1000 / len(paths)
    print(json.dumps({
        "benchmark": "worker_transform", "device_name": device_name("cpu"), "images": a.images,
        "baseline": "uint8 half on PIL images (decode, RRC, flip), same process",
        "full_ms_per_image": round(t_full, 3), "uint8_half_pil_ms_per_image": round(t_pil, 3),
        "uint8_half_ms_per_image": round(t_tensor, 3),
        "decode_pil_ms_per_image": round(t_decode_pil, 3),
        "decode_ms_per_image": round(t_decode_tensor, 3),
        "speedup_vs_pil_half": round(t_pil / t_tensor, 3),
        "speedup_vs_full": round(t_full / t_tensor, 3), "max_pixel_diff": diff,
        "batched_finish_cpu_ms_per_image": round(t_finish, 3)}), flush=True)


if __name__ == "__main__":
    main()
