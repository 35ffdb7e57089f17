"""Training configuration: one frozen dataclass, named presets with the papers' settings,
and `key=value` overrides converted to the field types."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

from smix.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from smix.cpus import auto_workers
from smix.data import CIFAR10_MEAN, CIFAR10_STD
from smix.errors import UserError


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    preset: str
    arch: str
    dataset: str  # cifar10 | cifar100 | imagenet | tinyimagenet | shapes | folder
    data: Path
    out: Path
    method: str = "none"
    method_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    arch_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    epochs: int = 200
    batch_size: int = 128  # global, split over torchrun processes
    # images per forward/backward pass in each process (0: its whole batch); gradients of the
    # passes accumulate into one step of the whole batch (pretrain.engine.train_step)
    micro_batch: int = 0
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = (60, 120, 160)
    gamma: float = 0.2
    warmup_epochs: int = 0
    input_size: int = 32
    resize: int = 32
    crop: int = 32
    train_aug: str = "cifar"
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD
    workers: int = 4  # `workers=auto` (the ImageNet presets): `resolve_workers`
    # loader workers live for the whole run (pretrain.engine.make_loader); no effect on results
    persistent_workers: bool = True
    loader: str = "auto"  # auto (DALI on CUDA when installed) | torch | dali | nvjpeg; see
    # pretrain.dali and pretrain.nvjpeg
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # auto (bf16/fp16 on GPU, off on CPU) | off | bf16 | fp16
    channels_last: str = "auto"  # auto (on for GPU) | on | off
    # CUDA: cuDNN times its convolution algorithms once per shape and keeps the fastest, as
    # torchvision's references and timm train; GPU runs are not bit-exact either way
    cudnn_benchmark: bool = True
    compile: bool = False
    skip_bad_images: bool = False
    limit_train: int = 0  # 0 = all; otherwise N evenly spaced training samples (smoke runs)
    limit_val: int = 0
    progress: bool = True
    # What resolving the preset changed on its own (rescaled milestones, scaled lr), in words;
    # recorded in config.json and printed at the start of a run.
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problem = config_problem(self)
        if problem:
            raise UserError(f"bad setting: {problem}")


CHOICES = {"loader": ("auto", "torch", "dali", "nvjpeg"), "amp": ("auto", "off", "bf16", "fp16"),
           "channels_last": ("auto", "on", "off")}


def config_problem(cfg: TrainConfig) -> str | None:
    """What is wrong with a config, in words (None: nothing); checked when one is made, so
    that a bad `key=value` ends in one line, not in a traceback from deep inside torch."""
    for key, valid in CHOICES.items():
        if getattr(cfg, key) not in valid:
            return f"{key}={getattr(cfg, key)!r}; valid: {', '.join(valid)}"
    if cfg.device != "auto":
        import torch
        try:
            torch.device(cfg.device)
        except (RuntimeError, ValueError):
            return f"device={cfg.device!r}; valid: auto, cpu, cuda, cuda:N"
    positive = ("epochs", "batch_size", "input_size", "resize", "crop")
    at_least_0 = ("micro_batch", "workers", "warmup_epochs", "limit_train", "limit_val")
    for key in positive:
        if getattr(cfg, key) < 1:
            return f"{key}={getattr(cfg, key)} must be at least 1"
    for key in at_least_0:
        if isinstance(getattr(cfg, key), int) and getattr(cfg, key) < 0:
            return f"{key}={getattr(cfg, key)} must not be negative"
    if cfg.batch_size < 2:
        return (f"batch_size={cfg.batch_size}: a training step takes at least 2 images (a pair "
                "to mix, BatchNorm's batch statistics; the engine skips smaller batches)")
    # NaN and inf pass the comparisons below (and the checkpoint's metadata check only
    # refuses them after the first epoch)
    for key in ("lr", "momentum", "weight_decay", "gamma"):
        if not math.isfinite(getattr(cfg, key)):
            return f"{key}={getattr(cfg, key):g} must be a finite number"
    for key in ("mean", "std"):
        if not all(math.isfinite(v) for v in getattr(cfg, key)):
            return f"{key}={_csv(getattr(cfg, key))} must be finite numbers"
    if not (cfg.lr > 0 and 0 <= cfg.momentum < 1 and cfg.weight_decay >= 0 and cfg.gamma > 0):
        return (f"lr={cfg.lr:g} must be > 0, momentum={cfg.momentum:g} in [0, 1), "
                f"weight_decay={cfg.weight_decay:g} >= 0, gamma={cfg.gamma:g} > 0")
    if any(m < 1 for m in cfg.milestones):
        return f"milestones={_csv(cfg.milestones)} must be epochs from 1"
    if len(cfg.mean) != 3 or len(cfg.std) != 3 or min(cfg.std) <= 0:
        return (f"mean={_csv(cfg.mean)} and std={_csv(cfg.std)} need 3 values each (RGB, in "
                "[0, 1] units), std above 0")
    if cfg.crop > cfg.resize:
        return f"crop={cfg.crop} is larger than resize={cfg.resize}"
    from pretrain.mixers import get_mixer
    side = get_mixer(cfg.method, **cfg.method_params).min_image_side()
    if cfg.input_size < side:
        return (f"input_size={cfg.input_size}: {cfg.method} reads saliency in a 3x3 "
                f"neighbourhood; it needs images of at least {side}x{side}")
    if cfg.dataset in ("cifar10", "cifar100") and cfg.input_size != 32:
        return (f"input_size={cfg.input_size}: CIFAR images are 32x32 and the CIFAR recipe "
                "crops 32 from them padded by 4")
    return None


# Settings a user does not set with key=value: given by flags, or derived.
# set by flags or derived, or (the last two) set one key at a time: method.<p>=v, arch.<p>=v
_NOT_SETTABLE = ("preset", "data", "out", "method", "notes", "method_params", "arch_kwargs")


def _cifar(arch: str, classes: int, **kw: Any) -> dict[str, Any]:
    # batch 256 as the SaliencyMix paper trains (its official code: 128). Normalisation: the
    # CIFAR-10 statistics on CIFAR-100 too, as the codes of this recipe normalise both
    # (SaliencyMix_CIFAR/saliencymix.py, Cutout's and CutMix-PyTorch's train.py). GuidedMixup's
    # code (PuzzleMix's recipe: 1200 epochs, wd 1e-4, no preset here) normalises CIFAR-100
    # with (129.3, 124.1, 112.4) / (68.2, 65.4, 70.4): `mean=`/`std=` set those.
    base = dict(arch=arch, dataset=f"cifar{classes}", epochs=200, batch_size=256, lr=0.1,
                weight_decay=5e-4, milestones=(60, 120, 160), gamma=0.2, input_size=32,
                resize=32, crop=32, train_aug="cifar", mean=CIFAR10_MEAN, std=CIFAR10_STD)
    return {**base, **kw}


def _imagenet(arch: str, **kw: Any) -> dict[str, Any]:
    # workers: decoding JPEGs for a GPU wants every core the process has
    base = dict(arch=arch, dataset="imagenet", epochs=300, batch_size=256, lr=0.1,
                weight_decay=1e-4, milestones=(75, 150, 225), gamma=0.1, input_size=224,
                resize=256, crop=224, train_aug="imagenet", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                nesterov=True, workers="auto")
    return {**base, **kw}


PRESETS: dict[str, dict[str, Any]] = {}
for _c in (10, 100):
    PRESETS[f"cifar{_c}-resnet18"] = _cifar("cifar_resnet18", _c)
    PRESETS[f"cifar{_c}-resnet50"] = _cifar("cifar_resnet50", _c)
    PRESETS[f"cifar{_c}-wrn28-10"] = _cifar("wide_resnet28_10", _c, arch_kwargs={"dropout": 0.3})
    PRESETS[f"cifar{_c}-preactresnet18"] = _cifar("preact_resnet18", _c)
PRESETS["tinyimagenet-resnet50"] = _imagenet(
    "resnet50", dataset="tinyimagenet", epochs=200, batch_size=128, lr=0.1, weight_decay=5e-4,
    milestones=(60, 120, 160), gamma=0.2, input_size=64, resize=64, crop=64, train_aug="cifar",
    nesterov=True)
PRESETS["imagenet-resnet50"] = _imagenet("resnet50")
PRESETS["imagenet-resnet101"] = _imagenet("resnet101")
# Sized for the demo's shapes data on a 2-core CPU: ImageNet stem (so detection transfer and
# CAM work as for ImageNet backbones), 64 px, three epochs. lr 0.02 without crops: at lr 0.05
# with random-resized crops the first epoch diverged (train loss 2.9 > ln 4) and 6 epochs
# reached 48%; this setting reaches 99.5% after one epoch on the demo's data.
PRESETS["shapes-resnet18"] = dict(
    arch="resnet18", dataset="shapes", epochs=3, batch_size=32, lr=0.02, weight_decay=5e-4,
    milestones=(2,), gamma=0.1, input_size=64, resize=64, crop=64, train_aug="none",
    mean=IMAGENET_MEAN, std=IMAGENET_STD, nesterov=True, workers=0, warmup_epochs=0)

# Method defaults that depend on the dataset (the papers' settings): mixing probability 0.5 on
# CIFAR for CutMix/SaliencyMix, 1.0 on ImageNet. Cutout's hole (`_method_defaults`): DeVries &
# Taylor's 16 px on CIFAR-10 and 8 px on CIFAR-100 (a quarter of the crop side), half the crop
# side elsewhere (112 at 224, as CutMix's ImageNet baseline).
METHOD_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "cifar": {"cutmix": {"prob": 0.5}, "saliencymix": {"prob": 0.5}},
    "imagenet": {"cutmix": {"prob": 1.0}, "saliencymix": {"prob": 1.0}},
}
# GuidedMixup's mixing probability depends on its saliency, not on the dataset: every command
# of the official README (3neutronstar/GuidedMixup: CIFAR-100, Tiny-ImageNet and FGVC) runs
# Guided-SR with --mix_prob 0.5 and Guided-AP with --mix_prob 0.8 (its argparse default, 1.0,
# is not what the paper's tables ran).
GUIDED_PROB = {"sr": 0.5, "ap": 0.8}


def _method_defaults(method: str, values: dict[str, Any], given: dict[str, str]
                     ) -> dict[str, Any]:
    """The dataset's (and for GuidedMixup the saliency's) defaults of `method`'s parameters;
    `given` are the user's `method.<p>=v`, which override them afterwards."""
    family = "cifar" if values["dataset"].startswith("cifar") else "imagenet"
    defaults = dict(METHOD_DEFAULTS[family].get(method, {}))
    if method == "cutout":
        side = int(values["input_size"])
        defaults["size"] = max(1, side // 4 if values["dataset"] == "cifar100" else side // 2)
    if method == "guidedmixup":
        saliency = given.get("saliency", "sr")
        if saliency in GUIDED_PROB:  # an unknown one is the mixer's error to report
            defaults["prob"] = GUIDED_PROB[saliency]
    return defaults


def resolve_workers(workers: int | str, notes: tuple[str, ...]) -> tuple[int, tuple[str, ...]]:
    """`workers=auto` as this machine's count (`smix.cpus.auto_workers`), said in the notes;
    what an earlier resolution said there (the machine a resumed run started on) is dropped.
    Any count of at least 1 draws the same crops (`pretrain.data.SeededSampler`)."""
    kept = tuple(n for n in notes if not n.startswith("workers=auto"))
    if workers != "auto":
        return int(workers), kept
    count = auto_workers()
    return count, (*kept, f"workers=auto: {count} on this machine")


def convert_setting(value: str, annotation: Any, key: str) -> Any:
    if key == "workers" and value == "auto":
        return value  # resolved by `resolve_workers`
    origin = typing.get_origin(annotation)
    try:
        if annotation is bool:
            if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(value)
            return value.lower() in ("1", "true", "yes", "on")
        if annotation is int:
            return int(value)
        if annotation is float:
            return float(value)
        if annotation is Path:
            return Path(value)
        if origin is tuple:
            inner = typing.get_args(annotation)[0]
            return tuple(inner(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise UserError(f"bad value for {key}: {value!r}") from None
    if origin is dict:
        raise UserError(f"{key} cannot be set with key=value; use method.<param>=value")
    return value


def build_config(preset: str, data: Path, out: Path, method: str = "none",
                 overrides: dict[str, str] | None = None) -> TrainConfig:
    """Preset, then the user's `key=value` overrides, then what follows from them: the
    dataset-dependent method defaults, LR milestones rescaled to `epochs`, the LR scaled
    linearly with `batch_size` (each change said in `notes`). Every value is typed.

    `method.<param>=v` sets a mixer parameter; `arch.<param>=v` an architecture parameter.
    """
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; valid: {', '.join(sorted(PRESETS))}")
    values: dict[str, Any] = dict(PRESETS[preset])
    arch_kwargs: dict[str, Any] = dict(values.pop("arch_kwargs", {}))
    method_set: dict[str, str] = {}
    hints = typing.get_type_hints(TrainConfig)
    names = {f.name for f in dataclasses.fields(TrainConfig)} - set(_NOT_SETTABLE)
    for key, raw in (overrides or {}).items():
        if key.startswith("method."):
            method_set[key[len("method."):]] = raw
        elif key.startswith("arch."):
            arch_kwargs[key[len("arch."):]] = _literal(raw)
        elif key in names:
            values[key] = convert_setting(raw, hints[key], key)
        else:
            raise UserError(f"unknown setting {key!r}; valid: {', '.join(sorted(names))}, "
                            "method.<param>, arch.<param>")
    notes = _follow_preset(PRESETS[preset], values, set(overrides or {}))
    if "workers" in values:  # `auto` (a preset's or the user's): resolved, saved as a number
        values["workers"], said = resolve_workers(values["workers"], ())
        notes.extend(said)
    method_params = typed_method_params(method, {**_method_defaults(method, values, method_set),
                                                  **method_set})
    return TrainConfig(preset=preset, data=Path(data), out=Path(out), method=method,
                       method_params=method_params, arch_kwargs=arch_kwargs,
                       notes=tuple(notes), **values)


def _follow_preset(preset: dict[str, Any], values: dict[str, Any], given: set[str]) -> list[str]:
    """Keep the preset's recipe when the user changes `epochs` or `batch_size` alone: the LR
    milestones at the same fractions of training, the LR linear in the batch (Goyal et al.,
    as transfer does). Returns the changes in words."""
    notes = []
    if "epochs" in given and "milestones" not in given and values["epochs"] != preset["epochs"]:
        scale = values["epochs"] / preset["epochs"]
        values["milestones"] = tuple(max(1, int(m * scale + 0.5)) for m in preset["milestones"])
        notes.append(f"LR milestones rescaled to {values['epochs']} epochs: "
                     f"{_csv(preset['milestones'])} -> {_csv(values['milestones'])}")
    if ("batch_size" in given and "lr" not in given
            and values["batch_size"] != preset["batch_size"]):
        values["lr"] = preset["lr"] * values["batch_size"] / preset["batch_size"]
        notes.append(f"lr scaled linearly with the batch: {preset['lr']:g} x "
                     f"{values['batch_size']}/{preset['batch_size']} = {values['lr']:g}")
    return notes


def _csv(items: tuple[Any, ...]) -> str:
    return ",".join(str(i) for i in items)


def typed_method_params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """The mixer's parameters converted to its field types (and validated), so that a saved
    config holds numbers, not the strings they were typed as."""
    from pretrain.mixers import get_mixer
    mixer = get_mixer(method, **params)
    return {k: getattr(mixer, k) for k in params}


def config_from_json(saved: dict[str, Any], **replace: Any) -> TrainConfig:
    """A `TrainConfig` from its `config.json` (JSON lists back to tuples, strings to paths),
    with `replace` applied; the inverse of writing it with `smix.io.to_jsonable`."""
    hints = typing.get_type_hints(TrainConfig)
    values = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name not in saved:
            continue  # a field added since the run was written: its default
        v, kind = saved[f.name], hints[f.name]
        if kind is Path:
            v = Path(v)
        elif typing.get_origin(kind) is tuple:
            v = tuple(v)
        values[f.name] = v
    values["method_params"] = typed_method_params(values["method"], values["method_params"])
    return TrainConfig(**{**values, **replace})


def _literal(raw: str) -> Any:
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw
