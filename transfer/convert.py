"""Toolkit checkpoint -> detectron2 ResNet weights, and the checks both backends share.

detectron2 names a ResNet `stem.conv1`, `res2`..`res5`, `convK.norm`, `shortcut(.norm)`; this
renames torchvision's keys the same way detectron2's `tools/convert-torchvision-to-d2.py` does
and writes the model-zoo pickle `{"model", "__author__", "matching_heuristics"}` (numpy arrays),
which detectron2's checkpointer matches by suffix, so `res5` lands in `roi_heads.res5` for C4.
`num_batches_tracked` counters have no counterpart in FrozenBN and are dropped; every other
tensor that is not converted (the classifier) is reported.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from smix.arch import arch_spec
from smix.checkpoint import BackboneMeta
from smix.errors import UserError
from smix.io import atomic_save

_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(.+)$")
_CONV_NORM = re.compile(r"^bn([1-3])\.(weight|bias|running_mean|running_var)$")
_SHORTCUT = {"downsample.0.weight": "shortcut.weight"}
_NORM_FIELDS = ("weight", "bias", "running_mean", "running_var")


def check_detection_backbone(meta: BackboneMeta, arch: str) -> None:
    """Only ImageNet-stem ResNets fit Faster R-CNN here; C4 needs a bottleneck res5 (R50/101)."""
    spec = arch_spec(meta.arch)
    if spec.family != "resnet" or spec.stem != "imagenet":
        raise UserError(f"checkpoint arch {meta.arch!r} is not an ImageNet-stem ResNet; detection "
                        "transfer needs resnet18/34/50/101")
    if arch == "c4" and spec.depth < 50:
        raise UserError(f"--arch c4 needs ResNet-50/101 (its RoI head is a bottleneck res5); "
                        f"{meta.arch} works with --arch fpn")


def _rename(key: str) -> str | None:
    """torchvision ResNet key -> detectron2 key; None for keys with no detectron2 counterpart."""
    if key.startswith("fc.") or key.endswith("num_batches_tracked"):
        return None
    if key == "conv1.weight":
        return "stem.conv1.weight"
    m = re.match(r"^bn1\.(weight|bias|running_mean|running_var)$", key)
    if m:
        return f"stem.conv1.norm.{m.group(1)}"
    m = _BLOCK.match(key)
    if not m:
        return None
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    if re.fullmatch(r"conv[1-3]\.weight", rest):
        new = rest
    elif _CONV_NORM.match(rest):
        n = _CONV_NORM.match(rest)
        new = f"conv{n.group(1)}.norm.{n.group(2)}"  # type: ignore[union-attr]
    elif rest in _SHORTCUT:
        new = _SHORTCUT[rest]
    elif rest.startswith("downsample.1.") and rest.split(".")[-1] in _NORM_FIELDS:
        new = f"shortcut.norm.{rest.split('.')[-1]}"
    else:
        return None
    return f"res{stage}.{block}.{new}"


@dataclasses.dataclass(frozen=True)
class Conversion:
    """The converted tensors and what was left behind (and why)."""

    model: dict[str, np.ndarray]
    mapping: dict[str, str]  # toolkit key -> detectron2 key
    unconverted: tuple[str, ...]  # real weights with no detectron2 counterpart (the classifier)
    dropped_counters: int  # BatchNorm num_batches_tracked buffers


def to_detectron2(state: Mapping[str, torch.Tensor]) -> Conversion:
    """Rename a torchvision-layout ResNet state dict into detectron2's backbone names."""
    model: dict[str, np.ndarray] = {}
    mapping: dict[str, str] = {}
    unconverted, counters = [], 0
    for key, value in state.items():
        new = _rename(key)
        if new is None:
            if key.endswith("num_batches_tracked"):
                counters += 1
            else:
                unconverted.append(key)
            continue
        mapping[key] = new
        model[new] = value.detach().cpu().float().numpy()
    return Conversion(model, mapping, tuple(sorted(unconverted)), counters)


def save_detectron2_weights(path: Path, conv: Conversion, author: str) -> None:
    """The detectron2 model-zoo pickle (only numpy arrays and strings), written atomically."""
    payload = {"model": conv.model, "__author__": author, "matching_heuristics": True}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)

    atomic_save(path, write)
