"""`smix robustness fgsm|pgd|corruption`: parse, build a frozen config, call one function.

One subcommand per registered attack (a new registration appears here by itself), plus
`corruption`. Epsilon and step are in /255 pixel units.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from smix.cli import ArgParser, workers_arg
from smix.errors import UserError
from smix.io import distinct_names
from smix.report import incomplete_note
from robustness.adversarial import MAX_EPS, AttackConfig, run_attack
from robustness.attacks import attack_info, list_attacks
from robustness.corruption import CorruptionConfig, run_corruption


def parse_eps(text: str, allow_subpixel: bool = False) -> tuple[float, ...]:
    """"1,2,4,8" -> (1.0, 2.0, 4.0, 8.0); each in (0, 255] (/255 units), duplicates dropped.

    Every value below 1 almost always means [0,1] units (0.03 for 8/255, as torchattacks'
    `eps` is given): that would attack with 255 times too small an epsilon, so it is refused
    unless `allow_subpixel` says the sub-pixel budget is meant."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--eps: expected comma-separated numbers in /255 units, got {text!r}") from None
    if not values:
        raise UserError("--eps: no value given")
    bad = [v for v in values if not 0 < v <= MAX_EPS]
    if bad:
        raise UserError(f"--eps {bad[0]:g} is outside (0, {MAX_EPS:g}]: epsilon is in /255 pixel "
                        "units (8 means 8/255)")
    if not allow_subpixel and all(v < 1 for v in values):
        meant = ",".join(_scaled(v) for v in values)
        raise UserError(f"--eps {text} looks like [0,1] units; ε is in /255 pixel units: did you "
                        f"mean {meant}? (--allow-subpixel-eps runs it as given)")
    return tuple(dict.fromkeys(values))


def _scaled(v: float) -> str:
    """v in [0,1] units written in /255 units, rounded as a user would have typed it."""
    return f"{round(v * 255) if v * 255 >= 0.5 else round(v * 255, 2):g}"


def _common(p: argparse.ArgumentParser, data_help: str) -> None:
    p.add_argument("--ckpt", type=Path, action="append", required=True,
                   help="checkpoint (.safetensors); repeat to evaluate several in one run")
    p.add_argument("--data", type=Path, required=True, help=data_help)
    p.add_argument("--out", type=Path, required=True,
                   help="run folder to write; a rerun into it replaces its config, log, "
                        "metrics and plot (--resume continues it instead)")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate N evenly spaced images (per split) instead of all")
    p.add_argument("--workers", type=workers_arg, default="auto",
                   help="data loader processes, or auto: this process's share of the CPUs less "
                        "one (default)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dataset", default="", help="dataset name for metrics.json")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run in --out from its progress.json (the counts "
                        "committed so far are kept; checkpoints, data and settings must match)")


def _attack_parser(sub: Any, name: str) -> None:
    info = attack_info(name)
    p = sub.add_parser(name, help=f"{name.upper()} white-box L-inf evaluation")
    _common(p, "evaluation images as class folders (e.g. ImageNet val), Tiny-ImageNet's "
               "own val/ layout (images/ + val_annotations.txt), or CIFAR-10/100's python "
               "pickles (their test set)")
    p.add_argument("--eps", default=",".join(f"{e:g}" for e in info.default_eps),
                   help="epsilons in /255 pixel units, comma-separated (default: %(default)s)")
    p.add_argument("--allow-subpixel-eps", action="store_true",
                   help="accept an --eps whose values are all below 1/255 (refused by default: "
                        "usually [0,1] units by mistake)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--impl", default=info.default_impl, choices=sorted(info.impls),
                   help="implementation (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of random starts")
    if "step" in info.params:
        p.add_argument("--step", type=float, default=1.0, help="step size in /255 units")
    if "steps" in info.params:
        p.add_argument("--steps", type=int, default=10)
    if "random_start" in info.params:
        p.add_argument("--random-start", action=argparse.BooleanOptionalAction, default=True)


def build_parser() -> ArgParser:
    parser = ArgParser(prog="smix robustness",
                       description="Adversarial (white-box L-inf in [0,1] pixel space, eps in "
                                   "/255) and corruption robustness of checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in list_attacks():
        _attack_parser(sub, name)
    c = sub.add_parser("corruption", help="ImageNet-C mCE / CIFAR-10-C, CIFAR-100-C mean error")
    _common(c, "ImageNet-C root (corruption/severity/class/*) or CIFAR-C folder (*.npy)")
    c.add_argument("--clean", type=Path, default=None,
                   help="clean val set (class folders; CIFAR pickles for CIFAR-C) for the clean "
                        "error and the relative mCE")
    c.add_argument("--corruptions", default="",
                   help="comma-separated subset (default: the 15 benchmark corruptions on disk)")
    c.add_argument("--batch-size", type=int, default=128)
    return parser


def _attack_config(args: argparse.Namespace) -> AttackConfig:
    return AttackConfig(
        attack=args.command, checkpoints=tuple(args.ckpt), data=args.data, out=args.out,
        eps=parse_eps(args.eps, args.allow_subpixel_eps), batch_size=args.batch_size,
        limit=args.limit, impl=args.impl,
        step=getattr(args, "step", 1.0), steps=getattr(args, "steps", 10),
        random_start=getattr(args, "random_start", True), seed=args.seed,
        workers=args.workers, device=args.device, dataset=args.dataset, resume=args.resume)


def _corruption_config(args: argparse.Namespace) -> CorruptionConfig:
    names = tuple(n.strip() for n in args.corruptions.split(",") if n.strip())
    return CorruptionConfig(
        checkpoints=tuple(args.ckpt), data=args.data, out=args.out, clean=args.clean,
        corruptions=names, batch_size=args.batch_size, limit=args.limit, workers=args.workers,
        device=args.device, dataset=args.dataset, resume=args.resume)


def _summary(results: dict[str, Any], kind: str) -> list[str]:
    lines = []
    models = results.get("models", [])
    names = distinct_names([m["checkpoint"]["path"] for m in models])
    for name, m in zip(names, models):
        if kind == "corruption":
            lines.append(f"{name}: mean error {_fmt(m['mean_error'])}  mCE {_fmt(m['mCE'])}  "
                         f"clean error {_fmt(m['clean_error'])}{incomplete_note(results)}")
        else:
            adv = "  ".join(f"eps {k}: {_fmt(v['top1'])}" for k, v in m["adversarial"].items())
            lines.append(f"{name}: clean top-1 {_fmt(m['clean_acc'])}  {adv}")
    return lines


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    if args.command == "corruption":
        results = run_corruption(_corruption_config(args))
    else:
        results = run_attack(_attack_config(args))
    for line in _summary(results, args.command):
        print(line)
    if results:
        print(f"wrote {args.out / 'metrics.json'}")
    return 0
