"""Does fine-tuning work? AP50 of a Faster R-CNN fine-tuned on shapes vs the untrained detector.

The torchvision backend, end to end through `run_transfer` (the code `smix transfer` runs): a
randomly initialised ResNet-18 checkpoint, FPN, generated shapes data in the VOC layout, N
iterations of the d2-voc schedule (rescaled) versus 0 iterations (the baseline, same process,
same seed: identical new layers). Prints one JSON line naming the device it trained on
(`--device`, default the GPU where there is one, as `smix transfer` picks).

    python benchmarks/transfer_finetune.py [--iters 300] [--classes 4] [--per-class 40]
        [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from smix.arch import build_model
from smix.checkpoint import BackboneMeta, save_checkpoint
from smix.devices import device_name
from smix.shapes import SHAPES, ShapesConfig, generate_shapes
from transfer.api import run_transfer
from transfer.config import TransferConfig

OVERRIDES = ("min_size=64", "max_size=64", "batch=4", "lr=0.02", "workers=0",
             "anchor_sizes=16,32,64,128,256", "roi_batch=128", "rpn_post_nms_train=300",
             "rpn_post_nms_test=100", "checkpoint_period=100000", "log_period=50")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--per-class", type=int, default=40)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on shared cores)")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_shapes(ShapesConfig(root / "shapes", classes=args.classes,
                                     per_class=args.per_class, size=64, seed=0), progress=False)
        names = SHAPES[: args.classes]
        torch.manual_seed(0)
        ckpt = save_checkpoint(root / "r18.safetensors", build_model("resnet18", len(names)),
                               BackboneMeta(arch="resnet18", num_classes=len(names),
                                            class_names=names, input_size=64, resize=64, crop=64,
                                            dataset="random-init"))
        ap = {}
        seconds = {}
        for iters in (0, args.iters):
            cfg = TransferConfig(ckpt, root / "shapes", root / f"run{iters}", backend="torchvision",
                                 arch="fpn", classes="auto", iters=iters, progress=False,
                                 device=args.device,
                                 overrides=tuple(tuple(o.split("=", 1)) for o in OVERRIDES))
            sync(device)
            tic = time.perf_counter()
            ap[iters] = run_transfer(cfg)
            sync(device)
            seconds[iters] = time.perf_counter() - tic
    base, tuned = ap[0], ap[args.iters]
    print(json.dumps({
        "benchmark": "transfer_finetune", "device": device.type,
        "device_name": device_name(device), "backend": "torchvision", "arch": "fpn",
        "backbone": "resnet18 (random init)", "data": f"shapes {args.classes} classes, "
        f"{args.per_class}/class train, 64px", "iters": args.iters,
        "baseline": "untrained detector (0 iterations)", "baseline_AP50": round(base["AP50"], 2),
        "AP50": round(tuned["AP50"], 2), "AP50_gain": round(tuned["AP50"] - base["AP50"], 2),
        "ratio": round(tuned["AP50"] / base["AP50"], 2) if base["AP50"] > 0 else None,
        "baseline_AP": round(base["AP"], 2), "AP": round(tuned["AP"], 2),
        "per_class_AP50": {k: round(v, 1) for k, v in tuned["per_class"].items()},
        "train_seconds": round(seconds[args.iters] - seconds[0], 1)}))


if __name__ == "__main__":
    main()
