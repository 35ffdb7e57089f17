"""Ground-truth boxes for localisation: a VOC devkit root, or a boxes file.

Boxes file (`--boxes FILE`): the format `smix.boxes` reads (JSON lines or CSV, 0-based
half-open pixel boxes, one a line). Several lines for one image give several boxes; as for VOC,
the image's class is that of its largest box, and its ground truth is every box of that class.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable

from smix.boxes import Box, read_boxes_file
from smix.errors import UserError
from smix.voc import VOCRecord, find_year_dir, load_voc


@dataclasses.dataclass(frozen=True)
class GTImage:
    """One image to localise: its class and the boxes of that class (0-based, half-open)."""

    image: Path
    class_name: str
    boxes: tuple[Box, ...]


def _area(b: Box) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def _from_objects(image: Path, objects: Iterable[tuple[str, Box]]) -> GTImage:
    objs = list(objects)
    cls = max(objs, key=lambda o: _area(o[1]))[0]
    return GTImage(image, cls, tuple(b for name, b in objs if name == cls))


def from_voc(root: Path, split: str = "test", year: str = "2007") -> list[GTImage]:
    """Records of a VOC split; the class of an image is that of its largest non-difficult
    object (any object when all are difficult)."""
    year_dir = find_year_dir(Path(root), year)
    if year_dir is None:
        raise UserError(f"{root}: no VOC{year} folder (expected ROOT/VOC{year} or "
                        f"ROOT/VOCdevkit/VOC{year})")
    records = load_voc(year_dir, split)
    out = [_voc_image(r) for r in records if r.objects]
    if not out:
        raise UserError(f"{year_dir}: no boxes in the {split} annotations")
    return out


def _voc_image(rec: VOCRecord) -> GTImage:
    easy = [o for o in rec.objects if not o.difficult] or list(rec.objects)
    cls = max(easy, key=lambda o: _area(o.box0)).name
    return GTImage(rec.image_path, cls, tuple(o.box0 for o in rec.objects if o.name == cls))


def from_boxes_file(path: Path) -> list[GTImage]:
    """Read the JSON-lines or CSV boxes file (format: `smix.boxes`)."""
    return [_from_objects(image, objs) for image, objs in read_boxes_file(path).items()]
