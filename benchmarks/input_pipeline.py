"""Does the input pipeline keep the training step busy? Three rates in one process (issue 14):

* loader alone  -- the engine's training loader for one epoch, batches delivered to the device;
* step alone    -- the engine's `train_step` on a batch already on the device, per method;
* engine epoch  -- `engine.train_epoch`: loader + step as training runs them, the epoch after
                   an untimed warm-up epoch. Worker start-up is not in it: the workers persist
                   (`persistent_workers`, the default) and the warm-up started them;
                   DALI builds each epoch's pipeline before `train_epoch` starts its clock.
                   It does include the epoch's wait for its first batch and, at its end, for
                   the slowest worker (see "Epoch length").

Baseline: the step alone with method `none`. Ratios: `epoch_vs_step` (goal >= 0.9 on a GPU,
ResNet-50, batch 256, bf16, loader=auto), `loader_vs_step`, and per method
`step_vs_none` (goal >= 0.98 for saliencymix). The data is a class-folder tree of JPEGs of
ImageNet's typical size (500x375), written once into `--data` (or a temporary folder).

Epoch length. An epoch starts by waiting for its first batch, which one worker makes (a chunk
of it per worker on the GPU path, `engine.ChunkedLoader`), and ends waiting for the slowest
worker; an epoch of few batches per worker measures those two waits more than the pipeline's
rate (on this 2-core CPU, 2 workers, whole batches: 2 batches per epoch gave the loader 708
img/s, 8 batches 1,204). ImageNet's epoch is 5,005 batches of 256. So `--images` defaults to 4
batches per worker (at least 2,560), and `loader_first_batch_s` says how long the epoch's
start waited.

    python benchmarks/input_pipeline.py --device cuda --loader auto            # the issue's run
    python benchmarks/input_pipeline.py --device cuda --loader torch,nvjpeg    # two loaders
    python benchmarks/input_pipeline.py --device cpu --arch resnet18 --size 64 --images 96 \
        --batch 16 --workers 1 --steps 3                                        # a CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from smix.devices import device_name, graphs_enabled
from smix.dist import init_distributed
from smix.cpus import auto_workers
from pretrain import engine
from pretrain.config import build_config
from pretrain.mixers import get_mixer

GOALS = {"epoch_vs_step": 0.9, "saliencymix_step_vs_none": 0.98}


def write_jpeg(path: Path, seed: int) -> None:
    """One smooth random 500x375 picture, quality 90 (its own seed: the writers run in any
    order)."""
    low = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(low).resize((500, 375), Image.BILINEAR).save(path, quality=90)


def write_jpegs(root: Path, images: int, classes: int, seed: int = 0) -> None:
    """`root/{train,val}/<class>/*.jpg`, written by one process per core (many images)."""
    classes = min(classes, images)  # every class in train/, or val/ would hold classes it lacks
    jobs = []
    for split, n in (("train", images), ("val", max(classes, images // 10))):
        for i in range(n):
            folder = root / split / f"c{i % classes:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((folder / f"{i:06d}.jpg", seed * 10_000_019 + len(jobs)))
    if len(jobs) < 512:  # fewer: a pool's start costs more than it saves
        for job in jobs:
            write_jpeg(*job)
        return
    # fork (no re-import of the caller) unless CUDA is up, which a forked child cannot use
    fork = "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized()
    with multiprocessing.get_context("fork" if fork else "spawn").Pool(os.cpu_count() or 1) as pool:
        pool.starmap(write_jpeg, jobs, chunksize=64)


def jpeg_tree(root: Path, images: int, classes: int) -> Path:
    """`root/jpeg<images>x<classes>`, written unless there: into a sibling folder renamed when
    complete, so that a tree killed half-written is never reused."""
    data = root / f"jpeg{images}x{classes}"
    if not (data / "train").is_dir():
        partial = data.with_name(data.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        write_jpegs(partial, images, classes)
        partial.rename(data)
    return data


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(rt: engine.Runtime, epoch: int) -> tuple[float, float]:
    """Images/s of one epoch of the training loader, batches moved onto the device, and the
    seconds until its first batch was there."""
    sync(rt.dist.device)
    start, n, first = time.perf_counter(), 0, None
    colour = engine.colour_generator(rt, epoch)
    for batch in engine.make_loader(rt, True, epoch):
        images, labels, _ = engine.train_batch(rt, batch, colour)
        n += len(labels)
        if first is None:
            sync(rt.dist.device)
            first = time.perf_counter() - start
    sync(rt.dist.device)
    return n / (time.perf_counter() - start), first or 0.0


def step_rate(rt: engine.Runtime, images: torch.Tensor, labels: torch.Tensor, method: str,
              steps: int) -> float:
    """Images/s of `train_step` alone (batch on the device), after two warm-up steps."""
    rt.mixer = get_mixer(method, **build_config(rt.cfg.preset, rt.cfg.data, rt.cfg.out,
                                                method).method_params)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        engine.train_step(rt, images, labels, gen)
    sync(rt.dist.device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.train_step(rt, images, labels, gen)
    sync(rt.dist.device)
    return steps * len(labels) / (time.perf_counter() - start)


def loader_line(cfg, device: str, loader: str, steps: dict[str, float], size: int,
                images: int) -> dict:
    """Engine epoch and loader-alone rates of one loader, against the step rates `steps`."""
    cfg = dataclasses.replace(cfg, loader=loader)
    rt = engine.build_runtime(cfg, init_distributed(device))
    engine.train_epoch(rt, 0)  # warm-up: kernels, autotuning, pipelines, page cache
    epoch = engine.train_epoch(rt, 1)["images_per_s"]
    loader_s, first_batch = loader_rate(rt, 2)
    return {"benchmark": "input_pipeline", "device": rt.dist.device.type,
            "device_name": device_name(rt.dist.device), "loader_asked": loader,
            "loader": rt.loader, "arch": cfg.arch, "batch": cfg.batch_size, "size": size,
            "amp": str(rt.amp_dtype), "channels_last": rt.channels_last,
            "workers": cfg.workers, "images": images,
            "colour_on": "device" if rt.data.finish is not None else "workers",
            "cuda_graphs": graphs_enabled(), "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "loader_img_s": round(loader_s, 1), "epoch_img_s": round(epoch, 1),
            "loader_first_batch_s": round(first_batch, 3),
            **{f"step_{m}_img_s": round(r, 1) for m, r in steps.items()},
            "baseline": "step alone, method none (same process)",
            "epoch_vs_step": round(epoch / steps["none"], 4),
            "loader_vs_step": round(loader_s / steps["none"], 4),
            **{f"{m}_step_vs_none": round(r / steps["none"], 4) for m, r in steps.items()
               if m != "none"},
            "goals": GOALS, "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--loader", default="auto",
                   help="auto, torch, dali or nvjpeg; several, comma-separated, are compared "
                        "against one step baseline (one JSON line each)")
    p.add_argument("--preset", default="imagenet-resnet50")
    p.add_argument("--arch", default=None, help="override the preset's architecture")
    p.add_argument("--size", type=int, default=224, help="training crop")
    p.add_argument("--images", type=int, default=None,
                   help="training images (default: 4 batches per worker, at least 2560)")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--amp", default="auto")
    p.add_argument("--workers", type=int, default=auto_workers(),
                   help="loader workers (default: workers=auto, smix.cpus)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per method")
    p.add_argument("--methods", default="none,saliencymix",
                   help="methods whose step is timed; none (the baseline) always is")
    p.add_argument("--data", type=Path, default=None, help="reuse/keep the JPEG tree here")
    a = p.parse_args()
    n_images = a.images or max(2560, 4 * a.batch * max(a.workers, 1))
    tmp = tempfile.TemporaryDirectory(prefix="smix-input-")
    data = jpeg_tree(a.data or Path(tmp.name), n_images, a.classes)
    overrides = {"device": a.device, "batch_size": str(a.batch), "amp": a.amp,
                 "workers": str(a.workers), "input_size": str(a.size), "crop": str(a.size),
                 "resize": str(round(a.size * 256 / 224)), "progress": "false", "epochs": "100",
                 "loader": "torch"}
    if a.arch:
        overrides["arch"] = a.arch
    cfg = build_config(a.preset, data, Path(tmp.name) / "run", "none", overrides)
    rt = engine.build_runtime(cfg, init_distributed(a.device))  # the step baseline's
    batch = next(iter(engine.make_loader(rt, True, 3)))
    images, labels, _ = engine.train_batch(rt, batch, engine.colour_generator(rt, 3))
    methods = ["none"] + [m for m in a.methods.split(",") if m != "none"]  # none: the baseline
    steps = {m: step_rate(rt, images, labels, m, a.steps) for m in methods}
    del rt, images, labels, batch
    for loader in a.loader.split(","):
        print(json.dumps(loader_line(cfg, a.device, loader, steps, a.size, n_images)),
              flush=True)
    tmp.cleanup()


if __name__ == "__main__":
    main()
