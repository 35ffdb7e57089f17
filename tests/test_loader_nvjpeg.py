"""`loader=nvjpeg`: JPEGs decoded by torchvision (nvjpeg on CUDA, libjpeg-turbo here) and
resampled in two batched matmuls.

References, all independent of `pretrain.nvjpeg`: PyTorch's own antialiased bilinear kernel
(`F.interpolate(antialias=True)`) per image; the torch loader's PIL path (`eval_transform`,
`train_transform`) on real photos from scikit-image; a simulation of RandomResizedCrop's
published algorithm (`tests.test_loader_dali`); the torch loader's sampler order.
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from skimage import data as skdata

from smix.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from smix.data import eval_transform
from smix.errors import UserError
from pretrain.dali import resolve_loader
from pretrain.nvjpeg import (DecodeLoader, EncodedImages, Geometry, assemble, axis_weights,
                             collate_packed, nvjpeg_works, resample)
from tests.test_loader_dali import (DRAWS, OUT, SIDE, assert_fair_flips, assert_same_distribution,
                                    crop_geometry, simulate_rrc, torch_loader_draws)

CPU = torch.device("cpu")
UNIT = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # eval "normalisation" that leaves [0,1] pixels


def photo_jpeg(folder: Path, name: str = "astronaut", size: tuple[int, int] | None = None,
               mode: str = "RGB", fmt: str = "JPEG") -> Path:
    image = Image.fromarray(getattr(skdata, name)()).convert("RGB")
    if size:
        image = image.resize(size, Image.BICUBIC)
    path = folder / f"{name}-{mode}-{image.size[0]}.{fmt.lower()}"
    image.convert(mode).save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return path


def batches(paths: list[Path], geometry: Geometry, skip_bad: bool = False,
            norm=UNIT) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """The feeder's batches for `paths` (label = position), on the CPU, in order."""
    items = EncodedImages([(str(p), k) for k, p in enumerate(paths)], geometry, skip_bad)
    packed = [collate_packed([items[k] for k in range(len(items))])]
    make = lambda p: assemble(p, geometry, CPU, skip_bad, None if geometry.train else norm)
    return list(DecodeLoader(packed, make, CPU))


# -- the resampling against PyTorch's antialiased bilinear kernel --------------------------

@pytest.mark.parametrize("box", [(10, 20, 150, 90), (0, 0, 200, 300), (37, 5, 41, 23),
                                 (100, 250, 7, 50)])
def test_resample_is_torch_antialiased_bilinear_of_the_crop(box):
    """Down- and upsampling, square and not, at the border and inside, flipped or not."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 200, 300), generator=gen, dtype=torch.uint8)
    top, left, h, w = box
    plans = torch.tensor([[top, h, 48, 0, left, w, 48, 0]] * 2)
    got = resample(images, plans, torch.tensor([False, True]), 48)
    crop = images[:, :, top:top + h, left:left + w].float()
    ref = F.interpolate(crop, size=(48, 48), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(got[0], ref[0], atol=0.02, rtol=0)
    torch.testing.assert_close(got[1], ref[1].flip(-1), atol=0.02, rtol=0)


def test_weights_ignore_padding_and_rows_sum_to_one():
    plans = torch.tensor([[3, 10, 4, 0], [0, 20, 40, 0]])
    w = axis_weights(plans, 4, 32, torch.float32)
    assert w.shape == (2, 4, 32)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4))
    assert (w[0, :, :3] == 0).all() and (w[0, :, 13:] == 0).all()  # only the window [3, 13)
    assert (w[1, :, 20:] == 0).all()  # only the image, not the padding


def test_padding_garbage_never_reaches_the_output():
    """Two images of different sizes in one padded batch: each one's result is what it gives
    alone (the other's size only changes the padding)."""
    small = torch.randint(0, 256, (1, 3, 40, 30), dtype=torch.uint8)
    big = torch.full((1, 3, 90, 120), 255, dtype=torch.uint8)
    padded = torch.full((2, 3, 90, 120), 255, dtype=torch.uint8)
    padded[0, :, :40, :30] = small[0]
    padded[1] = big[0]
    plans = torch.tensor([[0, 40, 16, 0, 0, 30, 16, 0], [5, 80, 16, 0, 10, 100, 16, 0]])
    got = resample(padded, plans, torch.tensor([False, False]), 16)
    alone = resample(small, plans[:1], torch.tensor([False]), 16)
    torch.testing.assert_close(got[:1], alone)


# -- against the torch loader's PIL path on real photos -------------------------------------

@pytest.mark.parametrize("resize,crop", [(80, 64), (64, 64)])
def test_eval_matches_the_torch_loaders_eval_transform(tmp_path, resize, crop):
    """Resize the shorter side + centre crop (and the square resize), on a portrait and a
    landscape photo: within the two resamplers' rounding (PIL works on uint8, per pass)."""
    paths = [photo_jpeg(tmp_path, "astronaut", (300, 200)), photo_jpeg(tmp_path, "coffee")]
    (x, y, skipped), = batches(paths, Geometry(False, crop, resize))
    assert x.shape == (2, 3, crop, crop) and y.tolist() == [0, 1] and skipped == 0
    meta = type("M", (), dict(resize=resize, crop=crop, mean=UNIT[0], std=UNIT[1]))
    for k, p in enumerate(paths):
        ref = eval_transform(meta)(Image.open(p).convert("RGB"))
        diff = (x[k] - ref).abs() * 255
        assert diff.max() <= 2.0 and diff.mean() < 0.35, (p.name, diff.max(), diff.mean())


def test_train_crops_follow_random_resized_crop(tmp_path):
    """The coordinate picture as a lossless-ish JPEG (quality 100, 4:4:4): the crops' area
    and aspect match the torch loader's and RandomResizedCrop's algorithm; flips are fair."""
    ys, xs = np.mgrid[0:SIDE, 0:SIDE]
    path = tmp_path / "coords.jpg"
    Image.fromarray(np.stack([xs, ys, np.full_like(xs, 128)], -1).astype(np.uint8)).save(
        path, "JPEG", quality=100, subsampling=0)
    torch.manual_seed(0)  # the worker's RNG: here the main process's
    geometry = Geometry(True, OUT, scale=(0.08, 1.0))
    items = EncodedImages([(str(path), 0)] * DRAWS, geometry)
    x = torch.cat([assemble(collate_packed([items[k] for k in range(s, s + 250)]), geometry,
                            CPU, False)[0] for s in range(0, DRAWS, 250)])
    assert x.shape == (DRAWS, 3, OUT, OUT)
    area, aspect, flipped = crop_geometry(x)
    t_area, t_aspect, _ = crop_geometry(torch_loader_draws(path))
    sim_area, sim_aspect = simulate_rrc(4000, (0.08, 1.0))
    assert_same_distribution(area, t_area, "nvjpeg vs torch crop area")
    assert_same_distribution(aspect, t_aspect, "nvjpeg vs torch crop aspect")
    assert_same_distribution(area, sim_area, "nvjpeg crop area vs RandomResizedCrop")
    assert_same_distribution(aspect, sim_aspect, "nvjpeg crop aspect vs RandomResizedCrop")
    assert_fair_flips(flipped)


# -- what nvjpeg is not given, and what nobody reads -----------------------------------------

def test_png_cmyk_grey_and_large_pictures_are_finished_in_the_worker(tmp_path):
    """A PNG, a CMYK JPEG, a greyscale JPEG and a JPEG over `max_side` (DCT-scaled by PIL
    first) all arrive, each close to the torch loader's eval of the same file."""
    paths = [photo_jpeg(tmp_path, "coffee", fmt="PNG"),
             photo_jpeg(tmp_path, "astronaut", mode="CMYK"),
             photo_jpeg(tmp_path, "camera", mode="L"),
             photo_jpeg(tmp_path, "chelsea", (900, 600))]
    geometry = Geometry(False, 48, 56, max_side=512)
    items = EncodedImages([(str(p), k) for k, p in enumerate(paths)], geometry)
    assert [items[k].jpeg for k in range(4)] == [False, False, True, False]
    (x, y, skipped), = batches(paths, geometry)
    assert y.tolist() == [0, 1, 2, 3] and skipped == 0
    meta = type("M", (), dict(resize=56, crop=48, mean=UNIT[0], std=UNIT[1]))
    for k, p in enumerate(paths):
        ref = eval_transform(meta)(Image.open(p).convert("RGB"))
        diff = (x[k] - ref).abs() * 255
        # CMYK: PIL's own conversion both sides; large: DCT scaling before the resize
        assert diff.mean() < 1.5 and diff.max() <= 24, (p.name, diff.mean(), diff.max())


def test_unreadable_files_are_named_or_skipped(tmp_path):
    good = photo_jpeg(tmp_path, "coffee", (64, 48))
    noise = tmp_path / "noise.jpg"
    noise.write_bytes(bytes(range(256)) * 4)  # no image header at all
    body = tmp_path / "body.jpg"  # a valid header, then zeros: only decoding finds out
    raw = good.read_bytes()
    sos = raw.index(b"\xff\xda")  # the header ends with the start-of-scan segment: keep it
    # whole (Pillow before 13 cannot identify a JPEG cut before it, and Python 3.10 has no 13)
    body.write_bytes(raw[:sos + 2 + int.from_bytes(raw[sos + 2:sos + 4], "big") + 100] + bytes(400))
    geometry = Geometry(False, 32, 32)
    import pretrain.nvjpeg as nv

    nv._FALLBACK_WARNED = False
    with pytest.warns(RuntimeWarning, match="refused a batch of 2"):
        with pytest.raises(UserError, match=body.name):
            batches([good, body], geometry)
    for bad in (noise, body):
        with pytest.raises(UserError, match=bad.name):
            batches([good, bad], geometry)
        (x, y, skipped), = batches([good, bad, good], geometry, skip_bad=True)
        assert x.shape[0] == 2 and y.tolist() == [0, 2] and skipped == 1


# -- the feeder thread -----------------------------------------------------------------------

def test_feeder_raises_in_the_consumer_and_stops_when_the_consumer_does():
    def make(k):
        if k == 3:
            raise UserError("batch 3 is bad")
        return torch.full((1,), float(k)), torch.tensor([k]), 0

    before = threading.active_count()
    got = []
    with pytest.raises(UserError, match="batch 3 is bad"):
        for x, _, _ in DecodeLoader(range(6), make, CPU):
            got.append(int(x))
    assert got == [0, 1, 2]
    for x, _, _ in DecodeLoader(range(1000), lambda k: (torch.zeros(1), torch.zeros(1), 0), CPU):
        break  # the consumer leaves early: the feeder must not hang on a full queue
    assert threading.active_count() == before
    assert len(DecodeLoader(range(7), make, CPU)) == 7


# -- the engine, end to end --------------------------------------------------------------------

def _cfg(root: Path, out: Path, loader: str, epochs: int = 2, **extra):
    from pretrain.config import build_config

    return build_config("shapes-resnet18", root, out, "saliencymix", {
        "workers": "1", "batch_size": "8", "input_size": "32", "resize": "40", "crop": "32",
        "train_aug": "imagenet", "progress": "false", "epochs": str(epochs), "loader": loader,
        "device": "cpu", **extra})


def test_same_order_and_shards_as_the_torch_loader(shapes_root, tmp_path):
    """Per epoch and rank the labels arrive in the torch loader's order (same sampler, same
    seeds); epochs differ; two ranks split an epoch between them."""
    import dataclasses

    from pretrain import engine
    from smix.dist import DistInfo

    runtimes = {name: engine.build_runtime(_cfg(shapes_root, tmp_path / name, name),
                                           DistInfo(0, 1, 0, CPU)) for name in ("torch", "nvjpeg")}

    def labels(loader: str, epoch: int, rank: int = 0, world: int = 1) -> list[int]:
        rt = dataclasses.replace(runtimes[loader], dist=DistInfo(rank, world, 0, CPU), loaders={})
        return torch.cat([b[1] for b in engine.make_loader(rt, True, epoch)]).tolist()

    assert labels("nvjpeg", 0) == labels("torch", 0) != labels("nvjpeg", 1)
    halves = [labels("nvjpeg", 0, r, 2) for r in (0, 1)]
    assert halves == [labels("torch", 0, r, 2) for r in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == 12  # 24 images: 12 per rank, 3 batches of 4


def test_engine_trains_and_resumes_bit_identically_with_nvjpeg(shapes_root, tmp_path, capsys):
    from pretrain import engine

    engine.train(_cfg(shapes_root, tmp_path / "full", "nvjpeg"))
    engine.train(_cfg(shapes_root, tmp_path / "cut", "nvjpeg", epochs=1))
    engine.train(_cfg(shapes_root, tmp_path / "cut", "nvjpeg"), resume=True)
    full = load_file(str(tmp_path / "full" / "backbone.safetensors"))
    cut = load_file(str(tmp_path / "cut" / "backbone.safetensors"))
    assert all(torch.equal(full[k], cut[k]) for k in full)
    log = [json.loads(l) for l in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["train_images"] for r in log] == [24, 24] and log[-1]["val_images"] == 12
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["loader"] == "nvjpeg"


def test_resolve_loader_nvjpeg(monkeypatch):
    import pretrain.nvjpeg as nv

    assert resolve_loader("nvjpeg", "imagenet", "imagenet", CPU) == "nvjpeg"
    assert resolve_loader("nvjpeg", "shapes", "none", CPU) == "nvjpeg"
    assert resolve_loader("auto", "imagenet", "imagenet", CPU) == "torch"
    with pytest.raises(UserError, match="loader=nvjpeg: CIFAR pickles"):
        resolve_loader("nvjpeg", "cifar10", "cifar", CPU)
    monkeypatch.setattr(nv, "nvjpeg_works", lambda device: "torchvision cannot decode")
    with pytest.raises(UserError, match="loader=nvjpeg: torchvision cannot decode"):
        resolve_loader("nvjpeg", "imagenet", "imagenet", CPU)


def test_nvjpeg_works_on_this_cpu():
    assert nvjpeg_works(CPU) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decode_matches_the_cpu_path(tmp_path):
    """On a GPU: nvjpeg + fp16 resampling against libjpeg-turbo + float32 (IDCTs differ by a
    few grey levels), and a batch made on the feeder's stream is whole when the step reads it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    cuda = torch.device("cuda", 0)
    assert nvjpeg_works(cuda) is None
    paths = [photo_jpeg(tmp_path, n) for n in ("astronaut", "coffee", "chelsea")]
    paths.append(photo_jpeg(tmp_path, "camera", mode="L"))  # greyscale: ~2% of ImageNet
    geometry = Geometry(False, 224, 256)
    items = EncodedImages([(str(p), k) for k, p in enumerate(paths)], geometry)
    assert all(items[k].jpeg for k in range(4))
    # one batched nvjpeg call takes the greyscale JPEG too (else every batch falls back)
    decoded = decode_jpeg([items[k].data for k in range(4)], mode=ImageReadMode.RGB, device=cuda)
    assert [tuple(d.shape) for d in decoded][-1] == (3, 512, 512)
    packed = [collate_packed([items[k] for k in range(4)])] * 3
    on_gpu = [x for x, _, _ in DecodeLoader(packed, lambda p: assemble(
        p, geometry, cuda, False, UNIT), cuda)]
    on_cpu = assemble(packed[0], geometry, CPU, False, UNIT)[0]
    for x in on_gpu:
        diff = (x.cpu() - on_cpu).abs() * 255
        assert diff.mean() < 1.0 and diff.max() <= 16, (diff.mean(), diff.max())
