"""The toolkit's Pascal VOC detection evaluator, usable on any detections.

It follows the VOC devkit as re-implemented in py-faster-rcnn's `voc_eval` (the code detectron2's
`PascalVOCDetectionEvaluator` runs), so that on the same detections it gives the same numbers:
- boxes in VOC pixel convention (1-based, inclusive: widths are `x1 - x0 + 1`); detections come in
  the 0-based [x0, y0, x1, y1) convention of torchvision / detectron2 and get `+1` on x0, y0,
  the inverse of the loaders' `-1`;
- per class, detections in descending score order; a detection whose best-overlapping ground truth
  (IoU strictly above the threshold) is `difficult` is neither a true nor a false positive, and
  difficult objects do not count as positives; a second detection of an already matched object is
  a false positive;
- AP: the VOC07 11-point interpolation (`voc07`) or the area under the interpolated curve (`area`);
  "AP" is the mean over IoU 0.50:0.05:0.95, "AP50"/"AP75" at 0.5/0.75, all in percent. Which one
  follows the test set's year as in the devkit: 11-point for VOC2007, area from VOC2010 on
  (`year_metric`).

One deliberate difference: a class without any non-difficult ground truth has no defined AP; it is
reported as None and left out of the means (the reference code silently counts it as 0).

Matching is vectorised: for a detection the best-overlapping object does not depend on the
threshold, and a detection is a true positive exactly when it is the first (in score order) to
reach that object above the threshold, so no per-detection Python loop is needed.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

from smix.errors import UserError
from smix.voc import VOCRecord

IOU_THRESHOLDS = tuple(t / 100.0 for t in range(50, 100, 5))  # as detectron2: 0.5 ... 0.95
METRICS = ("voc07", "area")


@dataclasses.dataclass(frozen=True)
class Detections:
    """Detections of a whole test set as flat arrays.

    `boxes` are 0-based [x0, y0, x1, y1) (torchvision / detectron2 output) unless `one_based`,
    when they already are in VOC's 1-based pixel convention; `labels` index the class list the
    evaluator is given.
    """

    image_ids: tuple[str, ...]
    labels: np.ndarray  # int [N]
    scores: np.ndarray  # float [N]
    boxes: np.ndarray  # float [N, 4]
    one_based: bool = False

    def __post_init__(self) -> None:
        n = len(self.image_ids)
        if self.labels.shape != (n,) or self.scores.shape != (n,) or self.boxes.shape != (n, 4):
            raise ValueError(f"inconsistent detection arrays: {n} ids, labels {self.labels.shape}, "
                             f"scores {self.scores.shape}, boxes {self.boxes.shape}")

    @classmethod
    def concat(cls, parts: Iterable[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
               one_based: bool = False) -> "Detections":
        """From per-image (image_id, boxes [n,4], scores [n], labels [n]) tuples."""
        ids: list[str] = []
        boxes, scores, labels = [], [], []
        for image_id, b, s, lab in parts:
            ids.extend([image_id] * len(s))
            boxes.append(np.asarray(b, np.float64).reshape(-1, 4))
            scores.append(np.asarray(s, np.float64).reshape(-1))
            labels.append(np.asarray(lab, np.int64).reshape(-1))
        if not ids:
            return cls.empty()
        return cls(tuple(ids), np.concatenate(labels), np.concatenate(scores),
                   np.concatenate(boxes), one_based)

    @classmethod
    def empty(cls) -> "Detections":
        return cls((), np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 4)))


@dataclasses.dataclass(frozen=True)
class _ClassGT:
    """Ground truth of one class, padded per image: boxes [I, G, 4], valid/difficult [I, G]."""

    boxes: np.ndarray
    valid: np.ndarray
    difficult: np.ndarray
    npos: int


def _class_ground_truth(records: Sequence[VOCRecord], name: str) -> _ClassGT:
    per_image = [[o for o in r.objects if o.name == name] for r in records]
    g = max(1, max((len(objs) for objs in per_image), default=0))
    boxes = np.zeros((len(records), g, 4))
    valid = np.zeros((len(records), g), bool)
    difficult = np.zeros((len(records), g), bool)
    for i, objs in enumerate(per_image):
        for j, o in enumerate(objs):
            boxes[i, j], valid[i, j], difficult[i, j] = o.bbox, True, o.difficult
    npos = int((valid & ~difficult).sum())
    return _ClassGT(boxes, valid, difficult, npos)


def _best_overlap(gt: _ClassGT, image_index: np.ndarray, det: np.ndarray,
                  max_pairs: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Max IoU and argmax object per detection (VOC pixel-inclusive IoU, the devkit's formula),
    in chunks so that crowded classes (G objects in an image) stay within ~max_pairs pairs."""
    step = max(1, max_pairs // gt.boxes.shape[1])
    if len(det) > step:
        parts = [_best_overlap(gt, image_index[i:i + step], det[i:i + step], max_pairs)
                 for i in range(0, len(det), step)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    g = gt.boxes[image_index]  # [N, G, 4]
    ixmin = np.maximum(g[..., 0], det[:, None, 0])
    iymin = np.maximum(g[..., 1], det[:, None, 1])
    ixmax = np.minimum(g[..., 2], det[:, None, 2])
    iymax = np.minimum(g[..., 3], det[:, None, 3])
    iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
    ih = np.maximum(iymax - iymin + 1.0, 0.0)
    inters = iw * ih
    uni = ((det[:, None, 2] - det[:, None, 0] + 1.0) * (det[:, None, 3] - det[:, None, 1] + 1.0)
           + (g[..., 2] - g[..., 0] + 1.0) * (g[..., 3] - g[..., 1] + 1.0) - inters)
    overlaps = np.where(gt.valid[image_index], inters / uni, -np.inf)
    return overlaps.max(axis=1), overlaps.argmax(axis=1)


def _tp_fp(gt: _ClassGT, image_index: np.ndarray, ovmax: np.ndarray, jmax: np.ndarray,
           threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """True/false positive flags of score-sorted detections at one IoU threshold."""
    hit = ovmax > threshold
    hard = gt.difficult[image_index, jmax]
    object_id = image_index * gt.boxes.shape[1] + jmax
    first = np.zeros(len(hit), bool)
    candidates = np.flatnonzero(hit & ~hard)
    # np.unique's return_index gives the first occurrence: the highest-scoring detection of it.
    _, first_pos = np.unique(object_id[candidates], return_index=True)
    first[candidates[first_pos]] = True
    tp = first
    fp = ~hit | (hit & ~hard & ~first)
    return tp.astype(np.float64), fp.astype(np.float64)


def year_metric(year: str | int) -> str:
    """The AP the devkit of a VOC year computes: VOC2007's 11-point interpolation (detectron2's
    `use_07_metric = year == 2007`), the area under the curve from VOC2010 on."""
    return "voc07" if int(year) < 2010 else "area"


def metric_label(year: str | int) -> str:
    """How results name what was computed: `voc07-11point`, `voc12-area`."""
    return "voc07-11point" if year_metric(year) == "voc07" else f"voc{str(year)[-2:]}-area"


def average_precision(rec: np.ndarray, prec: np.ndarray, metric: str = "voc07") -> float:
    """AP from a precision/recall curve: VOC07 11-point or the area under the envelope."""
    if metric == "voc07":
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):  # the devkit's exact thresholds (0.30000000000000004...)
            p = np.max(prec[rec >= t]) if np.sum(rec >= t) > 0 else 0.0
            ap += p / 11.0
        return float(ap)
    if metric == "area":
        mrec = np.concatenate(([0.0], rec, [1.0]))
        mpre = np.concatenate(([0.0], prec, [0.0]))
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        i = np.where(mrec[1:] != mrec[:-1])[0]
        return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))
    raise UserError(f"unknown AP metric {metric!r}; valid: {', '.join(METRICS)}")


def class_ap(gt: _ClassGT, image_index: np.ndarray, scores: np.ndarray, boxes_voc: np.ndarray,
             thresholds: Sequence[float], metric: str) -> list[float | None]:
    """AP of one class at each IoU threshold (None when the class has no positives)."""
    if gt.npos == 0:
        return [None] * len(thresholds)
    order = np.argsort(-scores)  # the reference's ordering, ties included
    image_index, boxes_voc = image_index[order], boxes_voc[order]
    if len(order):
        ovmax, jmax = _best_overlap(gt, image_index, boxes_voc)
    else:
        ovmax, jmax = np.zeros(0), np.zeros(0, np.int64)
    out: list[float | None] = []
    for t in thresholds:
        tp, fp = _tp_fp(gt, image_index, ovmax, jmax, t)
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        rec = tp / float(gt.npos)
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        out.append(average_precision(rec, prec, metric))
    return out


@dataclasses.dataclass(frozen=True)
class VOCResult:
    """Percent APs: means over classes with positives, and per class (None: no positives)."""

    AP: float
    AP50: float
    AP75: float
    per_class: dict[str, float | None]  # AP50 per class
    per_class_ap: dict[str, float | None]  # AP (0.50:0.95) per class
    metric: str
    classes_without_ground_truth: tuple[str, ...]

    def summary(self) -> dict[str, float]:
        return {"AP": self.AP, "AP50": self.AP50, "AP75": self.AP75}


def _mean(values: Iterable[float | None]) -> float:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else float("nan")


def _image_index(records: Sequence[VOCRecord], image_ids: Sequence[str]) -> np.ndarray:
    lookup = {r.image_id: i for i, r in enumerate(records)}
    if len(lookup) != len(records):
        raise UserError("the test split lists an image more than once")
    try:
        return np.array([lookup[i] for i in image_ids], dtype=np.int64)
    except KeyError as e:
        raise UserError(f"a detection names image {e.args[0]!r}, which is not in the test "
                        "split") from None


def to_voc_boxes(boxes0: np.ndarray) -> np.ndarray:
    """0-based [x0, y0, x1, y1) -> VOC 1-based inclusive (the inverse of the loaders' -1)."""
    out = np.array(boxes0, dtype=np.float64, copy=True).reshape(-1, 4)
    out[:, :2] += 1.0
    return out


def evaluate_voc(records: Sequence[VOCRecord], detections: Detections,
                 class_names: Sequence[str], metric: str = "voc07",
                 thresholds: Sequence[float] = IOU_THRESHOLDS) -> VOCResult:
    """Evaluate detections against VOC records (the test split); see the module docstring."""
    if metric not in METRICS:
        raise UserError(f"unknown AP metric {metric!r}; valid: {', '.join(METRICS)}")
    if 0.5 not in thresholds or 0.75 not in thresholds:
        raise ValueError("thresholds must include 0.5 and 0.75")
    if len(detections.labels) and (detections.labels.min() < 0
                                   or detections.labels.max() >= len(class_names)):
        raise UserError(f"detection labels must index the {len(class_names)} classes")
    image_index = _image_index(records, detections.image_ids)
    boxes_voc = (np.asarray(detections.boxes, np.float64) if detections.one_based
                 else to_voc_boxes(detections.boxes))
    per_t: dict[str, list[float | None]] = {}
    for c, name in enumerate(class_names):
        sel = detections.labels == c
        gt = _class_ground_truth(records, name)
        per_t[name] = class_ap(gt, image_index[sel], detections.scores[sel], boxes_voc[sel],
                               thresholds, metric)
    i50, i75 = list(thresholds).index(0.5), list(thresholds).index(0.75)
    pct = {n: [None if v is None else 100.0 * v for v in aps] for n, aps in per_t.items()}
    ap_by_t = [_mean(pct[n][k] for n in class_names) for k in range(len(thresholds))]
    return VOCResult(
        AP=float(np.mean(ap_by_t)), AP50=ap_by_t[i50], AP75=ap_by_t[i75],
        per_class={n: pct[n][i50] for n in class_names},
        per_class_ap={n: (None if pct[n][0] is None else _mean(pct[n])) for n in class_names},
        metric=metric,
        classes_without_ground_truth=tuple(n for n in class_names if pct[n][0] is None),
    )
