"""SaliencyMix (Uddin et al., ICLR 2021): paste the most salient patch of a source image.

Three modes (the `mode` field):

* ``official`` -- the official code (afm-shahab-uddin/SaliencyMix, ``saliency_bbox``) as it runs:
  one λ ~ Beta(α, α) and one permutation per batch; OpenCV's StaticSaliencyFineGrained on the
  *normalised float* tensor of the first permuted image (its defect: OpenCV converts the float
  image to gray in float but then reads the gray buffer as uint8 bytes, so the map does not
  describe the image); map * 255 truncated to uint8, box of side int(S*sqrt(1-λ)) centred on
  its argmax, clipped; the same box for the whole batch, pasted at the same place; λ recomputed
  from the clipped box. Needs OpenCV (opencv-contrib-python-headless); for faithful reruns only.
* ``batch`` (default) -- the same, with the map of the de-normalised 0..255 image and any
  registered detector (``detector=``, batched torch, fine_grained by default).
* ``sample`` -- one λ, one map and one box per sample, each from its own source image;
  vectorised over the batch (one detector call for the whole batch).

Schemes (paper §3.4, ``scheme=``): the source patch is centred on the salient (argmax) or
non-salient (argmin) point of the source map; it lands at the same place (``corresponding``)
or centred on the salient / non-salient point of the target image's map. Clipping: the source
box is centred on its point and clipped to the image as the official code does; the destination
box has exactly the clipped source box's size, is centred on its point the same way
(top-left = point - size // 2) and shifted, never shrunk, to lie inside the image, so the whole
source patch is pasted and λ = 1 - area / (H·W) is the actual mixed fraction.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from smix.devices import GraphCache, upload
from smix.errors import UserError
from pretrain.mixers.base import (MixContext, Mixer, MixOutput, MixParams, bernoulli, beta,
                                  register_mixer)
from pretrain.mixers.boxes import box_area, boxes_at_points, boxes_from_centres, paste_permuted
from pretrain.pairing import get_pairing

MODES = ("official", "batch", "sample")
# scheme name -> (source point, destination point); None = corresponding (same place).
SCHEMES: dict[str, tuple[str, str | None]] = {
    "salient_to_corresponding": ("max", None),
    "salient_to_salient": ("max", "max"),
    "salient_to_nonsalient": ("max", "min"),
    "nonsalient_to_salient": ("min", "max"),
    "nonsalient_to_nonsalient": ("min", "min"),
}


def extreme_index(maps: torch.Tensor, kind: str) -> torch.Tensor:
    """Flat index of the argmax (`max`) or argmin (`min`) of each [H,W] map, first on ties
    (row-major, as `np.argmax(...)` of the map)."""
    flat = maps.flatten(1)
    return flat.argmax(1) if kind == "max" else flat.argmin(1)


def cut_sides(lam: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Box sides int(H*sqrt(1-λ)), int(W*sqrt(1-λ)) of host λ, in float64 as the official
    `np.int(...)`. In numpy, as the official code: IEEE float64 throughout (sqrt correctly
    rounded), the values torch's ops give, at ~10 instead of ~17 µs of host time per step."""
    rat = np.sqrt(1.0 - np.clip(np.asarray(lam, dtype=np.float64), 0.0, 1.0))
    return (torch.from_numpy(np.floor(height * rat).astype(np.int64)),
            torch.from_numpy(np.floor(width * rat).astype(np.int64)))


def scheme_boxes(src_maps: torch.Tensor, dst_maps: torch.Tensor | None, lam: torch.Tensor,
                 scheme: str, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source and destination boxes [N,4] (y0, x0, y1, x1) for λ [N] under a scheme.

    The boxes are computed on the maps' device: the sides come from the host λ (enqueued,
    not waited for), the points never leave the device."""
    sides = upload(torch.stack(cut_sides(lam, height, width)), src_maps.device)
    src_kind, dst_kind = SCHEMES[scheme]
    dst_idx = None if dst_kind is None else extreme_index(dst_maps, dst_kind)
    src, dst, _ = boxes_at_points(extreme_index(src_maps, src_kind), dst_idx, sides, height,
                                  width)
    return src, dst


@torch.no_grad()
def _boxes_on_device(images: torch.Tensor, sides: torch.Tensor, perm: torch.Tensor | None = None,
                     *, scheme: str, detector: str, mean: tuple, std: tuple
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Maps, boxes and actual λ (float32) of modes batch/sample, all from device tensors and
    so one CUDA graph per batch shape (`GraphCache`): de-normalise, detect, argmax/argmin,
    boxes, areas (`boxes_at_points`: one Triton launch on CUDA).

    Without `perm` (mode batch): `images` are the first source and, for a scheme that needs
    it, the first target; one box. With it (mode sample): a box per sample from `maps[perm]`
    (whose points are those of `maps`, gathered: [B] indices, not [B,H,W] maps)."""
    from pretrain.saliency import normalized_saliency
    h, w = images.shape[2:]
    maps = normalized_saliency(detector, images, mean, std)
    src_kind, dst_kind = SCHEMES[scheme]
    if perm is None:
        src_idx = extreme_index(maps[:1], src_kind)
        dst_idx = None if dst_kind is None else extreme_index(maps[1:], dst_kind)
    else:
        points = {kind: extreme_index(maps, kind) for kind in {src_kind, dst_kind} - {None}}
        src_idx = points[src_kind].index_select(0, perm)
        dst_idx = None if dst_kind is None else points[dst_kind]
    return boxes_at_points(src_idx, dst_idx, sides, h, w)


_BOX_GRAPHS = GraphCache(_boxes_on_device, "saliencymix boxes")


@torch.no_grad()
def _mix_on_device(images: torch.Tensor, draws: torch.Tensor, *, mode: str, scheme: str,
                   detector: str, mean: tuple, std: tuple
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The step of modes batch/sample after the host draws, as `SaliencyMix.__call__` runs
    it: `plan`'s maps and boxes, then `apply`'s paste, the same ops in the same order (so the
    same values). `draws` is the permutation and the box sides in one int64 vector ([B] then
    [2,N]: one upload). Returns the mixed batch and the actual λ; one CUDA graph per batch
    shape (`_STEP_GRAPHS`). The label gather stays outside: one launch there, where passing
    the labels in and their gather out cost a copy and a clone."""
    bsz, _, h, w = images.shape
    perm, sides = draws[:bsz], draws[bsz:].view(2, -1)
    opts = {"scheme": scheme, "detector": detector, "mean": mean, "std": std}
    if mode == "batch":
        pick = _batch_pick(perm, scheme)
        src, dst, actual = _boxes_on_device(images[pick], sides, **opts)
    else:
        src, dst, actual = _boxes_on_device(images, sides, perm, **opts)
    src, dst, actual = src.expand(bsz, 4), dst.expand(bsz, 4), actual.expand(bsz).contiguous()
    mixed = paste_permuted(images, perm, src, None if SCHEMES[scheme][1] is None else dst)
    return mixed, actual


_STEP_GRAPHS = GraphCache(_mix_on_device, "saliencymix step")


def _batch_pick(perm: torch.Tensor, scheme: str) -> torch.Tensor:
    """Mode batch maps only the first source, and the first target when the scheme needs it."""
    if SCHEMES[scheme][1] is None:
        return perm[:1]
    return torch.cat([perm[:1], perm.new_zeros(1)])


def opencv_saliency() -> Any:
    """`cv2.saliency`, which only OpenCV's contrib build has; else a one-line error."""
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is None or not hasattr(cv2, "saliency"):
        raise UserError("saliencymix mode=official runs OpenCV contrib's saliency detector as "
                        "the official code does; install opencv-contrib-python-headless "
                        "(plain opencv-python has no cv2.saliency)")
    return cv2.saliency


def official_saliency_point(image: torch.Tensor) -> tuple[int, int]:
    """The official `saliency_bbox` map argmax for one normalised CHW image: OpenCV's
    fine-grained detector on the float32 HWC array exactly as the official code passes it."""
    temp_img = image.detach().float().cpu().numpy().transpose(1, 2, 0)
    _, sal = opencv_saliency().StaticSaliencyFineGrained_create().computeSaliency(temp_img)
    sal = (sal * 255).astype("uint8")
    row, col = np.unravel_index(np.argmax(sal, axis=None), sal.shape)
    return int(row), int(col)


@register_mixer("saliencymix")
@dataclasses.dataclass
class SaliencyMix(Mixer):
    """SaliencyMix; see the module docstring for `mode` and `scheme`. `alpha` is the official
    `--beta` (λ ~ Beta(α, α)); `prob` the mixing probability (official `--salmix_prob`)."""

    mode: str = "batch"
    scheme: str = "salient_to_corresponding"
    detector: str = "fine_grained"
    alpha: float = 1.0
    prob: float = 1.0
    pairing: str = "random"

    def validate(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"saliencymix: unknown mode {self.mode!r}; valid: {', '.join(MODES)}")
        if self.scheme not in SCHEMES:
            raise UserError(f"saliencymix: unknown scheme {self.scheme!r}; valid: "
                            f"{', '.join(SCHEMES)}")
        from pretrain.saliency import get_detector
        if getattr(get_detector(self.detector), "needs_model", False):
            raise UserError(f"saliencymix: detector {self.detector!r} needs the model; use an "
                            "image detector (fine_grained, spectral_residual, frequency_tuned)")
        get_pairing(self.pairing)
        if not 0 < self.alpha < math.inf or not 0 <= self.prob <= 1:  # NaN too
            raise UserError("saliencymix: alpha must be a finite number > 0 and prob in [0, 1]")
        if self.mode == "official":
            opencv_saliency()  # now, not as a traceback on the first step
        default = SaliencyMix()
        if self.mode == "official" and (self.scheme, self.detector, self.pairing) != (
                default.scheme, default.detector, default.pairing):
            raise UserError("saliencymix: mode=official reproduces the published code only "
                            "(salient_to_corresponding, fine_grained, random pairing); "
                            "use mode=batch or mode=sample for other variants")

    def min_image_side(self) -> int:
        return 3  # every mode asks a detector for maps

    def draw(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
             ctx: MixContext, perm_device: torch.device | str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The coin flip, λ ([1] or [B] float64 on the host) and the permutation (on
        `perm_device`, default the images'), always in this order; None: do not mix."""
        if not bernoulli(generator, self.prob):
            return None
        bsz = len(labels)
        draw = beta(generator, self.alpha, size=bsz if self.mode == "sample" else None)
        lam = torch.as_tensor(np.atleast_1d(draw), dtype=torch.float64)
        perm = get_pairing(self.pairing)(bsz, generator, perm_device or images.device,
                                         images=images, ctx=ctx, labels=labels)
        return perm, lam

    def sample(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
               ctx: MixContext) -> MixParams:
        draws = self.draw(images, labels, generator, ctx)
        if draws is None:
            return MixParams(active=False, info=self._info())
        return self.plan(images, draws[0], draws[1], ctx)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                 ctx: MixContext) -> MixOutput:
        """`apply(sample(...))` with the same draws and values, in one pass on the device
        (modes batch/sample): the permutation and box sides go up in one upload, and maps,
        boxes and paste are one CUDA graph (`_mix_on_device`), then the label gather, where
        sample and apply launch a dozen more kernels and two more uploads between them."""
        if self.mode == "official":
            return super().__call__(images, labels, generator, ctx)
        # a random permutation is a host draw: kept there to travel with the sides
        perm_device = "cpu" if self.pairing == "random" else images.device
        draws = self.draw(images, labels, generator, ctx, perm_device)
        if draws is None:
            return self.apply(images, labels, MixParams(active=False))
        perm, lam = draws
        sides = torch.stack(cut_sides(lam, images.shape[2], images.shape[3])).flatten()
        if perm.device.type == "cpu":
            packed = upload(torch.cat([perm, sides]), images.device)
        else:
            packed = torch.cat([perm, upload(sides, images.device)])
        mixed, lam = _STEP_GRAPHS(images, packed, mode=self.mode, scheme=self.scheme,
                                  detector=self.detector, mean=tuple(ctx.mean),
                                  std=tuple(ctx.std))
        return MixOutput(mixed, labels, labels.index_select(0, packed[:len(labels)]), lam)

    def plan(self, images: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor,
             ctx: MixContext) -> MixParams:
        """Boxes and actual λ for a given permutation and sampled λ ([1] or [B] float64)."""
        bsz, _, h, w = images.shape
        if self.mode == "official":
            cy, cx = official_saliency_point(images[perm[0]])
            cut_h, cut_w = cut_sides(lam, h, w)
            src = boxes_from_centres(torch.tensor([cy]), torch.tensor([cx]), cut_h, cut_w, h, w)
            dst = src
            actual = (1.0 - box_area(src).double() / (h * w)).float()
        else:
            sides = upload(torch.stack(cut_sides(lam, h, w)), images.device)
            opts = {"scheme": self.scheme, "detector": self.detector, "mean": tuple(ctx.mean),
                    "std": tuple(ctx.std)}
            if self.mode == "batch":
                src, dst, actual = _BOX_GRAPHS(images[_batch_pick(perm, self.scheme)], sides,
                                               **opts)
            else:
                src, dst, actual = _BOX_GRAPHS(images, sides, perm, **opts)
        src, dst, actual = src.expand(bsz, 4), dst.expand(bsz, 4), actual.expand(bsz).contiguous()
        info = self._info()
        if self.mode != "sample":
            info["lam_sampled"] = float(lam[0])
        return MixParams(active=True, perm=perm, lam=actual, boxes=src,
                         dst_boxes=None if SCHEMES[self.scheme][1] is None else dst, info=info)

    def apply(self, images: torch.Tensor, labels: torch.Tensor, params: MixParams) -> MixOutput:
        if not params.active:
            return MixOutput(images, labels, None, torch.ones(len(labels), device=images.device))
        mixed = paste_permuted(images, params.perm, params.boxes, params.dst_boxes)
        return MixOutput(mixed, labels, labels[params.perm], upload(params.lam, images.device))

    def _info(self) -> dict[str, Any]:
        return {"mode": self.mode, "scheme": self.scheme, "pairing": self.pairing,
                "detector": self.detector}

    def describe(self) -> dict[str, Any]:
        """Parameters plus what they mean, so a checkpoint says exactly which variant ran."""
        official = self.mode == "official"
        return {**super().describe(),
                "saliency_input": ("normalised float tensor via OpenCV (official defect)"
                                   if official else "de-normalised 0..255 image"),
                "boxes": "one per sample" if self.mode == "sample" else "one per batch",
                "detector_impl": "opencv StaticSaliencyFineGrained" if official
                else f"pretrain.saliency.{self.detector}"}
