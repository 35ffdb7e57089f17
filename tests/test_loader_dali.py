"""`loader=dali|torch|auto`: which loader a run gets, and that DALI's augmentation draws from the
same distribution as the torch loader's.

The geometry is read back from the images themselves: a 256×256 picture whose red channel is
the column and green the row (PNG, lossless). After RandomResizedCrop + flip, the slope of red
along a row is ±(crop width)/(output side) and that of green along a column (crop height)/side
(linear resampling keeps a ramp a ramp away from the borders), so every output image tells its
crop's area fraction, aspect ratio and flip. The torch loader's draws are checked against a
simulation of RandomResizedCrop's published algorithm (always); DALI's (CPU operators, skipped
when DALI is not installed: it is an optional extra) against the torch loader's and the
simulation, with two-sample Kolmogorov-Smirnov tests.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp

from smix.data import TrainAug, draw_jitter_lighting, jitter_lighting_batch, train_transform
from smix.dist import shard_indices
from smix.errors import UserError
from pretrain.dali import RECIPES, dali_installed, epoch_files, resolve_loader

SIDE, OUT, DRAWS = 256, 64, 2000
needs_dali = pytest.mark.skipif(not dali_installed(),
                                reason="NVIDIA DALI not installed (optional extra `dali`)")
CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def coordinate_png(folder: Path) -> Path:
    ys, xs = np.mgrid[0:SIDE, 0:SIDE]
    rgb = np.stack([xs, ys, np.full_like(xs, 128)], -1).astype(np.uint8)
    path = folder / "coords.png"
    Image.fromarray(rgb).save(path)
    return path


def crop_geometry(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(area fraction, log aspect w/h, flipped) per [N,3,S,S] image in 0..255 pixel units,
    from least-squares slopes over the central half (clear of the resampling borders)."""
    s = images.shape[-1]
    mid = slice(s // 4, 3 * s // 4)
    t = torch.arange(s, dtype=torch.float64)[mid]
    t = t - t.mean()
    red = images[:, 0, mid, mid].double()
    green = images[:, 1, mid, mid].double()
    slope_x = ((red - red.mean(-1, keepdim=True)) * t).sum(-1).mean(-1) / (t * t).sum()
    slope_y = ((green - green.mean(-2, keepdim=True)) * t[:, None]).sum(-2).mean(-1) / (t * t).sum()
    w, h = slope_x.abs() * s, slope_y.abs() * s
    return ((w * h / SIDE**2).numpy(), torch.log(w / h).numpy(), (slope_x < 0).numpy())


def simulate_rrc(n: int, scale: tuple[float, float], seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """RandomResizedCrop's algorithm on a SIDE² image, from its definition: up to 10 tries of
    area ~ U(scale)·A, log-aspect ~ U(log 3/4, log 4/3), sides rounded, kept if they fit;
    else the whole (square) image."""
    rng = np.random.default_rng(seed)
    area, aspect = [], []
    for _ in range(n):
        w = h = SIDE
        for _ in range(10):
            target = rng.uniform(*scale) * SIDE * SIDE
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < cw <= SIDE and 0 < ch <= SIDE:
                w, h = cw, ch
                break
        area.append(w * h / SIDE**2)
        aspect.append(math.log(w / h))
    return np.array(area), np.array(aspect)


def torch_loader_draws(png: Path, n: int = DRAWS) -> torch.Tensor:
    torch.manual_seed(0)
    aug = TrainAug("imagenet", OUT, (0.0, 0.0, 0.0), (1 / 255,) * 3, color_jitter=0.0,
                   lighting=0.0)
    transform = train_transform(aug)
    image = Image.open(png).convert("RGB")
    return torch.stack([transform(image) for _ in range(n)])


def assert_same_distribution(a: np.ndarray, b: np.ndarray, what: str) -> None:
    p = ks_2samp(a, b).pvalue
    assert p > 1e-3, f"{what}: KS p={p:.2e}, means {a.mean():.4f} vs {b.mean():.4f}"


def assert_fair_flips(flipped: np.ndarray) -> None:
    bound = 4 * math.sqrt(0.25 / len(flipped))  # 4 sigma of a fair coin's rate
    assert abs(flipped.mean() - 0.5) < bound, flipped.mean()


def test_torch_loader_crops_follow_random_resized_crop(tmp_path):
    area, aspect, flipped = crop_geometry(torch_loader_draws(coordinate_png(tmp_path)))
    sim_area, sim_aspect = simulate_rrc(4000, RECIPES["imagenet"])
    assert_same_distribution(area, sim_area, "torch crop area")
    assert_same_distribution(aspect, sim_aspect, "torch crop aspect")
    assert_fair_flips(flipped)
    assert area.min() > 0.07 and area.max() <= 1.01
    assert np.abs(aspect).max() < math.log(4 / 3) + 0.02


def test_geometry_reader_on_known_crops(tmp_path):
    """The reader itself, on crops made by hand: a 128×64 window resized to OUT², flipped."""
    png = coordinate_png(tmp_path)
    image = torch.from_numpy(np.array(Image.open(png))).permute(2, 0, 1).float()
    crop = image[:, 40:104, 10:138].unsqueeze(0)  # h 64, w 128
    out = torch.nn.functional.interpolate(crop, size=(OUT, OUT), mode="bilinear",
                                          align_corners=False)
    area, aspect, flipped = crop_geometry(torch.cat([out, out.flip(-1)]))
    np.testing.assert_allclose(area, [128 * 64 / SIDE**2] * 2, rtol=1e-6)
    np.testing.assert_allclose(aspect, [math.log(2)] * 2, rtol=1e-6)
    assert flipped.tolist() == [False, True]


@needs_dali
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_dali_crops_match_the_torch_loader(tmp_path, device):
    """DALI's CPU operators here; on a GPU, nvjpeg decoding and DALI's GPU operators."""
    from pretrain.dali import DaliLoader, PipeSpec

    png = coordinate_png(tmp_path)
    dev = torch.device(device, 0) if device == "cuda" else CPU
    spec = PipeSpec(batch=200, size=OUT, resize=OUT, recipe="imagenet", mean=(0.0, 0.0, 0.0),
                    std=(1 / 255,) * 3, color_jitter=0.0, lighting=0.0, threads=1,
                    device_id=dev.index)
    loader = DaliLoader(spec, [(str(png), 0)] * DRAWS, True, 5, 0, 1, dev, drop_last=True)
    dali = torch.cat([x for x, _, _ in loader])
    assert dali.shape == (DRAWS, 3, OUT, OUT) and dali.device == dev
    dali = dali.cpu()
    area, aspect, flipped = crop_geometry(dali)
    t_area, t_aspect, _ = crop_geometry(torch_loader_draws(png))
    sim_area, sim_aspect = simulate_rrc(4000, RECIPES["imagenet"])
    assert_same_distribution(area, t_area, "dali vs torch crop area")
    assert_same_distribution(aspect, t_aspect, "dali vs torch crop aspect")
    assert_same_distribution(area, sim_area, "dali crop area vs RandomResizedCrop")
    assert_same_distribution(aspect, sim_aspect, "dali crop aspect vs RandomResizedCrop")
    assert_fair_flips(flipped)


@needs_dali
def test_dali_shards_cover_the_epoch_once_and_replay_it(tmp_path):
    """Two ranks read disjoint halves of the epoch's permutation, in its order; the same epoch
    seed replays the same order (resume), another seed permutes anew."""
    from pretrain.dali import DaliLoader, PipeSpec

    png = coordinate_png(tmp_path)
    samples = [(str(png), i) for i in range(26)]  # label = sample id
    spec = PipeSpec(batch=4, size=16, resize=16, recipe="shapes", mean=(0.5,) * 3,
                    std=(0.25,) * 3, threads=1)

    def labels(seed: int, rank: int) -> list[int]:
        loader = DaliLoader(spec, samples, True, seed, rank, 2, CPU, drop_last=True)
        got = [y for _, y, _ in loader]
        assert len(got) == len(loader) == 3  # 13 per rank -> 3 full batches of 4
        return torch.cat(got).tolist()

    order = epoch_files(26, 11, 2)
    assert labels(11, 0) == order[:12] and labels(11, 1) == order[13:25]
    assert labels(11, 0) == labels(11, 0)
    assert labels(12, 0) != labels(11, 0)

    def images(seed: int) -> torch.Tensor:  # crops, flips and colours replay too
        spec_c = dataclasses.replace(spec, recipe="imagenet")
        return torch.cat([x for x, _, _ in DaliLoader(spec_c, samples, True, seed, 0, 2, CPU, True)])
    assert torch.equal(images(11), images(11)) and not torch.equal(images(11), images(12))


@needs_dali
def test_dali_eval_is_resize_and_centre_crop(tmp_path):
    """Eval: the coordinate image (256²) resized to 128 and centre-cropped to 64 shows
    columns 64..191 scaled by 2, as torchvision's Resize + CenterCrop."""
    from pretrain.dali import DaliLoader, PipeSpec

    png = coordinate_png(tmp_path)
    spec = PipeSpec(batch=2, size=64, resize=128, recipe="imagenet", mean=(0.0,) * 3,
                    std=(1 / 255,) * 3, threads=1)
    (x, y, skipped), = list(DaliLoader(spec, [(str(png), 3)] * 2, False, 0, 0, 1, CPU, False))
    assert x.shape == (2, 3, 64, 64) and y.tolist() == [3, 3] and skipped == 0
    area, aspect, flipped = crop_geometry(x)
    np.testing.assert_allclose(area, 0.25, rtol=0.02)
    np.testing.assert_allclose(aspect, 0.0, atol=0.02)
    assert not flipped.any()
    assert abs(float(x[0, 0, 32, 32]) - 128.0) < 2.5  # the centre column stays the centre


@needs_dali
def test_dali_decodes_exif_rotated_jpegs_as_the_torch_loader(tmp_path):
    """A 96x48 JPEG tagged EXIF Orientation=6 (shown rotated 90 degrees by viewers): PIL and
    torchvision's decoder keep its stored pixels, and so must DALI (2.x would turn it upright
    by default): a red ramp along the stored columns stays along the columns."""
    from pretrain.dali import DaliLoader, PipeSpec
    from smix.data import load_rgb, load_rgb_tensor

    xs = np.tile(np.arange(96), (48, 1))
    rgb = np.stack([xs * 255 // 95, np.full_like(xs, 60), np.full_like(xs, 128)], -1)
    rgb = rgb.astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(rgb).save(path, quality=95, exif=exif)
    assert Image.open(path).getexif()[0x0112] == 6
    pil = torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1)
    assert pil.shape == (3, 48, 96) and torch.equal(pil, load_rgb_tensor(path))
    spec = PipeSpec(batch=1, size=32, resize=32, recipe="none", mean=(0.0,) * 3,
                    std=(1 / 255,) * 3, threads=1)
    (x, _, _), = list(DaliLoader(spec, [(str(path), 0)], True, 0, 0, 1, CPU, False))
    red = x[0, 0].double()
    along_columns = (red[:, -4:].mean() - red[:, :4].mean()).item()  # stored: ~ +220
    along_rows = (red[-4:].mean() - red[:4].mean()).item()  # rotated: the ramp would be here
    assert along_columns > 150 and abs(along_rows) < 10, (along_columns, along_rows)


@needs_dali
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_dali_decodes_as_its_cpu_operators(tmp_path):
    """nvjpeg (DALI's `mixed` decoder, hardware or CUDA) and DALI's GPU resize against its CPU
    operators on a real photo (JPEG, 512x512): eval (resize 256, centre crop 224) and the `none`
    recipe's square resize; only the decoders' IDCT rounding may differ, by a grey level or so."""
    from skimage import data as photos
    from pretrain.dali import DaliLoader, PipeSpec

    path = tmp_path / "astronaut.jpg"
    Image.fromarray(photos.astronaut()).save(path, quality=90)
    samples = [(str(path), 0)] * 3
    for train, recipe, size, resize in ((False, "imagenet", 224, 256), (True, "none", 96, 96)):
        spec = PipeSpec(batch=3, size=size, resize=resize, recipe=recipe, mean=(0.0,) * 3,
                        std=(1 / 255,) * 3, threads=2)
        out = {}
        for dev in (CPU, CUDA):
            spec_d = dataclasses.replace(spec, device_id=dev.index)
            (x, y, _), = list(DaliLoader(spec_d, samples, train, 0, 0, 1, dev, False))
            assert x.device == dev and x.shape == (3, 3, size, size) and y.tolist() == [0] * 3
            out[dev.type] = x.float().cpu()
        diff = (out["cuda"] - out["cpu"]).abs()
        assert diff.mean() < 1.0 and (diff > 4).float().mean() < 0.01, (
            train, float(diff.mean()), float(diff.max()))


def test_an_empty_dali_eval_shard_yields_no_batches():
    """Fewer validation images than ranks: the rank without any gets no batches (the others
    still meet it in the all-reduce of the totals), as with the torch loader; too few training
    images for the ranks is an error on every rank alike. No pipeline is built, so this runs
    without DALI."""
    from pretrain.dali import DaliLoader, PipeSpec

    spec = PipeSpec(batch=4, size=16, resize=16, recipe="shapes", mean=(0.5,) * 3,
                    std=(0.25,) * 3, threads=1)
    samples = [("unused.png", 0)]
    assert len(shard_indices(1, 1, 2)) == 0
    loader = DaliLoader(spec, samples, False, 0, 1, 2, CPU, drop_last=False)
    assert len(loader) == 0 and list(loader) == []
    with pytest.raises(UserError, match="no training images for rank 1 of 2"):
        DaliLoader(spec, samples, True, 0, 1, 2, CPU, drop_last=True)


@needs_dali
def test_engine_trains_with_dali_on_cpu(shapes_root, tmp_path):
    from pretrain import engine
    from pretrain.config import build_config

    cfg = build_config("shapes-resnet18", shapes_root, tmp_path / "run", "cutmix",
                       {"workers": "1", "batch_size": "8", "input_size": "32", "resize": "32",
                        "crop": "32", "progress": "false", "epochs": "1", "loader": "dali",
                        "device": "cpu"})
    engine.train(cfg)
    log = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert log["train_images"] == 24 and log["val_images"] == 12


def test_resolve_loader(monkeypatch):
    import pretrain.dali as dali

    monkeypatch.setattr(dali, "dali_installed", lambda: True)
    assert resolve_loader("auto", "imagenet", "imagenet", CUDA) == "dali"
    assert resolve_loader("auto", "imagenet", "imagenet", CPU) == "torch"  # CPU keeps torch
    assert resolve_loader("auto", "cifar10", "cifar", CUDA) == "torch"
    assert resolve_loader("auto", "tinyimagenet", "cifar", CUDA) == "torch"
    assert resolve_loader("auto", "imagenet", "imagenet", CUDA, skip_bad_images=True) == "torch"
    assert resolve_loader("dali", "shapes", "shapes", CPU) == "dali"  # DALI's CPU operators
    assert resolve_loader("torch", "imagenet", "imagenet", CUDA) == "torch"
    with pytest.raises(UserError, match="CIFAR pickles"):
        resolve_loader("dali", "cifar10", "cifar", CUDA)
    with pytest.raises(UserError, match="loader must be one of"):
        resolve_loader("fast", "imagenet", "imagenet", CUDA)
    monkeypatch.setattr(dali, "dali_installed", lambda: False)
    assert resolve_loader("auto", "imagenet", "imagenet", CUDA) == "torch"
    with pytest.raises(UserError, match="nvidia-dali-cuda120"):
        resolve_loader("dali", "imagenet", "imagenet", CUDA)


def test_pretrain_cli_rejects_dali_for_cifar(tmp_path, capsys):
    from smix.cli import main as smix
    from tests.conftest import write_cifar10

    data = write_cifar10(tmp_path / "c")
    code = smix(["pretrain", "--preset", "cifar10-resnet18", "--data", str(data), "--out",
                 str(tmp_path / "run"), "loader=dali", "device=cpu"])
    assert code != 0 and "loader=dali: CIFAR pickles" in capsys.readouterr().err


def test_batched_jitter_lighting_hand_computed():
    """Brightness then contrast then saturation (per-sample order), then PCA lighting, on a
    two-pixel image, against the formulas written out."""
    x = torch.tensor([[[[0.2, 0.8]], [[0.4, 0.6]], [[0.1, 0.3]]]])  # [1,3,1,2]
    factors = torch.tensor([[1.5, 0.5, 2.0]])
    alpha = torch.tensor([[0.1, -0.2, 0.05]])
    out = jitter_lighting_batch(x, factors, torch.tensor([[0, 1, 2]]), alpha)
    gray_w = torch.tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)
    ref = (1.5 * x).clamp(0, 1)
    m = (ref * gray_w).sum(1, keepdim=True).mean()
    ref = (0.5 * ref + 0.5 * m).clamp(0, 1)
    g = (ref * gray_w).sum(1, keepdim=True)
    ref = (2.0 * ref - 1.0 * g).clamp(0, 1)
    eigval = torch.tensor([0.2175, 0.0188, 0.0045])
    eigvec = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140],
                           [-0.5836, -0.6948, 0.4203]])
    ref = ref + (eigvec @ (alpha[0] * eigval)).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ref)
    # another order is another result; factors of one are the identity (then only lighting)
    assert not torch.allclose(jitter_lighting_batch(x, factors, torch.tensor([[2, 1, 0]]), alpha), out)
    same = jitter_lighting_batch(x, torch.ones(1, 3), torch.tensor([[1, 0, 2]]), torch.zeros(1, 3))
    torch.testing.assert_close(same, x)


def test_jitter_draws_match_color_jitter_ranges():
    factors, order, alpha = draw_jitter_lighting(4000, torch.Generator().manual_seed(0), 0.4, 0.1)
    assert factors.min() >= 0.6 and factors.max() <= 1.4
    assert abs(float(factors.mean()) - 1.0) < 0.01
    assert (order.sort(1).values == torch.arange(3)).all()
    assert abs(float(alpha.std()) - 0.1) < 0.005


@pytest.mark.parametrize("images,expected", [(12, [8, 4]), (13, [8, 5]), (24, [8, 8, 8])])
def test_dali_keeps_a_short_last_batch_by_the_process_share_as_the_torch_loader(
        monkeypatch, images, expected):
    """12 training images at batch 8: one process trains 8 + 4, as the torch loader; on two
    processes (4 a step each) DALI dropped each one's last 2 of 6 (the whole set's size chose
    `drop_last`, not the process's share) and trained 8. No pipeline is built (runs without
    DALI): the batch sizes follow from the shard and `drop_last`."""
    import types
    from smix.dist import DistInfo
    from pretrain import dali

    monkeypatch.setattr(dali, "_pipeline", lambda *a: object())
    samples = [(f"{i}.png", 0) for i in range(images)]

    def batches(rank: int, world: int) -> list[int]:
        cfg = types.SimpleNamespace(batch_size=8, input_size=16, crop=16, resize=16,
                                    train_aug="shapes", mean=(0.5,) * 3, std=(0.25,) * 3,
                                    workers=1)
        rt = types.SimpleNamespace(cfg=cfg, dist=DistInfo(rank, world, rank, CPU),
                                   data=types.SimpleNamespace(train=types.SimpleNamespace(
                                       samples=samples)))
        loader = dali.make_dali_loader(rt, True, 0)
        sizes = [min(loader.spec.batch, loader.per_shard - i * loader.spec.batch)
                 for i in range(len(loader))]
        return sizes if not loader.drop_last else [loader.spec.batch] * len(loader)
    assert batches(0, 1) == expected
    two = [batches(r, 2) for r in (0, 1)]
    # an odd image is cut by epoch_files (equal shards), as DistributedSampler(drop_last=True)
    assert sum(map(sum, two)) == images - images % 2
    assert two[0] == two[1] and len(two[0]) == len(expected)
