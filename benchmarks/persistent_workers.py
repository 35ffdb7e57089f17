"""What starting the loader workers every epoch costs, and what persistent workers save.

The engine's training loader for short epochs (class folders of 500x375 JPEGs, the run's
recipe), with `persistent_workers=false` (the baseline: a fresh set of workers each epoch, as
before) and `true` (workers started once, each epoch only reseeds the sampler), in the same
process, alternating. One JSON line: median epoch time and time to the first batch of each,
and the ratio. A short epoch is where it shows: CIFAR's 50k images take ~2.5 s on a GPU, an
epoch of 2560 ImageNet-sized images (input_pipeline.py's) ~0.5 s, and starting 15 workers from
a process holding a CUDA context takes a sizeable part of either.

    python benchmarks/persistent_workers.py [--device cuda] [--workers 15] [--images 2560]
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

from benchmarks.input_pipeline import sync, write_jpegs  # noqa: E402
from smix.devices import device_name  # noqa: E402
from smix.dist import init_distributed  # noqa: E402
from smix.cpus import auto_workers  # noqa: E402
from pretrain import engine  # noqa: E402
from pretrain.config import build_config  # noqa: E402


def epoch_times(rt: engine.Runtime, epoch: int) -> tuple[float, float]:
    """(seconds to the first batch on the device, seconds for the whole epoch)."""
    sync(rt.dist.device)
    start = time.perf_counter()
    first = None
    colour = engine.colour_generator(rt, epoch)
    for batch in engine.make_loader(rt, True, epoch):
        engine.train_batch(rt, batch, colour)
        if first is None:
            sync(rt.dist.device)
            first = time.perf_counter() - start
    sync(rt.dist.device)
    return first or 0.0, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=auto_workers(),
                    help="loader workers (default: workers=auto, smix.cpus)")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=4, help="timed epochs per setting")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="smix-persist-") as tmp:
        write_jpegs(Path(tmp) / "data", a.images, 10)
        runtimes = {}
        for persistent in ("false", "true"):
            cfg = build_config("imagenet-resnet50", Path(tmp) / "data", Path(tmp) / persistent,
                               "none", {"device": a.device, "arch": "resnet18",
                                        "batch_size": str(a.batch), "workers": str(a.workers),
                                        "input_size": str(a.size), "crop": str(a.size),
                                        "resize": str(a.size), "progress": "false",
                                        "persistent_workers": persistent, "loader": "torch"})
            runtimes[persistent] = engine.build_runtime(cfg, init_distributed(a.device))
            epoch_times(runtimes[persistent], 0)  # warm-up (and the persistent workers' start)
        times: dict[str, list[tuple[float, float]]] = {"false": [], "true": []}
        for e in range(1, a.epochs + 1):
            for key in (("false", "true") if e % 2 else ("true", "false")):
                times[key].append(epoch_times(runtimes[key], e))
    med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v))
           for k, v in times.items()}
    device = runtimes["true"].dist.device
    print(json.dumps({
        "benchmark": "persistent_workers", "device": device.type,
        "device_name": device_name(device), "workers": a.workers, "images": a.images,
        "batch": a.batch, "size": a.size, "epochs": a.epochs,
        "baseline": "persistent_workers=false (fresh workers each epoch), same process",
        "fresh_epoch_s": round(med["false"][1], 4), "persistent_epoch_s": round(med["true"][1], 4),
        "fresh_first_batch_s": round(med["false"][0], 4),
        "persistent_first_batch_s": round(med["true"][0], 4),
        "epoch_speedup": round(med["false"][1] / med["true"][1], 3)}), flush=True)


if __name__ == "__main__":
    main()
