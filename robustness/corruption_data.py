"""Readers for the published corruption benchmarks, as laid out on disk.

ImageNet-C (and Tiny-ImageNet-C): `ROOT/<corruption>/<severity 1..5>/<class>/*.JPEG`, images
already resized and centre-cropped to the model input (224 for ImageNet-C).
CIFAR-10-C / CIFAR-100-C: `ROOT/<corruption>.npy`, uint8 [5*n, H, W, 3] with the 5 severities
stacked in order (rows (s-1)*n .. s*n-1), and `ROOT/labels.npy` [5*n].
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from smix.checkpoint import BackboneMeta
from smix.data import eval_transform
from smix.errors import UserError

# Hendrycks & Dietterich, ICLR 2019: the 15 corruptions of the benchmark (mCE is over these) and
# the 4 extra "validation" corruptions distributed with the data (reported, never in mCE).
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression",
)
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
KNOWN_CORRUPTIONS = CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES = (1, 2, 3, 4, 5)


@dataclasses.dataclass(frozen=True)
class Split:
    """One evaluation split: a (corruption, severity) of a benchmark, or the clean reference."""

    corruption: str  # "clean" for the clean reference set
    severity: int  # 0 for clean
    path: Path  # a class-folder tree, or a .npy array
    kind: str  # "folder" or "array"
    labels: Path | None = None  # arrays: the labels .npy
    start: int = 0  # arrays: first row of this severity
    count: int = 0  # arrays: rows of this severity


def detect_layout(root: Path) -> str:
    """"cifar-c" when ROOT has labels.npy, "imagenet-c" when it has corruption folders."""
    if not root.is_dir():
        raise UserError(f"{root}: corruption data directory does not exist")
    if (root / "labels.npy").is_file():
        return "cifar-c"
    if any((root / c).is_dir() for c in KNOWN_CORRUPTIONS):
        return "imagenet-c"
    raise UserError(f"{root}: neither ImageNet-C (ROOT/<corruption>/<severity>/<class>/) nor "
                    "CIFAR-C (ROOT/<corruption>.npy + labels.npy) layout")


def select(found: Sequence[str], wanted: Sequence[str], root: Path) -> list[str]:
    """The corruptions to evaluate: `wanted` (all must be on disk), or the 15 benchmark ones
    that are on disk."""
    for name in wanted:
        if name not in KNOWN_CORRUPTIONS:
            raise UserError(f"unknown corruption {name!r}; valid: {', '.join(KNOWN_CORRUPTIONS)}")
        if name not in found:
            raise UserError(f"{root}: corruption {name!r} not found")
    chosen = list(wanted) if wanted else [c for c in CORRUPTIONS if c in found]
    if not chosen:
        raise UserError(f"{root}: none of the benchmark corruptions is present "
                        f"(found: {', '.join(found) or 'nothing'}); choose with --corruptions")
    return chosen


def scan_imagenet_c(root: Path, wanted: Sequence[str] = ()) -> tuple[list[Split], list[str]]:
    """Splits of an ImageNet-C tree and the folders ignored as unknown; every chosen corruption
    must have all five severities."""
    entries = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    found = [e for e in entries if e in KNOWN_CORRUPTIONS]
    ignored = [e for e in entries if e not in KNOWN_CORRUPTIONS]
    splits = []
    for name in select(found, wanted, root):
        missing = [s for s in SEVERITIES if not (root / name / str(s)).is_dir()]
        if missing:
            raise UserError(f"{root / name}: severity folder(s) {', '.join(map(str, missing))} "
                            "missing (expected 1..5)")
        splits += [Split(name, s, root / name / str(s), "folder") for s in SEVERITIES]
    return splits, ignored


def load_npy(path: Path) -> np.ndarray:
    """A memory-mapped .npy; a bad file is one line naming it."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable .npy file ({e})") from None


def _check_array(path: Path, n_labels: int) -> int:
    arr = load_npy(path)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] != 3:
        raise UserError(f"{path}: expected uint8 images [N,H,W,3], got {arr.dtype} "
                        f"{list(arr.shape)}")
    if arr.shape[0] != n_labels or n_labels % len(SEVERITIES):
        raise UserError(f"{path}: {arr.shape[0]} images for {n_labels} labels; expected the 5 "
                        "severities stacked (5 x n images, as labels.npy)")
    return n_labels // len(SEVERITIES)


def scan_cifar_c(root: Path, wanted: Sequence[str] = ()) -> tuple[list[Split], list[str]]:
    """Splits of a CIFAR-10-C / CIFAR-100-C folder and the .npy files ignored as unknown."""
    labels_path = root / "labels.npy"
    labels = load_npy(labels_path)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{labels_path}: expected a 1-D integer array, got {labels.dtype} "
                        f"{list(labels.shape)}")
    stems = sorted(p.stem for p in root.glob("*.npy") if p.name != "labels.npy")
    found = [s for s in stems if s in KNOWN_CORRUPTIONS]
    ignored = [s for s in stems if s not in KNOWN_CORRUPTIONS]
    splits = []
    for name in select(found, wanted, root):
        n = _check_array(root / f"{name}.npy", len(labels))
        splits += [Split(name, s, root / f"{name}.npy", "array", labels_path, (s - 1) * n, n)
                   for s in SEVERITIES]
    return splits, ignored


def warn_ignored(root: Path, ignored: Sequence[str]) -> None:
    if ignored:
        print(f"smix robustness: note: ignoring unknown entries in {root}: {', '.join(ignored)}",
              file=sys.stderr)


class PrecroppedTransform:
    """[0,1] pixels of a corruption image. ImageNet-C images are already resized 256 and
    centre-cropped 224, and Hendrycks' test.py only centre-crops them; resizing them again to 256
    would zoom in. So an image already at the checkpoint's crop size is used as is; any other size
    goes through the checkpoint's evaluation transform."""

    def __init__(self, meta: BackboneMeta):
        self.size = (meta.crop, meta.crop)
        self.as_is = eval_transform(dataclasses.replace(meta, resize=meta.crop), normalize=False)
        self.full = eval_transform(meta, normalize=False)

    def __call__(self, img: Image.Image) -> Any:
        return (self.as_is if img.size == self.size else self.full)(img)


def split_transform(split: Split, meta: BackboneMeta) -> Callable:
    """Clean splits use the checkpoint's evaluation transform; corrupted ones are pre-cropped."""
    if split.corruption == "clean":
        return eval_transform(meta, normalize=False)
    return PrecroppedTransform(meta) if split.kind == "folder" else eval_transform(meta, normalize=False)
