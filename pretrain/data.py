"""The training and validation datasets of a run, from the config's dataset kind."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from smix.data import (CIFAR, ClassFolder, TrainAug, eval_transform, subset_indices,
                       train_transform)
from smix.errors import UserError
from pretrain.config import TrainConfig


@dataclasses.dataclass
class RunData:
    train: Dataset
    val: Dataset
    classes: list[str]


@dataclasses.dataclass(frozen=True)
class _EvalSpec:  # what eval_transform reads from a checkpoint's metadata
    resize: int
    crop: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def build_datasets(cfg: TrainConfig) -> RunData:
    """CIFAR pickles for cifar10/100; `DATA/train` and `DATA/val` class folders otherwise."""
    aug = TrainAug(cfg.train_aug, cfg.input_size, cfg.mean, cfg.std)
    evaluate = eval_transform(_EvalSpec(cfg.resize, cfg.crop, cfg.input_size, cfg.mean, cfg.std))
    if cfg.dataset.startswith("cifar"):
        train = CIFAR(cfg.data, True, train_transform(aug))
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
        train = ClassFolder(root / "train", train_transform(aug), cfg.skip_bad_images)
        val = ClassFolder(root / "val", evaluate, cfg.skip_bad_images, classes=train.classes)
        classes = train.classes
    # Evenly spaced, not the first N: class folders are sorted by class.
    if cfg.limit_train:
        train = Subset(train, subset_indices(len(train), cfg.limit_train))
    if cfg.limit_val:
        val = Subset(val, subset_indices(len(val), cfg.limit_val))
    return RunData(train, val, list(classes))


def to_device(batch: tuple, device: torch.device, channels_last: bool
              ) -> tuple[torch.Tensor, torch.Tensor, int]:
    images, labels, skipped = batch
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True), int(skipped)
