"""The torchvision backend: train Faster R-CNN on VOC and evaluate it with the toolkit's evaluator.

Training follows detectron2's solver so the two backends are comparable: SGD (momentum 0.9,
weight decay 1e-4 on every trainable parameter), linear warmup from `warmup_factor`, x`gamma` at
each step, multi-scale training (one shorter side per batch, from the preset), horizontal flips,
images without objects left out of training. A resumable state file is written atomically every
`checkpoint_period` iterations; `--resume` continues bit-for-bit with the same batches.
The preset's batch is the effective batch: an iteration runs in micro-batches with gradient
accumulation (`micro_batch`, see `transfer.micro`), in autocast with `amp=bf16|fp16` on CUDA.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from smix.amp import amp_dtype, autocast, grad_scaler
from smix.checkpoint import BackboneMeta, load_backbone
from smix.dist import pick_device
from smix.errors import UserError
from smix.io import RunDir, atomic_save
from transfer.config import Settings, TransferConfig, first_difference, recipe
from transfer.data import VOCSplits
from transfer.micro import (MicroChoice, all_proposals, announce, choose, largest_train_size,
                            oom_error, split)
from transfer.tv_data import BatchPlan, PlanSampler, VOCDetection, collate_list, iteration_seed
from transfer.tv_models import build_detector
from transfer.voc_eval import Detections, VOCResult, evaluate_voc, year_metric

STATE_FILE = "resume.pt"
FINAL_WEIGHTS = "model_final.safetensors"
DETECTOR_FORMAT = "smix.detector/1"


def lr_at(it: int, s: Settings) -> float:
    """detectron2's WarmupMultiStepLR: x gamma at each step (steps beyond max_iter ignored);
    during warmup (at most the whole schedule, as detectron2 caps it) a linear ramp from
    `warmup_factor` to the value warmup ends at."""
    steps = [x for x in s.steps if x <= s.max_iter]
    warmup = min(s.warmup_iters, s.max_iter)

    def multiplier(i: int) -> float:
        return s.gamma ** bisect.bisect_right(steps, i)

    if it < warmup:
        alpha = it / warmup
        start = s.warmup_factor * multiplier(0)
        return s.lr * (start * (1.0 - alpha) + multiplier(warmup) * alpha)
    return s.lr * multiplier(it)


def make_optimizer(model: nn.Module, s: Settings) -> torch.optim.SGD:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr_at(0, s), momentum=s.momentum,
                           weight_decay=s.weight_decay)


def build_from_checkpoint(ckpt: Path, arch: str, class_names: tuple[str, ...], s: Settings
                          ) -> tuple[nn.Module, BackboneMeta]:
    """The detector on the checkpoint's weights; new layers initialised from the run's seed."""
    resnet, meta = load_backbone(ckpt, "cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        model = build_detector(resnet, meta, arch, len(class_names), s)
    return model, meta


def _fingerprint(cfg: TransferConfig, sha: str, class_names: tuple[str, ...], s: Settings
                 ) -> str:
    return json.dumps({"backend": "torchvision", "arch": cfg.arch, "backbone_sha256": sha,
                       "classes": list(class_names), **recipe(s)})


def _mismatch(saved: Any, fingerprint: str) -> str | None:
    """What differs between the run that wrote a resume state and this one; None: the same run
    (a state written before the settings were recorded is checked on what it records)."""
    if saved == fingerprint:
        return None
    try:
        diff = first_difference(json.loads(saved), json.loads(fingerprint))
    except (TypeError, ValueError, AttributeError):
        return "checkpoint, arch, classes, backend or settings differ"
    return None if diff is None else f"it was run with {diff[0]} {diff[1]!r}, not {diff[2]!r}"


def save_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, next_iter: int,
               fingerprint: str, scaler: torch.amp.GradScaler | None = None) -> None:
    """Resume state: tensors and primitives only, so `torch.load(weights_only=True)` reads it."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "iteration": next_iter,
             "fingerprint": fingerprint, "scaler": {} if scaler is None else scaler.state_dict()}
    atomic_save(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, fingerprint: str,
               scaler: torch.amp.GradScaler | None = None) -> int:
    """Restore model, optimizer (and fp16 loss scale); returns the next iteration to run."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: one clear line
        raise UserError(f"{path}: unreadable resume state ({type(e).__name__}: {e})") from None
    mismatch = _mismatch(state.get("fingerprint"), fingerprint)
    if mismatch:
        raise UserError(f"{path}: resume state belongs to another run ({mismatch}); use a new "
                        "--out")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["iteration"])


def _to(device: torch.device, images: list, targets: list) -> tuple[list, list]:
    return ([im.to(device) for im in images],
            [{k: v.to(device) for k, v in t.items()} for t in targets])


@dataclasses.dataclass
class Stepper:
    """How an iteration runs: micro-batch size, autocast dtype and (fp16) loss scaler."""

    device: torch.device
    micro_batch: int | None = None  # None: the whole batch in one pass
    amp: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    def __post_init__(self) -> None:
        if self.scaler is None:
            self.scaler = grad_scaler(self.device, self.amp)


def _step(model: nn.Module, opt: torch.optim.Optimizer, st: Stepper, images: list,
          targets: list, seed: int, it: int) -> dict[str, float]:
    """One SGD step on the batch, in micro-batches: each one's loss weighted by its share of the
    batch, gradients accumulated, one optimiser step — the big batch's step (`transfer.micro`).
    Sampling is seeded per image (seed, iteration, position); other draws from the global
    generator are seeded per iteration in a forked RNG scope, so a resumed run repeats the
    uninterrupted one and the caller's RNG state is left untouched."""
    n, totals = len(images), {}
    opt.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[st.device] if st.device.type == "cuda" else []):
        torch.manual_seed(iteration_seed(seed, it))
        for part in split(n, st.micro_batch or n):
            weight = (part.stop - part.start) / n
            with model.image_seeds.images(seed, [(it, k) for k in range(part.start, part.stop)],
                                          st.device), autocast(st.device, st.amp):
                losses = model(*_to(st.device, images[part], targets[part]))
            loss = torch.stack([v.float() for v in losses.values()]).sum()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.detach().item()}: {losses}")
            st.scaler.scale(loss * weight).backward()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + weight * v.detach().float()
    st.scaler.step(opt)
    st.scaler.update()
    return {k: v.item() for k, v in totals.items()}


def train(model: nn.Module, opt: torch.optim.Optimizer, dataset: VOCDetection, s: Settings,
          run: RunDir, start: int, device: torch.device, fingerprint: str,
          progress: bool = True, stop: int | None = None, stepper: Stepper | None = None) -> None:
    """Iterations `start`..`stop`-1 (default: to `max_iter`) of the schedule, logging every
    `log_period`, resumable state saved every `checkpoint_period` and at the end."""
    st = stepper or Stepper(device)
    stop = s.max_iter if stop is None else min(stop, s.max_iter)
    plan = BatchPlan(len(dataset), s.batch, s.seed, s.min_size_train)
    loader = DataLoader(dataset, batch_sampler=PlanSampler(plan, start, stop),
                        num_workers=s.workers, collate_fn=collate_list)
    model.train()
    model.transform.max_size = s.max_size_train
    bar = tqdm(total=s.max_iter, initial=start, desc="transfer train", disable=not progress)
    tic = time.perf_counter()
    for it, (images, targets, _) in zip(range(start, stop), loader):
        model.transform.min_size = (plan.augment(it)[1],)
        for group in opt.param_groups:
            group["lr"] = lr_at(it, s)
        try:
            losses = _step(model, opt, st, images, targets, s.seed, it)
        except torch.cuda.OutOfMemoryError:
            raise oom_error(st.micro_batch or len(images), it) from None
        bar.update(1)
        done = it + 1
        if done % s.log_period == 0 or done == s.max_iter:
            run.log({"iter": done, "lr": lr_at(it, s), "loss": sum(losses.values()),
                     **losses,
                     "sec_per_iter": (time.perf_counter() - tic) / (done - start)})
        if done % s.checkpoint_period == 0 or done == stop:
            save_state(run.file(STATE_FILE), model, opt, done, fingerprint, st.scaler)
    bar.close()


def probe_step(model: nn.Module, s: Settings, st: Stepper) -> tuple[Callable[[], None],
                                                                   tuple[int, int]]:
    """One training forward/backward on one synthetic image of the largest training size (for
    `micro_batch=auto`); gradients dropped after, RNG untouched."""
    h, w = largest_train_size(s.min_size_train, s.max_size_train)
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0))
    target = {"boxes": torch.tensor([[w / 4, h / 4, 3 * w / 4, 3 * h / 4]]),
              "labels": torch.tensor([1])}

    def step() -> None:
        model.train()
        model.transform.min_size, model.transform.max_size = (h,), s.max_size_train
        with torch.random.fork_rng(devices=[st.device] if st.device.type == "cuda" else []), \
                all_proposals(model.rpn), autocast(st.device, st.amp):
            losses = model(*_to(st.device, [image], [target]))
        torch.stack([v.float() for v in losses.values()]).sum().backward()
        model.zero_grad(set_to_none=True)
    return step, (h, w)


@torch.no_grad()
def predict(model: nn.Module, dataset: VOCDetection, s: Settings, device: torch.device,
            progress: bool = True) -> Detections:
    """Detections on every test image, in original image coordinates (0-based boxes)."""
    model.eval()
    model.transform.min_size = (s.min_size_test,)
    model.transform.max_size = s.max_size_test
    loader = DataLoader(dataset, batch_size=2, shuffle=False, num_workers=s.workers,
                        collate_fn=collate_list)
    parts = []
    for images, _, ids in tqdm(loader, desc="transfer eval", disable=not progress):
        for image_id, out in zip(ids, model([im.to(device) for im in images])):
            parts.append((image_id, out["boxes"].cpu().numpy(), out["scores"].cpu().numpy(),
                          out["labels"].cpu().numpy() - 1))
    return Detections.concat(parts)


def save_detector(path: Path, model: nn.Module, header: dict[str, Any]) -> None:
    """Final detector weights (safetensors, nothing pickled) with what they are in the header."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": DETECTOR_FORMAT,
            **{k: v if isinstance(v, str) else json.dumps(v) for k, v in header.items()}}
    atomic_save(path, lambda tmp: save_file(state, str(tmp), metadata=meta))


def run_torchvision(cfg: TransferConfig, s: Settings, splits: VOCSplits, run: RunDir,
                    ckpt_sha: str) -> tuple[VOCResult, dict[str, Any]]:
    """Build, train (or resume), save and evaluate; returns the evaluation and run facts."""
    device = pick_device(cfg.device)
    model, _ = build_from_checkpoint(cfg.ckpt, cfg.arch, splits.class_names, s)
    model.to(device)
    opt = make_optimizer(model, s)
    st = Stepper(device, amp=amp_dtype(s.amp, device, allow_cpu=False))
    fingerprint = _fingerprint(cfg, ckpt_sha, splits.class_names, s)
    state = run.file(STATE_FILE)
    start = (load_state(state, model, opt, fingerprint, st.scaler)
             if cfg.resume and state.is_file() else 0)
    if cfg.resume:  # the log holds the iterations of the state resumed from, each once
        run.write_log([r for r in run.read_log() if r.get("iter", 0) <= start])
    choice = MicroChoice(s.batch, s.batch, "none: nothing left to train")
    if start < s.max_iter:
        choice = choose(s.micro_batch, s.batch, device, *probe_step(model, s, st))
        announce(choice)
        st.micro_batch = choice.micro_batch
    train_set = VOCDetection([r for r in splits.train if r.objects], splits.class_names)
    train(model, opt, train_set, s, run, start, device, fingerprint, cfg.progress, stepper=st)
    save_detector(run.file(FINAL_WEIGHTS), model, {
        "backend": "torchvision", "arch": cfg.arch, "class_names": list(splits.class_names),
        "backbone_sha256": ckpt_sha, "iterations": s.max_iter})
    dets = predict(model, VOCDetection(splits.test, splits.class_names), s, device, cfg.progress)
    result = evaluate_voc(splits.test, dets, splits.class_names, year_metric(splits.test_year))
    return result, {"start_iter": start, "device": str(device), "detections": len(dets.scores),
                    "weights": FINAL_WEIGHTS, "evaluator": "toolkit (transfer.voc_eval)",
                    "micro_batch": dataclasses.asdict(choice), "amp": s.amp}
