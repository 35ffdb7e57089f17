"""`smix ckpt inspect FILE [--json]` and `smix ckpt import SRC DST [--arch NAME] ...`."""

from __future__ import annotations

import json
from pathlib import Path

from smix.checkpoint import describe, read_checkpoint
from smix.ckpt_import import import_checkpoint
from smix.cli import ArgParser
from smix.errors import UserError
from smix.io import read_user_text


def _print_human(info: dict) -> None:
    names = info["class_names"]
    shown = ", ".join(names[:8]) + (f", … ({len(names)} in all)" if len(names) > 8 else "")
    rows = [
        ("arch", f"{info['arch']} {info['arch_kwargs'] or ''}".strip()),
        ("classes", f"{info['num_classes']}: {shown}"),
        ("input", f"{info['input_size']}px; eval resize {info['resize']} / crop {info['crop']}"),
        ("mean / std", f"{info['mean']} / {info['std']}"),
        ("dataset", info["dataset"] or "-"),
        ("method", json.dumps(info["method"])),
        ("epochs", info["epochs"]),
        ("metrics", json.dumps(info["metrics"])),
        ("tensors", f"{info.get('tensors')} ({info.get('parameters', 0):,} values)"),
        ("provenance", json.dumps(info["provenance"])),
    ]
    for k, v in rows:
        print(f"{k:>11}  {v}")


def main(argv: list[str]) -> int:
    p = ArgParser(prog="smix ckpt", description="Inspect checkpoints, or import external ones into the toolkit format.")
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("inspect", help="print a checkpoint's metadata")
    i.add_argument("file", type=Path)
    i.add_argument("--json", action="store_true", help="machine-readable output")
    m = sub.add_parser("import", help="convert torchvision/timm/official SaliencyMix weights")
    m.add_argument("src", type=Path)
    m.add_argument("dst", type=Path)
    m.add_argument("--arch", default=None, help="inferred from the tensors when omitted")
    m.add_argument("--classes", type=Path, default=None, help="file with one class name a line")
    m.add_argument("--dataset", default="")
    m.add_argument("--method", default="unknown", help="mixing method the weights were trained with")
    m.add_argument("--input-size", type=int, default=None)
    a = p.parse_args(argv)
    if a.cmd == "inspect":
        state, meta = read_checkpoint(a.file)
        info = describe(meta, state)
        print(json.dumps(info, indent=2)) if a.json else _print_human(info)
        return 0
    if a.input_size is not None and a.input_size < 1:
        raise UserError(f"--input-size must be a positive number of pixels, got {a.input_size}")
    names = None
    if a.classes is not None:
        if not a.classes.is_file():
            raise UserError(f"{a.classes}: class list file not found")
        names = tuple(line.strip() for line in read_user_text(a.classes, "class list").splitlines()
                      if line.strip())
    meta = import_checkpoint(a.src, a.dst, a.arch, names, a.dataset, a.method, a.input_size)
    print(f"wrote {a.dst}: {meta.arch}, {meta.num_classes} classes")
    return 0
