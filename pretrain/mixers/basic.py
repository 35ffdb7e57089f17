"""The peers of SaliencyMix: none, Cutout, Mixup and CutMix, as their papers define them."""

from __future__ import annotations

import dataclasses
import math

import torch

from smix.devices import upload
from smix.errors import UserError
from pretrain.mixers.base import Mixer, MixOutput, MixParams, bernoulli, beta, register_mixer
from pretrain.mixers.boxes import box_mask, boxes_from_centres, paste_box, paste_permuted
from pretrain.pairing import get_pairing


def _identity(images: torch.Tensor, labels: torch.Tensor) -> MixOutput:
    return MixOutput(images, labels, None, torch.ones(len(labels), device=images.device))


def batch_lam(lam: float, size: int) -> torch.Tensor:
    """One λ for the whole batch, as a host tensor of `size` (float32) that says so (stride 0)."""
    return torch.tensor(lam, dtype=torch.float32).expand(size)


def lam_on(lam: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None
           ) -> torch.Tensor:
    """`upload(lam, device, dtype)`, contiguous; a host λ of one value for the batch
    (`batch_lam`) is filled on an accelerator instead: one kernel, no pinned copy."""
    if lam.device.type == "cpu" and device.type != "cpu" and lam.dim() == 1 and lam.stride(0) == 0:
        return torch.full(lam.shape, float(lam[0]), dtype=dtype or lam.dtype, device=device)
    return upload(lam.contiguous(), device, dtype)


@register_mixer("none")
@dataclasses.dataclass
class NoMix(Mixer):
    """Plain training: images and labels untouched."""

    def sample(self, images, labels, generator, ctx) -> MixParams:
        return MixParams(active=False)

    def apply(self, images, labels, params) -> MixOutput:
        return _identity(images, labels)


@register_mixer("cutout")
@dataclasses.dataclass
class Cutout(Mixer):
    """DeVries & Taylor 2017: one square hole per image (side `size`, centre uniform, clipped),
    filled with 0 in normalised space (the dataset mean), labels unchanged."""

    size: int = 16
    prob: float = 1.0

    def validate(self) -> None:
        if self.size < 1 or not 0 <= self.prob <= 1:
            raise UserError("cutout: size must be >= 1 and prob in [0, 1]")

    def sample(self, images, labels, generator, ctx) -> MixParams:
        bsz, _, h, w = images.shape
        active = bernoulli(generator, self.prob)
        cy = torch.randint(0, h, (bsz,), generator=generator)
        cx = torch.randint(0, w, (bsz,), generator=generator)
        side = torch.full((bsz,), self.size)
        # Cutout's own clipping: [c - size//2, c + size//2) per axis, clipped to the image.
        return MixParams(active=active, boxes=boxes_from_centres(cy, cx, side, side, h, w))

    def apply(self, images, labels, params) -> MixOutput:
        if not params.active:
            return _identity(images, labels)
        hole = box_mask(params.boxes, images.shape[2], images.shape[3], images.device)
        return _identity(images.masked_fill(hole, 0.0), labels)


@dataclasses.dataclass
class PairMixer(Mixer):
    """A mixer of image pairs with λ ~ Beta(α, α), applied with probability `prob`."""

    alpha: float = 1.0
    prob: float = 1.0
    pairing: str = "random"

    def validate(self) -> None:
        get_pairing(self.pairing)
        if not 0 < self.alpha < math.inf or not 0 <= self.prob <= 1:  # NaN too
            raise UserError(f"{self.name}: alpha must be a finite number > 0 and prob in [0, 1]")

    def min_image_side(self) -> int:
        return 3 if self.pairing == "greedy" else 1  # greedy pairs by spectral-residual maps

    def draw(self, images, labels, generator, ctx) -> tuple[bool, float, torch.Tensor]:
        """The coin flip, λ and the pairing, always in this order from the generator."""
        active = bernoulli(generator, self.prob)
        lam = float(beta(generator, self.alpha))
        perm = get_pairing(self.pairing)(len(labels), generator, images.device,
                                         images=images, ctx=ctx, labels=labels)
        return active, lam, perm


@register_mixer("mixup")
@dataclasses.dataclass
class Mixup(PairMixer):
    """Zhang et al. 2018: x = λ·x_a + (1-λ)·x_b with one λ ~ Beta(α, α) per batch."""

    def sample(self, images, labels, generator, ctx) -> MixParams:
        active, lam, perm = self.draw(images, labels, generator, ctx)
        return MixParams(active=active, perm=perm, lam=batch_lam(lam, len(labels)),
                         info={"pairing": self.pairing})

    def apply(self, images, labels, params) -> MixOutput:
        if not params.active:
            return _identity(images, labels)
        lam = lam_on(params.lam, images.device, images.dtype)
        mixed = lam.view(-1, 1, 1, 1) * images + (1 - lam.view(-1, 1, 1, 1)) * images[params.perm]
        return MixOutput(mixed, labels, labels.index_select(0, params.perm), lam)


@register_mixer("cutmix")
@dataclasses.dataclass
class CutMix(PairMixer):
    """Yun et al. 2019: paste a box of side S·sqrt(1-λ) from the permuted image at the same
    place; one box per batch as the official code; λ corrected to the clipped area."""

    def draw_box(self, images, labels, generator, ctx
                 ) -> tuple[bool, float, torch.Tensor, tuple[int, int, int, int], float]:
        """`draw`, then the box's centre (always drawn, so the stream does not depend on the
        coin): the coin, λ as sampled, the pairing, the clipped box (y0, x0, y1, x1) in host
        integers and the actual λ (float64)."""
        _, _, h, w = images.shape
        active, lam, perm = self.draw(images, labels, generator, ctx)
        cut = 1.0 - lam
        cut_h, cut_w = int(h * cut ** 0.5), int(w * cut ** 0.5)
        cy = int(torch.randint(0, h, (1,), generator=generator))
        cx = int(torch.randint(0, w, (1,), generator=generator))
        # `boxes_from_centres` for one box, in host integers: the values are the same, without
        # the ~30 tiny tensor ops that were most of this mixer's host time per step
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        lam_actual = 1.0 - max(y1 - y0, 0) * max(x1 - x0, 0) / (h * w)  # float64, as before
        return active, lam, perm, (y0, x0, y1, x1), lam_actual

    def sample(self, images, labels, generator, ctx) -> MixParams:
        bsz = len(labels)
        active, lam, perm, box, lam_actual = self.draw_box(images, labels, generator, ctx)
        return MixParams(active=active, perm=perm, lam=batch_lam(lam_actual, bsz),
                         boxes=torch.tensor([box]).expand(bsz, 4),
                         info={"pairing": self.pairing, "lam_sampled": lam})

    def apply(self, images, labels, params) -> MixOutput:
        if not params.active:
            return _identity(images, labels)
        mixed = paste_permuted(images, params.perm, params.boxes)
        return MixOutput(mixed, labels, labels.index_select(0, params.perm),
                         lam_on(params.lam, images.device))

    def __call__(self, images, labels, generator, ctx) -> MixOutput:
        """`apply(sample(...))` with the same draws and values, the box and λ kept as host
        numbers (sample wraps them in host tensors that apply reads back)."""
        active, _, perm, box, lam_actual = self.draw_box(images, labels, generator, ctx)
        if not active:
            return _identity(images, labels)
        return MixOutput(paste_box(images, perm, *box), labels, labels.index_select(0, perm),
                         torch.full((len(labels),), lam_actual, dtype=torch.float32,
                                    device=images.device))
