"""`smix audit --data ROOT --out DIR`: what a mixing method does to labels and objects.

SaliencyMix's argument (paper Fig. 1, §3) is that CutMix may paste a patch holding no object
yet gives it its share of the label, and that a saliency-guided patch holds the object. This
command measures that on any data with boxes (a VOC devkit, or images plus a boxes file), with
no training:

Per saliency detector, each image's map computed on its uint8 RGB pixels at its own resolution:
* ``hit_rate``: share of images whose map argmax (first maximum, row-major) lies inside any
  ground-truth box. A pixel (x, y) is inside a box [x0, x1) × [y0, y1) (0-based, half-open:
  for VOC x0 = xmin − 1, x1 = xmax) when x0 ≤ x + ½ < x1 and y0 ≤ y + ½ < y1 — for integer
  boxes exactly x ∈ [xmin − 1, xmax − 1], y ∈ [ymin − 1, ymax − 1].
* ``chance``: mean share of the image covered by the union of its boxes (the hit rate of a
  uniformly random point).
* ``energy_in_box``: mean over images of Σ map·obj / Σ map (a map with no mass counts as
  uniform, i.e. as the covered share).

Per mixing method, on N pairs drawn by the method's own `sample` (its pairing and λ draw) from
batches of `batch_size` images resized to S×S (boxes alike): M is the per-pixel weight of the
target image a in the mixed image (1 outside the pasted region and 0 inside it for cut-paste
methods; λ everywhere for mixup; the mask for GuidedMixup; 0 in Cutout's hole) and obj the union
of an image's boxes as a mask at S×S (a box smaller than a pixel keeps the pixel of its centre):
* O_a = Σ M·obj_a / Σ obj_a (``target_object_visible``);
* O_b = Σ W_b·obj_b / Σ obj_b (``source_object_visible``), W_b the weight with which each pixel
  of the source b reaches the mixed image: 1 − M where the method mixes in place, the source box
  where a scheme moves the patch, 0 without a source (none, Cutout);
* ``label_evidence_gap`` = |(1 − λ) − O_b / (O_a + O_b)| (0 where both are 0), λ the label
  weight of a that the method trains with;
* ``empty_source_rate``: share of pairs with 1 − λ ≥ 0.1 and O_b < 0.1 (label for an object
  that is not there); ``erased_target_rate``: share with λ ≥ 0.1 and O_a < 0.1.
For mixup O_a = λ and O_b = 1 − λ exactly, so its gap is 0.

The mixers and detectors live in the `pretrain` stage; like the dispatcher, this core module
reaches them by module name at run time (imports inside the functions that need them), so
importing `smix` never imports a stage.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from smix.boxes import Box, check_inside, read_boxes_file
from smix.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from smix.data import denormalize, load_rgb, normalize
from smix.errors import UserError
from smix.io import RunDir, atomic_write
from smix.report import Table
from smix.voc import find_year_dir, load_voc

DETECTOR_METRICS = {
    "hit_rate": "share of images whose saliency argmax (first maximum, row-major; map of the "
                "image's uint8 RGB pixels at its own resolution) lies inside any ground-truth box "
                "(0-based inclusive: x in [xmin-1, xmax-1], y in [ymin-1, ymax-1])",
    "chance": "mean share of the image covered by the union of its boxes (hit rate of a "
              "uniformly random point)",
    "energy_in_box": "mean over images of the share of the map's mass inside the boxes (a map "
                     "with no mass counts as uniform)",
}
METHOD_METRICS = {
    "target_object_visible": "mean O_a = sum(M*obj_a)/sum(obj_a), M the per-pixel weight of the "
                             "target image a in the mixed image",
    "source_object_visible": "mean O_b = sum(W_b*obj_b)/sum(obj_b), W_b the weight with which "
                             "each pixel of the source b reaches the mixed image (1-M in place)",
    "label_evidence_gap": "mean |(1-lam) - O_b/(O_a+O_b)| (0 where both are 0), lam the "
                          "label weight of a",
    "empty_source_rate": "share of pairs with 1-lam >= 0.1 and O_b < 0.1",
    "erased_target_rate": "share of pairs with lam >= 0.1 and O_a < 0.1",
    "mean_lambda": "mean label weight lam of the target image a",
}


@dataclasses.dataclass(frozen=True)
class AuditImage:
    """One image and the union of its ground-truth boxes (0-based, half-open, its pixels)."""

    path: Path
    boxes: tuple[Box, ...]


@dataclasses.dataclass(frozen=True)
class AuditConfig:
    out: Path
    data: Path | None = None
    boxes_file: Path | None = None
    split: str = "test"
    year: str = "2007"
    methods: tuple[tuple[str, dict[str, Any]], ...] = ()  # (mixer, params); () = every mixer
    detectors: tuple[str, ...] = ()  # () = every image detector
    size: int = 224
    pairs: int = 1024
    batch_size: int = 64
    seed: int = 0
    examples: int = 8
    threads: int = 1  # torch intra-op threads (see `run_audit`)
    progress: bool = True


# ------------------------------------------------------------------------------- the data


def load_images(cfg: AuditConfig) -> tuple[list[AuditImage], str]:
    """The images to audit with every box of each (VOC: all objects, difficult included)."""
    if cfg.boxes_file is not None:
        grouped = read_boxes_file(cfg.boxes_file)
        images = [AuditImage(p, tuple(b for _, b in objs)) for p, objs in grouped.items()]
        if cfg.data is not None:  # class folders: audit the images of the boxes file under ROOT
            if not cfg.data.is_dir():
                raise UserError(f"{cfg.data}: no such folder")
            root = cfg.data.resolve()
            images = [im for im in images if root in im.path.resolve().parents]
            if not images:
                raise UserError(f"{cfg.boxes_file}: no image of it lies under {cfg.data}")
        return images, str(cfg.boxes_file)
    if cfg.data is None:
        raise UserError("give --data (a VOC devkit root, or class folders with --boxes FILE)")
    year_dir = find_year_dir(Path(cfg.data), cfg.year)
    if year_dir is None:
        raise UserError(f"{cfg.data}: no VOC{cfg.year} folder (expected ROOT/VOC{cfg.year} or "
                        f"ROOT/VOCdevkit/VOC{cfg.year}); for class folders give --boxes FILE")
    records = load_voc(year_dir, cfg.split)
    images = [AuditImage(r.image_path, tuple(o.box0 for o in r.objects))
              for r in records if r.objects]
    if not images:
        raise UserError(f"{year_dir}: no boxes in the {cfg.split} annotations")
    return images, f"VOC{cfg.year} {cfg.split}"


def object_mask(boxes: Sequence[Box], orig_hw: tuple[int, int], out_hw: tuple[int, int]
                ) -> torch.Tensor:
    """[H,W] bool union of the boxes at resolution `out_hw`: pixel (x, y) is inside when its
    centre, mapped back to the original image, lies in [x0, x1) × [y0, y1); a box too small to
    hold a pixel centre keeps the pixel that holds its own centre."""
    (h0, w0), (h, w) = orig_hw, out_hw
    cy = (torch.arange(h, dtype=torch.float64) + 0.5) * (h0 / h)
    cx = (torch.arange(w, dtype=torch.float64) + 0.5) * (w0 / w)
    mask = torch.zeros(h, w, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        rows = (cy >= y0) & (cy < y1)
        cols = (cx >= x0) & (cx < x1)
        if not rows.any():
            rows[min(h - 1, int((y0 + y1) / 2 * h / h0))] = True
        if not cols.any():
            cols[min(w - 1, int((x0 + x1) / 2 * w / w0))] = True
        mask |= rows[:, None] & cols[None, :]
    return mask


def detector_scores(maps: torch.Tensor, masks: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: argmax inside a box (bool), covered share, share of the map's mass inside."""
    flat, inside = maps.flatten(1).double(), masks.flatten(1)
    hit = inside.gather(1, flat.argmax(1, keepdim=True)).squeeze(1)  # first maximum
    cover = inside.double().mean(1)
    total = flat.sum(1)
    energy = torch.where(total > 0, (flat * inside).sum(1) / total.clamp(min=1e-300), cover)
    return hit, cover, energy


# ---------------------------------------------------------------------- pass over the images


def _read(path: Path) -> np.ndarray:
    return np.asarray(load_rgb(path))


def _pair_indices(n_images: int, cfg: AuditConfig) -> list[torch.Tensor]:
    """Image indices of the mixing batches: a seeded shuffle, repeated when N exceeds the
    images, cut into batches (N rounded up to whole batches)."""
    if cfg.pairs < 2 or cfg.batch_size < 2:
        raise UserError("--pairs and --batch-size must be at least 2")
    bsz = min(cfg.batch_size, cfg.pairs)
    total = math.ceil(cfg.pairs / bsz) * bsz
    order = torch.randperm(n_images, generator=torch.Generator().manual_seed(cfg.seed))
    order = order.repeat(math.ceil(total / n_images))[:total]
    return list(order.split(bsz))


@dataclasses.dataclass
class Resized:
    """An image kept for mixing: its size × size uint8 pixels, object mask and boxes there."""

    pixels: torch.Tensor  # [3,S,S] uint8
    mask: torch.Tensor  # [S,S] bool
    boxes: list[Box]  # scaled to S × S, for drawing


def scan_images(images: list[AuditImage], detectors: Sequence[str], keep: set[int], size: int,
                progress: bool) -> tuple[dict[str, dict[str, float]], dict[int, Resized]]:
    """One pass: every detector on every image at its own resolution (images of one size are
    batched), and the images in `keep` resized to size × size with their object masks."""
    from pretrain.saliency import get_detector

    fns = {d: get_detector(d) for d in detectors}
    sums = {d: torch.zeros(3, dtype=torch.float64) for d in detectors}
    kept: dict[int, Resized] = {}
    buckets: dict[tuple[int, int], list[tuple[np.ndarray, torch.Tensor]]] = {}

    def flush(key: tuple[int, int]) -> None:
        batch = buckets.pop(key)
        pixels = torch.from_numpy(np.stack([a for a, _ in batch])).permute(0, 3, 1, 2)
        obj = torch.stack([m for _, m in batch])
        for name, fn in fns.items():
            hit, cover, energy = detector_scores(fn(pixels), obj)
            sums[name] += torch.stack([hit.double().sum(), cover.sum(), energy.sum()])

    for i, im in enumerate(tqdm(images, desc="audit: images", unit="img", disable=not progress)):
        arr = _read(im.path)
        hw = arr.shape[:2]
        check_inside(im.path, im.boxes, hw[1], hw[0])
        if fns and min(hw) < 3:  # the detectors' least size (`pretrain.saliency`)
            raise UserError(f"{im.path}: the image is {hw[1]}x{hw[0]}; the saliency "
                            "detectors need at least 3x3")
        buckets.setdefault(hw, []).append((arr, object_mask(im.boxes, hw, hw)))
        if len(buckets[hw]) >= 16:
            flush(hw)
        if i in keep:
            kept[i] = _resize(arr, im.boxes, size)
    for key in list(buckets):
        flush(key)
    n = len(images)
    stats = {d: {"hit_rate": float(s[0] / n), "chance": float(s[1] / n),
                 "energy_in_box": float(s[2] / n), "images": n} for d, s in sums.items()}
    return stats, kept


def _resize(arr: np.ndarray, boxes: Sequence[Box], size: int) -> Resized:
    from PIL import Image

    h0, w0 = arr.shape[:2]
    small = np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR))
    sx, sy = size / w0, size / h0
    return Resized(torch.from_numpy(small.copy()).permute(2, 0, 1),
                   object_mask(boxes, (h0, w0), (size, size)),
                   [(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in boxes])


# ------------------------------------------------------------------------------ the mixers


def pixel_weights(params: Any, bsz: int, size: int) -> tuple[torch.Tensor, torch.Tensor,
                                                               torch.Tensor]:
    """(M, W_b, perm) from a mixer's `MixParams`: M [B,S,S] the weight of each target pixel in
    the mixed image, W_b [B,S,S] the weight with which each pixel of the source reaches it,
    perm the source of each target. Reads the documented fields: `mask` (pixel-wise mixing),
    `boxes`/`dst_boxes` (cut-paste; no `perm` = a hole, as Cutout), `lam` (global mixing)."""
    from pretrain.mixers.boxes import box_mask

    ones = torch.ones(bsz, size, size, dtype=torch.float64)
    perm = params.perm if params.perm is not None else torch.arange(bsz)
    if not params.active:
        return ones, torch.zeros_like(ones), torch.arange(bsz)
    if params.mask is not None:
        m = params.mask[:, 0].double().cpu()
        return m, 1 - m, perm.cpu()
    if params.boxes is not None:
        dst = params.boxes if params.dst_boxes is None else params.dst_boxes
        m = 1 - box_mask(dst.cpu(), size, size, "cpu")[:, 0].double()
        wb = box_mask(params.boxes.cpu(), size, size, "cpu")[:, 0].double()
        return m, (wb if params.perm is not None else torch.zeros_like(ones)), perm.cpu()
    if params.lam is not None:
        m = params.lam.double().cpu().view(-1, 1, 1) * ones
        return m, 1 - m, perm.cpu()
    raise ValueError("mixer params carry neither a mask, boxes nor λ")


def pair_scores(m: torch.Tensor, wb: torch.Tensor, lam: torch.Tensor, obj_a: torch.Tensor,
                obj_b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per pair: O_a, O_b, the label-evidence gap and the two failure flags (float64)."""
    oa_, ob_ = obj_a.double(), obj_b.double()
    o_a = (m * oa_).sum((1, 2)) / oa_.sum((1, 2))
    o_b = (wb * ob_).sum((1, 2)) / ob_.sum((1, 2))
    lam = lam.double()
    both = o_a + o_b
    share_b = torch.where(both > 0, o_b / both.clamp(min=1e-300), torch.zeros_like(both))
    gap = torch.where(both > 0, ((1 - lam) - share_b).abs(), torch.zeros_like(both))
    return {"target_object_visible": o_a, "source_object_visible": o_b,
            "label_evidence_gap": gap,
            "empty_source_rate": ((1 - lam >= 0.1) & (o_b < 0.1)).double(),
            "erased_target_rate": ((lam >= 0.1) & (o_a < 0.1)).double(),
            "mean_lambda": lam}


@dataclasses.dataclass
class Example:
    """What the figure of one method shows for one pair."""

    image: np.ndarray  # HWC uint8, the mixed image
    boxes_a: list[Box]
    boxes_b: list[Box]  # where b's boxes land in the mixed image
    region: tuple[str, Any]  # ("box", (y0, x0, y1, x1)) | ("mask", M) | ("none", None)
    scores: dict[str, float]


def audit_method(mixer: Any, batches: list[torch.Tensor], kept: dict[int, Resized], seed: int,
                 n_examples: int, progress: bool) -> tuple[dict[str, float], list[Example]]:
    """Run the mixer's own sample/apply on every batch; mean scores and the first examples."""
    from pretrain.mixers import MixContext

    gen = torch.Generator().manual_seed(seed)
    ctx = MixContext(mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=1)
    scores: dict[str, list[torch.Tensor]] = {}
    examples: list[Example] = []
    title = mixer.describe()["title"]
    per_batch = max(1, math.ceil(n_examples / len(batches)))  # examples spread over batches
    for idx in tqdm(batches, desc=f"audit: {title}", unit="batch", disable=not progress,
                    leave=False):
        x = normalize(torch.stack([kept[int(i)].pixels for i in idx]).float() / 255,
                      IMAGENET_MEAN, IMAGENET_STD)
        labels = torch.arange(len(idx))
        params = mixer.sample(x, labels, gen, ctx)
        out = mixer.apply(x, labels, params)
        size = x.shape[-1]
        m, wb, perm = pixel_weights(params, len(idx), size)
        obj = torch.stack([kept[int(i)].mask for i in idx])
        per = pair_scores(m, wb, out.lam.cpu(), obj, obj[perm])
        for k, v in per.items():
            scores.setdefault(k, []).append(v)
        if len(examples) < n_examples:
            examples += _examples(out.images, idx, params, m, perm, per, kept,
                                  min(per_batch, n_examples - len(examples)))
    means = {k: float(torch.cat(v).mean()) for k, v in scores.items()}
    means["pairs"] = int(sum(len(b) for b in batches))
    return means, examples


def _examples(mixed: torch.Tensor, idx: torch.Tensor, params: Any, m: torch.Tensor,
              perm: torch.Tensor, per: dict[str, torch.Tensor], kept: dict[int, Resized],
              count: int) -> list[Example]:
    pixels = denormalize(mixed[:count].detach().float().cpu(), IMAGENET_MEAN, IMAGENET_STD, 255)
    pixels = pixels.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    out = []
    for j in range(min(count, len(idx))):
        shift = (0.0, 0.0)
        region: tuple[str, Any] = ("none", None)
        if params.active and params.mask is not None:
            region = ("mask", m[j].numpy())
        elif params.active and params.boxes is not None:
            dst = params.boxes if params.dst_boxes is None else params.dst_boxes
            region = ("box", tuple(int(v) for v in dst[j]))
            shift = (float(dst[j][1] - params.boxes[j][1]), float(dst[j][0] - params.boxes[j][0]))
        a, b = int(idx[j]), int(idx[int(perm[j])])
        moved = [(x0 + shift[0], y0 + shift[1], x1 + shift[0], y1 + shift[1])
                 for x0, y0, x1, y1 in kept[b].boxes]
        has_source = params.active and params.perm is not None
        out.append(Example(pixels[j], kept[a].boxes, moved if has_source else [], region,
                           {k: float(v[j]) for k, v in per.items()}))
    return out


# -------------------------------------------------------------------------------- outputs


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _num(v: float | None, spec: str) -> str:
    """`v` formatted, or "–" where the record lacks it (the report's policy)."""
    return "–" if v is None else format(v, spec)


def audit_tables(results: dict[str, Any], source: str = "") -> list[Table]:
    """The detector and mixer tables of one audit's results (used by `smix report` too)."""
    where = f" — {source}" if source else ""
    det_rows = [[name, _num(d.get("images"), ""), _pct(d.get("hit_rate")),
                 _pct(d.get("chance")),
                 _num(None if d.get("hit_rate") is None or d.get("chance") is None
                      else 100 * (d["hit_rate"] - d["chance"]), "+.1f"),
                 _pct(d.get("energy_in_box"))]
                for name, d in results.get("detectors", {}).items()]
    mix_rows = [[_num(m.get("title"), ""), _num(m.get("pairs"), ""),
                 _num(m.get("mean_lambda"), ".3f"), _pct(m.get("target_object_visible")),
                 _pct(m.get("source_object_visible")), _num(m.get("label_evidence_gap"), ".3f"),
                 _pct(m.get("empty_source_rate")), _pct(m.get("erased_target_rate"))]
                for m in results.get("methods", [])]
    data = f"{results.get('dataset', '?')}, {results.get('images', '?')} images"
    tables = []
    if det_rows:
        tables.append(Table(
            f"Audit: saliency detectors (%){where}",
            ["detector", "images", "hit rate", "chance", "hit − chance (pp)", "energy in box"],
            det_rows, f"{data}. Hit rate: the map's argmax lies in a ground-truth box; chance: "
            "the boxes' mean share of the image (a random point's hit rate); energy in box: the "
            "map's mass inside the boxes. A detector below chance points at background."))
    if mix_rows:
        tables.append(Table(
            f"Audit: mixing methods{where}",
            ["method", "pairs", "mean λ", "target object visible O_a (%)",
             "source object visible O_b (%)", "label-evidence gap", "empty source (%)",
             "erased target (%)"], mix_rows,
            f"{data}, resized to {results.get('size', '?')} px, batches of "
            f"{results.get('batch_size', '?')}. O = share of an image's object pixels that reach "
            "the mixed image; gap = |(1−λ) − O_b/(O_a+O_b)|, how far the label's share for the "
            "source is from the share of object evidence it contributes (0 for mixup); empty "
            "source: 1−λ ≥ 0.1 but O_b < 0.1; erased target: λ ≥ 0.1 but O_a < 0.1."))
    return tables


def plot_summary(results: dict[str, Any], path: Path) -> Path | None:
    """Bar charts: detectors' hit rate against chance; mixers' O_a, O_b and gap."""
    dets, methods = results.get("detectors", {}), results.get("methods", [])
    if not dets and not methods:
        return None
    from smix.report import _figure, _save_png

    plt = _figure()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 2]})
    names = list(dets)
    xs = np.arange(len(names))
    a1.bar(xs - 0.2, [_bar(dets[n], "hit_rate") for n in names], 0.4, label="hit rate")
    a1.bar(xs + 0.2, [_bar(dets[n], "chance") for n in names], 0.4, label="chance")
    a1.set_xticks(xs, names, rotation=20, fontsize=8)
    a1.set(ylabel="%", title="Detectors: argmax inside a box")
    titles = [_num(m.get("title"), "") for m in methods]
    xs = np.arange(len(titles))
    for k, (key, label) in enumerate((("target_object_visible", "O_a target visible"),
                                      ("source_object_visible", "O_b source visible"),
                                      ("label_evidence_gap", "label-evidence gap"))):
        a2.bar(xs + (k - 1) * 0.27, [_bar(m, key) for m in methods], 0.27, label=label + " (%)")
    a2.set_xticks(xs, titles, rotation=20, fontsize=7, ha="right")
    a2.set(title="Mixers: object evidence vs label")
    for a in (a1, a2):
        a.grid(alpha=0.3, axis="y")
        a.legend(fontsize=7)
    _save_png(fig, path)
    plt.close(fig)
    return path


def _bar(record: dict[str, Any], key: str) -> float:
    """A bar's height in %; NaN (no bar) where the record lacks the value."""
    v = record.get(key)
    return math.nan if v is None else 100 * v


def plot_examples(title: str, examples: list[Example], path: Path) -> Path:
    """Mixed images with a's boxes (green), b's boxes where they land (red) and the pasted
    region (yellow dashed box, or the M = ½ contour for pixel-wise masks)."""
    from matplotlib.patches import Rectangle

    from smix.report import _figure, _save_png

    plt = _figure()
    cols = max(1, min(4, len(examples)))
    rows = max(1, math.ceil(len(examples) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, ex in zip(axes.flat, examples):
        ax.imshow(ex.image)
        for boxes, colour in ((ex.boxes_a, "lime"), (ex.boxes_b, "red")):
            for x0, y0, x1, y1 in boxes:
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                       edgecolor=colour, linewidth=1.6))
        kind, region = ex.region
        if kind == "box":
            y0, x0, y1, x1 = region
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                   edgecolor="yellow", linewidth=1.5, linestyle="--"))
        elif kind == "mask" and region.min() < 0.5 < region.max():
            ax.contour(region, levels=[0.5], colors="yellow", linewidths=1.0, linestyles="--")
        s = ex.scores
        ax.set_title(f"λ={s['mean_lambda']:.2f} O_a={s['target_object_visible']:.2f}\n"
                     f"O_b={s['source_object_visible']:.2f} gap={s['label_evidence_gap']:.2f}",
                     fontsize=7)
    fig.suptitle(f"{title}: boxes of target a (green), of source b (red), pasted region "
                 "(yellow)",
                 fontsize=9)
    _save_png(fig, path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------- the run


def resolve_methods(cfg: AuditConfig) -> list[Any]:
    """The mixers to audit, built through the registry (unknown names and parameters are
    user errors listing the valid ones); one whose `sample` needs a model is refused."""
    from pretrain.mixers import get_mixer, list_mixers

    specs = cfg.methods or tuple((name, {}) for name in list_mixers())
    mixers = [get_mixer(name, **params) for name, params in specs]
    for mixer in mixers:
        if getattr(mixer, "needs_model", False):
            raise UserError(f"method {mixer.describe()['title']} needs the model being trained; "
                            "the audit runs without one")
    return mixers


def resolve_detectors(cfg: AuditConfig) -> list[str]:
    from pretrain.saliency import get_detector, list_detectors

    names = cfg.detectors or tuple(d for d in list_detectors()
                                   if not getattr(get_detector(d), "needs_model", False))
    for d in names:
        if getattr(get_detector(d), "needs_model", False):
            raise UserError(f"detector {d!r} needs a model; the audit runs image detectors only")
    return list(names)


def run_audit(cfg: AuditConfig) -> dict[str, Any]:
    """Audit detectors and mixers on the data; write metrics.json, tables and figures.

    Runs on `cfg.threads` intra-op threads (default 1): the work is many short passes per
    image, and on a busy 2-core machine two threads wait on each other (measured: reading and
    masking 200 images took 7.8 s on two threads against 0.47 s on one)."""
    if cfg.size < 8 or cfg.threads < 1 or cfg.examples < 0:
        raise UserError("--size must be at least 8, --threads at least 1, --examples at least 0")
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(before)


def _run(cfg: AuditConfig) -> dict[str, Any]:
    mixers, detectors = resolve_methods(cfg), resolve_detectors(cfg)
    images, source = load_images(cfg)
    batches = _pair_indices(len(images), cfg)  # refuses bad --pairs before the folder is touched
    run = RunDir(cfg.out).claim("audit", "audit")
    run.write_config(dataclasses.asdict(cfg))
    t0 = time.perf_counter()
    keep = {int(i) for b in batches for i in b}
    det_stats, kept = scan_images(images, detectors, keep, cfg.size, cfg.progress)
    results: dict[str, Any] = {
        "dataset": source, "images": len(images), "size": cfg.size,
        "batch_size": len(batches[0]), "seed": cfg.seed, "detectors": det_stats, "methods": []}
    for mixer in mixers:
        means, examples = audit_method(mixer, batches, kept, cfg.seed, cfg.examples,
                                       cfg.progress)
        desc = mixer.describe()
        fig = plot_examples(desc["title"], examples, run.file(f"examples_{_slug(desc['title'])}.png"))
        results["methods"].append({"title": desc["title"], "method": desc, **means,
                                   "figure": fig.name})
    results["seconds"] = round(time.perf_counter() - t0, 2)
    _write_outputs(run, results, cfg)
    return results


def _slug(title: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in title).strip("_")


def _write_outputs(run: RunDir, results: dict[str, Any], cfg: AuditConfig) -> None:
    tables = audit_tables(results)
    plot = plot_summary(results, run.file("audit_summary.png"))
    md = ["# Audit", ""] + [t.markdown() for t in tables]
    if plot is not None:
        md.append(f"![audit summary]({plot.name})\n")
    md += [f"![{m['title']}]({m['figure']})\n" for m in results["methods"]]
    atomic_write(run.file("audit.md"), "\n".join(md))
    for t, name in zip(tables, ("audit_detectors.csv", "audit_methods.csv")):
        atomic_write(run.file(name), t.csv())
    run.write_metrics(stage="audit", kind="audit", results=results,
                      config=dataclasses.asdict(cfg),
                      definitions={**DETECTOR_METRICS, **METHOD_METRICS})


# ------------------------------------------------------------------------------------ CLI


def parse_methods(text: str | None, overrides: dict[str, str]) -> tuple[tuple[str, dict], ...]:
    """`--methods cutmix,saliencymix:detector=frequency_tuned` plus `NAME.param=value`
    overrides (applied to every entry of that mixer)."""
    from pretrain.mixers import list_mixers

    entries = []
    for item in (text.split(",") if text else list_mixers()):
        name, *kv = item.strip().split(":")
        params: dict[str, str] = {}
        for pair in kv:
            if "=" in pair:
                k, v = pair.split("=", 1)
                params[k] = v
            elif params:  # part of a value holding ':' (detector=network:PATH)
                params[k] += ":" + pair
            else:
                raise UserError(f"--methods: expected name:key=value, got {item!r}")
        entries.append((name, params))
    names = {n for n, _ in entries}
    for key, value in overrides.items():
        name, _, param = key.partition(".")
        if not param or name not in names:
            raise UserError(f"override {key}={value}: expected METHOD.param=value with METHOD "
                            f"one of {', '.join(sorted(names))}")
        for n, params in entries:
            if n == name:
                params.setdefault(param, value)
    return tuple(entries)


def main(argv: list[str]) -> int:
    from smix.cli import ArgParser, parse_overrides

    p = ArgParser(prog="smix audit", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="VOC devkit root, or class folders (with --boxes)")
    p.add_argument("--boxes", type=Path, help="boxes file (JSON lines or CSV, see smix.boxes)")
    p.add_argument("--split", default="test", help="VOC split (default test)")
    p.add_argument("--year", default="2007")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--methods", help="comma list, NAME or NAME:key=value:… (default: every mixer)")
    p.add_argument("--detectors", help="comma list (default: every image detector)")
    p.add_argument("--size", type=int, default=224, help="side S the mixers see (default 224)")
    p.add_argument("--pairs", type=int, default=1024, help="pairs N per method (default 1024)")
    p.add_argument("--batch-size", type=int, default=64, help="images per mixing batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--examples", type=int, default=8, help="mixed examples per figure")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="METHOD.param=value")
    a = p.parse_args(argv)
    cfg = AuditConfig(
        out=a.out, data=a.data, boxes_file=a.boxes, split=a.split, year=a.year,
        methods=parse_methods(a.methods, parse_overrides(a.overrides)),
        detectors=tuple(d.strip() for d in a.detectors.split(",")) if a.detectors else (),
        size=a.size, pairs=a.pairs, batch_size=a.batch_size, seed=a.seed,
        examples=a.examples, threads=a.threads, progress=not a.no_progress)
    res = run_audit(cfg)
    for t in audit_tables(res):
        print(t.markdown())
    print(f"audit: {a.out / 'metrics.json'} ({res['seconds']:.0f} s)")
    return 0
