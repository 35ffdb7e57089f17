"""The greedy walk of `pretrain.greedy` as one Triton kernel (imported only where Triton is).

`greedy_cycle` launches it on CUDA; the tensor-op walk stays the reference (CPU, and CUDA
with SMIX_TRITON=0). Under TRITON_INTERPRET=1 (set before Triton is imported) Triton's
interpreter runs it on CPU tensors, which is how the CPU tests check it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def walk(d_ptr, start_ptr, perm_ptr, n, BLOCK: tl.constexpr):
    """`d` [n,n] float64 with a -inf diagonal, `start` [1] the flat argmax of d, BLOCK a power
    of two >= n; writes perm[i] = the image after i on the cycle (one program).

    The visited images live in registers as a mask over the columns; each step loads the
    current image's row with them masked to -inf and takes its first maximum, as the tensor-op
    walk does with its -inf columns: n dependent row loads (L2-resident) in one launch, where
    the tensor ops launch 3n kernels."""
    offs = tl.arange(0, BLOCK)
    start = tl.load(start_ptr)
    first = start // n
    col = start % n
    tl.store(perm_ptr + first, col)
    visited = (offs == first) | (offs == col) | (offs >= n)
    for _ in range(2, n):
        row = tl.load(d_ptr + col * n + offs, mask=~visited, other=float("-inf"))
        nxt = tl.argmax(row, 0, tie_break_left=True).to(tl.int64)
        tl.store(perm_ptr + col, nxt)
        visited = visited | (offs == nxt)
        col = nxt
    tl.store(perm_ptr + col, first)
