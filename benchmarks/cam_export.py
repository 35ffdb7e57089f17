"""Export throughput of `smix cam export`: batched (32) against one image at a time.

Both runs go through the same `export_cams` (decode, eval transform, CAM, overlay, PNG and .npy
writes) on the same generated images and checkpoint, in this process; the baseline is
`--batch-size 1`. The two runs alternate `--repeats` times and the best time of each counts
(the CPU is shared: the minimum is the least disturbed run). Times are end to end, checkpoint
loading included. Prints one JSON line per CAM method with the ratio. Goal: >= 5x for CAM and
Grad-CAM on this CPU. The line names the device; with `--device cuda` every run (the public
loop too) computes on the card, and the clock is read after a synchronisation.

    .venv/bin/python benchmarks/cam_export.py [--arch resnet18] [--size 224] [--images 64]
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
from cam.export import ExportConfig, export_cams


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(cfg: ExportConfig) -> float:
    device = torch.device(cfg.device)
    sync(device)
    start = time.perf_counter()
    export_cams(cfg)
    sync(device)
    return time.perf_counter() - start


def public_gradcam_loop(ckpt: Path, images: Path, out: Path, device: torch.device) -> float:
    """The public path, one image at a time: pytorch-grad-cam's GradCAM as its README uses
    it (a CAM object per image, full backward), `show_cam_on_image`, a PNG and a .npy per image."""
    import numpy as np
    from PIL import Image
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from smix.checkpoint import load_backbone
    from smix.data import eval_transform, load_rgb

    out.mkdir(parents=True, exist_ok=True)
    sync(device)
    start = time.perf_counter()
    model, meta = load_backbone(ckpt, device)
    to_pixels, to_input = eval_transform(meta, normalize=False), eval_transform(meta)
    for i, path in enumerate(sorted(images.rglob("*.jpg"))):
        img = load_rgb(path)
        x = to_input(img)[None].to(device)
        with torch.no_grad():
            pred = int(model(x).argmax())
        with GradCAM(model=model, target_layers=[model.layer4]) as cam:
            gray = cam(input_tensor=x, targets=[ClassifierOutputTarget(pred)])[0]
        rgb = to_pixels(img).permute(1, 2, 0).numpy()
        Image.fromarray(show_cam_on_image(rgb, gray, use_rgb=True)).save(out / f"{i}.png")
        np.save(out / f"{i}.npy", gray)
    sync(device)
    return time.perf_counter() - start


def make_inputs(root: Path, arch: str, size: int, images: int) -> tuple[Path, Path]:
    """(checkpoint, image folder): an untrained `arch` over 4 shape classes, ~`images` JPEGs."""
    per_class = max(1, images // 4)  # val gets max(4, per_class/4) per class
    generate_shapes(ShapesConfig(root / "data", classes=4, per_class=4 * per_class, size=size),
                    progress=False)
    ckpt = root / "m.safetensors"
    save_checkpoint(ckpt, build_model(arch, 4), BackboneMeta(
        arch=arch, num_classes=4, class_names=SHAPES[:4], input_size=size, resize=size,
        crop=size, method={"name": "none"}))
    return ckpt, root / "data" / "val"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--methods", default="cam,gradcam")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt, folder = make_inputs(root, a.arch, a.size, a.images)
        images = (folder,)
        n = sum(1 for _ in images[0].rglob("*.jpg"))
        for method in a.methods.split(","):
            base = ExportConfig((ckpt,), images, root / "warm", method=method, batch_size=4,
                                grid_max=0, progress=False, device=a.device)
            export_cams(base)  # warm-up: imports, allocator, oneDNN kernels
            one = ExportConfig(**{**base.__dict__, "out": root / "one", "batch_size": 1})
            many = ExportConfig(**{**base.__dict__, "out": root / "batch",
                                   "batch_size": a.batch_size})
            times = [(_timed(one), _timed(many)) for _ in range(a.repeats)]
            single, batched = min(t[0] for t in times), min(t[1] for t in times)
            public = min(public_gradcam_loop(ckpt, images[0], root / "public", device)
                         for _ in range(max(1, a.repeats - 1)))
            print(json.dumps({
                "benchmark": "cam_export", "device": device.type,
                "device_name": device_name(device), "method": method, "arch": a.arch,
                "size": a.size, "images": n, "threads": torch.get_num_threads(),
                "batch_size": a.batch_size,
                "baseline": "same export, batch_size=1", "repeats": a.repeats,
                "batched_img_per_s": round(n / batched, 2),
                "baseline_img_per_s": round(n / single, 2),
                "speedup": round(single / batched, 2), "goal": 5.0,
                "goal_met": single / batched >= 5.0,
                "public_gradcam_per_image_img_per_s": round(n / public, 2),
                "speedup_vs_public_gradcam_per_image": round(public / batched, 2)}), flush=True)


if __name__ == "__main__":
    main()
