"""`smix audit` at the size of the VOC07 test set: 4952 images, every mixer, every image detector.

The data is a synthetic VOC devkit of that size written by the shapes generator (square images
of `--side` px; 432² ≈ VOC's typical 500×375 pixel count), made once per (`--images`, `--side`)
in its own folder under `--root` (`voc<images>x<side>`) and reused; the line's `images` and
`side` are read back from the data measured. The baseline, measured in the same process just
before, is reading every image of the split (the I/O floor any audit pays); the JSON line gives
both times and their ratio. `smix audit` runs on the CPU (numpy and torch on the host, no
device option), so the line names the CPU.

    python benchmarks/audit_voc_size.py [--root /tmp/voc_size] [--images 4952] [--side 432]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smix.audit import AuditConfig, load_images, run_audit  # noqa: E402
from smix.data import load_rgb  # noqa: E402
from smix.devices import device_name  # noqa: E402
from smix.shapes import SHAPES, ShapesConfig, generate_shapes  # noqa: E402


def make_data(root: Path, images: int, side: int) -> Path:
    """`root/voc<images>x<side>`, a devkit whose `test` split holds about `images` images (the
    generator's val split): a folder per setting, so other settings' data is never reused;
    written unless complete (the generator writes `shapes.json` last, and a rerun rewrites the
    same files, so a run killed half-way is made whole)."""
    data = root / f"voc{images}x{side}"
    if not (data / "shapes.json").is_file():
        classes = len(SHAPES)
        per = -(-images // classes)
        generate_shapes(ShapesConfig(data, classes=classes, per_class=1, size=side,
                                     val_fraction=per), progress=True)
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("/tmp/smix_voc_size"))
    p.add_argument("--images", type=int, default=4952)
    p.add_argument("--side", type=int, default=432)
    p.add_argument("--pairs", type=int, default=1024)
    p.add_argument("--size", type=int, default=224)
    a = p.parse_args()
    data = make_data(a.root, a.images, a.side)
    side = json.loads((data / "shapes.json").read_text())["size"]
    cfg = AuditConfig(out=data / "audit", data=data, size=a.size, pairs=a.pairs,
                      progress=False)
    images, _ = load_images(cfg)
    t0 = time.perf_counter()
    for im in images:
        load_rgb(im.path)
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = run_audit(cfg)
    audit_s = time.perf_counter() - t0
    print(json.dumps({"bench": "audit_voc_size", "device": "cpu",
                      "device_name": device_name("cpu"), "images": len(images), "side": side,
                      "methods": len(res["methods"]), "detectors": len(res["detectors"]),
                      "pairs": a.pairs, "size": a.size, "audit_s": round(audit_s, 1),
                      "read_baseline_s": round(read_s, 3), "ratio": round(audit_s / read_s, 2),
                      "loadavg_1m": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
