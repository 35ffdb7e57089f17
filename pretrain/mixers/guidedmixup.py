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
from typing import Any

import torch

from smix.devices import GraphCache
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


@torch.no_grad()
def _sr_plan(images: torch.Tensor, perm: torch.Tensor | None = None, *, pairing: str,
             mean: tuple, std: tuple, blur: int, sigma: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Guided-SR's permutation, mask and λ: spectral-residual maps of the de-normalised batch,
    blurred and normalised, paired greedily (`perm` None: deterministic) or by the drawn
    `perm`. Device tensors in and out, nothing drawn: one CUDA graph per batch shape."""
    from pretrain.saliency import normalized_saliency
    maps = guided_maps(normalized_saliency(SALIENCY["sr"], images, mean, std), blur, sigma)
    if perm is None:
        perm = get_pairing(pairing)(len(images), None, images.device, maps=maps)
    mask = mixing_mask(maps, perm)
    return perm, mask, mask.mean((1, 2, 3))


_SR_GRAPHS = GraphCache(_sr_plan, "guidedmixup sr")


def blend(images: torch.Tensor, labels: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply`'s pixel-wise mix M·x_a + (1-M)·x_b, in the images' dtype, and the source labels."""
    m = mask.to(images.device, images.dtype)
    return m * images + (1 - m) * images[perm], labels[perm]


@torch.no_grad()
def _sr_step(images: torch.Tensor, labels: torch.Tensor, perm: torch.Tensor | None = None,
             **opts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Guided-SR's whole step after the host draws, as `GuidedMixup.__call__` runs it:
    `_sr_plan`, then `apply`'s blend, the same ops (so the same values): the mixed batch, the
    source labels and λ. One CUDA graph per batch shape (`_SR_STEP_GRAPHS`)."""
    perm, mask, lam = _sr_plan(images, perm, **opts)
    mixed, label_b = blend(images, labels, perm, mask)
    return mixed, label_b, lam


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
        if not 0 <= self.prob <= 1 or self.blur < 1 or self.blur % 2 == 0 or self.sigma <= 0:
            raise UserError("guidedmixup: prob must be in [0, 1], blur an odd size >= 1, "
                            "sigma > 0")

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
