"""CAM methods, by name: plain CAM computed here, the others through the grad-cam package.

Template in the style of pytorch-grad-cam's `BaseCAM`: a method is a `CamMethod` subclass that
overrides one function (`raw`), registered with `@register_cam(name)`. Every method returns
maps post-processed by the same steps — bilinear upsampling to the input size, min–max per
image — so the figures and the localisation metrics compare like with like. The ReLU before
them belongs to the Grad-CAM family (Selvaraju et al. define Grad-CAM with it); plain CAM is
min–max normalised raw, as Zhou et al.'s `returnCAM` and Choe et al.'s wsolevaluation
(`normalize_scoremap`) do, so that a CAM threshold means what it means in those papers.
Hooks live only inside a `with` block (`capture`), so a model never keeps stale hooks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import sys
from typing import Any, Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from smix.arch import arch_spec
from smix.dist import is_main_process
from smix.errors import UserError


@dataclasses.dataclass(frozen=True)
class CamResult:
    """Maps [B,H,W] in [0,1] (CPU float32), the logits [B,K] of the same forward pass, and
    the class [B] each map explains."""

    maps: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor


_METHODS: dict[str, type["CamMethod"]] = {}


def register_cam(name: str) -> Callable[[type["CamMethod"]], type["CamMethod"]]:
    def deco(cls: type[CamMethod]) -> type[CamMethod]:
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def list_cam_methods() -> list[str]:
    return list(_METHODS)


def get_cam_method(name: str) -> type["CamMethod"]:
    """The registered class; an unknown name is a `UserError` that lists the valid ones."""
    try:
        return _METHODS[name]
    except KeyError:
        raise UserError(f"unknown CAM method {name!r}; valid: {', '.join(_METHODS)}") from None


def resolve_layer(model: nn.Module, arch: str, layer: str | None) -> tuple[str, nn.Module]:
    """The target layer: the arch registry's `cam_layer` unless a module name overrides it."""
    name = layer or arch_spec(arch).cam_layer
    try:
        return name, model.get_submodule(name)
    except AttributeError:
        top = ", ".join(n for n, _ in model.named_children())
        raise UserError(f"unknown layer {name!r} for {arch}; top-level modules: {top} "
                        "(nested names such as layer4.1.conv2 work too)") from None


@contextlib.contextmanager
def capture(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record `module`'s forward output in the yielded dict; the hook is removed on exit."""
    store: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
        store["out"] = out

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


@contextlib.contextmanager
def autograd_from(model: nn.Module, layer: nn.Module, gradients: bool) -> Iterator[None]:
    """Autograd only from `layer`'s output on, for one call: parameters are frozen and the
    layer's output becomes a leaf that requires grad, so the backward pass stops there instead
    of running through the whole backbone. The gradients the methods read (of the score with
    respect to that output) are unchanged. Without `gradients`, no graph is built at all."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    handle = layer.register_forward_hook(
        lambda _m, _i, out: out.detach().requires_grad_(True)) if gradients else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


# A map whose span is within this fraction of its magnitude is flat: float32 rounding, e.g.
# upsampling a 1x1 or constant map, leaves differences of ~1e-7 relative, not a signal.
FLAT_RTOL = 1e-5


def postprocess(cams: torch.Tensor, size: tuple[int, int], relu: bool = True) -> torch.Tensor:
    """ReLU (if `relu`), bilinear upsampling to `size`, min–max per image. A flat map (span within
    `FLAT_RTOL` of its magnitude) becomes all zero, as the grad-cam package's methods give,
    instead of rounding noise stretched to [0, 1]."""
    cams = cams.float().clamp(min=0) if relu else cams.float()
    cams = F.interpolate(cams.unsqueeze(1), size=size, mode="bilinear",
                         align_corners=False).squeeze(1)
    flat = cams.flatten(1)
    lo, hi = flat.min(1).values.view(-1, 1, 1), flat.max(1).values.view(-1, 1, 1)
    span = hi - lo
    signal = span > FLAT_RTOL * torch.maximum(hi.abs(), lo.abs())
    return torch.where(signal, (cams - lo) / span.clamp(min=1e-12), torch.zeros_like(cams))


class CamMethod:
    """Base class: `method(images, targets)` -> `CamResult`; subclasses override `raw`.

    `images` are normalised [B,3,H,W]; `targets` int64 [B], or None for the predicted class.
    """

    name: ClassVar[str] = "base"
    postprocessed: ClassVar[bool] = False  # True when `raw` already returns final maps
    relu: ClassVar[bool] = True  # clip negative evidence before min–max (the Grad-CAM family)

    def __init__(self, model: nn.Module, arch: str, layer: str | None = None):
        self.model = model.eval()
        self.arch = arch
        self.layer_name, self.layer = resolve_layer(model, arch, layer)
        self.device = next(model.parameters()).device
        self._warned = False

    def raw(self, images: torch.Tensor, targets: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(maps [B,h,w] before post-processing, logits, targets) — one method's essence."""
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> CamResult:
        images = images.to(self.device)
        if targets is not None:
            targets = torch.as_tensor(targets, dtype=torch.long).to(self.device)
        with capture(self.layer) as store:
            maps, logits, targets = self.raw(images, targets)
        self._warn_if_one_pixel(store.get("out"), images.shape[-2:])
        if not self.postprocessed:
            maps = postprocess(maps, (images.shape[-2], images.shape[-1]), self.relu)
        return CamResult(maps.detach().float().cpu(), logits.detach().float().cpu(),
                         targets.detach().long().cpu())

    def _warn_if_one_pixel(self, feats: Any, size: torch.Size) -> None:
        """A 1x1 map at the target layer is flat once upsampled: say so once, since every map
        of this run is then all zero and cannot localise anything."""
        if self._warned or not isinstance(feats, torch.Tensor) or feats.shape[-2:] != (1, 1):
            return
        self._warned = True
        if not is_main_process():  # every rank has the same layer: torchrun printed it per rank
            return
        print(f"warning: {self.name}: layer {self.layer_name!r} of {self.arch} is 1x1 at "
              f"{size[0]}x{size[1]} input, so its maps are flat (all zero) and cannot localise; "
              "use a larger input or an earlier --layer", file=sys.stderr)


@register_cam("cam")
class PlainCAM(CamMethod):
    """Zhou et al. 2016: CAM_k = Σ_c w_kc·A_c from the fc weights and the features that feed
    global average pooling. One forward pass, no backward, so it is the cheap default.

    No ReLU: Zhou et al.'s `returnCAM` and Choe et al.'s `normalize_scoremap` min–max the raw
    map, so negative evidence sets the zero of the scale. Clipping it first would move every
    threshold wherever the background is negative, and the boxes would no longer compare with
    those papers' numbers. Grad-CAM (ReLU by definition) thus equals this CAM only after a ReLU.
    """

    relu = False

    def __init__(self, model: nn.Module, arch: str, layer: str | None = None):
        super().__init__(model, arch, layer)
        spec = arch_spec(arch)
        if self.layer_name != spec.cam_layer:
            raise UserError(f"method 'cam' needs the layer that feeds global average pooling "
                            f"({spec.cam_layer!r} for {arch}); use --method gradcam for layer "
                            f"{self.layer_name!r}")
        fc = getattr(model, spec.classifier, None)
        if not isinstance(fc, nn.Linear):
            raise UserError(f"method 'cam' needs a linear classifier {spec.classifier!r} after "
                            f"global average pooling; {arch} has none — use --method gradcam")
        self.fc = fc

    def raw(self, images, targets):
        with torch.no_grad(), capture(self.layer) as store:
            logits = self.model(images)
        feats = store["out"]
        if targets is None:
            targets = logits.argmax(1)
        weights = self.fc.weight[targets]  # [B,C]: each image's own target row
        return torch.einsum("bc,bchw->bhw", weights, feats), logits, targets


class PackageCAM(CamMethod):
    """A method of the `pytorch_grad_cam` package (named by its class), batched with one
    `ClassifierOutputTarget` per image. The package post-processes its maps itself with the
    same ReLU / upsample / min–max steps (its resize is OpenCV's bilinear, half-pixel centred
    like ours)."""

    package_class: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}
    gradients: ClassVar[bool] = True  # does the method read gradients at the target layer?
    postprocessed = True

    def raw(self, images, targets):
        package = importlib.import_module("pytorch_grad_cam")
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        wanted = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets]
        # Our leaf-making hook must be registered before the package's own hooks.
        with autograd_from(self.model, self.layer, self.gradients), torch.enable_grad():
            cam = getattr(package, self.package_class)(model=self.model,
                                                       target_layers=[self.layer])
            for key, value in self.options.items():
                setattr(cam, key, value)
            try:
                maps = torch.from_numpy(cam(input_tensor=images, targets=wanted))
                logits = cam.outputs.detach()
            finally:
                # Not `with cam:` — the package's __exit__ swallows IndexError.
                cam.activations_and_grads.release()
                self.model.zero_grad(set_to_none=True)
        if targets is None:
            targets = logits.argmax(1)
        return maps, logits, targets


@register_cam("gradcam")
class GradCAM(PackageCAM):
    """Selvaraju et al. 2017: channel weights = spatial mean of the gradients."""

    package_class = "GradCAM"


@register_cam("gradcam++")
class GradCAMPlusPlus(PackageCAM):
    """Chattopadhyay et al. 2018: higher-order gradient weights."""

    package_class = "GradCAMPlusPlus"


@register_cam("scorecam")
class ScoreCAM(PackageCAM):
    """Wang et al. 2020: weights from the score of the input masked by each channel (one
    forward per channel, so slow; the package batches those forwards)."""

    package_class = "ScoreCAM"
    options = {"batch_size": 64}
    gradients = False


@register_cam("eigencam")
class EigenCAM(PackageCAM):
    """Muhammad & Yeasin 2020: first principal component of the activations; class-agnostic
    (the target only labels the output)."""

    package_class = "EigenCAM"
    gradients = False


@register_cam("layercam")
class LayerCAM(PackageCAM):
    """Jiang et al. 2021: positive gradients weight each activation element-wise."""

    package_class = "LayerCAM"


def build_cam(name: str | None, model: nn.Module, arch: str, layer: str | None = None
              ) -> CamMethod:
    """A ready method for `model`; `None` picks plain CAM (every registered arch is GAP+FC)."""
    return get_cam_method(name or default_method(arch))(model, arch, layer)


def default_method(arch: str) -> str:
    return "cam" if arch_spec(arch).classifier == "fc" else "gradcam"
