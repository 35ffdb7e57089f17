"""`smix pretrain --preset NAME --data DIR --method NAME --out RUN [--epochs N] [key=value …]`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from smix.cli import ArgParser, parse_overrides
from smix.errors import UserError
from smix.io import read_json
from pretrain.config import PRESETS, TrainConfig, build_config
from pretrain.engine import train
from pretrain.mixers import list_mixers


def _parser() -> ArgParser:
    p = ArgParser(prog="smix pretrain", description="Train a backbone with a mixing method.",
                  epilog="key=value overrides any TrainConfig field (lr=0.05 milestones=30,60 "
                         "workers=8 amp=bf16 compile=true loader=dali …), method.<param>=v a mixer "
                         "parameter (method.prob=0.5), arch.<param>=v an arch parameter.")
    p.add_argument("--preset", help=f"one of: {', '.join(sorted(PRESETS))}")
    p.add_argument("--data", type=Path, help="class-folder root (train/, val/) or CIFAR pickles")
    p.add_argument("--method", default="none", help=f"mixer: {', '.join(list_mixers())}")
    p.add_argument("--out", type=Path, help="run folder")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip and count unreadable images instead of stopping")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN",
                   help="continue a killed run from its folder (its saved config is used)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def config_from_args(a) -> tuple[TrainConfig, bool]:
    if a.resume is not None:
        saved = read_json(a.resume / "config.json")
        overrides = {k: _to_str(v) for k, v in saved.items()
                     if k not in ("preset", "data", "out", "method", "method_params", "arch_kwargs")}
        overrides.update({f"method.{k}": _to_str(v) for k, v in saved["method_params"].items()})
        overrides.update({f"arch.{k}": _to_str(v) for k, v in saved["arch_kwargs"].items()})
        cfg = build_config(saved["preset"], Path(saved["data"]), a.resume, saved["method"], overrides)
        if a.epochs is not None:  # extending a finished run is allowed
            cfg = dataclasses.replace(cfg, epochs=a.epochs)
        return cfg, True
    for name in ("preset", "data", "out"):
        if getattr(a, name) is None:
            raise UserError(f"--{name} is required (or --resume RUN)")
    overrides = parse_overrides(a.overrides)
    if a.epochs is not None:
        overrides["epochs"] = str(a.epochs)
    if a.seed is not None:
        overrides["seed"] = str(a.seed)
    if a.skip_bad_images:
        overrides["skip_bad_images"] = "true"
    return build_config(a.preset, a.data, a.out, a.method, overrides), False


def _to_str(v) -> str:
    if isinstance(v, list):
        return ",".join(str(x) for x in v)
    return str(v)


def main(argv: list[str]) -> int:
    cfg, resume = config_from_args(_parser().parse_intermixed_args(argv))
    summary = train(cfg, resume=resume)
    from smix.dist import cleanup, init_distributed
    if init_distributed(cfg.device).is_main:
        print(json.dumps({"run": str(cfg.out), "checkpoint": str(cfg.out / "backbone.safetensors"),
                          **summary}, indent=2))
    cleanup()
    return 0
