"""Greedy pairing (GuidedMixup, Kang & Kim 2023, Algorithm 1) and GuidedMixup's map preparation.

Greedy pairing puts images whose salient regions overlap least together: with
D_ij = ||S_i - S_j||_2 over the blurred, sum-to-one saliency maps (diagonal -inf so an image
never pairs with itself), it starts at the pair argmax D, walks from the current image to the
farthest image not yet visited, and finally closes the cycle. The result is one cycle over the
batch, so every image is mixed in exactly once as a source and receives exactly one source.

Registered as pairing ``greedy`` so mixup, cutmix and saliencymix can use it too
(GuidedMixup §5.6); without maps from the mixer it computes spectral-residual maps of the
de-normalised batch, as Guided-SR does. Unlike the official CIFAR/Tiny-ImageNet code (which
asks for ``greedy_c`` and silently falls back to a random permutation), this really pairs
greedily when asked.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from smix.devices import CheckedKernels, GraphCache, constant, on_device_of
from pretrain.pairing import register_pairing

GREEDY_DETECTOR = "spectral_residual"


@functools.lru_cache(maxsize=8)
def gaussian_kernel1d(size: int, sigma: float) -> torch.Tensor:
    """The 1-D kernel torchvision's `gaussian_blur` uses (samples of exp(-x²/2σ²), sum 1)."""
    half = (size - 1) * 0.5
    x = torch.linspace(-half, half, size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return pdf / pdf.sum()


def gaussian_blur_maps(maps: torch.Tensor, size: int = 7, sigma: float = 3.0) -> torch.Tensor:
    """Separable Gaussian blur of [B,H,W] maps with reflect padding, as torchvision's
    `gaussian_blur(maps, (size, size), (sigma, sigma))` in the official GuidedMixup code."""
    if size <= 1:
        return maps
    k = constant(tuple(gaussian_kernel1d(size, float(sigma)).tolist()), maps.dtype, maps.device)
    pad = size // 2
    h, w = maps.shape[-2:]
    mode = "reflect" if min(h, w) > pad else "replicate"  # reflect needs pad < size
    x = F.pad(maps.unsqueeze(1), (pad, pad, pad, pad), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return F.conv2d(x, k.view(1, 1, -1, 1)).squeeze(1)


def guided_maps(raw: torch.Tensor, size: int = 7, sigma: float = 3.0) -> torch.Tensor:
    """GuidedMixup's saliency preparation: blur, then S <- S / sum(S) per image.

    A map with no mass (a flat image, or NaN from a detector) becomes uniform, so the mixing
    ratio S_a / (S_a + S_b) stays defined (the official code would produce NaN there)."""
    s = torch.nan_to_num(raw.detach().float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_(min=0)
    s = gaussian_blur_maps(s, size, sigma)
    total = s.sum((1, 2), keepdim=True)
    uniform = torch.full_like(s, 1.0 / (s.shape[1] * s.shape[2]))
    return torch.where(total > 0, s / total.clamp(min=torch.finfo(s.dtype).tiny), uniform)


def pairwise_distances(maps: torch.Tensor) -> torch.Tensor:
    """D_ij = ||S_i - S_j||_2 over flattened maps (exact difference form, no matmul trick)."""
    flat = maps.flatten(1).double()
    return torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist")


def greedy_cycle(dist: torch.Tensor, use_kernel: bool | None = None) -> torch.Tensor:
    """Algorithm 1 on a distance matrix: `perm[i]` is the source mixed into target i.

    Runs on the matrix's device without the host waiting for it. With `use_kernel` (default:
    on CUDA) the walk is one Triton kernel (`WALK`, where Triton is). Otherwise tensor
    ops whose indices stay tensors: per step, -inf into the column of the current image (now
    taken as a source; `first` only closes the cycle, so its column is closed from the start),
    then the argmax of its row -- three small kernels, 3n launches in all; the path becomes
    `perm` in one scatter at the end. Ties go to the lowest index as numpy's argmax in the
    official `onecycle_cover` (torch's argmax and the kernel's both return the first maximum)."""
    n = dist.shape[0]
    if n < 2:
        return torch.arange(n, device=dist.device)
    d = dist.detach().to(torch.float64).clone()
    d.fill_diagonal_(float("-inf"))
    start = torch.argmax(d).view(1)
    if use_kernel is None:
        use_kernel = d.is_cuda
    # a failed launch (no compiler for Triton's launcher, an old Triton): tensor ops for good
    return WALK.run(WALK.get(d.device) if use_kernel else None,
                    lambda kernel: _launch(kernel, d, start), lambda: _tensor_walk(d, start))


def _launch(kernel, d: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """perm from the kernel (`pretrain.greedy_triton.walk`), on `d`'s device."""
    n = d.shape[0]
    perm = torch.empty(n, dtype=torch.long, device=d.device)
    with on_device_of(d):
        kernel[(1,)](d, start, perm, n, BLOCK=1 << (n - 1).bit_length(), enable_fp_fusion=False)
    return perm


def _tensor_walk(d: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """The walk in tensor ops on `d` (-inf diagonal, modified in place) from its flat argmax."""
    n = d.shape[0]
    first, col = torch.div(start, n, rounding_mode="floor"), start % n
    d.index_fill_(1, first, float("-inf"))
    path = [first, col]
    for _ in range(n - 2):
        d.index_fill_(1, col, float("-inf"))
        col = torch.argmax(d.index_select(0, col), dim=1)
        path.append(col)
    order = torch.cat(path)  # the cycle: order[k] receives order[k + 1], the last `first`
    return torch.empty_like(order).index_copy_(0, order, order.roll(-1))


def _load_walk():
    from pretrain.greedy_triton import walk
    return walk


def _check_walk(kernel, device: torch.device) -> str | None:
    """Why the kernel cannot be trusted on `device` (None: it can): its cycles against the
    tensor-op walk's on the same device, for quantised maps (many tied distances) of 2, 3, 37
    and 130 images, where the lowest-index tie rule decides most steps."""
    g = torch.Generator().manual_seed(20231)
    for n in (2, 3, 37, 130):
        maps = (torch.rand(n, 4, 4, generator=g) * 2).round().to(device)
        d = pairwise_distances(maps)
        d.fill_diagonal_(float("-inf"))
        start = torch.argmax(d).view(1)
        if not torch.equal(_launch(kernel, d, start), _tensor_walk(d.clone(), start)):
            return f"its cycle for {n} images differs from the tensor-op walk's"
    return None


# the walk as one Triton kernel where Triton is (SMIX_TRITON=0: tensor ops on CUDA too)
WALK = CheckedKernels("greedy pairing", _load_walk, _check_walk)


@torch.no_grad()
def greedy_from_maps(maps: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 on maps [B,H,W]: distances, then the walk. On CUDA one graph replay per
    (shape, dtype, device) (`GraphCache`: the walk is n small steps, each a few kernel
    launches); elsewhere eager. Deterministic, so a replay is the eager result."""
    return _GREEDY_GRAPHS(maps)


def _greedy_from_maps(maps: torch.Tensor) -> torch.Tensor:
    return greedy_cycle(pairwise_distances(maps))


_GREEDY_GRAPHS = GraphCache(_greedy_from_maps, "greedy pairing")


def saliency_for_pairing(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Guided-SR maps of a normalised batch: spectral residual of the 0..255 image, prepared."""
    from pretrain.saliency import normalized_saliency
    return guided_maps(normalized_saliency(GREEDY_DETECTOR, images, mean, std))


@register_pairing("greedy")
def greedy_pairing(batch_size: int, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu", *, images: torch.Tensor | None = None,
                   ctx=None, maps: torch.Tensor | None = None, **_: object) -> torch.Tensor:
    """Greedy one-cycle pairing of a batch, from `maps` if the mixer has them, otherwise from
    Guided-SR maps of `images` (needs `ctx` for the normalisation). Draws no randomness."""
    if maps is None:
        if images is None or ctx is None:
            raise ValueError("greedy pairing needs saliency maps or the images and their "
                             "MixContext")
        maps = saliency_for_pairing(images, ctx.mean, ctx.std)
    if maps.shape[0] != batch_size:
        raise ValueError(f"greedy pairing: {maps.shape[0]} maps for a batch of {batch_size}")
    return greedy_from_maps(maps).to(device)
