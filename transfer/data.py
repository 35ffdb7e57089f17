"""VOC07+12 trainval -> VOC07 test, read with the toolkit's VOC reader, and the class list.

Every file is read through `smix.voc.load_voc` (validated fields, boxes inside the image,
classes in the list), never through detectron2's `load_voc_instances`, whose `np.loadtxt` turns a
one-line split file into a 0-d array.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from PIL import Image

from smix.data import UNREADABLE
from smix.errors import UserError
from smix.io import read_user_text
from smix.voc import VOC_CLASSES, VOCRecord, classes_in, find_year_dir, load_voc

DEFAULT_TRAIN = (("2007", "trainval"), ("2012", "trainval"))
DEFAULT_TEST = ("2007", "test")


@dataclasses.dataclass(frozen=True)
class VOCSplits:
    """The records a transfer run trains and tests on, and where they came from."""

    train: tuple[VOCRecord, ...]
    test: tuple[VOCRecord, ...]
    class_names: tuple[str, ...]
    train_sets: tuple[str, ...]  # e.g. ("VOC2007/trainval", "VOC2012/trainval")
    test_set: str
    test_dir: Path  # the VOC<year> folder the test split lives in
    skipped_sets: tuple[str, ...]  # default sets that are absent (VOC2012 is optional)

    @property
    def test_year(self) -> str:
        """"2007" for `VOC2007/test`: the year decides the AP metric (see `year_metric`)."""
        return self.test_set.split("/", 1)[0][len("VOC"):]


def parse_sets(text: str) -> tuple[tuple[str, str], ...]:
    """`2007:trainval,2012:trainval` -> (("2007", "trainval"), ("2012", "trainval"))."""
    out = []
    for item in text.split(","):
        year, sep, split = item.strip().partition(":")
        if not sep or year not in ("2007", "2012") or not split:
            raise UserError(f"bad VOC set {item!r}: expected YEAR:SPLIT with YEAR 2007 or 2012")
        out.append((year, split))
    return tuple(out)


def read_class_list(spec: str) -> tuple[str, ...] | None:
    """`voc`: the 20 VOC classes; `auto`: None (found later); else a file, one name a line."""
    if spec == "voc":
        return VOC_CLASSES
    if spec == "auto":
        return None
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--classes: {spec!r} is neither 'voc', 'auto' nor an existing file")
    names = [line.strip() for line in read_user_text(path, "class list").splitlines()
             if line.strip()]
    if not names:
        raise UserError(f"{path}: class list file is empty")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"{path}: class {dupes[0]!r} is listed twice")
    return tuple(names)


def _year_dir(root: Path, year: str) -> Path | None:
    if not root.is_dir():
        raise UserError(f"--voc-root {root}: no such directory")
    return find_year_dir(root, year)


_EXIF_ORIENTATION = 0x0112


def _check_size(rec: VOCRecord) -> None:
    """The picture's size (its header only) must be the annotation's <size>: the boxes were
    checked against it, and detectron2 stops mid-run, with a traceback, on the first image
    whose size differs (annotation tools write wrong or 0x0 sizes now and then). The size is
    detectron2's: upright, as the EXIF orientation tag says (a phone photo's 5-8 turn it)."""
    try:
        with Image.open(rec.image_path) as im:
            width, height = im.size
            if im.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
                width, height = height, width
    except UNREADABLE as e:
        raise UserError(f"{rec.image_path}: cannot read image ({type(e).__name__}: {e})") from None
    if (width, height) != (rec.width, rec.height):
        raise UserError(f"{rec.image_path}: the image is {width}x{height} but its annotation "
                        f"{rec.image_id}.xml gives <size> {rec.width}x{rec.height}")


def load_splits(root: Path, classes: str,
                train_sets: Sequence[tuple[str, str]] = DEFAULT_TRAIN,
                test_set: tuple[str, str] = DEFAULT_TEST) -> VOCSplits:
    """Read train and test records. VOC2012 may be absent when it is only in the default sets."""
    root = Path(root)
    wanted = read_class_list(classes)
    explicit = tuple(train_sets) != DEFAULT_TRAIN
    train, used, skipped = [], [], []
    for year, split in train_sets:
        folder = _year_dir(root, year)
        if folder is None:
            if year == "2012" and not explicit:
                skipped.append(f"VOC{year}/{split}")
                continue
            raise UserError(f"{root}: no VOC{year}/ folder (expected ROOT/VOC{year}, "
                            f"ROOT/VOCdevkit/VOC{year}, or beside ROOT when it is a VOC folder)")
        train += load_voc(folder, split, wanted)
        used.append(f"VOC{year}/{split}")
    test_dir = _year_dir(root, test_set[0])
    if test_dir is None:
        raise UserError(f"{root}: no VOC{test_set[0]}/ folder for the test split")
    test = load_voc(test_dir, test_set[1], wanted)
    names = wanted if wanted is not None else classes_in(train + test)
    if not names:
        raise UserError(f"{root}: the annotations name no objects, so --classes auto finds "
                        "no class")
    if not any(r.objects for r in train):
        raise UserError(f"{root}: the training splits have no annotated object")
    if not any(not o.difficult for r in test for o in r.objects if o.name in names):
        raise UserError(f"{test_dir}: the test split {test_set[1]} has no object that is not "
                        "difficult, so it has no AP to measure (VOC ignores difficult ones)")
    for rec in (*train, *test):
        if not rec.image_path.is_file():
            raise UserError(f"{rec.image_path}: image missing (listed by its annotation "
                            f"{rec.image_id}.xml)")
        _check_size(rec)
    return VOCSplits(tuple(train), tuple(test), tuple(names), tuple(used),
                     f"VOC{test_set[0]}/{test_set[1]}", test_dir, tuple(skipped))
