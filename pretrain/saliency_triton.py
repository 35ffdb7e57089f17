"""The detectors' per-pixel stages as Triton kernels (imported only where Triton is;
`pretrain.saliency` launches them on CUDA once they reproduce its tensor ops there).

Fine-grained (SaliencyMix's detector):
* `blur3`: OpenCV's 3x3 Gaussian blur of uint8 (BORDER_REFLECT_101), of a gray plane, or of
  float RGB pixels quantised to OpenCV's uint8 grid and converted to gray on the fly (BGR2GRAY),
  optionally de-normalised first -- two launches for the gray plane blurred twice, where the
  tensor ops make about 24 (27 with the de-normalisation).
* `on_off_sums`: per pixel and for every scale, the truncated centre-surround difference from
  four corners of the integral image, summed into the on and off maps -- one pass, where the
  tensor ops make about eight full passes per scale. It clamps the corners itself, so the
  integral image is two cumsums (the tensor ops pad it, 4x the plane at 224x224, and copy
  edge replicas into the padding).
* `scale_and_mix`: OpenCV's `mixScales` + `mixOnOff` of the on/off sums given their per-image
  maxima -- one pass for what the tensor ops do in about fifteen.

Spectral residual (Guided-SR's):
* `gray_resize`: its input, OpenCV's uint8 gray plane resized to 64x64 with INTER_LINEAR_EXACT,
  from (optionally normalised) RGB pixels -- one pass for about 22 (the FFTs and the rest stay
  tensor ops: their float results depend on each library's order of operations).

All do the tensor ops' float32 arithmetic in the same order: integer values below 2^24 (exact
in float32, whatever the order or fusion of adds and multiplies), IEEE-rounded divisions
(`tl.div_rn`: Triton's `/` is an approximate division), and the de-normalisation's multiply
and add rounded one by one (every launch turns FMA contraction off). Under TRITON_INTERPRET=1
(set before Triton is imported) Triton's interpreter runs them on CPU tensors, which is how
the CPU tests check them.
"""

from __future__ import annotations

import triton
import triton.language as tl


_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: (v + M) - M rounds |v| <= 2^22, half to even


@triton.jit
def _pixels(total, height, width, BLOCK: tl.constexpr):
    """This program's BLOCK pixels of a [B,H,W] batch of `total` pixels: flat index, whether
    it is live, image, index in the image, row, column."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    plane = height * width
    rem = idx % plane
    return idx, idx < total, idx // plane, rem, rem // width, rem % width


@triton.jit
def _reflect(i, n):
    """BORDER_REFLECT_101 of an index at most one step outside [0, n) (n >= 2)."""
    i = tl.where(i < 0, -i, i)
    return tl.where(i >= n, 2 * n - 2 - i, i)


@triton.jit
def _uint8_grid(v):
    """`_as_uint8_grid`: round half to even, clamp to [0, 255], NaN kept. Clamping to [-1, 256]
    first changes no result and keeps the rounding trick's operand small."""
    v = tl.minimum(tl.maximum(v, -1.0, propagate_nan=tl.PropagateNan.ALL), 256.0,
                   propagate_nan=tl.PropagateNan.ALL)
    v = (v + _MAGIC) - _MAGIC
    return tl.minimum(tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL), 255.0,
                      propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _channel(at, live, c, affine_ptr, NORMALIZED: tl.constexpr):
    """Channel `c`'s value at `at` in float32 (a float16/bfloat16 load widens exactly), with
    NORMALIZED de-normalised as `smix.data.denormalize(x, mean, std, 255)` computes it: x * std
    + mean, then * 255, each rounded (the launch turns FMA contraction off)."""
    v = tl.load(at, mask=live, other=0.0).to(tl.float32)
    if NORMALIZED:
        v = (v * tl.load(affine_ptr + c) + tl.load(affine_ptr + 3 + c)) * 255.0
    return v


@triton.jit
def _level(src_ptr, y, x, s_c, s_y, s_x, live, affine_ptr, FROM_RGB: tl.constexpr,
           NORMALIZED: tl.constexpr):
    """The level the blur reads at (y, x) of the image at `src_ptr` (per-lane pointers): the
    gray plane's value, or `_gray_u8(_as_uint8_grid(rgb))` (integers < 2^24: exact)."""
    at = src_ptr + y * s_y + x * s_x
    if FROM_RGB:
        r = _uint8_grid(_channel(at, live, 0, affine_ptr, NORMALIZED))
        g = _uint8_grid(_channel(at + s_c, live, 1, affine_ptr, NORMALIZED))
        b = _uint8_grid(_channel(at + 2 * s_c, live, 2, affine_ptr, NORMALIZED))
        return tl.floor((r * 9798.0 + g * 19235.0 + b * 3735.0 + 16384.0) * (1.0 / 32768.0))
    else:
        return tl.load(at, mask=live, other=0.0)


@triton.jit
def _row3(src_ptr, y, x, xl, xr, s_c, s_y, s_x, live, affine_ptr, FROM_RGB: tl.constexpr,
          NORMALIZED: tl.constexpr):
    """[1, 2, 1] across row y at column x (xl, xr: its reflected neighbours)."""
    return ((_level(src_ptr, y, xl, s_c, s_y, s_x, live, affine_ptr, FROM_RGB, NORMALIZED)
             + _level(src_ptr, y, xr, s_c, s_y, s_x, live, affine_ptr, FROM_RGB, NORMALIZED))
            + 2.0 * _level(src_ptr, y, x, s_c, s_y, s_x, live, affine_ptr, FROM_RGB,
                           NORMALIZED))


@triton.jit
def blur3(src_ptr, out_ptr, affine_ptr, total, height, width, s_b, s_c, s_y, s_x,
          FROM_RGB: tl.constexpr, NORMALIZED: tl.constexpr, BLOCK: tl.constexpr):
    """`_gaussian3_u8` of src into out [B,H,W] f32 (contiguous); src is the gray plane
    [B,H,W] or, with FROM_RGB, RGB pixels [B,3,H,W] (float32/16, bfloat16; any strides, in
    elements; channel 0 red), quantised and made gray per tap; with NORMALIZED too, normalised
    images de-normalised first by affine [2,3] f32 (std, then mean). `total` = B*H*W;
    H, W >= 2. Every level is an integer below 2^24, so the float32 sums are exact in any
    order."""
    idx, live, b, rem, y, x = _pixels(total, height, width, BLOCK)
    src = src_ptr + b * s_b
    xl = _reflect(x - 1, width)
    xr = _reflect(x + 1, width)
    up = _row3(src, _reflect(y - 1, height), x, xl, xr, s_c, s_y, s_x, live, affine_ptr,
               FROM_RGB, NORMALIZED)
    down = _row3(src, _reflect(y + 1, height), x, xl, xr, s_c, s_y, s_x, live, affine_ptr,
                 FROM_RGB, NORMALIZED)
    mid = _row3(src, y, x, xl, xr, s_c, s_y, s_x, live, affine_ptr, FROM_RGB, NORMALIZED)
    s = (up + down) + 2.0 * mid
    tl.store(out_ptr + idx, tl.floor((s + 8.0) * (1.0 / 16.0)), mask=live)


@triton.jit
def gray_resize(src_ptr, out_ptr, affine_ptr, y0_ptr, y1_ptr, wy_ptr, x0_ptr, x1_ptr, wx_ptr,
                total, size_h, size_w, s_b, s_c, s_y, s_x, NORMALIZED: tl.constexpr,
                BLOCK: tl.constexpr):
    """`_resize_u8_exact(_gray_u8(_as_uint8_grid(rgb)), size_h, size_w)` into out, written
    transposed ([B,size_w,size_h] f32, contiguous: the layout `_resize_u8_exact` returns, so
    the FFTs get the same strides): the spectral residual's input, from RGB pixels as
    `blur3` reads them (de-normalised with NORMALIZED), made gray at the four source taps of
    each output pixel. Taps: source rows/columns y0/y1, x0/x1 (int64) and the second tap's
    weight in 1/256 (wy, wx: f32) per output row/column. Rows first, then columns, one
    rounding at the end, as OpenCV's fixed point: every value is an integer below 2^24."""
    idx, live, b, rem, oy, ox = _pixels(total, size_h, size_w, BLOCK)
    src = src_ptr + b * s_b
    ya = tl.load(y0_ptr + oy, mask=live, other=0)
    yb = tl.load(y1_ptr + oy, mask=live, other=0)
    xa = tl.load(x0_ptr + ox, mask=live, other=0)
    xb = tl.load(x1_ptr + ox, mask=live, other=0)
    wy = tl.load(wy_ptr + oy, mask=live, other=0.0)
    wx = tl.load(wx_ptr + ox, mask=live, other=0.0)
    col_a = (_level(src, ya, xa, s_c, s_y, s_x, live, affine_ptr, True, NORMALIZED)
             * (256.0 - wy)
             + _level(src, yb, xa, s_c, s_y, s_x, live, affine_ptr, True, NORMALIZED) * wy)
    col_b = (_level(src, ya, xb, s_c, s_y, s_x, live, affine_ptr, True, NORMALIZED)
             * (256.0 - wy)
             + _level(src, yb, xb, s_c, s_y, s_x, live, affine_ptr, True, NORMALIZED) * wy)
    v = col_a * (256.0 - wx) + col_b * wx
    tl.store(out_ptr + b * (size_h * size_w) + ox * size_h + oy,
             tl.floor((v + 32768.0) * (1.0 / 65536.0)), mask=live)


@triton.jit
def _corner(base, y, x, height, width, live):
    """The padded integral image `_fill_integral` writes, read from the plain one (inclusive
    sums, [H,W]): 0 above or left of the image, the last row or column below or right."""
    inside = live & (y >= 0) & (x >= 0)
    return tl.load(base + tl.minimum(y, height - 1) * width + tl.minimum(x, width - 1),
                   mask=inside, other=0.0)


@triton.jit
def on_off_sums(gray_ptr, integral_ptr, area_ptr, scales_ptr, sums_ptr, total, off_plane,
                height, width, N_SCALES: tl.constexpr, BLOCK: tl.constexpr):
    """gray [B,H,W] f32, integral [B,H,W] f32 (its inclusive 2-D prefix sums), area [S,H,W]
    f32, scales [S,3] i32 (half-heights, half-widths, multiplicity); writes sums (on at
    `sums`, off `off_plane` elements further; each [B,H,W]). `total` = B*H*W."""
    idx, live, b, rem, y, x = _pixels(total, height, width, BLOCK)
    plane = height * width
    g = tl.load(gray_ptr + idx, mask=live, other=0.0)
    base = integral_ptr + b * plane
    on = tl.zeros([BLOCK], dtype=tl.float32)
    signed = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(N_SCALES):  # unrolled: at most six distinct scales
        ny = tl.load(scales_ptr + 3 * i)
        nx = tl.load(scales_ptr + 3 * i + 1)
        count = tl.load(scales_ptr + 3 * i + 2).to(tl.float32)
        area = tl.load(area_ptr + i * plane + rem, mask=live, other=2.0)
        # cols(r) = I[r, x - nx] - I[r, x + nx]; t = cols(y + ny) - cols(y - ny)
        hi = (_corner(base, y + ny, x - nx, height, width, live)
              - _corner(base, y + ny, x + nx, height, width, live))
        lo = (_corner(base, y - ny, x - nx, height, width, live)
              - _corner(base, y - ny, x + nx, height, width, live))
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
