"""The torch loader feeding a GPU: workers decode, crop and flip into uint8; colour jitter, PCA
lighting and normalisation run on the whole batch on the device (`smix.data.finish_on_device`).

Checked on the CPU with the same functions: without colour ops the batched path gives the
per-image path's normalised tensor exactly (same geometry draws, same arithmetic); with them,
its colour statistics follow the per-image recipe's distribution (two-sample KS tests, with a
control showing the tests reject a recipe without jitter); and the engine's plumbing carries
uint8 batches to `to_device` only when asked.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp

from smix.data import TrainAug, finish_on_device, train_transform
from smix.dist import init_distributed
from pretrain import engine
from pretrain.config import build_config
from pretrain.data import build_datasets, to_device

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def picture(size: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(low).resize((size, size), Image.BILINEAR)


def both_paths(aug: TrainAug, image, seeds) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image outputs of the CPU recipe, and the uint8 outputs of the worker half, with the
    worker RNG seeded alike per image (so the crops and flips are the same draws)."""
    full, half = [], []
    for s in seeds:
        torch.manual_seed(s)
        full.append(train_transform(aug)(image))
        torch.manual_seed(s)
        half.append(train_transform(aug, on_device=True)(image))
    return torch.stack(full), torch.stack(half)


@pytest.mark.parametrize("kind", ["imagenet", "shapes", "cifar", "none"])
def test_batched_finish_equals_per_image_path_without_colour_ops(kind):
    aug = TrainAug(kind, 32, MEAN, STD, color_jitter=0.0, lighting=0.0)
    image = picture(48) if kind != "cifar" else torch.from_numpy(
        np.array(picture(32))).permute(2, 0, 1).contiguous()
    full, half = both_paths(aug, image, range(12))
    assert half.dtype == torch.uint8 and half.shape == (12, 3, 32, 32)
    finished = finish_on_device(half, aug, torch.Generator().manual_seed(0))
    assert finished.dtype == torch.float32
    assert torch.equal(finished, full)


def test_imagenet_recipe_is_jitter_0_4_and_lighting_0_1():
    """ImageNet's recipe as the CutMix / SaliencyMix code trains it: ColorJitter(0.4, 0.4, 0.4)
    and AlexNet PCA lighting with standard deviation 0.1."""
    ops = train_transform(TrainAug("imagenet", 224, MEAN, STD)).transforms
    jitter = next(o for o in ops if type(o).__name__ == "ColorJitter")
    assert (jitter.brightness, jitter.contrast, jitter.saturation) == ((0.6, 1.4),) * 3
    assert jitter.hue is None
    assert next(o for o in ops if type(o).__name__ == "Lighting").alphastd == 0.1


def channel_means(x: torch.Tensor) -> np.ndarray:
    return x.double().mean((2, 3)).numpy()


def test_batched_colour_ops_follow_the_per_image_distribution():
    """ColorJitter(0.4) in a random order + PCA lighting 0.1, per image with PIL (rounding to
    uint8 after each op) or batched on float pixels: the per-image channel means (what the
    colour ops move) agree in distribution; a recipe without jitter does not."""
    aug = TrainAug("imagenet", 16, MEAN, STD)
    full, half = both_paths(aug, picture(24, seed=1), range(400))
    batched = finish_on_device(half, aug, torch.Generator().manual_seed(1))
    plain = finish_on_device(half, TrainAug("imagenet", 16, MEAN, STD, 0.0, 0.1),
                             torch.Generator().manual_seed(1))
    a, b, c = channel_means(full), channel_means(batched), channel_means(plain)
    for ch in range(3):
        assert ks_2samp(a[:, ch], b[:, ch]).pvalue > 1e-3, ch
        assert ks_2samp(a[:, ch], c[:, ch]).pvalue < 1e-3, ch  # the test can tell
    assert abs(a.std(0) - b.std(0)).max() < 0.15 * a.std(0).max()


def test_to_device_finishes_only_when_asked():
    aug = TrainAug("imagenet", 8, MEAN, STD)
    batch = (torch.full((2, 3, 8, 8), 255, dtype=torch.uint8), torch.tensor([0, 1]), 0)
    images, labels, skipped = to_device(batch, torch.device("cpu"), False, aug,
                                        torch.Generator().manual_seed(0))
    assert images.dtype == torch.float32 and labels.tolist() == [0, 1] and skipped == 0
    plain, _, _ = to_device(batch, torch.device("cpu"), False)
    assert plain.dtype == torch.uint8  # untouched without a recipe
    empty = (torch.empty(0), torch.empty(0, dtype=torch.long), 2)  # all skipped
    assert to_device(empty, torch.device("cpu"), False, aug)[0].numel() == 0


def test_engine_trains_on_uint8_batches(shapes_root, tmp_path):
    """The uint8 worker path through the engine (as on CUDA), here on the CPU: the class-folder
    items are uint8, the batches reach the step normalised, the epoch trains; without
    `on_device` (what CPU runs use) the items stay normalised float."""
    cfg = build_config("shapes-resnet18", shapes_root, tmp_path / "run", "cutmix",
                       {"workers": "0", "batch_size": "8", "input_size": "32", "resize": "32",
                        "crop": "32", "progress": "false", "epochs": "1", "device": "cpu"})
    data = build_datasets(cfg, on_device=True)
    assert data.train[0][0].dtype == torch.uint8 and data.finish is not None
    assert data.val[0][0].dtype == torch.float32  # evaluation is unchanged
    plain = build_datasets(cfg)
    assert plain.train[0][0].dtype == torch.float32 and plain.finish is None
    rt = engine.build_runtime(cfg, init_distributed("cpu"), data)
    seen = []
    real_step = engine.train_step

    def spy(rt_, images, labels, gen):
        seen.append(images)
        return real_step(rt_, images, labels, gen)

    engine.train_step = spy
    try:
        stats = engine.train_epoch(rt, 0)
    finally:
        engine.train_step = real_step
    assert stats["train_images"] == 24 and np.isfinite(stats["train_loss"])
    assert all(x.dtype == torch.float32 and -3 < float(x.mean()) < 3 for x in seen)


def test_chunks_per_batch():
    from pretrain.engine import chunks_per_batch
    assert chunks_per_batch(256, 15) == 8  # 32-image chunks from 8 workers
    assert chunks_per_batch(256, 4) == 4
    assert chunks_per_batch(100, 4) == 2  # 3 does not divide 100
    assert chunks_per_batch(8, 0) == 1 and chunks_per_batch(8, 4) == 1  # too small to share


class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return None if i == 7 else (torch.full((1, 2, 2), i, dtype=torch.uint8), i)


@pytest.mark.parametrize("drop_last", [True, False])
def test_chunked_batches_are_the_unchunked_batches(drop_last):
    """Two chunks of two make the batches of four that one loader would make from the same
    generator: same images in the same order, same labels, skipped counts added, and the same
    batches kept or dropped at the end."""
    from torch.utils.data import DataLoader
    from smix.data import collate_skip
    from pretrain.engine import ChunkedLoader

    def loader(batch):
        return DataLoader(Items(), batch_size=batch, shuffle=True, drop_last=drop_last,
                          generator=torch.Generator().manual_seed(5), collate_fn=collate_skip)
    whole = list(loader(4))
    chunked = ChunkedLoader(loader(2), 2, drop_last)
    assert len(chunked) == len(whole) == (2 if drop_last else 3)
    for (im, lab, skip), batch in zip(whole, chunked):
        im2, lab2, skip2 = to_device(batch, torch.device("cpu"), False)
        assert torch.equal(im2, im) and torch.equal(lab2, lab) and skip2 == skip
    assert sum(b[2] for b in chunked) == sum(b[2] for b in whole)


def test_engine_trains_on_chunked_uint8_batches(shapes_root, tmp_path, monkeypatch):
    """The engine with several workers sharing each batch (as on CUDA with large batches)."""
    cfg = build_config("shapes-resnet18", shapes_root, tmp_path / "run", "saliencymix",
                       {"workers": "0", "batch_size": "8", "input_size": "32", "resize": "32",
                        "crop": "32", "progress": "false", "epochs": "1", "device": "cpu"})
    rt = engine.build_runtime(cfg, init_distributed("cpu"), build_datasets(cfg, on_device=True))
    monkeypatch.setattr(engine, "chunks_per_batch", lambda batch, workers: 4)
    loader = engine.make_loader(rt, True, 0)
    assert isinstance(loader, engine.ChunkedLoader) and len(loader) == 3
    stats = engine.train_epoch(rt, 0)
    assert stats["train_images"] == 24 and np.isfinite(stats["train_loss"])
    assert not isinstance(engine.make_loader(rt, False, 0), engine.ChunkedLoader)


@pytest.mark.parametrize("on_device", [False, True])
def test_cifar_plus_is_a_32_crop_of_the_4_padded_image_and_a_fair_flip(on_device):
    """The CIFAR '+' augmentation, checked against its definition rather than against another
    path: every output is one of the 81 crops of the zero-padded image, mirrored or not; all 81
    turn up, and about half are mirrored. Pixels encode their own position, so a crop is
    recognised exactly (0 never occurs in the image: padding is told apart)."""
    y, x = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    img = torch.stack([y * 7 + 1, x * 7 + 1, torch.full_like(y, 128)]).to(torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
    t = train_transform(TrainAug("cifar", 32, mean, std), on_device=on_device)
    padded = torch.nn.functional.pad(img, (4, 4, 4, 4))
    crops = {(dy, dx, flip): c.flip(-1) if flip else c
             for dy in range(9) for dx in range(9) for flip in (False, True)
             for c in [padded[:, dy:dy + 32, dx:dx + 32]]}
    torch.manual_seed(0)
    seen = []
    for _ in range(1000):
        out = t(img)
        if not on_device:  # normalised float: back to the uint8 grid
            out = (out * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1))
            out = (out * 255).round().to(torch.uint8)
        match = [k for k, c in crops.items() if torch.equal(out, c)]
        assert len(match) == 1
        seen.append(match[0])
    assert {(dy, dx) for dy, dx, _ in seen} == {(dy, dx) for dy in range(9) for dx in range(9)}
    assert abs(sum(flip for *_, flip in seen) / len(seen) - 0.5) < 0.05
