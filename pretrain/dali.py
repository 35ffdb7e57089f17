"""Class-folder datasets decoded and augmented by NVIDIA DALI (optional extra `dali`).

On a GPU the PIL + torchvision loader caps ImageNet pretraining at about a quarter of what the
training step can take (issue 14: 1149 img/s from 15 workers against 4716 img/s for the step
on an H200). Here JPEGs are decoded by nvjpeg (`device="mixed"`), cropped, resized and flipped
by DALI, and the colour half of the recipe runs right after, as batched tensor ops on the GPU:

* train (`imagenet`/`shapes` recipes): RandomResizedCrop fused into decoding
  (`decoders.image_random_crop`: area ~ U(scale), aspect log-uniform in (3/4, 4/3), as
  torchvision), linear resize with antialiasing, horizontal flip p=0.5; then on the device
  ColorJitter(0.4, 0.4, 0.4) in a random order per sample and PCA lighting 0.1
  (`smix.data.jitter_lighting_batch`, draws from a per-epoch host generator), normalisation;
  the `none` recipe (the demo's): a square resize, no flip.
* eval: resize of the shorter side to `resize`, centre crop `crop`, normalisation (a square
  resize when `resize == crop`, as `smix.data.eval_transform`).

Order and sharding: every epoch the file list is permuted on the host by a generator seeded
from (seed, epoch) — the same on every rank — cut to a multiple of the world size, and DALI's
reader takes its `shard_id`/`num_shards` part; so an epoch's data is a function of the epoch
alone and a run resumed at an epoch boundary sees the same order. Evaluation shards the list
with `smix.dist.shard_indices` (exact totals, as the torch loader).

Without CUDA the same pipelines run on DALI's CPU operators (`device_id=None`): that is how the
tests check it on a machine without a GPU. Differences from the torch loader, within the
recipe's distribution: colour ops on float pixels (PIL rounds to uint8 after each), DALI's
resampling filter, an eval centre crop that may sit up to a pixel apart where the margin is odd
(torchvision rounds it half to even; measured at 256/224 on a 500x375 picture: within one
grey level of a coordinate ramp), and no `skip_bad_images` (DALI stops on an unreadable file).
The decoders keep the torch loader's pixels otherwise (`_decoder_args`: EXIF orientation
ignored, libjpeg's chroma upsampling on the GPU).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Iterator, Sequence

import torch

from smix.data import TrainAug, finish_on_device
from smix.devices import upload
from smix.dist import shard_indices
from smix.errors import UserError

LOADERS = ("auto", "torch", "dali", "nvjpeg")
# recipe -> RandomResizedCrop area range (None: a square resize, no flip); the colour ops
# apply to `imagenet` only
RECIPES: dict[str, tuple[float, float] | None] = {"imagenet": (0.08, 1.0), "shapes": (0.5, 1.0),
                                                  "none": None}
ASPECT = (3.0 / 4.0, 4.0 / 3.0)
INSTALL = ("pip install 'saliencymix-toolkit[dali]' (nvidia-dali-cuda120, for torch built with "
           "CUDA 12) or 'saliencymix-toolkit[dali-cu13]' (nvidia-dali-cuda130, for CUDA 13)")


def dali_installed() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def resolve_loader(loader: str, dataset: str, train_aug: str, device: torch.device,
                   skip_bad_images: bool = False) -> str:
    """`torch`, `dali` or `nvjpeg` for a run. `auto`: DALI when it is installed, the run trains
    on CUDA and reads class folders with a recipe DALI implements; the torch loader otherwise.
    `nvjpeg` (`pretrain.nvjpeg`: torchvision's GPU decoder, no extra) is chosen by name only:
    on an H200 its engine epoch was 0.837 of the step against the torch loader's 0.9075 (its
    decoding takes GPU time from the step). A loader asked for where it cannot run is a user
    error naming why."""
    if loader not in LOADERS:
        raise UserError(f"loader must be one of {', '.join(LOADERS)}, got {loader!r}")
    if loader == "nvjpeg":
        from pretrain.nvjpeg import nvjpeg_works

        why = _class_folder_recipe(dataset, train_aug) or nvjpeg_works(device)
        if why:
            raise UserError(f"loader=nvjpeg: {why}")
        return loader
    why = _class_folder_recipe(dataset, train_aug)
    if why is None and skip_bad_images:
        why = "DALI cannot skip unreadable images (skip_bad_images)"
    elif why is None and not dali_installed():
        why = f"NVIDIA DALI is not installed: {INSTALL}"
    if loader == "dali" and why:
        raise UserError(f"loader=dali: {why}")
    if loader == "auto":
        return "dali" if why is None and device.type == "cuda" else "torch"
    return loader


def _class_folder_recipe(dataset: str, train_aug: str) -> str | None:
    """Why a GPU-decoding loader (DALI, nvjpeg) cannot take this data (None: it can)."""
    if dataset.startswith("cifar"):
        return "CIFAR pickles are read by the torch loader"
    if train_aug not in RECIPES:
        return f"train_aug={train_aug} has no GPU-decoding pipeline (only {', '.join(RECIPES)})"
    return None


def epoch_files(n: int, seed: int, world_size: int) -> list[int]:
    """This epoch's order of the training files (every rank computes the same), cut to a
    multiple of the world size so that DALI's contiguous shards are equal."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[:n - n % world_size]


@dataclasses.dataclass(frozen=True)
class PipeSpec:
    """What a DALI pipeline needs from the run config."""

    batch: int
    size: int  # train: output side; eval: crop
    resize: int
    recipe: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    color_jitter: float = 0.4
    lighting: float = 0.1
    threads: int = 4
    device_id: int | None = None  # None: DALI's CPU operators only


def _pipeline(spec: PipeSpec, files: Sequence[str], labels: Sequence[int], train: bool,
              seed: int, shard_id: int, num_shards: int):
    """A built DALI pipeline yielding (images uint8 CHW for train / normalised float for
    eval, labels int32)."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = spec.device_id is not None
    decoder = "mixed" if gpu else "cpu"
    pad = _decoder_args(gpu)

    @pipeline_def(batch_size=spec.batch, num_threads=spec.threads, device_id=spec.device_id,
                  seed=seed % (2**31 - 1), prefetch_queue_depth=2)
    def pipe():
        jpegs, lab = fn.readers.file(files=list(files), labels=list(labels), name="reader",
                                     shard_id=shard_id, num_shards=num_shards,
                                     random_shuffle=False, pad_last_batch=False)
        if train and RECIPES[spec.recipe] is None:  # the `none` recipe: resize only
            images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB, **pad)
            images = fn.resize(images, resize_x=spec.size, resize_y=spec.size,
                               interp_type=types.INTERP_LINEAR, antialias=True)
            images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW")
        elif train:
            images = fn.decoders.image_random_crop(
                jpegs, device=decoder, output_type=types.RGB, random_area=list(RECIPES[spec.recipe]),
                random_aspect_ratio=list(ASPECT), num_attempts=10, **pad)
            images = fn.resize(images, resize_x=spec.size, resize_y=spec.size,
                               interp_type=types.INTERP_LINEAR, antialias=True)
            images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW",
                                              mirror=fn.random.coin_flip(probability=0.5))
        else:
            images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB, **pad)
            if spec.resize != spec.size:
                images = fn.resize(images, resize_shorter=spec.resize,
                                   interp_type=types.INTERP_LINEAR, antialias=True)
            else:
                images = fn.resize(images, resize_x=spec.size, resize_y=spec.size,
                                   interp_type=types.INTERP_LINEAR, antialias=True)
            images = fn.crop_mirror_normalize(
                images, dtype=types.FLOAT, output_layout="CHW", crop=(spec.size, spec.size),
                crop_pos_x=0.5, crop_pos_y=0.5, mean=[m * 255 for m in spec.mean],
                std=[s * 255 for s in spec.std])
        return images, lab

    p = pipe()
    p.build()
    return p


def _decoder_args(gpu: bool) -> dict:
    """The decoders' arguments: pixels as the torch loader decodes them, and NVIDIA's ResNet-50
    example's nvjpeg buffers on a GPU.

    * ``adjust_orientation=False``: DALI 2.x (its nvImageCodec decoders) turns a picture upright
      from its EXIF orientation tag by default; PIL and torchvision's ``decode_jpeg`` (the torch
      loader, and every later stage reading the checkpoint's images) do not, nor does DALI 1.30,
      whose decoders have no such argument (hence asked only where the schema has it).
    * ``jpeg_fancy_upsampling=True`` (``mixed`` only): nvjpeg upsamples chroma as libjpeg does
      (PIL, DALI's CPU decoder), not with its cheaper default; the only GPU-vs-CPU pixel
      difference left is the hardware decoder's IDCT rounding.
    """
    from nvidia.dali import backend

    names = set(backend.GetSchema("decoders__Image").GetArgumentNames()) & set(
        backend.GetSchema("decoders__ImageRandomCrop").GetArgumentNames())
    args = {"adjust_orientation": False} if "adjust_orientation" in names else {}
    if gpu:
        args.update(device_memory_padding=211_025_920, host_memory_padding=140_544_512,
                    jpeg_fancy_upsampling=True)
    return args


class DaliLoader:
    """One epoch of batches `(images, labels, 0)` on the run's device, like the torch
    DataLoader with `collate_skip` (the 0: nothing is skipped)."""

    def __init__(self, spec: PipeSpec, samples: Sequence[tuple[str, int]], train: bool,
                 seed: int, rank: int, world_size: int, device: torch.device,
                 drop_last: bool) -> None:
        if train:
            order = epoch_files(len(samples), seed, world_size)
            shard, num_shards = rank, world_size
            per_shard = len(order) // world_size
        else:
            order = list(shard_indices(len(samples), rank, world_size))
            shard, num_shards, per_shard = 0, 1, len(order)
        if per_shard == 0 and train:  # every rank alike: fewer training images than ranks
            raise UserError(f"loader=dali: no training images for rank {rank} of {world_size}")
        self.spec, self.train, self.device = spec, train, device
        self.color = torch.Generator().manual_seed(seed + 7 * rank + 1)
        self.drop_last = drop_last and per_shard >= spec.batch
        self.batches = per_shard // spec.batch if self.drop_last else -(-per_shard // spec.batch)
        self.per_shard = per_shard
        # an evaluation shard may be empty (fewer images than ranks): no batches, as the torch
        # loader, while the other ranks' totals still meet in the all-reduce
        self._pipe = None if per_shard == 0 else _pipeline(
            spec, [samples[i][0] for i in order], [samples[i][1] for i in order], train,
            seed + rank, shard, num_shards)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        if self._pipe is None:
            return
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
        it = DALIGenericIterator([self._pipe], ["images", "labels"], reader_name="reader",
                                 last_batch_policy=policy, auto_reset=False)
        for i, out in enumerate(it):
            if i >= self.batches:
                break
            images = out[0]["images"]
            labels = out[0]["labels"].view(-1).long()
            yield self._finish(images), upload(labels, self.device), 0

    def _finish(self, images: torch.Tensor) -> torch.Tensor:
        """Train batches: uint8 -> colour ops (imagenet recipe) -> normalised, on the device,
        by the same code as the torch loader's device path."""
        images = upload(images, self.device)
        if not self.train:
            return images
        aug = TrainAug(self.spec.recipe, self.spec.size, self.spec.mean, self.spec.std,
                       self.spec.color_jitter, self.spec.lighting)
        return finish_on_device(images, aug, self.color)


def dataset_samples(dataset) -> list[tuple[str, int]]:
    """(path, label) of a ClassFolder, or of a Subset of one (`limit_train`/`limit_val`)."""
    from torch.utils.data import Subset

    if isinstance(dataset, Subset):
        base = dataset_samples(dataset.dataset)
        return [base[i] for i in dataset.indices]
    return list(dataset.samples)


def make_dali_loader(rt, train: bool, seed: int) -> DaliLoader:
    """The engine's loader for `loader=dali`: the run's split, recipe, batch and device."""
    cfg, dist = rt.cfg, rt.dist
    dataset = rt.data.train if train else rt.data.val
    gpu = dist.device.type == "cuda"
    spec = PipeSpec(batch=max(1, cfg.batch_size // dist.world_size),
                    size=cfg.input_size if train else cfg.crop, resize=cfg.resize,
                    recipe=cfg.train_aug, mean=tuple(cfg.mean), std=tuple(cfg.std),
                    threads=max(1, cfg.workers), device_id=(dist.device.index or 0) if gpu else None)
    samples = dataset_samples(dataset)
    return DaliLoader(spec, samples, train, seed, dist.rank, dist.world_size, dist.device,
                      # this process's share decides, as the torch loader's (engine._data_loader)
                      drop_last=train and len(samples) // dist.world_size >= 2 * spec.batch)
