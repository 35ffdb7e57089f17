"""The fine-grained detector's two elementwise stages as Triton kernels (imported only where
Triton is; `pretrain.saliency` launches them on CUDA once they reproduce its tensor ops there).

* `on_off_sums`: per pixel and for every scale, the truncated centre-surround difference from
  four corners of the integral image, summed into the on and off maps -- one pass, where the
  tensor ops make about eight full passes per scale.
* `scale_and_mix`: OpenCV's `mixScales` + `mixOnOff` of the on/off sums given their per-image
  maxima -- one pass for what the tensor ops do in about fifteen.

Both do the tensor ops' float32 arithmetic in the same order: integer values below 2^24 (exact
in float32, whatever the order or fusion of adds and multiplies) and IEEE-rounded divisions
(`tl.div_rn`: Triton's `/` is an approximate division). Under TRITON_INTERPRET=1 (set before
Triton is imported) Triton's interpreter runs them on CPU tensors, which is how the CPU tests
check them.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def on_off_sums(gray_ptr, integral_ptr, area_ptr, scales_ptr, sums_ptr, total, off_plane,
                height, width, integral_h, integral_w, pad_y, pad_x,
                N_SCALES: tl.constexpr, BLOCK: tl.constexpr):
    """gray [B,H,W] f32, integral [B,IH,IW] f32 (padded as `_fill_integral` writes it), area
    [S,H,W] f32, scales [S,3] i32 (half-heights, half-widths, multiplicity); writes sums
    (on at `sums`, off `off_plane` elements further; each [B,H,W]). `total` = B*H*W."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = idx < total
    plane = height * width
    b = idx // plane
    rem = idx % plane
    y = rem // width
    x = rem % width
    g = tl.load(gray_ptr + idx, mask=live, other=0.0)
    base = integral_ptr + b * (integral_h * integral_w)
    on = tl.zeros([BLOCK], dtype=tl.float32)
    signed = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(N_SCALES):  # unrolled: at most six distinct scales
        ny = tl.load(scales_ptr + 3 * i)
        nx = tl.load(scales_ptr + 3 * i + 1)
        count = tl.load(scales_ptr + 3 * i + 2).to(tl.float32)
        area = tl.load(area_ptr + i * plane + rem, mask=live, other=2.0)
        row_lo = (pad_y - ny + y) * integral_w
        row_hi = (pad_y + ny + y) * integral_w
        col_lo = pad_x - nx + x
        col_hi = pad_x + nx + x
        # cols(r) = I[r, col_lo] - I[r, col_hi]; t = cols(row_hi) - cols(row_lo)
        hi = (tl.load(base + row_hi + col_lo, mask=live, other=0.0)
              - tl.load(base + row_hi + col_hi, mask=live, other=0.0))
        lo = (tl.load(base + row_lo + col_lo, mask=live, other=0.0)
              - tl.load(base + row_lo + col_hi, mask=live, other=0.0))
        t = (hi - lo) + g * area
        q = tl.div_rn(t, area - 1.0)
        t = tl.where(q < 0.0, tl.ceil(q), tl.floor(q)) * count  # trunc, times multiplicity
        signed += t
        on += tl.maximum(t, 0.0)
    tl.store(sums_ptr + idx, on, mask=live)
    tl.store(sums_ptr + off_plane + idx, on - signed, mask=live)


@triton.jit
def _to_255(s, peak):
    """(uchar)(255. * (float)(s / (float)peak)) exactly, as `_scale_to_255` computes it."""
    q = tl.div_rn(s, peak)
    q256 = q * 256.0
    k = tl.floor(q256 - q)
    return k - tl.where(q - (q256 - k) > 0.0, 1.0, 0.0)


@triton.jit
def scale_and_mix(sums_ptr, peaks_ptr, out_ptr, total, off_plane, plane,
                  SATURATE: tl.constexpr, BLOCK: tl.constexpr):
    """sums as `on_off_sums` writes them, peaks [2,B] f32 (per-image maxima of on and off, at
    least 1); writes out [B,H,W] f32 in [0,1] as `_mix_on_off`."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = idx < total
    b = idx // plane
    images = total // plane
    on = _to_255(tl.load(sums_ptr + idx, mask=live, other=0.0),
                 tl.load(peaks_ptr + b, mask=live, other=1.0))
    off = _to_255(tl.load(sums_ptr + off_plane + idx, mask=live, other=0.0),
                  tl.load(peaks_ptr + images + b, mask=live, other=1.0))
    mixed = on + off
    if SATURATE:
        mixed = tl.minimum(mixed, 255.0)
    else:
        mixed = mixed - 256.0 * tl.minimum(tl.maximum(mixed - 255.0, 0.0), 1.0)
    tl.store(out_ptr + idx, mixed * (1.0 / 255.0), mask=live)
