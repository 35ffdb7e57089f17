"""Checkpoints opened for CAM: model, metadata, the ready CAM method and how to label it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from smix.checkpoint import BackboneMeta, load_backbone
from smix.errors import UserError
from cam.methods import CamMethod, build_cam, get_cam_method


@dataclasses.dataclass
class CamModel:
    path: Path
    model: nn.Module
    meta: BackboneMeta
    cam: CamMethod
    tag: str  # output sub-folder, unique per run (checkpoints are often all `backbone.safetensors`)
    label: str  # row label of the figure: the training method from the metadata

    @property
    def method_name(self) -> str:
        return str(self.meta.method.get("name", "unknown"))

    def describe(self) -> dict[str, str]:
        return {"label": self.label, "dir": self.tag, "cam_method": self.cam.name,
                "layer": self.cam.layer_name}


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_+." else "_" for c in text) or "x"


def load_models(ckpts: Sequence[Path], method: str | None, layer: str | None,
                device: torch.device) -> list[CamModel]:
    """Open every checkpoint (validated) and build its CAM method; fails before any output."""
    if not ckpts:
        raise UserError("give at least one --ckpt")
    if method is not None:
        get_cam_method(method)  # an unknown name fails before any checkpoint is read
    out: list[CamModel] = []
    for k, path in enumerate(ckpts):
        model, meta = load_backbone(path, device)
        cam = build_cam(method, model, meta.arch, layer)
        name = str(meta.method.get("name", "unknown"))
        out.append(CamModel(Path(path), model, meta, cam, f"{k:02d}_{_safe(name)}",
                            f"{name}\n{meta.arch}"))
    labels = [m.label for m in out]
    for k, m in enumerate(out):
        if labels.count(m.label) > 1:
            m.label = f"{m.label} #{k}"
    return out
