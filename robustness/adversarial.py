"""Adversarial evaluation: clean and adversarial top-1/top-5 per epsilon and per checkpoint.

White-box, model in eval mode, attacks in [0,1] pixel space with the checkpoint's own evaluation
transform (resize 256 / centre crop 224 for ImageNet checkpoints) and its normalisation applied
once inside the model (`robustness.model.Normalized`). Checkpoints with the same transform share
one pass over the data: each batch is loaded once and every model is attacked on it. Under
torchrun the batches are sharded over the processes and the integer counts are summed exactly.
PGD on ImageNet val is hours of GPU time: the counts are committed to `progress.json` about 20
times per pass, and `--resume` continues a killed run from its last commit, with the numbers an
uninterrupted run gives (each batch is seeded by its global index).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from smix.checkpoint import checkpoint_ref
from smix.data import CIFAR, ClassFolder, eval_transform, holds_cifar
from smix.devices import fits_on_device
from smix.dist import (DistInfo, agree, all_reduce_sum, broadcast_object, distributed,
                       shard_indices)
from smix.errors import UserError
from smix.io import RunDir
from robustness.attacks import AttackParams, BatchAttack, attack_info, get_attack
from robustness.common import (PROGRESS_FILE, Loaded, checkpoint_hashes, commit_progress,
                               correct_counts, fresh_run, group_by_transform,
                               label_map, load_all, load_progress, open_images, percent,
                               progress, read_metas, resumed_run)
from robustness.data import index_batches, subset_indices
from robustness.plot import plot_accuracy_vs_eps

MAX_EPS = 255.0  # /255 units: epsilon is at most the whole pixel range
COMMITS = 20  # progress commits per pass: a killed run loses at most about 1/20 of a pass
# the batch size decides each batch's images and seed, so --resume keeps it: a smaller one is a
# new run
OOM_ADVICE = "rerun with a smaller --batch-size, without --resume (a run keeps its batch size)"


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """One adversarial evaluation run. eps and step are in /255 pixel units."""

    attack: str
    checkpoints: tuple[Path, ...]
    data: Path
    out: Path
    eps: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    batch_size: int = 64
    limit: int | None = None
    impl: str | None = None  # None: the attack's default implementation
    step: float = 1.0
    steps: int = 10
    random_start: bool = True
    seed: int = 0
    workers: int = 4
    device: str = "auto"
    dataset: str = ""  # the name metrics.json reports; default: the checkpoints' dataset
    resume: bool = False  # continue from the run folder's progress.json


def check_config(cfg: AttackConfig) -> None:
    """Library-level checks. eps = 0 is allowed here (it must reproduce the clean accuracy);
    the CLI is stricter and asks for eps in (0, 255]."""
    if not cfg.checkpoints:
        raise UserError("no checkpoint given (--ckpt FILE)")
    if not cfg.eps or any(not 0 <= e <= MAX_EPS for e in cfg.eps):
        raise UserError(f"eps must be in [0, {MAX_EPS:g}] (/255 units), got {list(cfg.eps)}")
    if cfg.batch_size < 1 or (cfg.limit is not None and cfg.limit < 1):
        raise UserError("--batch-size and --limit must be >= 1")
    if cfg.steps < 1 or not 0 < cfg.step <= MAX_EPS:
        raise UserError(f"--steps must be >= 1 and --step in (0, {MAX_EPS:g}]")
    if cfg.workers < 0:
        raise UserError("--workers must be >= 0")


def attack_params(cfg: AttackConfig) -> AttackParams:
    return AttackParams(step=cfg.step / 255, steps=cfg.steps, random_start=cfg.random_start)


def under_attacked(cfg: AttackConfig) -> list[float]:
    """The epsilons an iterative attack cannot reach: `steps` steps of `step` move a pixel at
    most steps·step, so a larger ε is under-attacked and its robust accuracy inflated."""
    if not {"step", "steps"} <= set(attack_info(cfg.attack).params):
        return []
    return [e for e in cfg.eps if cfg.steps * cfg.step < e]


def budget_warning(cfg: AttackConfig, short: Sequence[float]) -> str:
    """One line: which ε are out of reach, and Madry et al.'s step for the largest. The run
    keeps the user's step: changing it silently would change what was asked for."""
    top = max(short)
    return (f"warning: {cfg.attack}: {cfg.steps} steps of {cfg.step:g}/255 move at most "
            f"{cfg.steps * cfg.step:g}/255, less than ε = {', '.join(map(eps_key, short))}/255: "
            f"under-attacked, robust accuracy inflated; Madry et al.'s step = 2.5·ε/steps "
            f"gives --step {2.5 * top / cfg.steps:g} for ε = {top:g}")


def batch_seed(seed: int, global_batch: int) -> int:
    """The seed of one global batch: the same whichever process evaluates it."""
    return (seed * 1_000_003 + global_batch) % (2 ** 63)


def attack_counts(model: torch.nn.Module, attack: BatchAttack, images: torch.Tensor,
                  labels: torch.Tensor, eps01: Sequence[float], params: AttackParams,
                  seed: int) -> torch.Tensor:
    """int64 [1 + len(eps), 2]: top-1/top-5 correct counts, clean first, then each epsilon."""
    out = attack(model, images, labels, eps01, params, seed)
    with torch.no_grad():
        clean = out.clean_logits if out.clean_logits is not None else model(images)
    rows = [correct_counts(clean, labels)]
    for adv in out.adversarial:  # lazily attacked: needs autograd, so outside no_grad
        with torch.no_grad():
            rows.append(correct_counts(model(adv), labels))
    return torch.stack(rows)


def commit_chunks(start: int, n_batches: int, world_size: int, commits: int = COMMITS
                  ) -> list[range]:
    """Global batches [start, n_batches) in the chunks whose counts are committed one at a
    time: a multiple of `world_size` batches each (every process has work in each), about
    `commits` chunks over a whole pass."""
    per = world_size * max(1, math.ceil(n_batches / (commits * world_size)))
    return [range(b, min(b + per, n_batches)) for b in range(start, n_batches, per)]


def _slice(r: range) -> slice:
    return slice(r.start, r.stop)


def saved_counts(saved: dict[str, Any], shape: tuple[int, ...], n_batches: int, out: Path
                 ) -> tuple[int, torch.Tensor]:
    """(batches done, counts) of one pass's progress entry, checked against the run's shape."""
    try:
        batches, counts = int(saved["batches"]), torch.tensor(saved["counts"], dtype=torch.int64)
    except (KeyError, TypeError, ValueError):
        counts = None
    if counts is None or tuple(counts.shape) != shape or not 0 <= batches <= n_batches:
        raise UserError(f"{Path(out) / PROGRESS_FILE}: a pass's record is malformed; rerun without "
                        "--resume to start over")
    return batches, counts


def _attack_pass(cfg: AttackConfig, group: list[Loaded], info: DistInfo, attack: BatchAttack,
                 desc: str, saved: dict[str, Any] | None,
                 commit: Callable[[int, torch.Tensor], None]) -> tuple[torch.Tensor, int]:
    """One pass over the data for checkpoints sharing a transform: counts [models, 1+E, 2],
    summed over processes. Global batch b is indices[b·batch : (b+1)·batch] whichever process
    attacks it, seeded by b; after each chunk of batches the counts so far are handed to
    `commit` with the number of batches they cover, and a pass `saved` by a killed run
    continues from its last commit with the same numbers an uninterrupted run gives."""
    dataset = open_images(cfg.data, group[0].meta, group[0].path,
                          eval_transform(group[0].meta, normalize=False))
    maps = [label_map(dataset.classes, m.meta, m.path).to(info.device) for m in group]
    indices = subset_indices(len(dataset), cfg.limit)
    bs = cfg.batch_size
    n_batches = math.ceil(len(indices) / bs)
    eps01 = [e / 255 for e in cfg.eps]
    params = attack_params(cfg)
    shape = (len(group), 1 + len(cfg.eps), 2)
    start, counts = (saved_counts(saved, shape, n_batches, cfg.out) if saved
                     else (0, torch.zeros(shape, dtype=torch.int64)))
    chunks = commit_chunks(start, n_batches, info.world_size)
    mine = [chunk[_slice(shard_indices(len(chunk), info.rank, info.world_size))]
            for chunk in chunks]
    members = [indices[b * bs:(b + 1) * bs] for part in mine for b in part]
    batches = index_batches(dataset, members, cfg.workers)
    if start:
        desc += f" (resumed at batch {start}/{n_batches})"
    with progress(sum(map(len, members)), desc, info.is_main) as bar:
        for chunk, part in zip(chunks, mine):
            new = torch.zeros(shape, dtype=torch.int64)
            for b in part:
                images, labels = next(batches)
                images, labels = images.to(info.device), labels.to(info.device)
                with fits_on_device(bs, OOM_ADVICE):
                    for j, loaded in enumerate(group):
                        new[j] += attack_counts(loaded.model, attack, images, maps[j][labels],
                                                eps01, params, batch_seed(cfg.seed, b))
                bar.update(len(labels))
            counts += all_reduce_sum(new)  # int64: the totals over processes are exact
            commit(chunk.stop, counts)
    return counts, len(indices)


def run_identity(cfg: AttackConfig, impl: str, dataset: ClassFolder | CIFAR) -> dict[str, Any]:
    """What a resumed run must share with the killed one for its counts to be the same
    measurement: the checkpoints' bytes, the images (their list: a folder still being unpacked
    or cleaned up between the kill and the resume would mix counts of other images) and their
    subset, and all that decides an adversarial image: attack, implementation, ε, its
    parameters, the seed and the batch size (which decides each batch's seed). Workers and
    device only change how they are made."""
    if isinstance(dataset, CIFAR):
        names = dataset.digest()
    else:
        listing = "\n".join(f"{os.path.relpath(p, cfg.data)}\t{t}" for p, t in dataset.samples)
        names = hashlib.sha256(listing.encode()).hexdigest()
    return {"checkpoints": checkpoint_hashes(cfg.checkpoints),
            "data": str(Path(cfg.data).resolve()),
            "images": len(dataset), "image names": names,
            "limit": cfg.limit, "impl": impl,
            "eps": list(cfg.eps), "step": cfg.step, "steps": cfg.steps,
            "random_start": cfg.random_start, "seed": cfg.seed, "batch_size": cfg.batch_size}


def run_attack(cfg: AttackConfig) -> dict[str, Any]:
    """Evaluate every checkpoint under the attack; rank 0 writes metrics.json and the plot.
    Each pass's counts are committed to progress.json as they grow; `resume` continues there."""
    check_config(cfg)
    impl, attack = get_attack(cfg.attack, cfg.impl)
    metas = read_metas(cfg.checkpoints)
    # bad data fails here, before anything is written
    counts = sorted({m.num_classes for m in metas})
    if len(counts) > 1 and holds_cifar(cfg.data):
        raise UserError(f"{cfg.data}: one run evaluates one CIFAR test set, but the checkpoints "
                        f"have {' and '.join(map(str, counts))} classes: run each set's "
                        "checkpoints separately (each takes its own set where a root holds both)")
    images = open_images(cfg.data, metas[0], cfg.checkpoints[0])
    for path, meta in zip(cfg.checkpoints, metas):
        label_map(images.classes, meta, path)
    identity = run_identity(cfg, impl, images)
    with distributed(cfg.device) as info:
        agree(RunDir(cfg.out, create=False).claim, "robustness", cfg.attack)
        # rank 0's record (its error, on every rank): every rank continues from the same batch
        done: dict[str, Any] = broadcast_object(agree(
            lambda: load_progress(cfg.out, identity, cfg.attack)
            if cfg.resume and info.is_main else {}))
        run = (resumed_run(cfg.out) if cfg.resume else fresh_run(cfg.out)) if info.is_main else None
        if run:
            run.write_config(cfg)
            short = under_attacked(cfg)
            if short:
                print(budget_warning(cfg, short), file=sys.stderr)

        def commit(g: int, batches: int, counts: torch.Tensor) -> None:
            done[str(g)] = {"batches": batches, "counts": counts.tolist()}
            if run:
                commit_progress(cfg.out, cfg.attack, identity, done)

        loaded = load_all(cfg.checkpoints, info.device)
        counts = torch.zeros(len(loaded), 1 + len(cfg.eps), 2, dtype=torch.int64)
        groups = group_by_transform(metas)
        n_images = 0
        for g, group in enumerate(groups):
            t0 = time.perf_counter()
            desc = f"{cfg.attack} pass {g + 1}/{len(groups)}"
            saved = done.get(str(g))
            part, n_images = _attack_pass(cfg, [loaded[i] for i in group], info, attack, desc,
                                          saved, lambda b, c, g=g: commit(g, b, c))
            counts[group] = part
            if run:
                run.log({"pass": g, "checkpoints": [str(cfg.checkpoints[i]) for i in group],
                         "world_size": info.world_size, "images": n_images,
                         "resumed_at_batch": saved["batches"] if saved else 0,
                         "seconds": time.perf_counter() - t0})
        if not run:
            return {}
        results = build_results(cfg, impl, loaded, counts, n_images, len(groups))
        run.write_metrics(stage="robustness", kind=cfg.attack, results=results, config=cfg)
        plot_accuracy_vs_eps(run.file("accuracy_vs_eps.png"), results)
        return results


def eps_key(eps: float) -> str:
    return f"{eps:g}"


def dataset_name(cfg: AttackConfig, loaded: Sequence[Loaded]) -> str:
    if cfg.dataset:
        return cfg.dataset
    names = {m.meta.dataset for m in loaded}
    return names.pop() if len(names) == 1 and "" not in names else cfg.data.name


def build_results(cfg: AttackConfig, impl: str, loaded: Sequence[Loaded], counts: torch.Tensor,
                  n_images: int, passes: int) -> dict[str, Any]:
    """The metrics.json `results` of an attack run (RobustBench's fields where they apply)."""
    info = attack_info(cfg.attack)
    models = []
    top_eps = cfg.eps.index(max(cfg.eps))
    for j, m in enumerate(loaded):
        acc = [{"top1": percent(int(c[0]), n_images), "top5": percent(int(c[1]), n_images)}
               for c in counts[j]]
        models.append({
            "checkpoint": checkpoint_ref(m.path, m.meta),
            "architecture": m.meta.arch,
            "clean": acc[0],
            "adversarial": {eps_key(e): acc[1 + i] for i, e in enumerate(cfg.eps)},
            "clean_acc": acc[0]["top1"],
            "robust_acc": acc[1 + top_eps]["top1"],
        })
    params = {"step": cfg.step, "steps": cfg.steps, "random_start": cfg.random_start}
    short = under_attacked(cfg)
    return {
        "dataset": dataset_name(cfg, loaded),
        "n_images": n_images,
        "eps": list(cfg.eps),
        "attack": cfg.attack,
        "impl": impl,
        "threat_model": "Linf",
        "params": {k: v for k, v in params.items() if k in info.params},
        "passes": passes,
        "under_attacked_eps": short,  # ε beyond steps·step: their robust accuracy is inflated
        "warnings": [budget_warning(cfg, short)] if short else [],
        "models": models,
    }
