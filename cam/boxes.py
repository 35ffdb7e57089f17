"""Ground-truth boxes for localisation: a VOC devkit root, or a boxes file.

Boxes file (`--boxes FILE`), one box a line, in either form:
- JSON lines (`.jsonl`/`.json`, or any file whose first line starts with `{`):
  `{"image": "val/cat/1.jpg", "class": "cat", "box": [x0, y0, x1, y1]}`
- CSV with a header row: `image,class,x0,y0,x1,y1`
Coordinates are pixels of the original image, 0-based, [x0, x1) × [y0, y1) (so a VOC box
`xmin..xmax` inclusive is `xmin-1, ymin-1, xmax, ymax`). Relative image paths are relative to
the boxes file's folder. Several lines for one image give several boxes; as for VOC, the
image's class is that of its largest box, and its ground truth is every box of that class.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Iterable

from smix.errors import UserError
from smix.voc import VOCRecord, find_year_dir, load_voc

Box = tuple[float, float, float, float]


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


def _box(values: list, where: str) -> Box:
    try:
        box = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise UserError(f"{where}: box coordinates are not numbers: {values!r}") from None
    if len(box) != 4:
        raise UserError(f"{where}: a box needs 4 numbers x0,y0,x1,y1, got {len(box)}")
    if not (0 <= box[0] < box[2] and 0 <= box[1] < box[3]):
        raise UserError(f"{where}: box {list(box)} is empty or negative (need 0 <= x0 < x1, "
                        "0 <= y0 < y1)")
    return box  # type: ignore[return-value]


def _rows(path: Path, text: str) -> list[tuple[str, str, Box]]:
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise UserError(f"{path}: boxes file is empty")
    rows = []
    if path.suffix.lower() in (".jsonl", ".json") or lines[0][1].lstrip().startswith("{"):
        for n, line in lines:
            try:
                rec = json.loads(line)
                rows.append((str(rec["image"]), str(rec["class"]), _box(rec["box"], f"{path}:{n}")))
            except json.JSONDecodeError:
                raise UserError(f"{path}:{n}: not a JSON object") from None
            except (KeyError, TypeError):
                raise UserError(f"{path}:{n}: needs keys image, class, box") from None
        return rows
    reader = csv.DictReader(line for _, line in lines)
    needed = ["image", "class", "x0", "y0", "x1", "y1"]
    if reader.fieldnames is None or any(k not in reader.fieldnames for k in needed):
        raise UserError(f"{path}: CSV header must be {','.join(needed)}")
    for n, rec in enumerate(reader, 2):
        rows.append((rec["image"], rec["class"],
                     _box([rec[k] for k in needed[2:]], f"{path}:{n}")))
    return rows


def from_boxes_file(path: Path) -> list[GTImage]:
    """Read the JSON-lines or CSV boxes file described in this module's docstring."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"{path}: cannot read boxes file ({e.strerror or e})") from None
    grouped: dict[Path, list[tuple[str, Box]]] = {}
    for image, cls, box in _rows(path, text):
        image_path = Path(image) if Path(image).is_absolute() else path.parent / image
        grouped.setdefault(image_path, []).append((cls, box))
    return [_from_objects(image, objs) for image, objs in grouped.items()]
