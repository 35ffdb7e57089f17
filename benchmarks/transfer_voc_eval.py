"""Speed of the toolkit's vectorised VOC evaluator against the devkit's per-detection loop.

Baseline: the VOC devkit / py-faster-rcnn matching written as a per-detection Python loop (as
detectron2's `voc_eval` runs it), measured in the same process on the same synthetic VOC-scale
detections (images x classes, jittered true positives, duplicates, difficult objects, clutter).
Both compute AP50 per class. The script prints one JSON line, then checks they agree: over the
classes both score (a class without non-difficult objects has no AP: the toolkit says None, the
loop leaves it out rather than divide by zero as the devkit does), |ΔAP50| must stay within
1e-6 points and no class may be scored by one side only; otherwise it exits non-zero with one
line. Both run in numpy on the host, so there is no GPU variant; the line names the CPU.

    python benchmarks/transfer_voc_eval.py [--images 4952] [--dets-per-image 100]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from smix.devices import device_name
from smix.voc import VOC_CLASSES, VOCObject, VOCRecord
from transfer.voc_eval import Detections, average_precision, evaluate_voc, to_voc_boxes

TOLERANCE = 1e-6  # AP50 points: the two compute the same numbers, up to float rounding


def synthetic(n_images: int, per_image: int, seed: int = 0) -> tuple[list[VOCRecord], Detections]:
    rng = np.random.default_rng(seed)
    records, parts = [], []
    for i in range(n_images):
        k = rng.integers(1, 6)
        xy = rng.integers(1, 300, size=(k, 2))
        wh = rng.integers(10, 200, size=(k, 2))
        cls = rng.integers(0, len(VOC_CLASSES), size=k)
        objs = tuple(VOCObject(VOC_CLASSES[c], (float(x), float(y), float(x + w), float(y + h)),
                               difficult=bool(rng.random() < 0.1))
                     for (x, y), (w, h), c in zip(xy, wh, cls))
        records.append(VOCRecord(f"{i:06d}", Path(f"{i:06d}.jpg"), 500, 500, objs))
        src = rng.integers(0, k, size=per_image)
        boxes = np.concatenate([xy, xy + wh], axis=1)[src] + rng.normal(0, 8, (per_image, 4))
        labels = np.where(rng.random(per_image) < 0.8, cls[src], rng.integers(0, 20, per_image))
        parts.append((f"{i:06d}", boxes - [1, 1, 0, 0], rng.random(per_image), labels))
    return records, Detections.concat(parts)


def loop_ap50(records: list[VOCRecord], d: Detections) -> list[float | None]:
    """The baseline: one detection at a time, as the devkit does (None: no positives)."""
    boxes, aps = to_voc_boxes(d.boxes), []
    for c, name in enumerate(VOC_CLASSES):
        gts = {r.image_id: [o for o in r.objects if o.name == name] for r in records}
        used = {k: [False] * len(v) for k, v in gts.items()}
        npos = sum(not o.difficult for v in gts.values() for o in v)
        sel = np.flatnonzero(d.labels == c)
        tp, fp = np.zeros(len(sel)), np.zeros(len(sel))
        for n, i in enumerate(sel[np.argsort(-d.scores[sel])]):
            bb, objs = boxes[i], gts[d.image_ids[i]]
            best, j = -np.inf, -1
            for k, o in enumerate(objs):
                g = o.bbox
                iw = max(min(g[2], bb[2]) - max(g[0], bb[0]) + 1.0, 0.0)
                ih = max(min(g[3], bb[3]) - max(g[1], bb[1]) + 1.0, 0.0)
                ov = iw * ih / ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                                + (g[2] - g[0] + 1.0) * (g[3] - g[1] + 1.0) - iw * ih)
                if ov > best:
                    best, j = ov, k
            if best > 0.5:
                if not objs[j].difficult:
                    if not used[d.image_ids[i]][j]:
                        tp[n], used[d.image_ids[i]][j] = 1.0, True
                    else:
                        fp[n] = 1.0
            else:
                fp[n] = 1.0
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        if npos == 0:
            aps.append(None)
            continue
        aps.append(100 * average_precision(tp / npos, tp / np.maximum(tp + fp, 1e-300)))
    return aps


def compare(ref: list[float | None], ours: list[float | None]) -> tuple[float, int, int, int]:
    """(max |ΔAP50| over the classes both score, classes compared, classes skipped, classes
    scored by one side only)."""
    pairs = [(a, b) for a, b in zip(ref, ours) if a is not None and b is not None]
    one_sided = sum((a is None) != (b is None) for a, b in zip(ref, ours))
    diff = max((abs(a - b) for a, b in pairs), default=0.0)
    return diff, len(pairs), len(ref) - len(pairs), one_sided


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4952)  # VOC07 test
    p.add_argument("--dets-per-image", type=int, default=100)  # detections_per_image
    args = p.parse_args()
    records, d = synthetic(args.images, args.dets_per_image)
    tic = time.perf_counter()
    ref = loop_ap50(records, d)
    t_loop = time.perf_counter() - tic
    tic = time.perf_counter()
    ours = evaluate_voc(records, d, VOC_CLASSES, thresholds=(0.5, 0.75))
    t_vec = time.perf_counter() - tic
    tic = time.perf_counter()
    evaluate_voc(records, d, VOC_CLASSES)
    t_all = time.perf_counter() - tic
    diff, compared, skipped, one_sided = compare(ref, [ours.per_class[n] for n in VOC_CLASSES])
    print(json.dumps({
        "benchmark": "transfer_voc_eval", "device": "cpu", "device_name": device_name("cpu"),
        "images": args.images, "detections": len(d.scores),
        "baseline": "per-detection loop (VOC devkit / detectron2 voc_eval style), AP50",
        "baseline_s": round(t_loop, 3), "vectorised_AP50_AP75_s": round(t_vec, 3),
        "vectorised_all_10_thresholds_s": round(t_all, 3),
        "speedup_vs_baseline": round(t_loop / t_vec, 1), "max_abs_AP50_diff": diff,
        "classes_compared": compared, "classes_skipped_no_positives": skipped}), flush=True)
    if diff > TOLERANCE or one_sided:
        sys.exit(f"transfer_voc_eval: the evaluators disagree: max |dAP50| {diff:.3g} (tolerance "
                 f"{TOLERANCE}), {one_sided} class(es) scored by one side only")


if __name__ == "__main__":
    main()
