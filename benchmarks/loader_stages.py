"""Where the training loader's time goes: its rate stage by stage, in one process (issue 14).

On an H200 with 16 cores the torch loader delivered 2,392 img/s from 15 workers, while one
worker's decode + crop + flip cost ~1.0-1.2 ms per image with PIL on a 2-core CPU, and costs
~0.6 ms reading tensors (`worker_transform.py`): 15 such workers would make 12,000-25,000. This
tells which stage caps it. Every stage runs the engine's
own DataLoader settings (sampler and per-sample seeds, chunks of a batch, workers that persist),
two epochs each, the second timed:

* `ipc`      -- workers return blank uint8 images of the crop's size (no file read): the cost
                of seeding, collating, moving batches to the main process and pinning them;
* `workers`  -- the real samples (decode, crop, flip), batches left unpinned on the host;
* `pinned`   -- the same, pinned as the engine's loader pins them (the DataLoader's thread;
                CUDA only);
* `device`   -- `engine.make_loader` + `engine.train_batch`: on the device, colour and
                normalisation done (what `input_pipeline.py`'s loader-alone rate measures).

With `--loader nvjpeg`: `workers` (bytes and crop plans, no decode) and `device` (nvjpeg decode
and batched resampling in the feeder thread). Baseline: `ipc` (torch) or `workers` (nvjpeg), the
stage with the least work; one JSON line per loader with every stage's img/s and its ratio to
that baseline, plus the device and the worker count.

    python benchmarks/loader_stages.py --device cuda --loader torch,nvjpeg --data /tmp/jpeg
    python benchmarks/loader_stages.py --device cpu --batch 16 --workers 2 --images 256   # smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*` from any cwd

from smix.devices import device_name  # noqa: E402
from smix.dist import init_distributed  # noqa: E402
from smix.cpus import auto_workers  # noqa: E402
from pretrain import engine  # noqa: E402
from pretrain.config import build_config  # noqa: E402
from pretrain.data import SeededDataset  # noqa: E402
from pretrain.nvjpeg import DecodeLoader  # noqa: E402
from benchmarks.input_pipeline import jpeg_tree, sync  # noqa: E402


class BlankImages(Dataset):
    """`n` uint8 [3,size,size] zero images, label 0: a sample that costs nothing to make."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(3, self.size, self.size, dtype=torch.uint8), 0


def rate(batches, device: torch.device, to_device=None) -> float:
    """Images/s of one pass over `batches` (their labels are counted), after a warm-up pass."""
    for timed in (False, True):
        sync(device)
        start, n = time.perf_counter(), 0
        for batch in batches():
            if to_device is not None:
                batch = to_device(batch)
            labels = getattr(batch, "labels", None)  # nvjpeg's workers: a `Packed`
            labels = batch[1] if labels is None else labels
            n += sum(len(x) for x in labels) if isinstance(labels, list) else len(labels)
        sync(device)
        if timed:
            return n / (time.perf_counter() - start)
    raise AssertionError("unreachable")


def like(base: DataLoader, dataset: Dataset | None = None, pin: bool | None = None) -> DataLoader:
    """`base`'s DataLoader settings with another dataset or pinning."""
    return DataLoader(dataset if dataset is not None else base.dataset,
                      batch_size=base.batch_size, sampler=base.sampler,
                      num_workers=base.num_workers, collate_fn=base.collate_fn,
                      pin_memory=base.pin_memory if pin is None else pin,
                      drop_last=base.drop_last, persistent_workers=base.num_workers > 0)


def stages(rt: engine.Runtime) -> dict[str, float]:
    """img/s of each stage of `rt`'s training loader (see the module docstring)."""
    device, cfg = rt.dist.device, rt.cfg
    full = engine.make_loader(rt, True, 1)  # the engine's (ChunkedLoader, DecodeLoader: .loader)
    base = full.loader if isinstance(full, (engine.ChunkedLoader, DecodeLoader)) else full
    out: dict[str, float] = {}
    if rt.loader == "torch":
        blank = SeededDataset(BlankImages(len(rt.data.train), cfg.input_size), cfg.workers > 0)
        runs = [("ipc", dict(dataset=blank)), ("workers", dict(pin=False))]
        if device.type == "cuda":  # pinning is a CUDA thing
            runs.append(("pinned", dict(pin=True)))
        for name, change in runs:  # one stage's workers at a time
            loader = like(base, **change)
            out[name] = rate(lambda: loader, device)
            del loader
    else:
        out["workers"] = rate(lambda: base, device)
    colour = engine.colour_generator(rt, 1)
    out["device"] = rate(lambda: engine.make_loader(rt, True, 1), device,
                         lambda b: engine.train_batch(rt, b, colour))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--loader", default="torch", help="torch, nvjpeg, or both comma-separated")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--workers", type=int, default=auto_workers(),
                   help="loader workers (default: workers=auto, smix.cpus)")
    p.add_argument("--images", type=int, default=None,
                   help="training images (default: 2 batches per worker, at least 2560)")
    p.add_argument("--data", type=Path, default=None, help="reuse/keep the JPEG tree here")
    a = p.parse_args()
    n_images = a.images or max(2560, 2 * a.batch * max(a.workers, 1))
    tmp = tempfile.TemporaryDirectory(prefix="smix-stages-")
    data = jpeg_tree(a.data or Path(tmp.name), n_images, 100)
    overrides = {"device": a.device, "batch_size": str(a.batch), "workers": str(a.workers),
                 "input_size": str(a.size), "crop": str(a.size),
                 "resize": str(round(a.size * 256 / 224)), "progress": "false",
                 "epochs": "100", "arch": "resnet18"}
    for loader in a.loader.split(","):
        cfg = build_config("imagenet-resnet50", data, Path(tmp.name) / "run", "none",
                           {**overrides, "loader": loader})
        rt = engine.build_runtime(cfg, init_distributed(a.device))
        rates = stages(rt)
        baseline = "ipc" if "ipc" in rates else "workers"
        print(json.dumps({
            "benchmark": "loader_stages", "device": rt.dist.device.type,
            "device_name": device_name(rt.dist.device), "loader": rt.loader,
            "batch": a.batch, "size": a.size, "workers": a.workers, "images": n_images,
            "colour_on": "device" if rt.data.finish is not None else "workers",
            **{f"{k}_img_s": round(v, 1) for k, v in rates.items()},
            "baseline": f"{baseline} (same loader settings, same process)",
            **{f"{k}_vs_{baseline}": round(v / rates[baseline], 4) for k, v in rates.items()
               if k != baseline}}), flush=True)
        del rt
    tmp.cleanup()


if __name__ == "__main__":
    main()
