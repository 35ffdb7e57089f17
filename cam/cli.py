"""`smix cam export|mixed|localize`: parse, build the frozen config, call one function."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from smix.cli import ArgParser, parse_overrides, workers_arg
from smix.errors import UserError
from smix.io import distinct_names
from cam.methods import list_cam_methods

_METHODS = ", ".join(list_cam_methods())


def _common(p: argparse.ArgumentParser, method_flag: str = "--method") -> None:
    p.add_argument("--ckpt", action="append", type=Path, required=True,
                   help="checkpoint (.safetensors); repeat for several")
    p.add_argument(method_flag, dest="cam_method", default=None,
                   help=f"CAM method: {_METHODS} (default: cam for GAP+FC ResNets)")
    p.add_argument("--layer", default=None,
                   help="target layer (module name); default: the arch registry's cam_layer")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")


def _parser() -> ArgParser:
    p = ArgParser(prog="smix cam", description="Class activation maps: figures and measurements.")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="overlay PNG + map .npy per image and checkpoint, a grid")
    _common(e)
    e.add_argument("--images", nargs="+", action="extend", type=Path, required=True,
                   help="image files and/or folders (searched recursively)")
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--target", default="pred",
                   help="pred, true (the image's class folder) or a class name/index")
    _loader_args(e)
    e.add_argument("--grid-max", type=int, default=8, help="images (columns) in grid.png")
    m = sub.add_parser("mixed", help="each mixer's output for a pair and the CAMs of both classes")
    _common(m, "--cam-method")
    m.add_argument("--pair", nargs=2, type=Path, required=True, metavar=("IMG_A", "IMG_B"))
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--methods", default=None,
                   help="comma-separated mixer names (default: every registered mixer)")
    m.add_argument("--mixer-arg", action="append", default=[], metavar="MIXER.KEY=VALUE",
                   help="a mixer parameter, e.g. cutmix.alpha=1.0; repeatable")
    m.add_argument("--classes", nargs=2, default=("auto", "auto"), metavar=("A", "B"),
                   help="class of A and B: auto (the folder's name where it is a class of the "
                        "checkpoint, else the prediction; default), true (the folder's name), "
                        "pred, or a class name/index")
    m.add_argument("--seed", type=int, default=0)
    loc = sub.add_parser("localize", help="GT-known/Top-1 Loc, MaxBoxAcc, pointing game")
    _common(loc)
    src = loc.add_mutually_exclusive_group(required=True)
    src.add_argument("--voc-root", type=Path, help="VOC devkit root (boxes from Annotations/)")
    src.add_argument("--boxes", type=Path,
                     help="JSON lines {image, class, box:[x0,y0,x1,y1]} or CSV "
                          "image,class,x0,y0,x1,y1 (0-based pixels, x1/y1 exclusive)")
    loc.add_argument("--split", default="test", help="VOC split (default test)")
    loc.add_argument("--year", default="2007")
    loc.add_argument("--out", type=Path, required=True, help="run folder")
    loc.add_argument("--cam-threshold", type=float, default=0.2,
                     help="fraction of the map's max for the box (default 0.2)")
    loc.add_argument("--curve-interval", type=float, default=0.01,
                     help="threshold step of the MaxBoxAcc sweep")
    loc.add_argument("--iou-threshold", type=float, default=0.5)
    loc.add_argument("--geometry", default="crop", choices=("crop", "square"),
                     help="crop: the checkpoint's eval resize + centre crop (default); square: "
                          "the whole image resized to crop x crop, as Choe et al.'s WSOL "
                          "evaluation (compare MaxBoxAcc with their tables)")
    _loader_args(loc)
    return p


def _loader_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=workers_arg, default="auto",
                   help="DataLoader worker processes, or auto: this process's share of the CPUs "
                        "less one (default)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable images (named on stderr, counted) instead of failing")
    p.add_argument("--no-progress", action="store_true")


def _mixer_args(items: list[str]) -> tuple[tuple[str, str, str], ...]:
    out = []
    for key, value in parse_overrides(items).items():
        if "." not in key:
            raise UserError(f"--mixer-arg wants MIXER.KEY=VALUE, got {key}={value}")
        mixer, param = key.split(".", 1)
        out.append((mixer, param, value))
    return tuple(out)


def main(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if a.cmd == "export":
        from cam.export import ExportConfig, export_cams

        r = export_cams(ExportConfig(
            tuple(a.ckpt), tuple(a.images), a.out, a.cam_method, a.target, a.layer,
            a.batch_size, a.skip_bad_images, a.grid_max, a.workers, a.device, not a.no_progress))
        if main_rank:
            print(f"wrote {r['n_written']} image(s) x {len(r['models'])} checkpoint(s) to "
                  f"{a.out} (grid: {r.get('grid')}); skipped {r['n_skipped']} unreadable")
    elif a.cmd == "mixed":
        if not main_rank:  # two images: nothing to shard, rank 0 does it all
            return 0
        from cam.mixed import MixedConfig, mixed_cams

        methods = None if a.methods is None else tuple(
            n.strip() for n in a.methods.split(",") if n.strip())
        r = mixed_cams(MixedConfig(tuple(a.ckpt), tuple(a.pair), a.out, methods,
                                   _mixer_args(a.mixer_arg), tuple(a.classes), a.cam_method,
                                   a.layer, a.seed, a.device))
        print(f"wrote {a.out / r['grid']} ({', '.join(r['mixers'])})")
    else:
        from cam.localize import LocalizeConfig, localize

        r = localize(LocalizeConfig(
            tuple(a.ckpt), a.out, a.voc_root, a.boxes, a.split, a.year, a.cam_method, a.layer,
            a.cam_threshold, a.curve_interval, a.iou_threshold, a.geometry, a.batch_size,
            a.skip_bad_images, a.workers, a.device, not a.no_progress))
        if main_rank:
            _print_localization(r)
    return 0


def _print_localization(r: dict) -> None:
    print(f"{r['dataset']}: {r['n_images']} images, IoU >= {r['iou_threshold']}, "
          f"CAM threshold {r['cam_threshold']}, geometry {r.get('geometry', 'crop')}")
    print(f"{'checkpoint':<40} {'GT-known':>9} {'Top-1Loc':>9} {'Top-1Cls':>9} "
          f"{'MaxBoxAcc':>10} {'MaxBoxAccV2':>12} {'Pointing':>9}")
    names = distinct_names([m["checkpoint"]["path"] for m in r["models"]])
    for m, name in zip(r["models"], names):
        name += f" ({m['training_method']})"
        print(f"{name[:40]:<40} {m['gt_known_loc']:9.2f} {m['top1_loc']:9.2f} "
              f"{m['top1_cls']:9.2f} {m['maxboxacc']:10.2f} {m['maxboxacc_v2']:12.2f} "
              f"{m['pointing_game']:9.2f}")
