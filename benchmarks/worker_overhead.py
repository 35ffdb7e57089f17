"""What the torch loader's workers spend besides their transform, and on reading (issue 14).

Two costs that were not decoding: seeding each sample with `torch.manual_seed` (which also
seeds every accelerator; in a worker without CUDA it formats a traceback for a lazy call each
time) where the transforms draw from the CPU generator alone, and stacking a batch in private
memory, which the DataLoader's queue then copies into shared memory once more
(`default_collate` stacks into shared memory directly). Baseline, in the same process over the
same DataLoader settings (sampler keys, workers that persist, chunks of 32 as the GPU path
makes): the old way, `torch.manual_seed` + `torch.stack`. Measured: `smix.data.collate_skip` +
`pretrain.data.SeededDataset`, on blank images (the bookkeeping alone) and on the GPU path's
real samples (decode, crop, flip of 500x375 JPEGs read as PIL images, as then). Then the reader,
with the new bookkeeping on both sides: PIL images (`load_rgb`, the baseline) against tensors
(`load_rgb_tensor`, what the GPU path's workers read now); and the whole change: old bookkeeping
on PIL images against new on tensors. One JSON line: img/s of both sides per row, medians over
interleaved rounds, and their ratio.

    python benchmarks/worker_overhead.py [--workers 2] [--images 512] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*` from any cwd

from smix.data import collate_skip, load_rgb  # noqa: E402
from smix.devices import device_name  # noqa: E402
from smix.cpus import auto_workers  # noqa: E402
from pretrain.config import build_config  # noqa: E402
from pretrain.data import SeededDataset, build_datasets  # noqa: E402
from benchmarks.input_pipeline import write_jpegs  # noqa: E402
from benchmarks.loader_stages import BlankImages  # noqa: E402


class OldSeeded(SeededDataset):
    """The baseline's seeding: `torch.manual_seed` per sample."""

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        torch.manual_seed(seed)
        return self.dataset[index]


def old_collate(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The baseline's collation: a stack in private memory."""
    return (torch.stack([b[0] for b in batch]),
            torch.tensor([b[1] for b in batch], dtype=torch.long), 0)


def loader(dataset: Dataset, old: bool, workers: int, chunk: int) -> DataLoader:
    keys = [(i, 1000 + i) for i in range(len(dataset))]
    return DataLoader((OldSeeded if old else SeededDataset)(dataset), batch_size=chunk,
                      sampler=keys, num_workers=workers,
                      collate_fn=old_collate if old else collate_skip, persistent_workers=True)


def epoch_rate(dl: DataLoader) -> float:
    start, n = time.perf_counter(), 0
    for batch in dl:
        n += len(batch[1])
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=auto_workers(),
                    help="loader workers (default: workers=auto, smix.cpus)")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(Path(tmp), a.images, 10)
        cfg = build_config("imagenet-resnet50", Path(tmp), Path(tmp) / "run", "none",
                           {"device": "cpu", "input_size": "224", "crop": "224"})
        tensors = build_datasets(cfg, on_device=True).train
        pil = copy.copy(tensors)
        pil.reader = load_rgb
        blank = BlankImages(a.images, 224)
        rows = {"blank": ((blank, True), (blank, False)),  # (dataset, old bookkeeping) per side
                "decode_crop_flip": ((pil, True), (pil, False)),
                "reader": ((pil, False), (tensors, False)),
                "all": ((pil, True), (tensors, False))}
        line = {"benchmark": "worker_overhead", "device_name": device_name("cpu"),
                "workers": a.workers, "chunk": a.chunk, "images": a.images, "rounds": a.rounds,
                "baseline": "torch.manual_seed per sample + torch.stack (same process); for "
                            "the reader row, PIL images"}
        for name, sides in rows.items():
            loaders = [loader(data, old, a.workers, a.chunk) for data, old in sides]
            for dl in loaders:
                epoch_rate(dl)  # warm-up: workers start, page cache
            rates: list[list[float]] = [[], []]
            for r in range(a.rounds):
                for k in ((0, 1) if r % 2 == 0 else (1, 0)):
                    rates[k].append(epoch_rate(loaders[k]))
            old_s, new_s = statistics.median(rates[0]), statistics.median(rates[1])
            line.update({f"{name}_old_img_s": round(old_s, 1), f"{name}_new_img_s": round(new_s, 1),
                         f"{name}_speedup": round(new_s / old_s, 3)})
            del loaders
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
