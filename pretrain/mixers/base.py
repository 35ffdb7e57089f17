"""The mixer interface and its registry.

A mixer is split in two, as torchvision v2 does it: `sample(images, labels, generator, ctx)`
draws every random choice (permutation, λ, boxes, masks) from an explicit `torch.Generator`;
`apply(images, labels, params)` is deterministic. λ is always the *actual* fraction of the image
that comes from the target (`label_a`) image, per sample, so the loss is
`λ·CE(y_a) + (1-λ)·CE(y_b)` for every method.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn

from smix.errors import UserError


@dataclasses.dataclass(frozen=True)
class MixContext:
    """What a mixer may need besides the batch: the normalisation (to recover pixels for
    saliency) and, for gradient saliency, the model being trained and the most images it may
    take in one forward and backward pass (`micro_batch`; 0: the whole batch)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int
    model: nn.Module | None = None
    micro_batch: int = 0


@dataclasses.dataclass
class MixParams:
    """Every random choice of one mixing step; `apply` reads only these.

    active: False when the probability draw said "do not mix" (identity).
    perm:   source index of every target sample (`images[perm]` is pasted/mixed in).
    lam:    per-sample λ [B] as sampled (mixers may recompute it from boxes/masks).
    boxes:  [B,4] int (y0, x0, y1, x1) source boxes, half-open; `dst_boxes` where pasted.
    mask:   [B,1,H,W] float in [0,1], the weight of the target image per pixel.
    info:   what actually ran (e.g. the pairing used), recorded in logs and metadata.
    """

    active: bool = True
    perm: torch.Tensor | None = None
    lam: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    dst_boxes: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class MixOutput:
    images: torch.Tensor
    label_a: torch.Tensor
    label_b: torch.Tensor | None  # None: not mixed, plain cross-entropy on label_a
    lam: torch.Tensor  # [B] float, fraction of label_a


@dataclasses.dataclass
class Mixer:
    """Base class: subclasses are dataclasses whose fields are the method's parameters."""

    name: ClassVar[str] = "base"

    def sample(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
               ctx: MixContext) -> MixParams:
        raise NotImplementedError

    def apply(self, images: torch.Tensor, labels: torch.Tensor, params: MixParams) -> MixOutput:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                 ctx: MixContext) -> MixOutput:
        return self.apply(images, labels, self.sample(images, labels, generator, ctx))

    def min_image_side(self) -> int:
        """The smallest image side the method can mix: 3 where a saliency detector's 3x3
        neighbourhood reads the images (SaliencyMix, Guided-SR, greedy pairing without the
        mixer's own maps), else 1."""
        return 1

    def describe(self) -> dict[str, Any]:
        """Method name and parameters, as recorded in the checkpoint metadata, plus a short
        `title` (the name and the parameters that differ from their defaults) for tables."""
        params = dataclasses.asdict(self)
        changed = [f"{f.name}={params[f.name]}" for f in dataclasses.fields(self)
                   if f.default is not dataclasses.MISSING and params[f.name] != f.default]
        title = self.name + (f"({', '.join(changed)})" if changed else "")
        return {"name": self.name, **params, "title": title}


_MIXERS: dict[str, type[Mixer]] = {}


def register_mixer(name: str) -> Callable[[type[Mixer]], type[Mixer]]:
    def deco(cls: type[Mixer]) -> type[Mixer]:
        cls.name = name
        _MIXERS[name] = cls
        return cls

    return deco


def list_mixers() -> list[str]:
    return sorted(_MIXERS)


def _coerce(value: Any, annotation: Any, key: str, mixer: str) -> Any:
    if not isinstance(value, str):
        return value
    kind = annotation if isinstance(annotation, type) else None
    try:
        if kind is bool or annotation == "bool":
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("1", "true", "yes")
        if kind is int or annotation == "int":
            return int(value)
        if kind is float or annotation == "float":
            return float(value)
    except ValueError:
        raise UserError(f"{mixer}: bad value for {key}: {value!r}") from None
    return value


def get_mixer(name: str, **params: Any) -> Mixer:
    """Build a registered mixer; string values (from `key=value`) are converted to the field type."""
    if name not in _MIXERS:
        raise UserError(f"unknown method {name!r}; valid: {', '.join(list_mixers())}")
    cls = _MIXERS[name]
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise UserError(f"{name}: unknown parameter {unknown[0]!r}; valid: {', '.join(sorted(fields)) or 'none'}")
    kwargs = {k: _coerce(v, hints.get(k), k, name) for k, v in params.items()}
    mixer = cls(**kwargs)
    validate = getattr(mixer, "validate", None)
    if validate is not None:
        validate()
    return mixer


def beta(generator: torch.Generator, alpha: float, size: int | None = None) -> np.ndarray | float:
    """Beta(α, α) draws from the explicit torch generator (through a numpy generator it seeds,
    since torch's Beta sampler cannot take a generator)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    draw = np.random.default_rng(seed).beta(alpha, alpha, size=size)
    return draw if size is not None else float(draw)


def bernoulli(generator: torch.Generator, p: float) -> bool:
    """One coin flip from the generator (always drawn, so the stream does not depend on p)."""
    return bool(torch.rand((), generator=generator).item() < p)
