"""Typed configuration of a transfer run: the CLI's config, the presets, and the resolved settings.

A preset is the published recipe (batch, lr, schedule, input sizes); `resolve` applies `--iters`
and `key=value` overrides to it once, so both backends train with the same resolved numbers and
the run folder records them. Changing the batch rescales the recipe as detectron2's
`DefaultTrainer.auto_scale_workers` does (Goyal et al., "ImageNet in 1 hour"): with
scale = batch / preset batch, the learning rate is multiplied by it and the iteration counts
(max_iter, LR steps, warmup, checkpoint period) divided by it, rounded to integers, so that the
schedule sees the same number of images; a value set explicitly (`lr=`, `steps=`, `warmup=`,
`checkpoint_period=`, `--iters`) is kept as given, and with `--iters` the LR steps keep their
fractions of the schedule (there is no periodic evaluation to rescale). The batch is the
*effective* batch: `micro_batch=N|auto` splits it into micro-batches with gradient accumulation
(`transfer.micro`) and changes nothing of the recipe; `amp=bf16|fp16` trains in mixed precision
on CUDA.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

from smix.errors import UserError
from smix.io import to_jsonable

ARCHS = ("c4", "fpn")
BACKENDS = ("auto", "detectron2", "torchvision")
AMP_MODES = ("off", "bf16", "fp16")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A published fine-tuning recipe (sizes are shorter-side pixels, as detectron2's INPUT)."""

    name: str
    batch: int
    lr: float
    max_iter: int
    steps: tuple[int, ...]
    warmup_iters: int = 100
    warmup_factor: float = 1e-3
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    min_size_train: tuple[int, ...] = tuple(range(480, 801, 32))
    max_size_train: int = 1333
    min_size_test: int = 800
    max_size_test: int = 1333
    checkpoint_period: int = 5000


_PRESETS: dict[str, Callable[[], Preset]] = {}


def register_preset(name: str) -> Callable[[Callable[[], Preset]], Callable[[], Preset]]:
    def deco(fn: Callable[[], Preset]) -> Callable[[], Preset]:
        _PRESETS[name] = fn
        return fn
    return deco


@register_preset("d2-voc")
def d2_voc() -> Preset:
    """detectron2's PascalVOC-Detection/faster_rcnn_R_50_C4 recipe (18k iters, ~17.4 epochs)."""
    return Preset("d2-voc", batch=16, lr=0.02, max_iter=18000, steps=(12000, 16000))


@register_preset("paper")
def paper() -> Preset:
    """The SaliencyMix / CutMix papers' VOC fine-tuning: batch 8, lr 4e-3, 41k iters, step 33k."""
    return Preset("paper", batch=8, lr=4e-3, max_iter=41000, steps=(33000,))


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str) -> Preset:
    try:
        return _PRESETS[name]()
    except KeyError:
        raise UserError(f"unknown preset {name!r}; valid: {', '.join(list_presets())}") from None


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    """What `smix transfer` was asked to do (the CLI builds it; library code reads it)."""

    ckpt: Path
    voc_root: Path
    out: Path
    backend: str = "auto"
    preset: str = "d2-voc"
    arch: str = "c4"
    classes: str = "voc"
    iters: int | None = None
    overrides: tuple[tuple[str, str], ...] = ()
    resume: bool = False
    num_gpus: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    dist_url: str = "auto"
    device: str = "auto"
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class Settings:
    """The resolved numbers a run trains and evaluates with (written to config.json)."""

    preset: str
    batch: int
    lr: float
    max_iter: int
    steps: tuple[int, ...]
    warmup_iters: int
    warmup_factor: float
    gamma: float
    momentum: float
    weight_decay: float
    min_size_train: tuple[int, ...]
    max_size_train: int
    min_size_test: int
    max_size_test: int
    checkpoint_period: int
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    rpn_batch: int = 256
    roi_batch: int = 512
    rpn_pre_nms_train: int = 12000
    rpn_post_nms_train: int = 2000
    rpn_pre_nms_test: int = 6000
    rpn_post_nms_test: int = 1000
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_image: int = 100
    workers: int = 2
    seed: int = 0
    log_period: int = 20
    train_sets: str = "2007:trainval,2012:trainval"
    test_set: str = "2007:test"
    micro_batch: int | None = None  # images per forward/backward pass; None: auto
    amp: str = "off"  # off (fp32, the recipe) | bf16 | fp16 (CUDA only)
    d2_options: tuple[tuple[str, str], ...] = ()  # raw detectron2 keys (UPPER.CASE=value)


# Settings that change how a run is carried out, not what it trains and measures: a resumed run
# may change them (e.g. a smaller micro_batch after an out-of-memory, as that error advises).
RUN_ONLY_SETTINGS = ("workers", "log_period", "checkpoint_period", "micro_batch")


def recipe(s: Settings) -> dict[str, Any]:
    """The settings that make a run what it is (JSON values): `--resume` must keep all of them."""
    return {k: v for k, v in to_jsonable(s).items() if k not in RUN_ONLY_SETTINGS}


def first_difference(before: Mapping[str, Any], now: Mapping[str, Any]
                     ) -> tuple[str, Any, Any] | None:
    """(key, old, new) of the first key of `now` whose JSON value differs from the one in
    `before`; keys `before` lacks (recorded by later versions only) are not compared."""
    for key, value in now.items():
        value = to_jsonable(value)
        if key in before and before[key] != value:
            return key, before[key], value
    return None


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _micro_batch(text: str) -> int | None:
    if text == "auto":
        return None
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _amp(text: str) -> str:
    if text not in AMP_MODES:
        raise ValueError(text)
    return text


# key -> (Settings field(s), parser); `min_size` also sets the test size to its largest value.
_OVERRIDES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "batch": ("batch", int), "batch_size": ("batch", int),  # total images per iteration
    "lr": ("lr", float), "steps": ("steps", _ints),
    "warmup": ("warmup_iters", int), "gamma": ("gamma", float),
    "weight_decay": ("weight_decay", float), "momentum": ("momentum", float),
    "min_size": ("min_size_train", _ints), "max_size": ("max_size_train", int),
    "test_size": ("min_size_test", int), "test_max_size": ("max_size_test", int),
    "checkpoint_period": ("checkpoint_period", int), "anchor_sizes": ("anchor_sizes", _ints),
    "rpn_batch": ("rpn_batch", int), "roi_batch": ("roi_batch", int),
    "rpn_pre_nms_train": ("rpn_pre_nms_train", int),
    "rpn_post_nms_train": ("rpn_post_nms_train", int),
    "rpn_pre_nms_test": ("rpn_pre_nms_test", int), "rpn_post_nms_test": ("rpn_post_nms_test", int),
    "score_thresh": ("score_thresh", float), "nms_thresh": ("nms_thresh", float),
    "detections_per_image": ("detections_per_image", int), "workers": ("workers", int),
    "seed": ("seed", int), "log_period": ("log_period", int),
    "train_sets": ("train_sets", str), "test_set": ("test_set", str),
    "micro_batch": ("micro_batch", _micro_batch), "amp": ("amp", _amp),
}


def _parse_overrides(overrides: tuple[tuple[str, str], ...]) -> tuple[dict[str, Any], list]:
    values: dict[str, Any] = {}
    d2: list[tuple[str, str]] = []
    for key, raw in overrides:
        if key[:1].isupper() and "." in key:
            d2.append((key, raw))
            continue
        if key not in _OVERRIDES:
            raise UserError(f"unknown override {key!r}; valid: {', '.join(sorted(_OVERRIDES))} "
                            "(or detectron2 keys such as SOLVER.CHECKPOINT_PERIOD=...)")
        field, parse = _OVERRIDES[key]
        try:
            values[field] = parse(raw)
        except ValueError:
            raise UserError(f"override {key}={raw!r}: not a valid value") from None
    return values, d2


def _arch_defaults(arch: str) -> dict[str, Any]:
    """detectron2's RPN proposal counts: C4 (Base-RCNN-C4 + defaults) and FPN (per level)."""
    if arch == "c4":
        return {"rpn_pre_nms_train": 12000, "rpn_post_nms_train": 2000,
                "rpn_pre_nms_test": 6000, "rpn_post_nms_test": 1000}
    return {"rpn_pre_nms_train": 2000, "rpn_post_nms_train": 1000,
            "rpn_pre_nms_test": 1000, "rpn_post_nms_test": 1000}


def _batch_scaled(p: Preset, batch: int, iters: int | None) -> dict[str, Any]:
    """lr, max_iter, steps, warmup and checkpoint period for `batch`, as detectron2's
    `auto_scale_workers` rescales them (lr x scale, iterations / scale, `int(round(...))`);
    with `--iters` the steps keep their fractions of the schedule."""
    scale = batch / p.batch
    if iters is None:
        max_iter = int(round(p.max_iter / scale))
        steps = tuple(int(round(s / scale)) for s in p.steps)
    elif iters < 0:
        raise UserError(f"--iters must be >= 0, got {iters}")
    else:
        max_iter, fraction = iters, iters / p.max_iter
        steps = tuple(int(round(s * fraction)) for s in p.steps)
    return dict(lr=p.lr * scale, max_iter=max_iter, steps=steps,
                warmup_iters=int(round(p.warmup_iters / scale)),
                checkpoint_period=max(1, int(round(p.checkpoint_period / scale))))


def resolve(cfg: TransferConfig) -> Settings:
    """Preset + `--iters` + overrides -> the numbers a run uses."""
    if cfg.arch not in ARCHS:
        raise UserError(f"unknown --arch {cfg.arch!r}; valid: {', '.join(ARCHS)}")
    p = get_preset(cfg.preset)
    values, d2 = _parse_overrides(cfg.overrides)
    batch = values.get("batch", p.batch)
    if batch < 1:
        raise UserError(f"batch must be >= 1, got {batch}")
    base = dict(
        preset=p.name, batch=batch, **_batch_scaled(p, batch, cfg.iters),
        warmup_factor=p.warmup_factor, gamma=p.gamma, momentum=p.momentum,
        weight_decay=p.weight_decay, min_size_train=p.min_size_train,
        max_size_train=p.max_size_train, min_size_test=p.min_size_test,
        max_size_test=p.max_size_test, **_arch_defaults(cfg.arch))
    max_iter = base["max_iter"]
    base["warmup_iters"] = min(base["warmup_iters"], max_iter)
    if "min_size_train" in values and "min_size_test" not in values:
        values["min_size_test"] = max(values["min_size_train"] or (0,))
    if "max_size_train" in values and "max_size_test" not in values:
        values["max_size_test"] = values["max_size_train"]
    merged = {**base, **values}
    # A step at or after the last iteration changes nothing (and detectron2 rejects it).
    merged["steps"] = tuple(x for x in merged["steps"] if x < max_iter)
    settings = Settings(**merged, d2_options=tuple(d2))
    _check(settings)
    if cfg.arch == "fpn" and len(settings.anchor_sizes) != 5:
        raise UserError(f"--arch fpn needs five anchor sizes (P2..P6), got {settings.anchor_sizes}")
    return settings


def _check(s: Settings) -> None:
    positive = ("lr", "min_size_test", "max_size_train", "max_size_test", "checkpoint_period",
                "rpn_batch", "roi_batch", "rpn_pre_nms_train", "rpn_post_nms_train",
                "rpn_pre_nms_test", "rpn_post_nms_test", "detections_per_image", "log_period")
    for name in positive:
        if getattr(s, name) <= 0:
            raise UserError(f"{name} must be > 0, got {getattr(s, name)}")
    # SGD refuses negative momentum / weight decay, numpy's SeedSequence a negative seed, and
    # detectron2's warmup a negative length: said here, before any training, in one line
    for name in ("momentum", "weight_decay", "warmup_iters", "seed"):
        if getattr(s, name) < 0:
            raise UserError(f"{name} must be >= 0, got {getattr(s, name)}")
    if not s.min_size_train or min(s.min_size_train) <= 0:
        raise UserError("min_size must list positive sizes")
    if not s.anchor_sizes or min(s.anchor_sizes) <= 0:
        raise UserError("anchor_sizes must list positive sizes")
    # detectron2's MultiStepParamScheduler takes milestones > 0, strictly increasing
    if list(s.steps) != sorted(set(s.steps)) or (s.steps and s.steps[0] < 1):
        raise UserError(f"steps must be increasing positive iterations, got {s.steps}")
    if s.workers < 0:
        raise UserError("workers must be >= 0")
