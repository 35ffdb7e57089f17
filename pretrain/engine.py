"""The training engine: one function, `train(cfg)`, used by the CLI, the demo and torchrun.

Per epoch: reseed every random stream from (seed, epoch) — the loader's shuffle and worker seeds,
the mixer's generator, the global RNG (dropout, transforms) — so that a run resumed at an epoch
boundary is bit-identical on CPU to an uninterrupted one. Rank 0 alone writes; every write is
atomic; `resume.pt` holds everything to continue (primitives and tensors only).

An epoch has one commit point, `resume.pt`: it is written first, and everything else of the
epoch (the `log.jsonl` line, `backbone.safetensors`, `best.safetensors`, `metrics.json`) is
derived from it. A kill anywhere after the commit is repaired by `--resume`, which rewrites
the derived files from the committed state, even when no epoch is left to train.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from smix.amp import amp_dtype, autocast, grad_scaler
from smix.arch import build_model
from smix.checkpoint import BackboneMeta, export_state, read_meta, save_checkpoint
from smix.data import collate_skip
from smix.dist import (DistInfo, all_gather_tensor, all_reduce_sum, any_rank, barrier,
                       init_distributed, micro_batches)
from smix.errors import UserError
from smix.io import RunDir, atomic_save, provenance, read_json
from pretrain.config import TrainConfig, typed_method_params
from pretrain.data import RunData, SeededDataset, SeededSampler, build_datasets, to_device
from pretrain.mixers import MixContext, Mixer, MixOutput, get_mixer

RESUME_FILE = "resume.pt"


class TrainingDiverged(UserError):
    """The loss became NaN/Inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class Runtime:
    """Everything `train` builds from the config, in one place."""

    cfg: TrainConfig
    dist: DistInfo
    run: RunDir
    data: RunData
    model: nn.Module
    ddp_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    mixer: Mixer
    ctx: MixContext
    amp_dtype: torch.dtype | None
    channels_last: bool
    loader: str = "torch"  # resolved `cfg.loader`: torch | dali | nvjpeg
    # per split, the loader whose workers persist across epochs, and its sampler (make_loader)
    loaders: dict[str, Any] = dataclasses.field(default_factory=dict)
    # the epoch whose model best.safetensors holds (rank 0; None: unknown), see `summarise`
    best_held: int | None = None


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    return amp_dtype(cfg.amp, device, allow_cpu=True)


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """Independent, reproducible seeds per (run seed, epoch, stream)."""
    return (seed * 1_000_003 + epoch * 7_919 + stream * 104_729) % (2**63 - 1)


def rank_seed(seed: int, epoch: int, stream: int, rank: int) -> int:
    """`epoch_seed` of one process: under torchrun each rank draws its own mixing, dropout and
    (without loader workers) crops, not a copy of rank 0's; rank 0's seed is `epoch_seed`'s,
    so one-process runs (and their `--resume`) are unchanged."""
    return (epoch_seed(seed, epoch, stream) + rank * 1_000_000_007) % (2**63 - 1)


def build_runtime(cfg: TrainConfig, dist: DistInfo, data: RunData | None = None) -> Runtime:
    """Model, optimiser, schedule, mixer and data of a run (`data` given: in-memory data)."""
    torch.manual_seed(cfg.seed)
    per_rank = cfg.batch_size // dist.world_size
    if cfg.batch_size % dist.world_size:
        # DDP averages equal shares: the remainder would be dropped from every step, silently.
        # A resumed run keeps its batch, so the advice names process counts that divide it too.
        fits = [n for n in range(1, cfg.batch_size // 2 + 1) if cfg.batch_size % n == 0][:8]
        raise UserError(f"batch_size={cfg.batch_size} does not split evenly over "
                        f"{dist.world_size} processes ({per_rank} each would train steps of "
                        f"{per_rank * dist.world_size}); use a multiple of {dist.world_size} "
                        f"or {', '.join(map(str, fits))} processes (--resume keeps the batch)")
    if per_rank < 2:
        raise UserError(f"batch_size={cfg.batch_size} over {dist.world_size} processes leaves "
                        f"{per_rank} image(s) per process and step; a step takes at least 2")
    if cfg.micro_batch != 0 and not 2 <= cfg.micro_batch <= per_rank:
        raise UserError(f"micro_batch={cfg.micro_batch} must be 0 (no split) or from 2 to the "
                        f"{per_rank} images each process trains on per step (batch_size "
                        f"{cfg.batch_size} / {dist.world_size})")
    from_disk = data is None  # in-memory data (benchmarks, tests) is the torch loader's
    from pretrain.dali import resolve_loader
    loader = resolve_loader(cfg.loader if from_disk else "torch", cfg.dataset, cfg.train_aug,
                            dist.device, cfg.skip_bad_images)
    # the torch loader feeding a GPU leaves colour and normalisation to the GPU (uint8
    # batches); nvjpeg's batches always get them on their device
    on_device = (loader == "torch" and dist.device.type == "cuda") or loader == "nvjpeg"
    data = data if data is not None else build_datasets(cfg, on_device)
    cudnn_settings(cfg, dist.device)
    model = build_model(cfg.arch, len(data.classes), **cfg.arch_kwargs).to(dist.device)
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto"
                                                  and dist.device.type == "cuda")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ddp_model: nn.Module = model
    if dist.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    if cfg.compile:
        ddp_model = torch.compile(ddp_model)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    amp_dtype = _amp_dtype(cfg, dist.device)
    scaler = grad_scaler(dist.device, amp_dtype)
    mixer = get_mixer(cfg.method, **cfg.method_params)
    ctx = MixContext(tuple(cfg.mean), tuple(cfg.std), len(data.classes), model,
                     micro_batch=cfg.micro_batch)
    return Runtime(cfg, dist, RunDir(cfg.out, create=dist.is_main), data, model, ddp_model,
                   optimizer, scheduler, scaler, mixer, ctx, amp_dtype, channels_last, loader)


def cudnn_settings(cfg: TrainConfig, device: torch.device) -> None:
    """On CUDA, let cuDNN pick each convolution's fastest algorithm (`cudnn_benchmark`): the
    shapes of a pretraining run are fixed (crop, batch), so the one-time timing pays back."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark


def _lr_lambda(cfg: TrainConfig):
    """Step schedule (× gamma at each milestone) with optional linear warm-up, per epoch."""
    def factor(epoch: int) -> float:
        warm = (epoch + 1) / cfg.warmup_epochs if epoch < cfg.warmup_epochs else 1.0
        return warm * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return factor


def make_loader(rt: Runtime, train: bool, epoch: int):
    """The run's training or validation loader for an epoch: the torch DataLoader (chunked
    when uint8 batches are finished on a GPU), DALI's, or nvjpeg's over the same sampler.

    With workers, each split's loader is built once and its workers persist across epochs
    (`persistent_workers`; each training epoch only reseeds its `SeededSampler`): starting 15
    workers costs about as much as a whole epoch of a small dataset on a GPU, and a CIFAR run
    evaluates after each of its 200 epochs."""
    cfg = rt.cfg
    if rt.loader == "dali":
        from pretrain.dali import make_dali_loader
        return make_dali_loader(rt, train, epoch_seed(cfg.seed, epoch, 1))
    persistent = cfg.workers > 0 and cfg.persistent_workers
    split = "train" if train else "val"
    if persistent and split in rt.loaders:
        loader, sampler = rt.loaders[split]
        if sampler is not None:
            sampler.set_epoch(epoch)
        return loader
    dataset = rt.data.train if train else rt.data.val
    if rt.loader == "nvjpeg":
        from pretrain.nvjpeg import Geometry, collate_packed, encoded_images, nvjpeg_loader
        geometry = (Geometry.for_recipe(cfg.train_aug, cfg.input_size) if train
                    else Geometry(False, cfg.crop, cfg.resize))
        batches, sampler = _data_loader(
            rt, encoded_images(dataset, geometry, cfg.skip_bad_images), train, epoch,
            collate_packed, 1, persistent)
        loader = nvjpeg_loader(batches, geometry, rt.dist.device, cfg.skip_bad_images,
                               None if train else (cfg.mean, cfg.std))
    else:
        per_rank = max(1, cfg.batch_size // rt.dist.world_size)
        parts = chunks_per_batch(per_rank, cfg.workers) if train and rt.data.finish else 1
        loader, sampler = _data_loader(rt, dataset, train, epoch, collate_skip, parts,
                                       persistent)
        if parts > 1:
            loader = ChunkedLoader(loader, parts, loader.drop_last)
    if persistent:
        rt.loaders[split] = (loader, sampler)
    return loader


def _data_loader(rt: Runtime, data, train: bool, epoch: int, collate, parts: int,
                 persistent: bool) -> tuple[DataLoader, SeededSampler | None]:
    """The DataLoader of `make_loader`. Training: the order from its own generator (or
    DistributedSampler's), each index paired with its sample seed; eval: this rank's shard."""
    cfg, dist = rt.cfg, rt.dist
    per_rank = max(1, cfg.batch_size // dist.world_size)
    sampler = None
    if train:
        order = None if dist.distributed else torch.Generator()
        inner = (DistributedSampler(data, dist.world_size, dist.rank, shuffle=True,
                                    seed=cfg.seed, drop_last=True)
                 if dist.distributed else RandomSampler(data, generator=order))
        sampler = SeededSampler(inner, order, lambda e: epoch_seed(cfg.seed, e, 1),
                                lambda e: epoch_seed(cfg.seed, e, 5))
        sampler.set_epoch(epoch)
        data = SeededDataset(data, seed=cfg.workers > 0)
    elif dist.distributed:
        from torch.utils.data import Subset
        from smix.dist import shard_indices
        data = Subset(data, shard_indices(len(data), dist.rank, dist.world_size))
    loader = DataLoader(
        data, batch_size=per_rank // parts, sampler=sampler, num_workers=cfg.workers,
        pin_memory=dist.device.type == "cuda" and collate is collate_skip,
        # this process's share decides (under torchrun `data` is the whole set): 12 images,
        # batch 8 on 2 processes trained 8 of them (one batch of 4 each) where one process
        # trains all 12
        drop_last=train and len(sampler) >= 2 * per_rank, collate_fn=collate,
        generator=torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch, 6)),
        persistent_workers=persistent)
    return loader, sampler


def chunks_per_batch(batch: int, workers: int, min_chunk: int = 32) -> int:
    """How many workers share one batch: the largest divisor of `batch` up to `workers` that
    leaves chunks of at least `min_chunk` images (1: one worker makes the whole batch)."""
    limit = min(workers, batch // min_chunk)
    return max([k for k in range(1, limit + 1) if batch % k == 0], default=1)


class ChunkedLoader:
    """Batches assembled from `parts` consecutive chunks of a DataLoader, so that several
    workers make one batch. With one worker per batch, the first batch of an epoch waits for
    a whole batch of decodes in one process (256 x a few ms: on an H200 the step would run
    ~10 batches meanwhile) and the epoch's end waits for the slowest worker's batch; chunks
    cut both by `parts`. The sampler's order is the same as one worker per batch would see (the
    same permutation, cut in the same places). Chunks stay separate, pinned tensors until
    `to_device` joins them on the device. Only for uint8 batches finished on a GPU: on the
    CPU the worker RNG streams, and so the bit-identical resume, stay as they were."""

    def __init__(self, loader: DataLoader, parts: int, drop_last: bool) -> None:
        self.loader, self.parts, self.drop_last = loader, parts, drop_last

    def __len__(self) -> int:
        n = len(self.loader)
        return n // self.parts if self.drop_last else -(-n // self.parts)

    def __iter__(self):
        group: list[tuple] = []
        for chunk in self.loader:
            group.append(chunk)
            if len(group) == self.parts:
                yield self._join(group)
                group = []
        if group and not self.drop_last:
            yield self._join(group)

    @staticmethod
    def _join(group: list[tuple]) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        return [c[0] for c in group], [c[1] for c in group], sum(c[2] for c in group)


def mixed_loss(logits: torch.Tensor, out: MixOutput) -> torch.Tensor:
    """λ·CE(y_a) + (1-λ)·CE(y_b), per sample; plain CE when nothing was mixed.

    In float32 whatever the autocast dtype: λ in bfloat16 would be off by up to 0.4%
    (8 mantissa bits), and the loss is cheap next to the forward pass."""
    logits = logits.float()
    if out.label_b is None:
        return F.cross_entropy(logits, out.label_a)
    ce_a = F.cross_entropy(logits, out.label_a, reduction="none")
    ce_b = F.cross_entropy(logits, out.label_b, reduction="none")
    lam = out.lam.to(device=logits.device, dtype=torch.float32)
    return (lam * ce_a + (1 - lam) * ce_b).mean()


def _autocast(rt: Runtime) -> contextlib.AbstractContextManager:
    return autocast(rt.dist.device, rt.amp_dtype)


def train_step(rt: Runtime, images: torch.Tensor, labels: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
    """One optimisation step; returns the loss as a detached tensor (no host sync).

    The mixer sees the whole batch (pairs, λ and boxes as the recipe draws them). With
    `micro_batch`, the mixed batch then goes through the model in passes of at most that many
    images, each pass's loss weighted by its share of the batch, gradients accumulating (DDP
    all-reduces after the last pass only), and the optimiser steps once: the recipe's batch
    and learning rate whatever the device holds. BatchNorm normalises each pass with its own
    statistics, as it does each GPU's share under DDP, and updates its running statistics
    once per pass."""
    out = rt.mixer(images, labels, generator, rt.ctx)
    rt.optimizer.zero_grad(set_to_none=True)
    n = len(labels)
    parts = micro_batches(n, rt.cfg.micro_batch)
    if len(parts) == 1:
        with _autocast(rt):
            loss = mixed_loss(rt.ddp_model(out.images), out)
        rt.scaler.scale(loss).backward()
        total = loss.detach()
    else:
        total = torch.zeros((), device=images.device)
        for k, part in enumerate(parts):
            share = (part.stop - part.start) / n
            with _no_sync(rt, last=k == len(parts) - 1):
                with _autocast(rt):
                    loss = mixed_loss(rt.ddp_model(out.images[part]), _slice_output(out, part))
                rt.scaler.scale(loss * share).backward()
            total += loss.detach() * share
    rt.scaler.step(rt.optimizer)
    rt.scaler.update()
    return total


def _slice_output(out: MixOutput, part: slice) -> MixOutput:
    return MixOutput(out.images[part], out.label_a[part],
                     None if out.label_b is None else out.label_b[part], out.lam[part])


def _no_sync(rt: Runtime, last: bool) -> contextlib.AbstractContextManager:
    """DDP's gradient all-reduce held back on every pass of a step but the last."""
    ddp = getattr(rt.ddp_model, "_orig_mod", rt.ddp_model)  # under torch.compile
    if last or not isinstance(ddp, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return ddp.no_sync()


def colour_generator(rt: Runtime, epoch: int) -> torch.Generator:
    """The host generator of the batched colour draws (`RunData.finish`), per epoch and rank."""
    return torch.Generator().manual_seed(epoch_seed(rt.cfg.seed, epoch, 4) + rt.dist.rank)


def train_batch(rt: Runtime, batch: tuple, colour: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A training loader batch on the device, finished there when the workers left it uint8."""
    return to_device(batch, rt.dist.device, rt.channels_last, rt.data.finish, colour)


def train_epoch(rt: Runtime, epoch: int) -> dict[str, float]:
    """One pass over the training data; stops with `TrainingDiverged` on a non-finite loss."""
    # per rank: with one seed, both ranks drew the same λ, boxes, pairs and dropout masks (and
    # crops and flips without workers) at every step
    torch.manual_seed(rank_seed(rt.cfg.seed, epoch, 2, rt.dist.rank))
    mix_gen = torch.Generator().manual_seed(rank_seed(rt.cfg.seed, epoch, 3, rt.dist.rank))
    colour = colour_generator(rt, epoch)
    loader = make_loader(rt, train=True, epoch=epoch)
    rt.ddp_model.train()
    loss_sum = torch.zeros((), device=rt.dist.device, dtype=torch.float64)
    seen, skipped, start = 0, 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{rt.cfg.epochs}", unit="batch",
               disable=not (rt.cfg.progress and rt.dist.is_main), leave=False)
    for step, batch in enumerate(bar):
        images, labels, n_skip = train_batch(rt, batch, colour)
        skipped += n_skip
        if _skip_batch(rt, len(labels)):
            continue
        try:
            loss = train_step(rt, images, labels, mix_gen)
        except torch.cuda.OutOfMemoryError:
            raise out_of_memory(rt, epoch, step, len(labels)) from None
        loss_sum += loss.double() * len(labels)
        seen += len(labels)
        if step % 20 == 0 or step == len(loader) - 1:
            _check_finite(loss_sum, epoch, step)
            rate = seen * rt.dist.world_size / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.0f}")
    _check_finite(loss_sum, epoch, len(loader))
    elapsed = time.perf_counter() - start
    totals = all_reduce_sum(torch.tensor([float(loss_sum), seen, skipped], dtype=torch.float64,
                                         device=rt.dist.device))
    n = max(int(totals[1]), 1)
    return {"train_loss": float(totals[0]) / n, "train_images": int(totals[1]),
            "skipped_images": int(totals[2]), "epoch_time_s": elapsed,
            "images_per_s": int(totals[1]) / max(elapsed, 1e-9)}


def out_of_memory(rt: Runtime, epoch: int, step: int, n: int) -> UserError:
    """The one line a step that does not fit on the device ends a run with."""
    passes = min(rt.cfg.micro_batch or n, n)
    advice = (f"micro_batch={passes // 2} (with --resume RUN once an epoch is saved; the batch "
              "and the learning rate stay the recipe's)" if passes >= 4
              else "a smaller model or input_size")
    return UserError(f"out of device memory in epoch {epoch + 1}, step {step + 1}, at {passes} "
                     f"images per pass; rerun with {advice}")


def _skip_batch(rt: Runtime, n: int) -> bool:
    """Skip a batch of fewer than 2 images (nothing to mix). Under DDP every rank must skip
    the same steps or the others wait in the gradient all-reduce forever; ranks can disagree
    only when unreadable images are skipped, so only then do they decide together."""
    if rt.dist.distributed and rt.cfg.skip_bad_images:
        return any_rank(n < 2, rt.dist.device)
    return n < 2


def _check_finite(loss_sum: torch.Tensor, epoch: int, step: int) -> None:
    if not bool(torch.isfinite(loss_sum)):
        raise TrainingDiverged(f"loss became NaN/Inf in epoch {epoch + 1} near step {step}; "
                               "stopped, the last good checkpoint is kept")


@torch.inference_mode()
def evaluate(rt: Runtime, epoch: int) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) on the validation set, exact over ranks."""
    rt.model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=rt.dist.device)  # top1, top5, n
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.dist.device)
    for batch in make_loader(rt, train=False, epoch=epoch):
        images, labels, _ = to_device(batch, rt.dist.device, rt.channels_last)
        if len(labels) == 0:
            continue
        with _autocast(rt):
            logits = rt.model(images)
        k = min(5, logits.shape[1])
        top = logits.float().topk(k, dim=1).indices
        hit = top == labels[:, None]
        counts += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(),
                               torch.tensor(len(labels), device=hit.device)]).double()
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
    totals = all_reduce_sum(torch.cat([counts, loss_sum.view(1)]))
    n = max(float(totals[2]), 1.0)
    return {"top1": 100 * float(totals[0]) / n, "top5": 100 * float(totals[1]) / n,
            "val_loss": float(totals[3]) / n, "val_images": int(totals[2])}


def backbone_meta(rt: Runtime, epoch: int, metrics: dict[str, Any]) -> BackboneMeta:
    cfg = rt.cfg
    return BackboneMeta(
        arch=cfg.arch, num_classes=len(rt.data.classes), class_names=tuple(rt.data.classes),
        arch_kwargs=dict(cfg.arch_kwargs), input_size=cfg.input_size, mean=tuple(cfg.mean),
        std=tuple(cfg.std), resize=cfg.resize, crop=cfg.crop, dataset=cfg.dataset,
        method=rt.mixer.describe(), epochs=epoch, metrics=metrics, provenance=provenance(),
    )


def save_resume(rt: Runtime, epoch: int, history: list[dict[str, Any]]) -> None:
    """Everything needed to continue after `epoch` (completed epochs), in one atomic file."""
    state = {
        "epoch": epoch,
        "model": export_state(rt.model),
        "optimizer": rt.optimizer.state_dict(),
        "scheduler": rt.scheduler.state_dict(),
        "scaler": rt.scaler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "history": history,
        "config": _plain_config(rt.cfg),
        "classes": list(rt.data.classes),
    }
    atomic_save(rt.run.file(RESUME_FILE), lambda tmp: torch.save(state, tmp))


def _plain_config(cfg: TrainConfig) -> dict[str, Any]:
    from smix.io import to_jsonable
    return to_jsonable(cfg)


def load_resume(rt: Runtime) -> tuple[int, list[dict[str, Any]]]:
    path = rt.run.file(RESUME_FILE)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{rt.run.path}: nothing to resume (no {RESUME_FILE}: no epoch was "
                        "finished); run the command again without --resume") from None
    except Exception as e:  # a torn or foreign file
        raise UserError(f"{path}: unreadable resume state ({type(e).__name__})") from None
    saved = state["config"]
    saved["method_params"] = typed_method_params(saved["method"], saved["method_params"])
    for key in ("arch", "dataset", "method", "method_params", "batch_size", "seed"):
        if saved.get(key) != _plain_config(rt.cfg).get(key):
            raise UserError(f"{path}: cannot resume with a different {key} "
                            f"({saved.get(key)!r} saved, {_plain_config(rt.cfg).get(key)!r} now)")
    classes = list(rt.data.classes)
    saved_classes = state.get("classes")  # absent in files of earlier versions
    if saved_classes is not None and saved_classes != classes:
        diff = next((f"{a!r} saved, {b!r} now" for a, b in zip(saved_classes, classes)
                     if a != b), f"{len(saved_classes)} saved, {len(classes)} now")
        raise UserError(f"{path}: cannot resume on data with other classes ({diff}); "
                        f"{rt.cfg.data} is not the run's data")
    try:
        rt.model.load_state_dict(state["model"])
    except RuntimeError:
        raise UserError(f"{path}: the saved model does not fit {rt.cfg.arch} with "
                        f"{len(classes)} classes; {rt.cfg.data} is not the run's data") from None
    rt.optimizer.load_state_dict(state["optimizer"])
    rt.scheduler.load_state_dict(state["scheduler"])
    rt.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    return int(state["epoch"]), list(state["history"])


def summarise(history: list[dict[str, Any]], held: int | None = None) -> dict[str, Any]:
    """Best epoch by top-1 (what the papers report) and the last epoch. Of epochs tied on top-1
    the latest is the best, with its top-5, as the official ImageNet code keeps them
    (CutMix-PyTorch and SaliencyMix-ImageNet train.py: `is_best = err1 <= best_err1`, then
    `best_err5 = err5`; its model_best is that epoch's model, as best.safetensors here).

    `held`: the epoch best.safetensors holds. A run written when the earliest of equals was the
    best holds an earlier tied epoch whose later equal is gone (only the last epoch's model can
    still be saved): that tied epoch stays the best, so that the file and metrics.json agree."""
    if not history:
        return {}
    best = max(history, key=lambda h: (h["top1"], h["epoch"]))
    if held is not None and best is not history[-1]:
        best = next((h for h in history if h["epoch"] == held and h["top1"] == best["top1"]),
                    best)
    last = history[-1]
    pick = lambda h: {"epoch": h["epoch"], "top1": h["top1"], "top5": h["top5"],
                      "top1_err": 100 - h["top1"], "top5_err": 100 - h["top5"]}
    return {"best": pick(best), "last": pick(last)}


def _write_epoch(rt: Runtime, epoch: int, history: list[dict[str, Any]]) -> None:
    """Commit `epoch` (resume.pt), then write what derives from it."""
    save_resume(rt, epoch, history)
    rt.run.log(history[-1])
    _write_artefacts(rt, epoch, history)


def _write_artefacts(rt: Runtime, epoch: int, history: list[dict[str, Any]]) -> None:
    """backbone.safetensors, best.safetensors (when `epoch` is the best one, as `summarise`
    picks it) and metrics.json of the model as it is after `epoch`."""
    summary = summarise(history, rt.best_held)
    meta = backbone_meta(rt, epoch, summary)
    save_checkpoint(rt.run.file("backbone.safetensors"), rt.model, meta)
    if summary["best"]["epoch"] == epoch:
        save_checkpoint(rt.run.file("best.safetensors"), rt.model, meta)
        rt.best_held = epoch
    results = {**summary, "arch": rt.cfg.arch, "dataset": rt.cfg.dataset,
               "method": rt.mixer.describe(), "seed": rt.cfg.seed, "epochs_done": epoch,
               "epochs": rt.cfg.epochs, "num_classes": len(rt.data.classes),
               "train_time_s": sum(h["epoch_time_s"] for h in history),
               "images_per_s": sum(h["images_per_s"] for h in history) / len(history),
               "world_size": rt.dist.world_size}
    rt.run.write_metrics(stage="pretrain", kind="classification", results=results,
                         config=rt.cfg, checkpoint=str(rt.run.file("backbone.safetensors")))


def _restore_artefacts(rt: Runtime, epoch: int, history: list[dict[str, Any]]) -> None:
    """On resume: the log holds exactly the committed epochs (a line written after a later
    epoch's kill is dropped), and the files derived from the committed state are rewritten
    from it (a kill between the commit and them left them one epoch behind, or missing)."""
    rt.run.write_log(history)
    try:  # the epoch of the model in best.safetensors, written by this or an earlier version
        rt.best_held = read_meta(rt.run.file("best.safetensors")).epochs
    except UserError:  # missing or torn: the rule's best (rewritten if it is `epoch`)
        rt.best_held = None
    if epoch > 0:
        _write_artefacts(rt, epoch, history)


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train (or continue) a run; returns the final metrics.json content's `results`."""
    dist = init_distributed(cfg.device)
    rt = build_runtime(cfg, dist)
    start, history = load_resume(rt) if resume else (0, [])
    if start > cfg.epochs:  # config.json and metrics.json would then misstate the run
        raise UserError(f"{rt.run.path}: {start} epochs are trained; --epochs {cfg.epochs} "
                        f"cannot undo them (give {start} or more)")
    if not resume and rt.run.file(RESUME_FILE).exists():
        raise UserError(f"{rt.run.path} already holds a run; use --resume to continue it "
                        "or choose another --out")
    rt.run.claim("pretrain", "classification")
    if dist.is_main:
        # a resumed run's set-up notes (milestones rescaled for the first --epochs, ...) are in
        # its config.json; only what this command changed (workers=auto) is news
        old = set(read_json(rt.run.file("config.json")).get("notes", ())) if resume else set()
        if resume:
            where = (f"at epoch {start + 1} of {cfg.epochs}" if start < cfg.epochs
                     else f"with all {cfg.epochs} epochs done")
            print(f"pretrain: resuming {rt.run.path} {where}, with the recipe it was set up "
                  "with (config.json)", file=sys.stderr)
        rt.run.write_config(cfg)
        for note in cfg.notes:
            if note not in old:
                print(f"pretrain: {note}", file=sys.stderr)
        if resume:
            rt.run.remove_stale_temporaries()
            _restore_artefacts(rt, start, history)
    for epoch in range(start, cfg.epochs):
        lr = rt.optimizer.param_groups[0]["lr"]  # the rate this epoch trains at
        stats = train_epoch(rt, epoch)
        sync_bn_buffers(rt)
        rt.scheduler.step()
        stats.update(evaluate(rt, epoch), epoch=epoch + 1, lr=lr)
        history.append(stats)
        if dist.is_main:
            _write_epoch(rt, epoch + 1, history)
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}  loss {stats['train_loss']:.4f}  "
                       f"top1 {stats['top1']:.2f}  top5 {stats['top5']:.2f}  "
                       f"{stats['images_per_s']:.0f} img/s")
        barrier()
    identical = replicas_identical(rt)
    if dist.is_main and dist.distributed:
        metrics = read_json(rt.run.file("metrics.json"))
        metrics["results"]["replicas_identical"] = identical
        from smix.io import write_json
        write_json(rt.run.file("metrics.json"), metrics)
    return summarise(history, rt.best_held)


def sync_bn_buffers(rt: Runtime) -> None:
    """Average BatchNorm running statistics over ranks (as timm's `distribute_bn` with
    reduce): DDP keeps parameters in sync but each rank updates its own running stats after
    the last forward, so without this the ranks would evaluate and save different models."""
    if not rt.dist.distributed:
        return
    with torch.no_grad():
        for name, buf in rt.model.named_buffers():
            if buf.is_floating_point() and ("running_mean" in name or "running_var" in name):
                all_reduce_sum(buf).div_(rt.dist.world_size)


def replicas_identical(rt: Runtime) -> bool:
    """Under DDP, check that every rank ends with the same weights (a cheap digest compare)."""
    if not rt.dist.distributed:
        return True
    with torch.no_grad():
        digest = torch.stack([p.double().sum() for p in rt.model.state_dict().values()
                              if p.is_floating_point()]).cpu()
    gathered = all_gather_tensor(digest)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])
