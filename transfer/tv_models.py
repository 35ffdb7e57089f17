"""torchvision Faster R-CNN on a toolkit ResNet: C4 (detectron2's Res5ROIHeads layout) and FPN.

Both follow detectron2's R-CNN conventions so the two backends train the same detector family:
FrozenBatchNorm everywhere in the backbone, stem and res2 frozen (FREEZE_AT = 2), normalisation
with the checkpoint's mean/std (the preprocessing contract), anchors 32..512 x {0.5, 1, 2}.
- C4: ResNet up to layer3 (stride 16, 1024 channels) feeds the RPN; each RoI is pooled to 14x14
  (RoIAlign) and passed through layer4 + global average pooling (2048-d) before the predictor.
- FPN: layer1..layer4 into a 256-channel FPN with a max-pooled P6, RoIAlign 7x7 and two FC layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from smix.checkpoint import BackboneMeta
from smix.errors import UserError
from transfer.config import Settings
from transfer.micro import ImageSeeds

ASPECT_RATIOS = (0.5, 1.0, 2.0)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d carrying the same statistics and affine."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            frozen.weight.copy_(module.weight if module.affine else torch.ones_like(frozen.weight))
            frozen.bias.copy_(module.bias if module.affine else torch.zeros_like(frozen.bias))
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = freeze_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def freeze_at_res2(resnet: nn.Module) -> None:
    """detectron2's FREEZE_AT = 2: the stem and res2 (torchvision's conv1/bn1/layer1) stay fixed."""
    for name in ("conv1", "bn1", "layer1"):
        for p in getattr(resnet, name).parameters():
            p.requires_grad_(False)


class Res5Head(nn.Module):
    """The C4 box head: ResNet layer4 on each 14x14 RoI feature, then global average pooling."""

    def __init__(self, layer4: nn.Module):
        super().__init__()
        self.res5 = layer4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.res5(x), 1), 1)


def _stage_channels(resnet: nn.Module) -> list[int]:
    out = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        last = getattr(resnet, name)[-1]
        out.append((last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels)
    return out


def _common_kwargs(meta: BackboneMeta, s: Settings) -> dict:
    return dict(
        min_size=s.min_size_train, max_size=s.max_size_train,
        image_mean=list(meta.mean), image_std=list(meta.std),
        rpn_pre_nms_top_n_train=s.rpn_pre_nms_train, rpn_post_nms_top_n_train=s.rpn_post_nms_train,
        rpn_pre_nms_top_n_test=s.rpn_pre_nms_test, rpn_post_nms_top_n_test=s.rpn_post_nms_test,
        rpn_batch_size_per_image=s.rpn_batch, box_batch_size_per_image=s.roi_batch,
        box_score_thresh=s.score_thresh, box_nms_thresh=s.nms_thresh,
        box_detections_per_img=s.detections_per_image,
    )


class PerImageSampler:
    """torchvision's balanced positive/negative sampler called one image at a time, each call
    under that image's seed (`ImageSeeds`): how a batch is split into micro-batches then does
    not change which anchors or proposals an image samples."""

    def __init__(self, sampler: Any, seeds: ImageSeeds, stream: str):
        self.sampler = sampler
        self._call = seeds.wrap(stream, sampler)

    def __call__(self, matched_idxs: list[torch.Tensor]) -> tuple[list, list]:
        pos: list[torch.Tensor] = []
        neg: list[torch.Tensor] = []
        for m in matched_idxs:
            p, n = self._call([m])
            pos += p
            neg += n
        return pos, neg


def seed_sampling(model: FasterRCNN) -> ImageSeeds:
    """Give the RPN's and the RoI heads' samplers per-image seeds; returns the seed source."""
    seeds = ImageSeeds()
    model.rpn.fg_bg_sampler = PerImageSampler(model.rpn.fg_bg_sampler, seeds, "rpn")
    model.roi_heads.fg_bg_sampler = PerImageSampler(model.roi_heads.fg_bg_sampler, seeds, "roi")
    return seeds


def build_detector(resnet: nn.Module, meta: BackboneMeta, arch: str, num_classes: int,
                   s: Settings) -> FasterRCNN:
    """Faster R-CNN (`num_classes` object classes + background) on the checkpoint's ResNet;
    `model.image_seeds` seeds its sampling per image (see `PerImageSampler`)."""
    model = _faster_rcnn(resnet, meta, arch, num_classes, s)
    model.image_seeds = seed_sampling(model)
    return model


def _faster_rcnn(resnet: nn.Module, meta: BackboneMeta, arch: str, num_classes: int,
                 s: Settings) -> FasterRCNN:
    resnet = freeze_batchnorm(resnet)
    freeze_at_res2(resnet)
    channels = _stage_channels(resnet)
    if arch == "fpn":
        if len(s.anchor_sizes) != 5:
            raise UserError(f"FPN needs five anchor sizes (P2..P6), got {s.anchor_sizes}")
        body = BackboneWithFPN(resnet, {f"layer{i}": str(i - 1) for i in range(1, 5)},
                               channels, 256)
        anchors = AnchorGenerator(tuple((a,) for a in s.anchor_sizes),
                                  (ASPECT_RATIOS,) * len(s.anchor_sizes))
        return FasterRCNN(body, num_classes=num_classes + 1, rpn_anchor_generator=anchors,
                          **_common_kwargs(meta, s))
    body = IntermediateLayerGetter(resnet, {"layer3": "0"})
    body.out_channels = channels[2]
    anchors = AnchorGenerator((tuple(s.anchor_sizes),), (ASPECT_RATIOS,))
    pool = MultiScaleRoIAlign(["0"], output_size=14, sampling_ratio=0)
    return FasterRCNN(body, rpn_anchor_generator=anchors, box_roi_pool=pool,
                      box_head=Res5Head(resnet.layer4),
                      box_predictor=FastRCNNPredictor(channels[3], num_classes + 1),
                      **_common_kwargs(meta, s))
