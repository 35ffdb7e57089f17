"""Models as the attacks see them: [0,1] RGB pixels in, logits out.

The preprocessing contract (DESIGN.md): attacks run in [0,1] pixel space and epsilon is in /255
pixel units, so the normalisation of the checkpoint is applied exactly once, inside `Normalized`.
torchattacks' own `set_normalization_used` is deliberately NOT used: it would normalise a second
time on top of this wrapper. We normalise in the wrapper rather than in torchattacks because the
same wrapped model also serves the shared-gradient FGSM and the corruption evaluation, which never
go through torchattacks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from smix.checkpoint import BackboneMeta, load_backbone
from smix.data import normalize
from smix.errors import UserError

_PLACEHOLDER = re.compile(r"class_\d+")


class Normalized(nn.Module):
    """`model(normalize(x, mean, std))`: takes [0,1] pixels, normalises once, returns logits."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(normalize(x, self.mean, self.std))


def has_class_names(meta: BackboneMeta) -> bool:
    """False when the names are the `class_<i>` placeholders of an import without `--classes`."""
    return not all(_PLACEHOLDER.fullmatch(n) for n in meta.class_names)


def require_class_names(meta: BackboneMeta, path: str | Path) -> None:
    """A class-folder evaluation maps folders to outputs by name, so the names must be real."""
    if not has_class_names(meta):
        raise UserError(f"{path}: checkpoint has no class names (only placeholders "
                        f"{meta.class_names[0]}..); re-import it with `smix ckpt import --classes`")


def load_for_eval(path: str | Path, device: torch.device) -> tuple[Normalized, BackboneMeta]:
    """The checkpoint's model in eval mode behind its own normalisation, and its metadata."""
    model, meta = load_backbone(path, device)
    wrapped = Normalized(model, meta.mean, meta.std).to(device).eval()
    for p in wrapped.parameters():  # attacks need input gradients only, never weight gradients
        p.requires_grad_(False)
    return wrapped, meta
