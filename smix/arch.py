"""Architecture registry.

As in timm, the builder's function name is the architecture's name; `build_model` of an unknown
name raises a `UserError` that lists the valid ones. Every architecture uses torchvision's key
names (`conv1.weight`, `layer1.0.bn1.*`, `fc.weight` ...) so that a checkpoint of `resnet50` loads
into `torchvision.models.resnet50` unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from smix.errors import UserError


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """What the stages need to know about an architecture besides its weights."""

    name: str
    builder: Callable[..., nn.Module]
    family: str  # "resnet" (torchvision layout), "wide_resnet", "preact_resnet"
    stem: str  # "imagenet" (7x7/2 + max-pool) or "cifar" (3x3/1, no pool)
    depth: int
    cam_layer: str  # the module whose output feeds global average pooling
    feature_dim: int
    classifier: str = "fc"
    default_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


_ARCHS: dict[str, ArchSpec] = {}


def register_arch(*, family: str, stem: str, depth: int, cam_layer: str, feature_dim: int,
                  **default_kwargs: Any) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _ARCHS[fn.__name__] = ArchSpec(fn.__name__, fn, family, stem, depth, cam_layer,
                                       feature_dim, default_kwargs=dict(default_kwargs))
        return fn

    return deco


def list_archs() -> list[str]:
    return sorted(_ARCHS)


def arch_spec(name: str) -> ArchSpec:
    try:
        return _ARCHS[name]
    except KeyError:
        raise UserError(f"unknown architecture {name!r}; valid: {', '.join(list_archs())}") from None


def build_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a freshly initialised model of a registered architecture."""
    spec = arch_spec(name)
    if num_classes < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}")
    merged = {**spec.default_kwargs, **kwargs}
    try:
        return spec.builder(num_classes=num_classes, **merged)
    except (TypeError, ValueError) as e:  # an unknown keyword; a value torch refuses
        raise UserError(f"bad arch_kwargs for {name}: {e}") from None


# --- torchvision ResNets (ImageNet stem) -------------------------------------------------------

def _tv(fn: Callable[..., nn.Module], num_classes: int, **kwargs: Any) -> nn.Module:
    return fn(weights=None, num_classes=num_classes, **kwargs)


@register_arch(family="resnet", stem="imagenet", depth=18, cam_layer="layer4", feature_dim=512)
def resnet18(num_classes: int, **kw: Any) -> nn.Module:
    return _tv(tv_resnet.resnet18, num_classes, **kw)


@register_arch(family="resnet", stem="imagenet", depth=34, cam_layer="layer4", feature_dim=512)
def resnet34(num_classes: int, **kw: Any) -> nn.Module:
    return _tv(tv_resnet.resnet34, num_classes, **kw)


@register_arch(family="resnet", stem="imagenet", depth=50, cam_layer="layer4", feature_dim=2048)
def resnet50(num_classes: int, **kw: Any) -> nn.Module:
    return _tv(tv_resnet.resnet50, num_classes, **kw)


@register_arch(family="resnet", stem="imagenet", depth=101, cam_layer="layer4", feature_dim=2048)
def resnet101(num_classes: int, **kw: Any) -> nn.Module:
    return _tv(tv_resnet.resnet101, num_classes, **kw)


# --- CIFAR stems: 3x3 stride-1 first conv and no max-pool, same key names ------------------------

def _cifar_stem(model: tv_resnet.ResNet) -> tv_resnet.ResNet:
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


@register_arch(family="resnet", stem="cifar", depth=18, cam_layer="layer4", feature_dim=512)
def cifar_resnet18(num_classes: int, **kw: Any) -> nn.Module:
    return _cifar_stem(_tv(tv_resnet.resnet18, num_classes, **kw))


@register_arch(family="resnet", stem="cifar", depth=50, cam_layer="layer4", feature_dim=2048)
def cifar_resnet50(num_classes: int, **kw: Any) -> nn.Module:
    return _cifar_stem(_tv(tv_resnet.resnet50, num_classes, **kw))


# --- Wide ResNet (Zagoruyko & Komodakis) and PreAct ResNet (He et al. 2016) ----------------------

class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; a 1x1 `shortcut` conv where the shape changes; optional dropout."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = (nn.Conv2d(in_planes, planes, 1, stride, bias=False)
                         if stride != 1 or in_planes != planes else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + skip


class PreActNet(nn.Module):
    """conv1 -> pre-activation stages -> final BN-ReLU -> global average pool -> fc."""

    def __init__(self, widths: list[int], blocks: list[int], strides: list[int],
                 num_classes: int, stem_width: int, dropout: float = 0.0):
        super().__init__()
        if not 0 <= dropout <= 1:  # nan or < 0 turned dropout off, silently
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {dropout}")
        self.conv1 = nn.Conv2d(3, stem_width, 3, 1, 1, bias=False)
        in_planes = stem_width
        for i, (w, n, s) in enumerate(zip(widths, blocks, strides), start=1):
            layers = []
            for j in range(n):
                layers.append(PreActBlock(in_planes, w, s if j == 0 else 1, dropout))
                in_planes = w
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.num_stages = len(widths)
        self.bn_final = nn.BatchNorm2d(in_planes)
        self.relu_final = nn.ReLU(inplace=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        x = self.relu_final(self.bn_final(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_arch(family="wide_resnet", stem="cifar", depth=28, cam_layer="relu_final",
               feature_dim=640, dropout=0.3)
def wide_resnet28_10(num_classes: int, dropout: float = 0.3) -> nn.Module:
    n = (28 - 4) // 6
    return PreActNet([160, 320, 640], [n] * 3, [1, 2, 2], num_classes, 16, dropout)


@register_arch(family="preact_resnet", stem="cifar", depth=18, cam_layer="relu_final",
               feature_dim=512)
def preact_resnet18(num_classes: int, dropout: float = 0.0) -> nn.Module:
    return PreActNet([64, 128, 256, 512], [2, 2, 2, 2], [1, 2, 2, 2], num_classes, 64, dropout)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP (`module.`) and torch.compile (`_orig_mod.`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or (
            type(model).__name__ == "DataParallel" and hasattr(model, "module")
        ):
            model = model.module
        else:
            return model
