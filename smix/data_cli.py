"""`smix data shapes OUT --classes K --per-class N --size S [--seed N]`."""

from __future__ import annotations

import json
from pathlib import Path

from smix.cli import ArgParser
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
    a = p.parse_args(argv)
    summary = generate_shapes(ShapesConfig(a.out, a.classes, a.per_class, a.size, a.seed))
    print(json.dumps(summary, indent=2))
    return 0
