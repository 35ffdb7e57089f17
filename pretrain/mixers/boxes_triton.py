"""The box mixers' per-step arithmetic as Triton kernels (imported only where Triton is;
`pretrain.mixers.boxes` launches them on CUDA once they reproduce its tensor ops there).

* `point_boxes`: from the flat argmax/argmin of each source (and destination) map and the box
  sides, the clipped source box, the destination box and the actual λ -- one launch for what
  the tensor ops do in about 25 kernels on [B] tensors.
* `paste`: every pixel of the batch from its own image, or, inside its destination box, from
  its source image's box -- one launch for the mask, the batch gather and the select.

Integer arithmetic on non-negative values (truncating and flooring division agree there) and
one IEEE float64 division (Triton's float64 `/` is `div.rn.f64`; only its float32 one is
approximate) rounded once to float32, as the tensor ops do: the
same values bit for bit. Under TRITON_INTERPRET=1 (set before Triton is imported) Triton's
interpreter runs them on CPU tensors, which is how the CPU tests check them.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _clip(v, lo, hi):
    return tl.minimum(tl.maximum(v, lo), hi)


@triton.jit
def point_boxes(src_idx_ptr, dst_idx_ptr, sides_ptr, sides_row, src_ptr, dst_ptr, lam_ptr,
                n, height, width, HAS_DST: tl.constexpr, BLOCK: tl.constexpr):
    """src_idx [n] i64: flat index of each source map's point; sides [2,n] i64 (heights, then
    widths `sides_row` elements further); writes src [n,4] i64 (y0, x0, y1, x1: centred on
    the point, clipped, `boxes_from_centres`), lam [n] f32 (1 - area / (H*W)) and, with
    HAS_DST, dst [n,4] i64: the same size centred on dst_idx's point and shifted inside the
    image (`place_like`)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = i < n
    point = tl.load(src_idx_ptr + i, mask=live, other=0)
    half_h = tl.load(sides_ptr + i, mask=live, other=0) // 2
    half_w = tl.load(sides_ptr + sides_row + i, mask=live, other=0) // 2
    cy = point // width
    cx = point % width
    y0 = _clip(cy - half_h, 0, height)
    y1 = _clip(cy + half_h, 0, height)
    x0 = _clip(cx - half_w, 0, width)
    x1 = _clip(cx + half_w, 0, width)
    out = src_ptr + 4 * i
    tl.store(out, y0, mask=live)
    tl.store(out + 1, x0, mask=live)
    tl.store(out + 2, y1, mask=live)
    tl.store(out + 3, x1, mask=live)
    sh = y1 - y0  # >= 0: the sides are >= 0
    sw = x1 - x0
    area = (sh * sw).to(tl.float64)
    lam = 1.0 - area / (height * width).to(tl.float64)  # float64 `/` is IEEE (div.rn.f64)
    tl.store(lam_ptr + i, lam.to(tl.float32), mask=live)
    if HAS_DST:
        target = tl.load(dst_idx_ptr + i, mask=live, other=0)
        ty0 = tl.minimum(tl.maximum(target // width - sh // 2, 0), height - sh)
        tx0 = tl.minimum(tl.maximum(target % width - sw // 2, 0), width - sw)
        out = dst_ptr + 4 * i
        tl.store(out, ty0, mask=live)
        tl.store(out + 1, tx0, mask=live)
        tl.store(out + 2, ty0 + sh, mask=live)
        tl.store(out + 3, tx0 + sw, mask=live)


@triton.jit
def _digits(idx, n0, n1, n2):
    """`idx` in mixed radix, n0 varying fastest, then n1, then n2: its four digits."""
    rest = idx // n0
    rest2 = rest // n1
    return idx % n0, rest % n1, rest2 % n2, rest2 // n2


@triton.jit
def paste(images_ptr, out_ptr, perm_ptr, src_ptr, dst_ptr, box_row, total, channels, height,
          width, s_b, s_c, s_y, s_x, CHANNELS_LAST: tl.constexpr, HAS_DST: tl.constexpr,
          BLOCK: tl.constexpr):
    """out[b] = images[b], except inside dst box b (src's when not HAS_DST), which comes from
    images[perm[b]] at the same offset inside src box b (clamped to the image, as `paste`).
    images and out share their strides (in elements), walked in memory order: NCHW, or NHWC
    with CHANNELS_LAST. Boxes [B,4] i64
    with row stride `box_row` (0: one box for the batch)."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = idx < total
    if CHANNELS_LAST:
        c, x, y, b = _digits(idx, channels, width, height)
    else:
        x, y, c, b = _digits(idx, width, height, channels)
    src = src_ptr + b * box_row
    sy0 = tl.load(src, mask=live, other=0)
    sx0 = tl.load(src + 1, mask=live, other=0)
    if HAS_DST:
        dst = dst_ptr + b * box_row
        dy0 = tl.load(dst, mask=live, other=0)
        dx0 = tl.load(dst + 1, mask=live, other=0)
        dy1 = tl.load(dst + 2, mask=live, other=0)
        dx1 = tl.load(dst + 3, mask=live, other=0)
    else:
        dy0 = sy0
        dx0 = sx0
        dy1 = tl.load(src + 2, mask=live, other=0)
        dx1 = tl.load(src + 3, mask=live, other=0)
    inside = (y >= dy0) & (y < dy1) & (x >= dx0) & (x < dx1)
    here = b * s_b + c * s_c + y * s_y + x * s_x
    own = tl.load(images_ptr + here, mask=live & ~inside)
    source = tl.load(perm_ptr + b, mask=live & inside, other=0)
    # clamped as the tensor ops' gather is (a no-op for boxes of equal size: never out of bounds)
    sy = _clip(y + (sy0 - dy0), 0, height - 1)
    sx = _clip(x + (sx0 - dx0), 0, width - 1)
    moved = tl.load(images_ptr + source * s_b + c * s_c + sy * s_y + sx * s_x,
                    mask=live & inside)
    tl.store(out_ptr + here, tl.where(inside, moved, own), mask=live)
