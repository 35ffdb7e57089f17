"""Pascal VOC devkit reader: `VOCdevkit/VOC2007/{Annotations,JPEGImages,ImageSets/Main}`.

Boxes are kept in VOC's own convention (1-based, inclusive pixel coordinates) as read from the
XML; consumers convert once (`VOCObject.box0` gives 0-based [x0, y0, x1, y1) for torch code).
"""

from __future__ import annotations

import dataclasses
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from smix.errors import UserError
from smix.io import read_user_text

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


@dataclasses.dataclass(frozen=True)
class VOCObject:
    name: str
    bbox: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax (VOC: 1-based, inclusive)
    difficult: bool = False
    truncated: bool = False

    @property
    def box0(self) -> tuple[float, float, float, float]:
        """0-based half-open box [x0, y0, x1, y1) as torchvision and detectron2 use it."""
        x0, y0, x1, y1 = self.bbox
        return (x0 - 1.0, y0 - 1.0, x1, y1)


@dataclasses.dataclass(frozen=True)
class VOCRecord:
    image_id: str
    image_path: Path
    width: int
    height: int
    objects: tuple[VOCObject, ...]


def _text(node: ET.Element, tag: str, xml: Path) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise UserError(f"{xml}: missing <{tag}>")
    return child.text.strip()


def _number(node: ET.Element, tag: str, xml: Path) -> float:
    raw = _text(node, tag, xml)
    try:
        return float(raw)
    except ValueError:
        raise UserError(f"{xml}: <{tag}> is not a number: {raw!r}") from None


def parse_annotation(xml: Path, image_dir: Path) -> VOCRecord:
    """Parse one VOC XML file, checking that every box lies inside the image."""
    try:
        root = ET.parse(xml).getroot()
    except FileNotFoundError:
        raise UserError(f"{xml}: annotation file missing") from None
    except OSError as e:  # a folder of that name, a file it may not read
        raise UserError(f"{xml}: cannot read annotation ({e.strerror or e})") from None
    except ET.ParseError as e:
        raise UserError(f"{xml}: not valid XML ({e})") from None
    size = root.find("size")
    if size is None:
        raise UserError(f"{xml}: missing <size>")
    width, height = int(_number(size, "width", xml)), int(_number(size, "height", xml))
    filename = root.findtext("filename", default=f"{xml.stem}.jpg").strip()
    objects = []
    for obj in root.findall("object"):
        bb = obj.find("bndbox")
        if bb is None:
            raise UserError(f"{xml}: an <object> has no <bndbox>")
        box = tuple(_number(bb, t, xml) for t in ("xmin", "ymin", "xmax", "ymax"))
        x0, y0, x1, y1 = box
        if not (1 <= x0 <= x1 <= width and 1 <= y0 <= y1 <= height):
            raise UserError(f"{xml}: box {box} lies outside the {width}x{height} image")
        objects.append(VOCObject(
            name=_text(obj, "name", xml),
            bbox=box,  # type: ignore[arg-type]
            difficult=obj.findtext("difficult", default="0").strip() == "1",
            truncated=obj.findtext("truncated", default="0").strip() == "1",
        ))
    return VOCRecord(xml.stem, image_dir / filename, width, height, tuple(objects))


def find_year_dir(root: Path, year: str) -> Path | None:
    """`root/VOC2007`, `root/VOCdevkit/VOC2007`, root itself when it is that folder, or its
    sibling when root is another year's folder (`--voc-root VOCdevkit/VOC2007` finds VOC2012)."""
    cands = [root / f"VOC{year}", root / "VOCdevkit" / f"VOC{year}"]
    if re.fullmatch(r"VOC\d{4}", root.name):
        cands.append(root.parent / f"VOC{year}")  # root itself for the same year
    return next((c for c in cands if c.is_dir()), None)


def read_split(year_dir: Path, split: str) -> list[str]:
    path = year_dir / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise UserError(f"{path}: split file missing")
    ids = [line.split()[0] for line in read_user_text(path, "split file").splitlines()
           if line.strip()]
    if not ids:
        raise UserError(f"{path}: split file lists no images")
    seen: set[str] = set()
    for i in ids:  # (said here, before any training; the evaluator would refuse it at the end)
        if i in seen:
            raise UserError(f"{path}: lists image {i} more than once")
        seen.add(i)
    return ids


def load_voc(year_dir: Path, split: str, class_names: tuple[str, ...] | None = None
             ) -> list[VOCRecord]:
    """All records of a split; with `class_names`, an object of another class is an error."""
    year_dir = Path(year_dir)
    for sub in ("Annotations", "JPEGImages"):
        if not (year_dir / sub).is_dir():
            raise UserError(f"{year_dir}: missing {sub}/ (expected the VOC devkit layout)")
    records = [parse_annotation(year_dir / "Annotations" / f"{i}.xml", year_dir / "JPEGImages")
               for i in read_split(year_dir, split)]
    if class_names is not None:
        allowed = set(class_names)
        for rec in records:
            for obj in rec.objects:
                if obj.name not in allowed:
                    raise UserError(f"{year_dir}/Annotations/{rec.image_id}.xml: class "
                                    f"{obj.name!r} is not in the class list ({len(allowed)} classes)")
    return records


def classes_in(records: list[VOCRecord]) -> tuple[str, ...]:
    """The sorted class names found in annotations (`--classes auto`)."""
    return tuple(sorted({o.name for r in records for o in r.objects}))


def write_annotation(path: Path, filename: str, width: int, height: int,
                     objects: list[VOCObject]) -> str:
    """The XML text of a VOC annotation (used by the shapes generator and tests)."""
    objs = "".join(
        f"<object><name>{o.name}</name><pose>Unspecified</pose>"
        f"<truncated>{int(o.truncated)}</truncated><difficult>{int(o.difficult)}</difficult>"
        f"<bndbox><xmin>{int(o.bbox[0])}</xmin><ymin>{int(o.bbox[1])}</ymin>"
        f"<xmax>{int(o.bbox[2])}</xmax><ymax>{int(o.bbox[3])}</ymax></bndbox></object>"
        for o in objects)
    return (f"<annotation><folder>VOC2007</folder><filename>{filename}</filename>"
            f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
            f"<segmented>0</segmented>{objs}</annotation>\n")
