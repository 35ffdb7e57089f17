"""The training and validation datasets of a run, from the config's dataset kind."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from smix.data import (CIFAR, ClassFolder, TrainAug, eval_transform, finish_on_device,
                       subset_indices, train_transform)
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
    image, against 4721 img/s for the ResNet-50 step)."""
    aug = TrainAug(cfg.train_aug, cfg.input_size, cfg.mean, cfg.std)
    evaluate = eval_transform(_EvalSpec(cfg.resize, cfg.crop, cfg.input_size, cfg.mean, cfg.std))
    if cfg.dataset.startswith("cifar"):
        train = CIFAR(cfg.data, True, train_transform(aug, on_device))
        val = CIFAR(cfg.data, False, evaluate)
        classes = train.classes
    else:
        root = Path(cfg.data)
        if not root.is_dir():
            raise UserError(f"{root}: data directory does not exist")
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise UserError(f"{root}: missing {split}/ (expected DATA/train/<class>/… and "
                                "DATA/val/<class>/…)")
        train = ClassFolder(root / "train", train_transform(aug, on_device), cfg.skip_bad_images)
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
