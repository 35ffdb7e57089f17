"""`smix pretrain --preset NAME --data DIR --method NAME --out RUN [--epochs N] [key=value …]`."""

from __future__ import annotations

import json
import typing
from pathlib import Path

from smix.cli import ArgParser, parse_overrides
from smix.errors import UserError
from smix.io import read_json
from pretrain.config import (PRESETS, TrainConfig, build_config, config_from_json,
                             convert_setting, resolve_workers)
from pretrain.engine import train
from pretrain.mixers import list_mixers


def _parser() -> ArgParser:
    p = ArgParser(prog="smix pretrain", description="Train a backbone with a mixing method.",
                  epilog="key=value overrides any TrainConfig field (lr=0.05 milestones=30,60 "
                         "workers=auto micro_batch=64 amp=bf16 compile=true loader=dali …), "
                         "method.<param>=v a mixer "
                         "parameter (method.prob=0.5), arch.<param>=v an arch parameter.")
    p.add_argument("--preset", help=f"one of: {', '.join(sorted(PRESETS))}")
    p.add_argument("--data", type=Path, help="class-folder root (train/, val/) or CIFAR pickles")
    p.add_argument("--method", default=None,
                   help=f"mixer (default none): {', '.join(list_mixers())}")
    p.add_argument("--out", type=Path, help="run folder")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip and count unreadable images instead of stopping")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN",
                   help="continue a killed run from its folder (its saved config is used)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


# What `--resume` may change: where the data is and how it is read or shown, not the result;
# and `micro_batch` (a step that no longer fits): the batch and the learning rate stay, only
# BatchNorm's per-pass statistics change from then on, as with another number of GPUs.
RESUME_SETTABLE = ("workers", "persistent_workers", "progress", "device", "cudnn_benchmark",
                   "micro_batch")
# What every pretraining run's config.json holds (the settings without a default, the mixer).
RUN_KEYS = ("preset", "arch", "dataset", "data", "method", "method_params")


def config_from_args(a) -> tuple[TrainConfig, bool]:
    if a.resume is not None:
        return _resume_config(a), True
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
    return build_config(a.preset, a.data, a.out, a.method or "none", overrides), False


def _resume_config(a) -> TrainConfig:
    """The run's saved, typed config; `--epochs` (extending), `--data` and the settings in
    `RESUME_SETTABLE` may change, anything else would change the result and is refused."""
    overrides = parse_overrides(a.overrides)
    refused = [f"--{n}" for n in ("preset", "method", "out", "seed") if getattr(a, n) is not None]
    refused += ["--skip-bad-images"] * a.skip_bad_images
    refused += [k for k in overrides if k not in RESUME_SETTABLE]
    if refused:
        raise UserError(f"--resume continues the run as it was configured; cannot change "
                        f"{', '.join(refused)} (allowed: --epochs, --data, "
                        f"{', '.join(RESUME_SETTABLE)}; or start a new run with --out)")
    saved = read_json(a.resume / "config.json")
    missing = next((k for k in RUN_KEYS if not isinstance(saved, dict) or k not in saved), None)
    if missing is not None:  # another stage's run folder, say: one line, not a KeyError
        raise UserError(f"{a.resume}: not a pretraining run (its config.json has no "
                        f"{missing!r}); --resume takes a folder `smix pretrain --out` wrote")
    hints = typing.get_type_hints(TrainConfig)
    changes = {k: convert_setting(v, hints[k], k) for k, v in overrides.items()}
    if "workers" in changes:  # `auto`: this machine's count; a stale note goes either way
        changes["workers"], changes["notes"] = resolve_workers(changes["workers"],
                                                               tuple(saved.get("notes", ())))
    if "workers" in changes and (changes["workers"] == 0) != (saved.get("workers") == 0):
        # without workers the training process draws the augmentations from its own RNG,
        # with any number of them each sample is seeded (pretrain.data.SeededDataset)
        raise UserError(f"--resume cannot switch workers={saved.get('workers')} to "
                        f"workers={changes['workers']}: 0 and any other count draw different "
                        "augmentations (counts above 0 may change freely)")
    if a.data is not None:
        changes["data"] = a.data
    if a.epochs is not None:  # extending a finished run is allowed
        changes["epochs"] = a.epochs
    return config_from_json(saved, out=a.resume, **changes)


def main(argv: list[str]) -> int:
    cfg, resume = config_from_args(_parser().parse_intermixed_args(argv))
    summary = train(cfg, resume=resume)
    from smix.dist import cleanup, init_distributed
    if init_distributed(cfg.device).is_main:
        print(json.dumps({"run": str(cfg.out), "checkpoint": str(cfg.out / "backbone.safetensors"),
                          **summary}, indent=2))
    cleanup()
    return 0
