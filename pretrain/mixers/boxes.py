"""Box arithmetic shared by the cut-and-paste mixers, vectorised over the batch.

Boxes are int64 [B,4] as (y0, x0, y1, x1), half-open, in pixels of the batch's images.
"""

from __future__ import annotations

import torch

from smix.devices import device_cache, upload


def boxes_from_centres(cy: torch.Tensor, cx: torch.Tensor, cut_h: torch.Tensor,
                       cut_w: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boxes centred on (cy, cx) with sides cut_h × cut_w, clipped to the image as the
    official CutMix/SaliencyMix `rand_bbox`/`saliency_bbox` do (`np.clip(c ± cut // 2, 0, S)`)."""
    y0 = (cy - torch.div(cut_h, 2, rounding_mode="floor")).clamp(0, height)
    y1 = (cy + torch.div(cut_h, 2, rounding_mode="floor")).clamp(0, height)
    x0 = (cx - torch.div(cut_w, 2, rounding_mode="floor")).clamp(0, width)
    x1 = (cx + torch.div(cut_w, 2, rounding_mode="floor")).clamp(0, width)
    return torch.stack([y0, x0, y1, x1], dim=1).long()


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return ((boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0))


@device_cache(maxsize=16)
def _grid(length: int, device: torch.device) -> torch.Tensor:
    """0..length-1 on the device, made there once (no upload)."""
    return torch.arange(length, device=device)


def box_mask(boxes: torch.Tensor, height: int, width: int, device: torch.device | str
             ) -> torch.Tensor:
    """[B,1,H,W] bool mask, True inside each sample's box.

    Both axes in one broadcast compare against one cached coordinate grid ([B,2,L]: rows of y,
    rows of x), then one outer AND: four small kernels on a GPU, where comparing each axis
    against fresh aranges took nine."""
    b = upload(boxes, device).reshape(-1, 2, 2, 1)  # [[y0, x0], [y1, x1]] per sample
    t = _grid(max(height, width), torch.device(device))
    axes = (t >= b[:, 0]) & (t < b[:, 1])
    return (axes[:, 0, :height, None] & axes[:, 1, None, :width]).unsqueeze(1)


def paste(target: torch.Tensor, source: torch.Tensor, src_boxes: torch.Tensor,
          dst_boxes: torch.Tensor | None = None) -> torch.Tensor:
    """Copy source[i] inside src_boxes[i] into target[i] at dst_boxes[i] (same size boxes).

    One gather over the batch: every target pixel inside its destination box reads the source
    pixel at the same offset inside the source box. Inputs are not modified. Boxes may live on
    the host or on the device; nothing here reads a device value on the host.
    """
    bsz, _, height, width = target.shape
    dst = src_boxes if dst_boxes is None else dst_boxes
    inside = box_mask(dst, height, width, target.device)
    if dst_boxes is None or dst_boxes is src_boxes:  # (equal values give the same result below)
        return torch.where(inside, source, target)
    shift = upload(src_boxes[:, :2] - dst[:, :2], target.device)
    shift_y, shift_x = shift[:, 0].view(bsz, 1, 1), shift[:, 1].view(bsz, 1, 1)
    t = _grid(max(height, width), target.device)
    ys = (t[:height].view(1, height, 1) + shift_y).clamp(0, height - 1)
    xs = (t[:width].view(1, 1, width) + shift_x).clamp(0, width - 1)
    flat = (ys * width + xs).view(bsz, 1, height * width).expand(-1, source.shape[1], -1)
    moved = source.flatten(2).gather(2, flat).view_as(source)
    return torch.where(inside, moved, target)


def paste_permuted(images: torch.Tensor, perm: torch.Tensor, src_boxes: torch.Tensor,
                   dst_boxes: torch.Tensor | None = None) -> torch.Tensor:
    """`paste(images, images[perm], src_boxes, dst_boxes)`, with a shortcut for the batch-wide
    box drawn on the host (CutMix, official SaliencyMix): its corners are host integers, so
    the patch is copied with slices — three kernels, no mask, no upload — where the general
    path needs the boxes on the device, a mask and a gather of the whole batch."""
    one_box = src_boxes.device.type == "cpu" and (len(src_boxes) == 1 or src_boxes.stride(0) == 0)
    if dst_boxes is not None or not one_box:
        return paste(images, images[perm], src_boxes, dst_boxes)
    y0, x0, y1, x1 = (int(v) for v in src_boxes[0].tolist())
    out = images.clone()
    if y1 > y0 and x1 > x0:
        # index_select: the same gather as `[perm]`, at half its host cost per call on CUDA
        out[:, :, y0:y1, x0:x1] = images[:, :, y0:y1, x0:x1].index_select(0, perm)
    return out
