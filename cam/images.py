"""Images in, targets resolved: the inputs every `smix cam` command shares.

Images come as files or folders (searched recursively, sorted). Reading happens in a Dataset so
that decoding overlaps with the model on DataLoader workers; an unreadable image is fatal by
default and, with `skip_bad_images`, skipped and reported by name.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from smix.checkpoint import BackboneMeta
from smix.data import image_files, load_rgb
from smix.errors import UserError


def list_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given (in order) and the image files under each folder (sorted)."""
    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(Path(f) for f in image_files(path))
            if not found:
                raise UserError(f"{path}: folder contains no images")
            out.extend(found)
        elif path.is_file():
            out.append(path)
        else:
            raise UserError(f"{path}: no such image file or folder")
    if not out:
        raise UserError("no images given")
    return out


def class_index(meta: BackboneMeta, name: str, source: str) -> int:
    """Index of a class given by name (or by number) in the checkpoint's class list."""
    if name in meta.class_names:
        return meta.class_names.index(name)
    if name.isdigit() and int(name) < meta.num_classes:
        return int(name)
    shown = ", ".join(meta.class_names[:10]) + (" …" if meta.num_classes > 10 else "")
    raise UserError(f"class {name!r} ({source}) is not a class of the checkpoint "
                    f"({meta.num_classes} classes: {shown})")


def folder_class(path: Path, meta: BackboneMeta) -> str:
    """The name of an image's class folder: its folder, or in Tiny-ImageNet's train layout
    (``<wnid>/images/<image>``) the one above, where that names a class and ``images`` none."""
    folder = path.parent
    if (folder.name == "images" and "images" not in meta.class_names
            and folder.parent.name in meta.class_names):
        return folder.parent.name
    return folder.name


def resolve_targets(spec: str, paths: Sequence[Path], meta: BackboneMeta, ckpt: Path
                    ) -> torch.Tensor | None:
    """Per-image target classes: None for `pred`; the class folder's for `true` (ImageNet-style
    class folders, `folder_class`); otherwise one class name or index for every image."""
    if spec == "pred":
        return None
    if spec == "true":
        return torch.tensor([class_index(meta, folder_class(p, meta), f"folder of {p}, for {ckpt}")
                             for p in paths], dtype=torch.long)
    return torch.full((len(paths),), class_index(meta, spec, f"--target, for {ckpt}"),
                      dtype=torch.long)


_ANNOUNCED: set[str] = set()


class Unreadable(str):
    """What a dataset gives for an image `--skip-bad-images` skips: its one-line error, said by
    the loop that receives it (`say_skipped`, in the main process). A worker's own print was
    repeated by every worker and every loader (one per checkpoint), and goes wherever its
    process's stderr went (under the forkserver start method, Python 3.14's default: not to
    this command's stderr)."""


def read_or_skip(path: Path, skip: bool) -> Any:
    """The RGB image, or for an unreadable file when skipping, its error (`Unreadable`)."""
    try:
        return load_rgb(path)
    except UserError as e:
        if not skip:
            raise
        return Unreadable(str(e))


def say_skipped(errors: Sequence[str]) -> None:
    """Name each skipped image on stderr, once (above the progress bar, which stays whole)."""
    for error in errors:
        if error not in _ANNOUNCED:
            _ANNOUNCED.add(error)
            tqdm.write(f"warning: skipping unreadable image: {error}", file=sys.stderr)


class ImageFiles(Dataset):
    """(transformed image, index) per path, or (its error, index) for a skipped unreadable one."""

    def __init__(self, paths: Sequence[Path], indices: Sequence[int], transform: Callable,
                 skip_bad_images: bool = False):
        self.paths, self.indices = list(paths), list(indices)
        self.transform, self.skip = transform, skip_bad_images

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        index = self.indices[i]
        img = read_or_skip(self.paths[index], self.skip)
        return (img if isinstance(img, Unreadable) else self.transform(img)), index


def collate_indexed(batch: list[tuple[Any, int]]
                    ) -> tuple[torch.Tensor | None, list[int], list[int], list[str]]:
    """Stack the readable images; return (images or None, their indices, skipped indices,
    their errors)."""
    kept = [(x, i) for x, i in batch if not isinstance(x, Unreadable)]
    bad = [(x, i) for x, i in batch if isinstance(x, Unreadable)]
    images = torch.stack([x for x, _ in kept]) if kept else None
    return images, [i for _, i in kept], [i for _, i in bad], [str(x) for x, _ in bad]


def image_loader(paths: Sequence[Path], indices: Sequence[int], transform: Callable,
                 batch_size: int, workers: int, skip_bad_images: bool) -> DataLoader:
    """Batches of (images, indices, skipped indices, their errors) in index order."""
    return DataLoader(ImageFiles(paths, indices, transform, skip_bad_images),
                      batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate_indexed)


def file_stem(index: int, path: Path) -> str:
    """Unique output stem: images from different class folders often share a file name."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem)
    return f"{index:04d}_{safe}"
