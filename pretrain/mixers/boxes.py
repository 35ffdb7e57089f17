"""Box arithmetic shared by the cut-and-paste mixers, vectorised over the batch.

Boxes are int64 [B,4] as (y0, x0, y1, x1), half-open, in pixels of the batch's images.
On CUDA, boxes from map points and the paste of per-sample boxes are Triton kernels
(`BOX_KERNELS`, `pretrain.mixers.boxes_triton`) where they reproduce the tensor ops there.
"""

from __future__ import annotations

import itertools

import torch

from smix.devices import CheckedKernels, device_cache, on_device_of, upload


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


def place_like(src: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, height: int,
               width: int) -> torch.Tensor:
    """Boxes of the same size as `src`, centred on (cy, cx) (top-left = point - size // 2) and
    shifted to lie inside the image."""
    sh, sw = src[:, 2] - src[:, 0], src[:, 3] - src[:, 1]
    y0 = torch.minimum((cy - torch.div(sh, 2, rounding_mode="floor")).clamp(min=0), height - sh)
    x0 = torch.minimum((cx - torch.div(sw, 2, rounding_mode="floor")).clamp(min=0), width - sw)
    return torch.stack([y0, x0, y0 + sh, x0 + sw], dim=1)


def boxes_at_points(src_idx: torch.Tensor, dst_idx: torch.Tensor | None, sides: torch.Tensor,
                    height: int, width: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source boxes, destination boxes and actual λ (float32) of N boxes: sides `sides` [2,N]
    (heights, widths), each source box centred on its map point `src_idx` (flat indices into
    H*W) and clipped (`boxes_from_centres`); the destination box has its size, centred on
    `dst_idx`'s point and shifted inside (`place_like`), or is the source box (None).
    On CUDA one Triton launch (`BOX_KERNELS`) where the tensor ops take about 25."""
    return BOX_KERNELS.run(
        _kernels_for(src_idx, sides),
        lambda kernels: _boxes_at_points_kernel(kernels, src_idx, dst_idx, sides, height, width),
        lambda: _boxes_at_points_ops(src_idx, dst_idx, sides, height, width))


def _boxes_at_points_ops(src_idx, dst_idx, sides, height, width):
    cy, cx = torch.div(src_idx, width, rounding_mode="floor"), src_idx % width
    src = boxes_from_centres(cy, cx, sides[0], sides[1], height, width)
    dst = src
    if dst_idx is not None:
        ty, tx = torch.div(dst_idx, width, rounding_mode="floor"), dst_idx % width
        dst = place_like(src, ty, tx, height, width)
    return src, dst, (1.0 - box_area(src).double() / (height * width)).float()


def _boxes_at_points_kernel(kernels, src_idx, dst_idx, sides, height, width):
    n = len(src_idx)
    src_idx, sides = src_idx.long().contiguous(), sides.long().contiguous()
    src = src_idx.new_empty((n, 4))
    dst = src if dst_idx is None else src_idx.new_empty((n, 4))
    lam = torch.empty(n, dtype=torch.float32, device=src_idx.device)
    idx = src_idx if dst_idx is None else dst_idx.long().contiguous()
    with on_device_of(src_idx):
        kernels.point_boxes[(-(-n // _POINT_BLOCK),)](
            src_idx, idx, sides, sides.stride(0), src, dst, lam, n, height, width,
            HAS_DST=dst_idx is not None, BLOCK=_POINT_BLOCK, enable_fp_fusion=False)
    return src, dst, lam


_POINT_BLOCK = 128
_PASTE_BLOCK = 1024


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
        kernels = _kernels_for(images, perm, src_boxes, dst_boxes)
        return BOX_KERNELS.run(
            kernels if _paste_fits(images, src_boxes, dst_boxes) else None,
            lambda kernels: _paste_kernel(kernels, images, perm, src_boxes, dst_boxes),
            lambda: paste(images, images[perm], src_boxes, dst_boxes))
    return paste_box(images, perm, *(int(v) for v in src_boxes[0].tolist()))


def paste_box(images: torch.Tensor, perm: torch.Tensor, y0: int, x0: int, y1: int, x1: int
              ) -> torch.Tensor:
    """`paste_permuted` of one box for the whole batch, given as host integers: the patch
    copied with slices (a clone, a gather, a copy)."""
    out = images.clone()
    if y1 > y0 and x1 > x0:
        # index_select: the same gather as `[perm]`, at half its host cost per call on CUDA
        out[:, :, y0:y1, x0:x1] = images[:, :, y0:y1, x0:x1].index_select(0, perm)
    return out


def _paste_fits(images: torch.Tensor, src_boxes: torch.Tensor,
                dst_boxes: torch.Tensor | None) -> bool:
    """Whether the paste kernel takes this call: a layout it walks, one box per image or one
    for the batch, and no gradient wanted (the kernel's output has none)."""
    return (_paste_layout(images) is not None
            and all(b is None or len(b) in (1, len(images)) for b in (src_boxes, dst_boxes))
            and not (images.requires_grad and torch.is_grad_enabled()))


def _paste_layout(images: torch.Tensor) -> bool | None:
    """Whether the paste kernel walks `images` channels last (False: NCHW; None: neither
    layout, or too large for its int32 pixel indices: tensor ops)."""
    if images.numel() >= 2**31:
        return None
    if images.is_contiguous():
        return False
    return True if images.is_contiguous(memory_format=torch.channels_last) else None


def _paste_kernel(kernels, images, perm, src_boxes, dst_boxes):
    """`paste(images, images[perm], src_boxes, dst_boxes)` in one launch of `paste`."""
    bsz, channels, height, width = images.shape
    out = torch.empty_like(images)  # the same strides: dense layouts are preserved
    has_dst = dst_boxes is not None and dst_boxes is not src_boxes
    # one box for the batch ([1,4]) read with row stride 0, as `paste` broadcasts it
    boxes = [_device_boxes(b, images.device).expand(bsz, 4)
             for b in (src_boxes, dst_boxes if has_dst else src_boxes)]
    if boxes[0].stride(0) != boxes[1].stride(0):  # one row stride for both
        boxes = [b.contiguous() for b in boxes]
    total = images.numel()
    with on_device_of(images):
        kernels.paste[(-(-total // _PASTE_BLOCK),)](
            images, out, upload(perm, images.device).long(), boxes[0], boxes[1],
            boxes[0].stride(0), total, channels, height, width, *images.stride(),
            CHANNELS_LAST=_paste_layout(images), HAS_DST=has_dst, BLOCK=_PASTE_BLOCK,
            enable_fp_fusion=False)
    return out


def _device_boxes(boxes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """int64 boxes on the device with unit column stride (a row stride of 0, one box for the
    batch, is kept)."""
    boxes = upload(boxes, device).long()
    return boxes if boxes.stride(1) == 1 else boxes.contiguous()


def _kernels_for(*tensors: torch.Tensor | None):
    """The box kernels where every tensor given is on one CUDA device and they passed their
    check there; else None (tensor ops)."""
    first = tensors[0]
    if not first.is_cuda or any(t is not None and t.device != first.device
                                for t in tensors[1:]):
        return None
    return BOX_KERNELS.get(first.device)


def _load_box_kernels():
    from pretrain.mixers import boxes_triton
    return boxes_triton


def _check_box_kernels(kernels, device: torch.device) -> str | None:
    """Why the box kernels cannot be trusted on `device` (None: they can): both against the
    tensor ops there, bit for bit. Points: 1, 7 and 300 boxes (over two programs) on 32x32,
    13x29 and 224x224, with and without destinations; sides from 0 to the whole image, points
    in corners. Paste: per-sample boxes with and without destinations, one box for the batch
    (row stride 0) alone, with one destination for the batch (mode batch's call) and with
    per-sample destinations, a [1,4] box, empty boxes; float32, bfloat16 and float16, NCHW
    and channels last, on 13x29 and 32x32 images (whose strides Triton specialises as
    multiples of 16)."""
    g = torch.Generator().manual_seed(20241)
    for n, h, w in ((1, 32, 32), (7, 13, 29), (300, 224, 224)):
        idx = torch.randint(0, h * w, (2, n), generator=g)
        idx[:, 0] = 0
        idx[:, -1] = h * w - 1
        sides = torch.stack([torch.randint(0, h + 1, (n,), generator=g),
                             torch.randint(0, w + 1, (n,), generator=g)])
        sides[:, 0] = torch.tensor([h, w])
        sides[:, -1] = 0
        idx, sides = idx.to(device), sides.to(device)
        for dst_idx in (None, idx[1]):
            want = _boxes_at_points_ops(idx[0], dst_idx, sides, h, w)
            got = _boxes_at_points_kernel(kernels, idx[0], dst_idx, sides, h, w)
            if not all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got, want)):
                return (f"its boxes of {n} points on {h}x{w} "
                        f"({'with' if dst_idx is not None else 'without'} destinations) "
                        "differ from the tensor ops'")
            if n == 7:
                boxes = got
    src, dst = boxes[0], boxes[1]  # 7 boxes fitting 13x29, and so 32x32 too
    one = src[3:4].expand(7, 4)
    points = torch.arange(7, device=device)
    one_dst = place_like(one, points + 3, points * 4, 13, 29)
    pairs = ((src, None), (src, dst), (one, None), (one, one_dst[5:6].expand(7, 4)),
             (one, one_dst), (src[3:4], None))
    for (h, w), dtype, channels_last in itertools.product(
            ((13, 29), (32, 32)), (torch.float32, torch.bfloat16, torch.float16), (False, True)):
        images = torch.randn(7, 3, h, w, generator=g).to(device, dtype)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        perm = torch.randperm(7, generator=g).to(device)
        for s, d in pairs:
            want = paste(images, images[perm], s, d)
            got = _paste_kernel(kernels, images, perm, s, d)
            if not torch.equal(got, want) or got.stride() != images.stride():
                return (f"its paste of {dtype} {'NHWC' if channels_last else 'NCHW'} "
                        f"images of {h}x{w} differs from the tensor ops'")
    return None


# boxes at map points and the per-sample paste as Triton kernels where Triton is
# (SMIX_TRITON=0: tensor ops)
BOX_KERNELS = CheckedKernels("mixer boxes", _load_box_kernels, _check_box_kernels)
