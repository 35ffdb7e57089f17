"""The training and validation datasets of a run, from the config's dataset kind."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import Dataset, Sampler, Subset

from smix.data import (CIFAR, CIFAR_LAYOUTS, ClassFolder, TrainAug, eval_transform,
                       finish_on_device, load_rgb, load_rgb_tensor, subset_indices,
                       train_transform)
from smix.errors import UserError
from pretrain.config import TrainConfig


@dataclasses.dataclass
class RunData:
    """A run's datasets. `finish`: the recipe whose per-batch half `to_device` still applies
    (training batches arrive as uint8, see `build_datasets`); None: they arrive normalised."""

    train: Dataset
    val: Dataset
    classes: list[str]
    finish: TrainAug | None = None


@dataclasses.dataclass(frozen=True)
class _EvalSpec:  # what eval_transform reads from a checkpoint's metadata
    resize: int
    crop: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def build_datasets(cfg: TrainConfig, on_device: bool = False) -> RunData:
    """CIFAR pickles for cifar10/100; `DATA/train` and `DATA/val` class folders otherwise.

    `on_device` (training on CUDA with the torch loader): the loader workers only decode, crop
    and flip, returning uint8; colour, lighting and normalisation run batched on the GPU in
    `to_device` (measured on an H200: 894 img/s from 15 workers doing the whole recipe per
    image, against 4721 img/s for the ResNet-50 step). Class-folder images then travel as
    tensors (`load_rgb_tensor`): the same pixels as PIL's, and a crop and resize by torch's
    uint8 kernels, in about 0.58 of the PIL path's time per image (`worker_transform.py`)."""
    aug = TrainAug(cfg.train_aug, cfg.input_size, cfg.mean, cfg.std)
    evaluate = eval_transform(_EvalSpec(cfg.resize, cfg.crop, cfg.input_size, cfg.mean, cfg.std))
    if cfg.dataset.startswith("cifar"):
        kind = cfg.dataset if cfg.dataset in CIFAR_LAYOUTS else None  # cifar10 | cifar100
        train = CIFAR(cfg.data, True, train_transform(aug, on_device), kind=kind)
        val = CIFAR(cfg.data, False, evaluate, kind=kind)
        classes = train.classes
    else:
        root = Path(cfg.data)
        if not root.is_dir():
            raise UserError(f"{root}: data directory does not exist")
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise UserError(f"{root}: missing {split}/ (expected DATA/train/<class>/… and "
                                "DATA/val/<class>/…)")
        train = ClassFolder(root / "train", train_transform(aug, on_device), cfg.skip_bad_images,
                            reader=load_rgb_tensor if on_device else load_rgb)
        val = ClassFolder(root / "val", evaluate, cfg.skip_bad_images, classes=train.classes)
        classes = train.classes
    # Evenly spaced, not the first N: class folders are sorted by class.
    if cfg.limit_train:
        train = Subset(train, subset_indices(len(train), cfg.limit_train))
    if cfg.limit_val:
        val = Subset(val, subset_indices(len(val), cfg.limit_val))
    return RunData(train, val, list(classes), aug if on_device else None)


def to_device(batch: tuple, device: torch.device, channels_last: bool,
              finish: TrainAug | None = None, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A loader batch on the device (enqueued from pinned memory); with `finish`, a uint8
    batch gets the recipe's per-batch half there (colour draws from `generator`)."""
    images, labels, skipped = batch
    if isinstance(images, list):  # chunks of one batch (engine.ChunkedLoader)
        images, labels = _join_on_device(images, device), _join_on_device(labels, device)
    images = images.to(device, non_blocking=True)
    if finish is not None:
        images = finish_on_device(images, finish, generator)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True), int(skipped)


def _join_on_device(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """One tensor on the device from pinned host chunks: each copy is enqueued (a host-side
    concatenation would be unpinned, and its copy would block); empty chunks (every image of
    the chunk skipped) are left out."""
    kept = [p.to(device, non_blocking=True) for p in parts if p.numel()]
    return torch.cat(kept) if kept else parts[0].to(device)


class SeededSampler(Sampler):
    """The training order of an epoch, each index paired with its own seed.

    `inner` gives the order: a `RandomSampler` over `generator` (reseeded from `order_seed(e)`
    at `set_epoch(e)`: the order the DataLoader's shuffle drew before) or a
    `DistributedSampler` (its own `set_epoch`). The seed of sample i is
    `sample_seed(e) + i`: `SeededDataset` seeds the worker's RNG with it before the sample's
    random transform, so an image's crop and flip depend on (run seed, epoch, index) alone —
    not on which worker made it, how many there are, or which epochs that worker made before.
    That is what lets the workers persist across epochs (no start-up each epoch) while a
    resumed run, with any `workers`, draws what an uninterrupted one draws."""

    def __init__(self, inner: Sampler, generator: torch.Generator | None,
                 order_seed: Callable[[int], int], sample_seed: Callable[[int], int]) -> None:
        self.inner, self.generator = inner, generator
        self.order_seed, self.sample_seed = order_seed, sample_seed
        self.base = 0

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)
        if self.generator is not None:
            self.generator.manual_seed(self.order_seed(epoch))
        self.base = self.sample_seed(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = self.base
        return ((i, (base + i) % (2**63 - 1)) for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


class SeededDataset(Dataset):
    """`dataset[index]` for `SeededSampler` keys, with the process's torch RNG seeded by the
    key first when `seed` (loader workers, whose RNG is their own). Without workers the
    samples are made in the training process, whose RNG the epoch seeds once (`seed` False):
    the draws then differ from those of any number of workers, which all agree."""

    def __init__(self, dataset: Dataset, seed: bool = True) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        if self.seed:
            # the CPU generator alone, which the transforms draw from: `torch.manual_seed` also
            # seeds every accelerator, and in a worker without CUDA it queues a lazy seeding
            # with a formatted traceback each time (96 us per sample measured, ~8% of a decode)
            torch.default_generator.manual_seed(seed)
        return self.dataset[index]
