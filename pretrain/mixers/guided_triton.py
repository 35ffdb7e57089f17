"""GuidedMixup's mask and pixel-wise blend as one Triton kernel (imported only where Triton is;
`pretrain.mixers.guidedmixup` launches it on CUDA once it reproduces its tensor ops there).

* `mask_and_blend`: per pixel of each target image, the mixing ratio M = S_a / (S_a + S_b)
  from its own map and its source's (1/2 where both are 0), written out as the [B,1,H,W] mask,
  and every channel's M·x_a + (1-M)·x_b -- one launch for what the tensor ops do in about a
  dozen kernels (the map and image gathers, the ratio, the 0/0 select, the blend).

The same float32 operations in the same order: the sum, an IEEE division (`tl.div_rn`; Triton's
float32 `/` is approximate), each product and sum rounded on its own (launched without FMA
contraction); for float16 and bfloat16 images M is rounded to their dtype first and every
result of the blend rounded to it, as torch computes each of its ops in float32 and rounds.
Under TRITON_INTERPRET=1 (set before Triton is imported) Triton's interpreter runs it on CPU
tensors, which is how the CPU tests check it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rounded(x, KIND: tl.constexpr):
    """float32 `x` rounded to nearest even in the images' dtype (KIND 0: float32, 1: float16,
    2: bfloat16), widened back; NaN stays NaN. bfloat16 rounds on the bits: the interpreter's
    own cast to it truncates (the GPU's rounds to nearest even), so the CPU tests would check
    another kernel."""
    if KIND == 2:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        # NaN stays NaN: a GPU's NaN (0x7FFFFFFF) would carry into the sign bit and become -0
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    elif KIND == 1:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def mask_and_blend(maps_ptr, perm_ptr, images_ptr, mask_ptr, out_ptr, total, pixels, width,
                   channels, s_b, s_c, s_y, s_x, tiny, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """maps [B,H,W] f32 contiguous (`pixels` = H*W each), perm [B] i64; images and out
    [B,C,H,W] of dtype KIND (`_rounded`) with strides (s_b, s_c, s_y, s_x) in elements; writes
    mask [B,1,H,W] f32 contiguous. One lane per (image, pixel), looping over the channels."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = idx < total
    b = idx // pixels
    p = idx % pixels
    source = tl.load(perm_ptr + b, mask=live, other=0)
    s_a = tl.load(maps_ptr + idx, mask=live, other=0.0)
    s_o = tl.load(maps_ptr + source * pixels + p, mask=live, other=0.0)
    both = s_a + s_o
    m = tl.where(both > 0, tl.div_rn(s_a, tl.maximum(both, tiny)), 0.5)
    tl.store(mask_ptr + idx, m, mask=live)
    m_x = _rounded(m, KIND)  # `mask.to(images.dtype)`
    rest = _rounded(1.0 - m_x, KIND)
    yx = (p // width) * s_y + (p % width) * s_x
    here = b * s_b + yx
    there = source * s_b + yx
    for c in range(channels):
        x_a = tl.load(images_ptr + here + c * s_c, mask=live, other=0.0).to(tl.float32)
        x_b = tl.load(images_ptr + there + c * s_c, mask=live, other=0.0).to(tl.float32)
        mixed = _rounded(_rounded(m_x * x_a, KIND) + _rounded(rest * x_b, KIND), KIND)
        # exact: the value is one of the dtype's
        tl.store(out_ptr + here + c * s_c, mixed.to(out_ptr.dtype.element_ty), mask=live)
