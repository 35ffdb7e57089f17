"""How fast `loader=nvjpeg` makes a batch on one device, and what batching the resampling buys.

Per batch of `--batch` JPEGs (photos from scikit-image at ImageNet's typical 500x375 and
375x500, quality 90), in one process on `--device`:

* decode       -- one `torchvision.io.decode_jpeg(list, device=...)` call (nvjpeg on CUDA);
* resample     -- `pretrain.nvjpeg.resample` (pad + two batched matmuls: crop, antialiased
                  bilinear, flip) of the decoded batch to 224² with RandomResizedCrop draws;
* baseline     -- the same crops made image by image with `F.interpolate(antialias=True)` and
                  a flip, as a per-image GPU transform would (the torch loader's tensor path);
* assemble     -- `pretrain.nvjpeg.assemble`: decode + resample + placing, from worker output.

Ratios: `resample_speedup` (baseline time / resample time) and `assemble_img_s`, which an
engine epoch cannot exceed with this loader (compare with input_pipeline's step alone).

    python benchmarks/decode_resample.py --device cuda
    python benchmarks/decode_resample.py --device cpu --batch 16 --repeats 2   # a smoke run
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from smix.devices import device_name
from pretrain.nvjpeg import (EncodedImages, Geometry, assemble, collate_packed, decode,
                             pad_batch, resample)

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
          "cat")  # colour photos bundled with scikit-image (no download)


def write_photos(folder: Path) -> list[Path]:
    from skimage import data

    paths = []
    for k, name in enumerate(PHOTOS):
        size = (500, 375) if k % 2 == 0 else (375, 500)
        image = Image.fromarray(getattr(data, name)()).convert("RGB").resize(size, Image.BICUBIC)
        path = folder / f"{name}.jpg"
        image.save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats`, after one warm-up, device work included."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_image(decoded: list[torch.Tensor], plans: torch.Tensor, flips: torch.Tensor,
              size: int) -> torch.Tensor:
    """The baseline: one interpolate (and flip) per image."""
    out = []
    for im, p, f in zip(decoded, plans.tolist(), flips.tolist()):
        crop = im[None, :, p[0]:p[0] + p[1], p[4]:p[4] + p[5]].float()
        r = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
        out.append(r.flip(-1) if f else r)
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_photos(Path(tmp))
        samples = [(str(paths[k % len(paths)]), 0) for k in range(a.batch)]
        geometry = Geometry(True, a.size, scale=(0.08, 1.0))
        items = EncodedImages(samples, geometry)
        packed = collate_packed([items[k] for k in range(len(items))])
    blobs = torch.split(packed.blob, packed.lengths)
    decoded = decode(blobs, device)
    plans, flips = packed.plans.to(device), packed.flips.to(device)
    t_decode = timed(lambda: decode(blobs, device), device, a.repeats)
    t_resample = timed(lambda: resample(pad_batch(decoded), plans, flips, a.size), device,
                       a.repeats)
    t_base = timed(lambda: per_image(decoded, packed.plans, packed.flips, a.size), device,
                   a.repeats)
    t_assemble = timed(lambda: assemble(packed, geometry, device, False), device, a.repeats)
    n = a.batch
    print(json.dumps({
        "benchmark": "decode_resample", "device": device.type, "device_name": device_name(device),
        "batch": n, "size": a.size, "photos": len(paths),
        "mean_jpeg_kb": round(sum(packed.lengths) / n / 1024, 1),
        "baseline": "per-image F.interpolate(antialias=True) + flip, same process",
        "decode_img_s": round(n / t_decode, 1), "resample_img_s": round(n / t_resample, 1),
        "per_image_img_s": round(n / t_base, 1), "assemble_img_s": round(n / t_assemble, 1),
        "resample_speedup": round(t_base / t_resample, 3)}), flush=True)


if __name__ == "__main__":
    main()
