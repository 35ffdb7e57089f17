"""Time of `smix cam localize`'s box metrics per image, against two baselines in this process.

The workload: `--images` smooth CAM-like maps (a 7x7 grid upsampled to `--size`, min-max
scaled, as a ResNet's layer4 CAM is) with one GT box each, scored at Choe et al.'s 100 CAM
thresholds (curve interval 0.01). Three ways, each timed `--repeats` times, best time counts:
- `localization_ious` (this toolkit, batched over the images: one labelling per threshold gives
  the largest region's box for MaxBoxAcc and every region's box for MaxBoxAccV2);
- the path this replaced (MaxBoxAcc only, no V2): scipy.ndimage's 8-connected labelling of
  the whole batch per threshold, the largest region by pixel count;
- the public path, Choe et al.'s wsolevaluation `compute_bboxes_from_scoremaps` with
  `multi_contour_eval=True` as written there (per image and threshold: cv2.threshold,
  cv2.findContours, cv2.boundingRect; its IoU in numpy), the reference implementation of
  MaxBoxAccV2. Needs OpenCV (the dev extra).
Prints one JSON line per comparison: the ratio of the baseline's time to the toolkit's.

    .venv/bin/python benchmarks/localize_metrics.py [--images 64] [--size 224] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import numpy as np
import torch
from scipy import ndimage

from cam.localize import best_iou, localization_ious, threshold_sweep


def cam_like_maps(images: int, size: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    grid = rng.random((images, 7, 7)) ** 3  # a few peaks, as a class's CAM has
    maps = torch.from_numpy(ndimage.zoom(grid, (1, size / 7, size / 7), order=1)).float()
    lo = maps.amin((1, 2), keepdim=True)
    return (maps - lo) / (maps.amax((1, 2), keepdim=True) - lo)


_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = True


def labelled_largest_boxes(masks: np.ndarray) -> np.ndarray:
    """The replaced `largest_region_boxes`: label the batch, count pixels per region, and take
    each image's largest region's box."""
    bsz, height, width = masks.shape
    labels, n = ndimage.label(masks, structure=_IN_PLANE)
    boxes = np.zeros((bsz, 4), dtype=np.float64)
    if n == 0:
        return boxes
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    ids = np.arange(1, n + 1)
    ends = np.maximum.accumulate(labels.reshape(bsz, -1).max(1))
    owner = np.searchsorted(ends, ids, side="left")
    best = np.zeros(bsz, dtype=counts.dtype)
    np.maximum.at(best, owner, counts)
    top = counts == best[owner]
    chosen = np.full(bsz, n + 1, dtype=np.int64)
    np.minimum.at(chosen, owner[top], ids[top])
    found = best > 0
    sel = labels == np.where(found, chosen, -1)[:, None, None]
    rows, cols = sel.any(2), sel.any(1)
    y0, y1 = rows.argmax(1), height - rows[:, ::-1].argmax(1)
    x0, x1 = cols.argmax(1), width - cols[:, ::-1].argmax(1)
    boxes[found] = np.stack([x0, y0, x1, y1], 1)[found]
    return boxes


def labelled_v1(maps: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor,
                sweep: list[float]) -> torch.Tensor:
    arr = maps.numpy()
    boxes = torch.from_numpy(np.stack([labelled_largest_boxes(arr > t) for t in sweep]))
    return best_iou(boxes, gt, valid)


def wsolevaluation_v2(maps: torch.Tensor, gt: torch.Tensor, sweep: list[float]) -> np.ndarray:
    """[T,B] best IoU per threshold, as wsolevaluation's BoxEvaluator.accumulate computes it."""
    import cv2

    out = np.zeros((len(sweep), len(maps)))
    for b, scoremap in enumerate(maps.numpy()):
        height, width = scoremap.shape
        image = np.expand_dims((scoremap * 255).astype(np.uint8), 2)
        gt_boxes = gt[b].numpy()
        for k, threshold in enumerate(sweep):
            _, thr = cv2.threshold(src=image, thresh=int(threshold * np.max(image)), maxval=255,
                                   type=cv2.THRESH_BINARY)
            contours = cv2.findContours(image=thr, mode=cv2.RETR_TREE,
                                        method=cv2.CHAIN_APPROX_SIMPLE)[0]
            if len(contours) == 0:
                boxes = np.asarray([[0, 0, 0, 0]])
            else:
                boxes = []
                for contour in contours:
                    x, y, w, h = cv2.boundingRect(contour)
                    boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
                boxes = np.asarray(boxes)
            out[k, b] = _multiple_iou(boxes, gt_boxes).max()
    return out


def _multiple_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """wsolevaluation's calculate_multiple_iou (inclusive pixel coordinates)."""
    a, b = np.expand_dims(a, 1), np.expand_dims(b, 0)
    x0, y0 = np.maximum(a[..., 0], b[..., 0]), np.maximum(a[..., 1], b[..., 1])
    x1, y1 = np.minimum(a[..., 2], b[..., 2]), np.minimum(a[..., 3], b[..., 3])
    inter = np.maximum(x1 - x0 + 1, 0) * np.maximum(y1 - y0 + 1, 0)
    area = lambda z: (z[..., 2] - z[..., 0] + 1) * (z[..., 3] - z[..., 1] + 1)
    return inter / (area(a) + area(b) - inter)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    maps = cam_like_maps(a.images, a.size)
    s = a.size
    gt = torch.tensor([[[0.2 * s, 0.25 * s, 0.7 * s, 0.8 * s]]] * a.images, dtype=torch.float64)
    valid = torch.ones(a.images, 1, dtype=torch.bool)
    sweep = threshold_sweep(0.01)
    ours = best_of(lambda: localization_ious(maps, gt, valid, sweep), a.repeats)
    common = {"bench": "localize_metrics", "images": a.images, "size": a.size,
              "thresholds": len(sweep), "device": "cpu", "toolkit_ms_per_image":
              round(1000 * ours / a.images, 2)}
    v1 = best_of(lambda: labelled_v1(maps, gt, valid, sweep), a.repeats)
    print(json.dumps({**common, "baseline": "scipy labelling, MaxBoxAcc only (the replaced path)",
                      "ratio": round(v1 / ours, 3)}))
    try:
        import cv2  # noqa: F401
    except ImportError:
        print(json.dumps({**common, "baseline": "wsolevaluation (OpenCV)",
                          "skipped": "OpenCV is not installed (the dev extra)"}))
        return
    public = best_of(lambda: wsolevaluation_v2(maps, gt, sweep), a.repeats)
    print(json.dumps({**common, "baseline": "wsolevaluation multi_contour_eval (OpenCV, per "
                      "image and threshold)", "ratio": round(public / ours, 3)}))


if __name__ == "__main__":
    main()
