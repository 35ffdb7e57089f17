"""The boxes file: ground-truth boxes for images outside a VOC devkit, one box a line.

Either form:
- JSON lines (`.jsonl`/`.json`, or any file whose first line starts with `{`):
  `{"image": "val/cat/1.jpg", "class": "cat", "box": [x0, y0, x1, y1]}`
- CSV with a header row: `image,class,x0,y0,x1,y1`
Coordinates are pixels of the original image, 0-based, [x0, x1) × [y0, y1) (so a VOC box
`xmin..xmax` inclusive is `xmin-1, ymin-1, xmax, ymax`). Relative image paths are relative to
the boxes file's folder. Several lines for one image give several boxes. Read here, in the core
package, because both `smix audit` and `cam localize` read it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from smix.errors import UserError
from smix.io import read_user_text

Box = tuple[float, float, float, float]


def parse_box(values: list, where: str) -> Box:
    """Four numbers x0, y0, x1, y1 of a non-empty box; `where` names the line in errors."""
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


def check_inside(image: Path, boxes: list[Box] | list[list[float]], width: int,
                 height: int) -> None:
    """Refuse a box past its image (a boxes file made for other images, a picture smaller
    than its annotation): its object mask would be an edge pixel or nothing. A pixel of
    slack on the far side, for boxes written with inclusive ends. `smix audit` and
    `cam localize` both check here."""
    for x0, y0, x1, y1 in boxes:
        if x0 >= width or y0 >= height or x1 > width + 1 or y1 > height + 1:
            raise UserError(f"{image}: box {[x0, y0, x1, y1]} lies outside the "
                            f"{width}x{height} image")


def _rows(path: Path, text: str) -> list[tuple[str, str, Box]]:
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise UserError(f"{path}: boxes file is empty")
    rows = []
    if path.suffix.lower() in (".jsonl", ".json") or lines[0][1].lstrip().startswith("{"):
        for n, line in lines:
            try:
                rec = json.loads(line)
                rows.append((str(rec["image"]), str(rec["class"]), parse_box(rec["box"], f"{path}:{n}")))
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
                     parse_box([rec[k] for k in needed[2:]], f"{path}:{n}")))
    return rows


def read_boxes_file(path: Path) -> dict[Path, list[tuple[str, Box]]]:
    """Every image of a boxes file with its (class, box) list, in file order."""
    path = Path(path)
    text = read_user_text(path, "boxes file")
    grouped: dict[Path, list[tuple[str, Box]]] = {}
    for image, cls, box in _rows(path, text):
        image_path = Path(image) if Path(image).is_absolute() else path.parent / image
        grouped.setdefault(image_path, []).append((cls, box))
    return grouped
