"""GuidedMixup (Kang & Kim, AAAI 2023): pixel-wise mixing with saliency-derived ratios.

Per image a saliency map S (``saliency=sr``: spectral residual of the de-normalised 0..255
image, Guided-SR; ``saliency=ap``: sqrt(mean_c (dCE/dx)^2) from one extra forward+backward of
the model being trained, Guided-AP), Gaussian blur 7×7 σ=3, S <- S / ΣS. Pairs by greedy
pairing (Algorithm 1, `pretrain.greedy`) or a random permutation. Mask M = S_a / (S_a + S_b)
(0/0 -> 1/2), x = M·x_a + (1-M)·x_b, per-sample λ_a = mean(M), soft label
λ_a·y_a + (1-λ_a)·y_b (expressed as the engine's λ·CE(y_a) + (1-λ)·CE(y_b)).

Differences from the official code (3neutronstar/GuidedMixup), on purpose:
* greedy pairing runs when asked (the CIFAR/Tiny path requests ``greedy_c``, which its
  `pairing()` does not know, and silently gets a random permutation); `info["pairing"]` and
  the checkpoint metadata say which pairing ran;
* greedy pairing covers the whole batch in one cycle (the FGVC code may split it into
  ``m_part`` chunks for multiprocessing);
* Guided-SR uses the OpenCV-parity spectral residual on 0..255 pixels, once blurred (the official
  CIFAR code uses its own FFT version on the normalised tensor at up to 128², with an inner
  7×7 blur before the mixing blur);
* a map with no mass becomes uniform and 0/0 mixing ratios become 1/2 instead of NaN.
The official code has no λ-balancing term and mixes with probability ``mix_prob``; so does this.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import torch

from smix.devices import CheckedKernels, GraphCache, on_device_of
from smix.errors import UserError
from pretrain.greedy import guided_maps
from pretrain.mixers.base import MixContext, Mixer, MixOutput, MixParams, bernoulli, register_mixer
from pretrain.pairing import get_pairing

SALIENCY = {"sr": "spectral_residual", "ap": "gradient"}


def mixing_mask(maps: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """M = S_a / (S_a + S_b) per pixel, [B,1,H,W]; 1/2 where both maps are 0."""
    s_a, s_b = maps, maps[perm]
    total = s_a + s_b
    m = torch.where(total > 0, s_a / total.clamp(min=torch.finfo(total.dtype).tiny),
                    torch.full_like(total, 0.5))
    return m.unsqueeze(1)


def _sr_pairs(images: torch.Tensor, perm: torch.Tensor | None, pairing: str, mean: tuple,
              std: tuple, blur: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Guided-SR's prepared maps (spectral residual of the de-normalised batch, blurred,
    normalised) and the permutation: greedy (`perm` None: deterministic) or the drawn one."""
    from pretrain.saliency import normalized_saliency
    maps = guided_maps(normalized_saliency(SALIENCY["sr"], images, mean, std), blur, sigma)
    if perm is None:
        perm = get_pairing(pairing)(len(images), None, images.device, maps=maps)
    return maps, perm


@torch.no_grad()
def _sr_plan(images: torch.Tensor, perm: torch.Tensor | None = None, *, pairing: str,
             mean: tuple, std: tuple, blur: int, sigma: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Guided-SR's permutation, mask and λ (`_sr_pairs`, then `mixing_mask`). Device tensors
    in and out, nothing drawn: one CUDA graph per batch shape."""
    maps, perm = _sr_pairs(images, perm, pairing, mean, std, blur, sigma)
    mask = mixing_mask(maps, perm)
    return perm, mask, mask.mean((1, 2, 3))


_SR_GRAPHS = GraphCache(_sr_plan, "guidedmixup sr")


def blend(images: torch.Tensor, labels: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply`'s pixel-wise mix M·x_a + (1-M)·x_b, in the images' dtype, and the source labels."""
    return _blend_pixels(images, perm, mask), labels[perm]


def _blend_pixels(images: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(images.device, images.dtype)
    return m * images + (1 - m) * images[perm]


def mask_and_blend(images: torch.Tensor, maps: torch.Tensor, perm: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """`blend` of `mixing_mask(maps, perm)`: the mixed batch and the mask. On CUDA one Triton
    launch (`BLEND_KERNELS`) where the tensor ops take about a dozen."""
    return BLEND_KERNELS.run(
        _blend_kernels_for(images, maps, perm),
        lambda kernels: _mask_and_blend_kernel(kernels, images, maps, perm),
        lambda: _mask_and_blend_ops(images, maps, perm))


def _mask_and_blend_ops(images: torch.Tensor, maps: torch.Tensor, perm: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """`mask_and_blend` in tensor ops: the mask, then `apply`'s blend."""
    mask = mixing_mask(maps, perm)
    return _blend_pixels(images, perm, mask), mask


def _mask_and_blend_kernel(kernels, images: torch.Tensor, maps: torch.Tensor,
                           perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`mask_and_blend` in one launch of `pretrain.mixers.guided_triton.mask_and_blend`."""
    bsz, channels, height, width = images.shape
    mixed = torch.empty_like(images)  # the same strides: dense layouts are preserved
    mask = torch.empty((bsz, 1, height, width), dtype=torch.float32, device=images.device)
    total = bsz * height * width
    with on_device_of(images):  # no FMA: each product and sum rounds, as the tensor ops
        kernels.mask_and_blend[(-(-total // _BLEND_BLOCK),)](
            maps.contiguous(), perm.long().contiguous(), images, mask, mixed, total,
            height * width, width, channels, *images.stride(), torch.finfo(torch.float32).tiny,
            KIND=_KINDS[images.dtype], BLOCK=_BLEND_BLOCK, enable_fp_fusion=False)
    return mixed, mask


_BLEND_BLOCK = 512
_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the kernel's KIND


def _blend_kernels_for(images: torch.Tensor, maps: torch.Tensor, perm: torch.Tensor):
    """The kernel for this call: CUDA tensors on one device that it takes (`_blend_fits`), and
    a kernel that passed its check there; else None (tensor ops)."""
    if not (images.is_cuda and maps.device == perm.device == images.device
            and _blend_fits(images, maps)):
        return None
    return BLEND_KERNELS.get(images.device)


def _blend_fits(images: torch.Tensor, maps: torch.Tensor) -> bool:
    """Whether the kernel takes these tensors, on any device: float32 maps; float32, float16 or
    bfloat16 images in NCHW or channels last, whose offsets and lane indices fit in int32; no
    gradient wanted (the kernel's output has none)."""
    dense = images.is_contiguous() or images.is_contiguous(memory_format=torch.channels_last)
    return (dense and maps.dtype == torch.float32 and images.dtype in _KINDS
            and images.numel() + _BLEND_BLOCK < 2**31
            and not (images.requires_grad and torch.is_grad_enabled()))


def _load_blend_kernels():
    """The kernel module (an ImportError where Triton is not installed)."""
    from pretrain.mixers import guided_triton
    return guided_triton


def _check_blend_kernels(kernels, device: torch.device) -> str | None:
    """Why the blend kernel cannot be trusted on `device` (None: it can): mixed batch, its
    strides, and mask against the tensor ops there, bit for bit. Maps with zeros where both
    images of a pair have none (the 1/2 branch), subnormal and huge values, and whole images
    without mass; float32, float16 and bfloat16 in NCHW and channels last, on 13x29 and 32x32
    images (whose strides Triton specialises as multiples of 16), and one image of 1 channel;
    NaN and infinite pixels; one image paired with itself."""
    g = torch.Generator().manual_seed(20251)
    cases = [(size, 3, dtype, channels_last) for size, dtype, channels_last in itertools.product(
        ((13, 29), (32, 32)), (torch.float32, torch.float16, torch.bfloat16), (False, True))]
    for (h, w), c, dtype, channels_last in [*cases, ((13, 29), 1, torch.float32, False)]:
        maps = torch.rand(7, h, w, generator=g)
        maps[maps < 0.3] = 0.0
        maps[1] = 0.0
        maps[2, :3] = torch.finfo(torch.float32).tiny / 8  # subnormal
        maps[3, 1] = 3e38
        images = torch.randn(7, c, h, w, generator=g) * 3
        # NaN and infinities, also where M is 0 (image 1 has no mass): 0·inf is NaN
        images[0, 0, 0, :3] = images[1, 0, 2, :3] = torch.tensor([float("nan"), float("inf"),
                                                                  -float("inf")])
        images = images.to(dtype)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        perm = torch.randperm(7, generator=g)
        perm[6] = 6
        maps, images, perm = maps.to(device), images.to(device), perm.to(device)
        want = _mask_and_blend_ops(images, maps, perm)
        got = _mask_and_blend_kernel(kernels, images, maps, perm)
        if not all(_same(a, b) for a, b in zip(got, want)) or \
                got[0].stride() != want[0].stride():
            return (f"its blend of {dtype} {'NHWC' if channels_last else 'NCHW'} images of "
                    f"{c}x{h}x{w} differs from the tensor ops'")
    return None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where the other has NaN (any NaN: a GPU's is not the CPU's)."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


# the mask and blend as one Triton kernel where Triton is (SMIX_TRITON=0: tensor ops)
BLEND_KERNELS = CheckedKernels("guidedmixup blend", _load_blend_kernels, _check_blend_kernels)


@torch.no_grad()
def _sr_step(images: torch.Tensor, labels: torch.Tensor, perm: torch.Tensor | None = None,
             **opts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Guided-SR's whole step after the host draws, as `GuidedMixup.__call__` runs it:
    `_sr_plan`'s maps, pairing and mask, then `apply`'s blend, the same operations (so the
    same values), the mask and blend in one kernel on CUDA (`mask_and_blend`): the mixed batch,
    the source labels and λ. One CUDA graph per batch shape (`_SR_STEP_GRAPHS`)."""
    maps, perm = _sr_pairs(images, perm, **opts)
    mixed, mask = mask_and_blend(images, maps, perm)
    return mixed, labels[perm], mask.mean((1, 2, 3))


_SR_STEP_GRAPHS = GraphCache(_sr_step, "guidedmixup sr step")


@register_mixer("guidedmixup")
@dataclasses.dataclass
class GuidedMixup(Mixer):
    """GuidedMixup; `saliency` sr|ap, `pairing` greedy|random, `prob` the mixing probability,
    `blur`/`sigma` the Gaussian blur of the maps (7, 3.0 as the paper)."""

    saliency: str = "sr"
    pairing: str = "greedy"
    prob: float = 1.0
    blur: int = 7
    sigma: float = 3.0

    def validate(self) -> None:
        if self.saliency not in SALIENCY:
            raise UserError(f"guidedmixup: unknown saliency {self.saliency!r}; valid: "
                            f"{', '.join(SALIENCY)}")
        get_pairing(self.pairing)
        if (not 0 <= self.prob <= 1 or self.blur < 1 or self.blur % 2 == 0
                or not 0 < self.sigma < math.inf):  # NaN too
            raise UserError("guidedmixup: prob must be in [0, 1], blur an odd size >= 1, "
                            "sigma a finite number > 0")

    def min_image_side(self) -> int:
        return 1 if self.saliency == "ap" else 3  # gradients have no neighbourhood

    @property
    def needs_model(self) -> bool:
        """Whether `sample` needs the model being trained (`MixContext.model`): Guided-AP."""
        return self.saliency == "ap"

    def saliency_maps(self, images: torch.Tensor, labels: torch.Tensor,
                      ctx: MixContext) -> torch.Tensor:
        """Prepared maps [B,H,W] (blurred, each summing to one)."""
        from pretrain.saliency import gradient_saliency, normalized_saliency
        if self.saliency == "ap":
            if ctx.model is None:
                raise UserError("guidedmixup saliency=ap needs the model being trained "
                                "(MixContext.model)")
            raw = gradient_saliency(ctx.model, images, labels, chunk=ctx.micro_batch)
        else:
            raw = normalized_saliency(SALIENCY[self.saliency], images, ctx.mean, ctx.std)
        return guided_maps(raw, self.blur, self.sigma)

    def sample(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
               ctx: MixContext) -> MixParams:
        if not bernoulli(generator, self.prob):
            return MixParams(active=False, info=self._info())
        if self.saliency == "sr":  # a function of the images (and a drawn perm): one graph
            perm = None if self.pairing == "greedy" else get_pairing(self.pairing)(
                len(labels), generator, images.device, images=images, ctx=ctx, labels=labels)
            opts = self._sr_options(ctx)
            perm, mask, lam = _SR_GRAPHS(images, **opts) if perm is None else \
                _SR_GRAPHS(images, perm, **opts)
            return MixParams(active=True, perm=perm, lam=lam, mask=mask, info=self._info())
        maps = self.saliency_maps(images, labels, ctx)
        perm = get_pairing(self.pairing)(len(labels), generator, images.device, images=images,
                                         ctx=ctx, labels=labels, maps=maps)
        mask = mixing_mask(maps, perm)
        return MixParams(active=True, perm=perm, lam=mask.mean((1, 2, 3)), mask=mask,
                         info=self._info())

    def apply(self, images: torch.Tensor, labels: torch.Tensor, params: MixParams) -> MixOutput:
        if not params.active:
            return MixOutput(images, labels, None, torch.ones(len(labels), device=images.device))
        mixed, label_b = blend(images, labels, params.perm, params.mask)
        lam = params.mask.to(images.device).mean((1, 2, 3))
        return MixOutput(mixed, labels, label_b, lam)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                 ctx: MixContext) -> MixOutput:
        """`apply(sample(...))` with the same draws and values; for Guided-SR in one pass on
        the device: maps, pairing, mask, blend and label gather are one CUDA graph
        (`_sr_step`), where apply alone launched half a dozen more kernels after it."""
        if self.saliency != "sr":
            return super().__call__(images, labels, generator, ctx)
        if not bernoulli(generator, self.prob):
            return self.apply(images, labels, MixParams(active=False))
        opts = self._sr_options(ctx)
        if self.pairing == "greedy":
            mixed, label_b, lam = _SR_STEP_GRAPHS(images, labels, **opts)
        else:
            perm = get_pairing(self.pairing)(len(labels), generator, images.device,
                                             images=images, ctx=ctx, labels=labels)
            mixed, label_b, lam = _SR_STEP_GRAPHS(images, labels, perm, **opts)
        return MixOutput(mixed, labels, label_b, lam)

    def _sr_options(self, ctx: MixContext) -> dict[str, Any]:
        return {"pairing": self.pairing, "mean": tuple(ctx.mean), "std": tuple(ctx.std),
                "blur": self.blur, "sigma": self.sigma}

    def _info(self) -> dict[str, Any]:
        return {"saliency": self.saliency, "pairing": self.pairing}

    def describe(self) -> dict[str, Any]:
        """Parameters plus what ran, so a checkpoint says exactly which variant it is."""
        return {**super().describe(),
                "variant": f"guided-{self.saliency} ({self.pairing} pairing)",
                "saliency_impl": ("pretrain.saliency.spectral_residual on 0..255 pixels"
                                  if self.saliency == "sr" else
                                  "pretrain.saliency.gradient_saliency (extra forward+backward)"),
                "label": "soft, lam = mean(M) per sample"}
