"""`smix cam localize`: weakly supervised localisation measured from CAMs.

For each image the CAM of its ground-truth class is thresholded; the box around the largest
8-connected region (the one whose outer contour encloses the most area, as Choe et al.'s
wsolevaluation picks it: `find_regions`) is compared with the ground-truth boxes of that class
(best IoU):
- GT-known Loc: IoU >= 0.5 at the CAM threshold (0.2 of the max by default, as Zhou et al.);
- Top-1 Loc: the same and the top-1 prediction is right;
- MaxBoxAcc (Choe et al., "Evaluating WSOL", CVPR 2020): the best GT-known box accuracy over
  thresholds 0, δ, 2δ, … < 1 (δ = 0.01);
- MaxBoxAccV2 (the same paper's recommended form): the box of *every* contour is tried, the
  best accuracy over thresholds is taken at IoU 0.3, 0.5 and 0.7, and the three averaged;
- energy-based pointing game (Wang et al., Score-CAM): the share of the CAM's mass inside the
  ground-truth boxes, averaged over images.
Maps are min–max scaled, so "a fraction of the max" is a plain threshold; a region is the set
of pixels strictly above it. Plain CAM is scaled from its raw minimum (no ReLU), as Zhou et al.'s
`returnCAM` and Choe et al.'s `normalize_scoremap`, so thresholds mean what they mean there; the
Grad-CAM family keeps its ReLU. Boxes go through the eval geometry together with the image
(torchvision's box transform): by default (`geometry="crop"`) the checkpoint's resize + centre
crop, as the classifier is evaluated, where a box the crop cuts away is not evaluable; with
`geometry="square"` the whole image is resized to crop x crop, as Choe et al.'s wsolevaluation
does (`_load_resized_boxes`), so that MaxBoxAcc compares with their tables. Under torchrun the
images are sharded and the counts summed exactly.

Where this departs from wsolevaluation's code, on purpose: a predicted box is the exact
half-open rectangle of its contour, where theirs reads OpenCV's exclusive end as inclusive
(`x + w`, then inclusive areas), one pixel too wide and too tall; and the map is thresholded as
floats, where theirs quantises it to uint8 first. On random CAM-like maps fed the same box
numbers, their MaxBoxAcc read 1.25-1.75 points higher and their V2 0.8-1.25 higher; with those
two artefacts removed, every per-image IoU agreed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from tqdm import tqdm

from smix.boxes import check_inside
from smix.checkpoint import checkpoint_ref
from smix.data import eval_transform
from smix.devices import fits_on_device
from smix.dist import DistInfo, agree, all_reduce_sum, distributed, shard_indices
from smix.errors import UserError
from smix.io import RunDir
from cam.boxes import GTImage, from_boxes_file, from_voc
from cam.images import Unreadable, class_index, read_or_skip, say_skipped
from cam.models import CamModel, load_models


# --- metrics: pure batched functions --------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Regions:
    """The contours of a batch of masks: each one's half-open bounding box (x0, y0, x1, y1)
    [n,4], the image it lies in [n] and whether it is a region's outer boundary [n] (else the
    boundary of a hole in one), and each image's largest region, an index into them (-1: the
    image has none)."""

    boxes: np.ndarray
    owner: np.ndarray
    outer: np.ndarray
    largest: np.ndarray


def find_regions(masks: np.ndarray) -> Regions:
    """[B,H,W] bool -> its `Regions`, read as Choe et al.'s wsolevaluation reads a thresholded
    CAM (`compute_bboxes_from_scoremaps`): every contour's bounding rectangle, holes' too
    (MaxBoxAccV2's `multi_contour_eval`; RETR_CCOMP gives the rectangles of their RETR_TREE),
    and as the largest region the outer contour enclosing the most area (`cv2.contourArea`;
    ties: the first in OpenCV's contour list, as their `max` takes it). The outer contours are
    the 8-connected components, islands inside holes included. Tracing boundaries reads a
    smooth CAM about 8x faster than labelling every pixel (grad-cam installs OpenCV)."""
    import cv2

    boxes, owner, outer, largest = [], [], [], np.full(len(masks), -1, dtype=np.int64)
    for b, mask in enumerate(masks):
        contours, hierarchy = cv2.findContours(np.ascontiguousarray(mask).view(np.uint8),
                                               cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        if not contours:
            continue
        is_outer = [h[3] < 0 for h in hierarchy[0]]
        areas = [cv2.contourArea(c) if o else -1.0 for c, o in zip(contours, is_outer)]
        largest[b] = len(owner) + int(np.argmax(areas))  # the first maximum, as max() takes it
        boxes += [(x, y, x + w, y + h) for x, y, w, h in map(cv2.boundingRect, contours)]
        owner += [b] * len(contours)
        outer += is_outer
    return Regions(np.array(boxes, dtype=np.float64).reshape(-1, 4),
                   np.array(owner, dtype=np.int64), np.array(outer, dtype=bool), largest)


def largest_boxes(r: Regions) -> np.ndarray:
    """[B,4]: each image's largest region's box; zeros where an image has none."""
    out = np.zeros((len(r.largest), 4), dtype=np.float64)
    found = r.largest >= 0
    out[found] = r.boxes[r.largest[found]]
    return out


def largest_region_boxes(masks: np.ndarray) -> np.ndarray:
    """[B,H,W] bool -> [B,4] (x0, y0, x1, y1), half-open box of each image's largest
    8-connected region (`find_regions`); zeros when a mask is empty."""
    return largest_boxes(find_regions(masks))


def best_region_iou(r: Regions, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B] float64: the best IoU of any contour's box (a hole's too, as theirs) with any valid
    GT box of its image (0 for an image without regions) — Choe et al.'s
    `multi_contour_eval`."""
    best = np.zeros(len(r.largest), dtype=np.float64)
    if len(r.owner):
        ious = best_iou(torch.from_numpy(r.boxes), gt[r.owner].double(), valid[r.owner])
        np.maximum.at(best, r.owner, ious.numpy())
    return torch.from_numpy(best)


def best_iou(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """IoU of predicted boxes [...,B,4] with the best of each image's GT boxes [B,M,4]."""
    p, g = pred.unsqueeze(-2), gt  # [...,B,1,4] against [B,M,4]
    iw = (torch.minimum(p[..., 2], g[..., 2]) - torch.maximum(p[..., 0], g[..., 0])).clamp(min=0)
    ih = (torch.minimum(p[..., 3], g[..., 3]) - torch.maximum(p[..., 1], g[..., 1])).clamp(min=0)
    inter = iw * ih
    area = lambda b: (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    union = area(p) + area(g) - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))
    return torch.where(valid, iou, torch.zeros_like(iou)).amax(-1)


def box_masks(gt: torch.Tensor, valid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B,H,W] bool: pixels whose centre lies in any valid GT box."""
    ys = torch.arange(height, dtype=gt.dtype).view(1, 1, height, 1) + 0.5
    xs = torch.arange(width, dtype=gt.dtype).view(1, 1, 1, width) + 0.5
    b = gt[..., None, None]
    inside = (xs >= b[:, :, 0]) & (xs < b[:, :, 2]) & (ys >= b[:, :, 1]) & (ys < b[:, :, 3])
    return (inside & valid[:, :, None, None]).any(1)


def energy_in_boxes(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] share of each map's total mass inside the mask (0 for an all-zero map)."""
    total = maps.flatten(1).sum(1).double()
    inside = (maps * mask).flatten(1).sum(1).double()
    return torch.where(total > 0, inside / total.clamp(min=1e-12), torch.zeros_like(total))


def threshold_sweep(interval: float) -> list[float]:
    """0, δ, 2δ, … < 1 as in Choe et al.'s `cam_curve_interval`."""
    if not 0 < interval < 1:
        raise UserError(f"--curve-interval must be in (0, 1), got {interval}")
    return [round(t, 10) for t in np.arange(0.0, 1.0, interval).tolist()]


def localization_ious(maps: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor,
                      thresholds: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """[T,B] float64 each: at each threshold, the IoU of the largest region's box (MaxBoxAcc,
    GT-known Loc) and the best IoU of any region's box (MaxBoxAccV2) with the GT boxes."""
    arr, largest, any_region = maps.numpy(), [], []
    for t in thresholds:
        r = find_regions(arr > t)
        largest.append(largest_boxes(r))
        any_region.append(best_region_iou(r, gt, valid))
    return (best_iou(torch.from_numpy(np.stack(largest)), gt.double(), valid),
            torch.stack(any_region))


def localization_hits(maps: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor,
                      thresholds: Sequence[float], iou_threshold: float) -> torch.Tensor:
    """[T,B] bool: the largest-region box at each threshold has IoU >= iou_threshold."""
    return localization_ious(maps, gt, valid, thresholds)[0] >= iou_threshold


# MaxBoxAccV2 (Choe et al. 2020, their recommended metric): every region's box, the best
# accuracy over CAM thresholds at each of these IoU thresholds, averaged over them
V2_IOUS = (0.3, 0.5, 0.7)


def v2_hits(any_region_ious: torch.Tensor) -> torch.Tensor:
    """[len(V2_IOUS), T, B] bool: some region's box has IoU >= δ, from `localization_ious`."""
    return torch.stack([any_region_ious >= d for d in V2_IOUS])


# --- the command --------------------------------------------------------------------------------

GEOMETRIES = ("crop", "square")


def localize_transform(meta: Any, geometry: str) -> Any:
    """The eval transform of `geometry`: the checkpoint's own (resize + centre crop), or the
    whole image resized to crop x crop (Choe et al.), normalised with the checkpoint's mean/std."""
    if geometry == "square":
        meta = dataclasses.replace(meta, resize=meta.crop)  # eval_transform's square branch
    return eval_transform(meta)


@dataclasses.dataclass(frozen=True)
class LocalizeConfig:
    ckpts: tuple[Path, ...]
    out: Path
    voc_root: Path | None = None
    boxes: Path | None = None
    split: str = "test"
    year: str = "2007"
    method: str | None = None  # None: plain CAM for GAP+FC archs
    layer: str | None = None
    cam_threshold: float = 0.2
    curve_interval: float = 0.01
    iou_threshold: float = 0.5
    geometry: str = "crop"  # crop: the checkpoint's resize + centre crop | square: wsolevaluation
    batch_size: int = 32
    skip_bad_images: bool = False
    workers: int = 0
    device: str = "auto"
    progress: bool = True

    def check(self) -> None:
        if (self.voc_root is None) == (self.boxes is None):
            raise UserError("give exactly one of --voc-root DIR or --boxes FILE")
        if not 0 <= self.cam_threshold < 1 or not 0 < self.iou_threshold <= 1:
            raise UserError("--cam-threshold must be in [0, 1) and --iou-threshold in (0, 1]")
        if self.geometry not in GEOMETRIES:
            raise UserError(f"--geometry {self.geometry!r}; valid: {', '.join(GEOMETRIES)}")
        if self.batch_size < 1 or self.workers < 0:
            raise UserError("--batch-size must be >= 1 and --workers >= 0")
        threshold_sweep(self.curve_interval)


class GTDataset(Dataset):
    """(normalised image, label, GT boxes mapped through the eval transform, index)."""

    def __init__(self, items: Sequence[GTImage], indices: Sequence[int], labels: Sequence[int],
                 transform: Any, skip_bad_images: bool):
        self.items, self.indices, self.labels = list(items), list(indices), list(labels)
        self.transform, self.skip = transform, skip_bad_images

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, ...] | Unreadable:
        index = self.indices[i]
        item = self.items[index]
        img = read_or_skip(item.image, self.skip)
        if isinstance(img, Unreadable):
            return img
        w, h = img.size
        check_inside(item.image, item.boxes, w, h)
        raw = torch.tensor(item.boxes, dtype=torch.float64)
        x, boxes = self.transform(img, tv_tensors.BoundingBoxes(
            raw, format="XYXY", canvas_size=(h, w)))
        size = torch.tensor([x.shape[-1], x.shape[-2]] * 2, dtype=torch.float64)
        boxes = torch.minimum(boxes.as_subclass(torch.Tensor).double().clamp(min=0), size)
        return x, self.labels[index], boxes, index


def _collate(batch: list) -> tuple[Any, ...]:
    kept = [b for b in batch if not isinstance(b, Unreadable)]
    skipped = [str(b) for b in batch if isinstance(b, Unreadable)]  # their errors
    if not kept:
        return None, None, None, None, skipped
    m = max(len(b[2]) for b in kept)
    gt = torch.zeros(len(kept), m, 4, dtype=torch.float64)
    valid = torch.zeros(len(kept), m, dtype=torch.bool)
    for j, b in enumerate(kept):
        gt[j, : len(b[2])] = b[2]
        valid[j, : len(b[2])] = (b[2][:, 2] > b[2][:, 0]) & (b[2][:, 3] > b[2][:, 1])
    images = torch.stack([b[0] for b in kept])
    return images, torch.tensor([b[1] for b in kept]), gt, valid, skipped


def read_ground_truth(cfg: LocalizeConfig) -> list[GTImage]:
    if cfg.voc_root is not None:
        return from_voc(cfg.voc_root, cfg.split, cfg.year)
    return from_boxes_file(cfg.boxes)  # type: ignore[arg-type]


def localize(cfg: LocalizeConfig) -> dict[str, Any]:
    """Measure every checkpoint; write metrics.json (rank 0) and return its `results`."""
    cfg.check()
    items = read_ground_truth(cfg)
    sweep = threshold_sweep(cfg.curve_interval)
    with distributed(cfg.device) as info:
        models = load_models(cfg.ckpts, cfg.method, cfg.layer, info.device)
        labels = [[class_index(m.meta, g.class_name, f"class of {g.image}, for {m.path}")
                   for g in items] for m in models]
        agree(RunDir(cfg.out, create=False).claim, "cam", "localization")
        run = RunDir(cfg.out) if info.is_main else None
        shard = list(shard_indices(len(items), info.rank, info.world_size))
        entries = []
        for m, lab in zip(models, labels):
            counts = all_reduce_sum(agree(_count, cfg, m, items, shard, lab, sweep, info))
            entries.append(_entry(cfg, m, counts, sweep))
            if run is not None:
                run.log({"checkpoint": str(m.path), **{k: v for k, v in entries[-1].items()
                                                       if k not in ("checkpoint", "boxacc_curve",
                                                                     "boxacc_v2_curves")}})
        results = {"dataset": _dataset_name(cfg), "n_images": int(entries[0]["n_evaluated"]),
                   "iou_threshold": cfg.iou_threshold, "cam_threshold": cfg.cam_threshold,
                   "geometry": cfg.geometry,
                   "models": entries}
        if run is not None:
            run.write_config(cfg)
            run.write_metrics(stage="cam", kind="localization", results=results, config=cfg)
    return results


def _dataset_name(cfg: LocalizeConfig) -> str:
    if cfg.voc_root is not None:
        return f"VOC{cfg.year} {cfg.split} ({Path(cfg.voc_root).resolve()})"
    return f"boxes {Path(cfg.boxes).resolve()}"  # type: ignore[arg-type]


def _count(cfg: LocalizeConfig, m: CamModel, items: Sequence[GTImage], shard: Sequence[int],
           labels: Sequence[int], sweep: Sequence[float], info: DistInfo) -> torch.Tensor:
    """float64 [7 + 4T]: n, correct, gt-known hits, top-1 hits, energy sum, unreadable,
    no box left after the crop, hits per sweep threshold, then MaxBoxAccV2's hits per sweep
    threshold at each of `V2_IOUS` — sums, so ranks add up exactly."""
    loader = DataLoader(GTDataset(items, shard, labels, localize_transform(m.meta, cfg.geometry),
                                  cfg.skip_bad_images),
                        batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=_collate)
    counts = torch.zeros(7 + (1 + len(V2_IOUS)) * len(sweep), dtype=torch.float64)
    thresholds = [*sweep, cfg.cam_threshold]
    for x, y, gt, valid, skipped in tqdm(loader, desc=f"localize {m.tag}", unit="batch",
                                         disable=not (cfg.progress and info.is_main)):
        counts[5] += len(skipped)
        say_skipped(skipped)
        if x is None:
            continue
        keep = valid.any(1)  # the centre crop can cut every GT box away: not evaluable
        counts[6] += int((~keep).sum())
        if not bool(keep.any()):
            continue
        x, y, gt, valid = x[keep], y[keep], gt[keep], valid[keep]
        with fits_on_device(cfg.batch_size, "rerun with a smaller --batch-size"):
            res = m.cam(x, y)
        correct = res.logits.argmax(1) == y
        largest, any_region = localization_ious(res.maps, gt, valid, thresholds)
        hits = largest >= cfg.iou_threshold
        energy = energy_in_boxes(res.maps, box_masks(gt, valid, *res.maps.shape[-2:]))
        counts[:5] += torch.tensor([len(y), correct.sum(), hits[-1].sum(),
                                    (hits[-1] & correct).sum(), energy.sum()], dtype=torch.float64)
        counts[7:7 + len(sweep)] += hits[:-1].sum(1).double()
        counts[7 + len(sweep):] += v2_hits(any_region[:-1]).sum(2).double().flatten()
    return counts.to(info.device)


def _entry(cfg: LocalizeConfig, m: CamModel, counts: torch.Tensor, sweep: Sequence[float]
           ) -> dict[str, Any]:
    c = counts.cpu().tolist()
    n = c[0]
    if n == 0:
        raise UserError("no image could be evaluated (all unreadable?)")
    t = len(sweep)
    curve = [100.0 * h / n for h in c[7:7 + t]]
    best = int(np.argmax(curve))
    v2 = {f"{round(100 * d)}": [100.0 * h / n for h in c[7 + t * (1 + k):7 + t * (2 + k)]]
          for k, d in enumerate(V2_IOUS)}
    return {"checkpoint": checkpoint_ref(m.path, m.meta), "method": m.cam.name,
            "layer": m.cam.layer_name, "training_method": m.method_name,
            "gt_known_loc": 100.0 * c[2] / n, "top1_loc": 100.0 * c[3] / n,
            "top1_cls": 100.0 * c[1] / n, "maxboxacc": curve[best],
            "maxboxacc_threshold": sweep[best],
            "maxboxacc_v2": float(np.mean([max(a) for a in v2.values()])),
            "maxboxacc_v2_per_iou": {d: max(a) for d, a in v2.items()},
            "pointing_game": 100.0 * c[4] / n,
            "n_evaluated": int(n), "n_skipped": int(c[5]), "n_box_cropped_out": int(c[6]),
            "boxacc_curve": {"thresholds": list(sweep), "acc": curve},
            "boxacc_v2_curves": v2}
