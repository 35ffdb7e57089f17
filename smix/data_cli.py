"""`smix data shapes OUT --classes K --per-class N --size S [--seed N]`."""

from __future__ import annotations

import json
from pathlib import Path

from smix.cli import ArgParser
from smix.errors import UserError
from smix.shapes import SHAPES, ShapesConfig, generate_shapes


def main(argv: list[str]) -> int:
    p = ArgParser(prog="smix data", description="Generate the synthetic shapes dataset.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("shapes", help="class folders + a VOC devkit copy with true boxes")
    s.add_argument("out", type=Path)
    s.add_argument("--classes", type=int, default=4, help=f"1..{len(SHAPES)}: {', '.join(SHAPES)}")
    s.add_argument("--per-class", type=int, default=100, help="training images per class")
    s.add_argument("--size", type=int, default=64, help="image side in pixels")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--radius", default="0.16,0.3",
                   help="object radius range as fractions of the side (default 0.16,0.3)")
    s.add_argument("--texture", type=float, default=0.5,
                   help="background texture amplitude, 0 = flat (default 0.5)")
    s.add_argument("--class-colours", action="store_true",
                   help="draw each class in its own colour (learnable in a few CPU minutes)")
    a = p.parse_args(argv)
    try:
        lo, hi = (float(v) for v in a.radius.split(","))
    except ValueError:
        raise UserError(f"--radius: expected two numbers LO,HI, got {a.radius!r}") from None
    if not 0 < lo <= hi < 0.5 or not 0 <= a.texture < float("inf"):  # (nan, inf: no image)
        raise UserError("--radius needs 0 < LO <= HI < 0.5 and --texture >= 0")
    summary = generate_shapes(ShapesConfig(a.out, a.classes, a.per_class, a.size, a.seed,
                                           radius=(lo, hi), texture=a.texture,
                                           class_colours=a.class_colours))
    print(json.dumps(summary, indent=2))
    return 0
