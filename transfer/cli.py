"""`smix transfer`: parse the command line, build a `TransferConfig`, call `run_transfer`."""

from __future__ import annotations

import json
from pathlib import Path

from smix.cli import ArgParser, parse_overrides
from transfer.config import ARCHS, BACKENDS, TransferConfig, list_presets


def build_parser() -> ArgParser:
    p = ArgParser(
        prog="smix transfer",
        description="Fine-tune Faster R-CNN on Pascal VOC (VOC07+12 trainval -> VOC07 test) from a "
                    "toolkit checkpoint and report AP50 (VOC07 11-point on a 2007 test set, "
                    "area under the curve on 2012) with AP, AP75 and per-class AP.",
        epilog="overrides (key=value): batch, lr, steps, warmup, min_size, max_size, test_size, "
               "anchor_sizes, rpn_batch, roi_batch, rpn_post_nms_train/test, workers, seed, "
               "checkpoint_period, train_sets (2007:trainval,2012:trainval), test_set, ...; "
               "detectron2 keys such as SOLVER.CHECKPOINT_PERIOD=2000 go to detectron2's config.")
    p.add_argument("--ckpt", required=True, type=Path, help="toolkit checkpoint (.safetensors)")
    p.add_argument("--voc-root", required=True, type=Path,
                   help="folder holding VOC2007/ (and VOC2012/), as the devkit lays them out")
    p.add_argument("--out", required=True, type=Path, help="run folder")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="default: detectron2 when importable, else torchvision")
    p.add_argument("--preset", default="d2-voc", choices=list_presets())
    p.add_argument("--arch", default="c4", choices=ARCHS)
    p.add_argument("--classes", default="voc",
                   help="voc (the 20 classes), auto (sorted names in the annotations) or a file")
    p.add_argument("--iters", type=int, default=None, help="iterations (steps rescaled)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--num-gpus", type=int, default=1, help="processes per machine (detectron2)")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto", help="e.g. tcp://host:port; auto on one machine")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    cfg = TransferConfig(
        ckpt=args.ckpt, voc_root=args.voc_root, out=args.out, backend=args.backend,
        preset=args.preset, arch=args.arch, classes=args.classes, iters=args.iters,
        overrides=tuple(parse_overrides(args.overrides).items()), resume=args.resume,
        num_gpus=args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
        dist_url=args.dist_url, device=args.device, progress=not args.no_progress)
    from transfer.api import run_transfer

    results = run_transfer(cfg)
    if results is None:  # a machine other than rank 0 of a multi-machine job
        return 0
    print(json.dumps({k: results[k] for k in ("AP50", "AP", "AP75", "backend", "preset", "arch",
                                              "iters")}))
    return 0
