"""Corruption robustness: top-1 error per corruption and severity, mCE and mean error.

ImageNet-C: mCE = mean over corruptions c of (sum_s E_{s,c} / sum_s E^AlexNet_{s,c}), and the
relative mCE = mean over c of (sum_s (E_{s,c} - E_clean)) / (sum_s (E^AlexNet_{s,c} - E^AlexNet_clean))
when the clean error is known (--clean). CIFAR-10-C / CIFAR-100-C: the mean corruption error
(no AlexNet normalisation, as in the CIFAR literature). Errors in metrics.json are percent.

ImageNet-C is 75 splits of 50,000 images: each split's exact counts (summed over processes) are
committed to `progress.json` in the run folder as soon as it is done, and `--resume` continues a
killed run from there, refusing one whose checkpoints, data or split selection differ, or a
finished split whose images changed since (their count, or the list of their files).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from smix.checkpoint import BackboneMeta, checkpoint_ref
from smix.data import cifar_kind, find_cifar, read_cifar
from smix.devices import fits_on_device
from smix.dist import DistInfo, agree, all_reduce_sum, broadcast_object, distributed
from smix.errors import UserError
from smix.io import RunDir
from robustness.common import (Loaded, checkpoint_hashes, commit_progress,
                               correct_counts, fresh_run, group_by_transform,
                               label_map, load_all, load_progress, open_images, progress,
                               read_metas, resumed_run)
from robustness.corruption_data import (CORRUPTIONS, Split, detect_layout, load_npy, scan_cifar_c,
                                        scan_imagenet_c, split_transform, warn_ignored)
from robustness.data import array_batches, dataset_batches, shard_batches, subset_indices

# AlexNet's top-1 error on ImageNet-C per corruption, averaged over the 5 severities (fractions):
# Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
# Perturbations", ICLR 2019; the values distributed with github.com/hendrycks/robustness and used
# to normalise mCE by AugMix (google-research/augmix, imagenet.py, ALEXNET_ERR).
ALEXNET_ERR: dict[str, float] = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948,
    "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572, "fog": 0.819324,
    "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
}
# AlexNet's clean top-1 error for the relative mCE: 1 - 0.56522, torchvision's documented top-1
# of the AlexNet weights (alexnet-owt-4df8aa71) the table above was measured with; the paper
# rounds it to 43.5.
ALEXNET_CLEAN_ERR = 0.43478
MCE_REFERENCE = "AlexNet errors of Hendrycks & Dietterich (ICLR 2019)"
# finished splits are kept, and the batch size is not part of a run's identity
OOM_ADVICE = "continue with --resume and a smaller --batch-size"


def mean_corruption_error(errors: Mapping[str, Sequence[float]],
                          reference: Mapping[str, float] = ALEXNET_ERR) -> float | None:
    """mCE as a fraction: mean over the corruptions with a reference of mean_s E / E_ref.
    (sum_s E / sum_s E_ref equals mean_s E / mean_s E_ref; the table holds the means.)"""
    ces = [float(np.mean(errs)) / reference[c] for c, errs in errors.items() if c in reference]
    return float(np.mean(ces)) if ces else None


def relative_mce(errors: Mapping[str, Sequence[float]], clean_error: float | None,
                 reference: Mapping[str, float] = ALEXNET_ERR,
                 reference_clean: float = ALEXNET_CLEAN_ERR) -> float | None:
    """Relative mCE as a fraction: the degradation from clean, normalised by AlexNet's."""
    if clean_error is None:
        return None
    rces = [(float(np.mean(errs)) - clean_error) / (reference[c] - reference_clean)
            for c, errs in errors.items() if c in reference]
    return float(np.mean(rces)) if rces else None


def mean_error(errors: Mapping[str, Sequence[float]]) -> float | None:
    """Unnormalised mean corruption error over the 15 benchmark corruptions evaluated (over all
    evaluated when none of them was chosen)."""
    chosen = [c for c in errors if c in CORRUPTIONS] or list(errors)
    return float(np.mean([np.mean(errors[c]) for c in chosen])) if chosen else None


@dataclasses.dataclass(frozen=True)
class CorruptionConfig:
    checkpoints: tuple[Path, ...]
    data: Path
    out: Path
    clean: Path | None = None  # clean val: a class folder (ImageNet-C) or CIFAR pickles (CIFAR-C)
    corruptions: tuple[str, ...] = ()  # () = the 15 benchmark corruptions found on disk
    batch_size: int = 128
    limit: int | None = None  # images per split, evenly spaced (quick runs)
    workers: int = 4
    device: str = "auto"
    dataset: str = ""
    resume: bool = False  # continue from the run folder's progress.json


def split_key(split: Split) -> str:
    return f"{split.corruption}/{split.severity}"


def run_identity(cfg: CorruptionConfig, splits: Sequence[Split]) -> dict[str, Any]:
    """What a resumed run must share with the killed one for its counts to be the same
    measurement: the checkpoints' bytes, the data, the split selection and the image subset
    (batch size, workers and device only change how the counts are made)."""
    return {"checkpoints": checkpoint_hashes(cfg.checkpoints),
            "data": str(Path(cfg.data).resolve()),
            "clean": str(Path(cfg.clean).resolve()) if cfg.clean is not None else None,
            "splits": [split_key(s) for s in splits], "limit": cfg.limit}


def plan_splits(cfg: CorruptionConfig) -> tuple[str, list[Split], list[str]]:
    """Layout, the splits to evaluate (clean first when given) and the ignored entries."""
    layout = detect_layout(cfg.data)
    scan = scan_imagenet_c if layout == "imagenet-c" else scan_cifar_c
    splits, ignored = scan(cfg.data, cfg.corruptions)
    if cfg.clean is not None:
        if not cfg.clean.exists():
            raise UserError(f"{cfg.clean}: clean data does not exist")
        splits.insert(0, Split("clean", 0, cfg.clean, "folder" if layout == "imagenet-c" else "cifar"))
    return layout, splits, ignored


class _SplitData:
    """Indices, labels per model and batches of one split, shared by a group of checkpoints."""

    def __init__(self, split: Split, group: Sequence[Loaded], cfg: CorruptionConfig):
        self.split, self.meta = split, group[0].meta
        self.transform = split_transform(split, self.meta)
        if split.kind == "folder":
            self.dataset = open_images(split.path, self.meta, group[0].path, self.transform)
            self.maps = [label_map(self.dataset.classes, m.meta, m.path) for m in group]
            n, offset = len(self.dataset), 0
        else:
            if split.kind == "cifar":
                # the checkpoint's classes say which, where a root holds both
                self.images, self.labels, _ = read_cifar(split.path, train=False,
                                                         kind=cifar_kind(self.meta.num_classes))
            else:
                self.images, self.labels = load_npy(split.path), load_npy(split.labels)
            self.maps = [_identity_map(self.labels, split, m) for m in group]
            n, offset = split.count or len(self.labels), split.start
        self.indices = [offset + i for i in subset_indices(n, cfg.limit)]

    def listing(self) -> str:
        """A digest of the images evaluated: the files' relative paths and classes, or of an
        array split the labels (its arrays are fixed releases; their count is checked too)."""
        if self.split.kind == "folder":
            samples = self.dataset.samples
            text = "\n".join(f"{os.path.relpath(samples[i][0], self.split.path)}\t{samples[i][1]}"
                             for i in self.indices)
            return hashlib.sha256(text.encode()).hexdigest()
        return hashlib.sha256(np.ascontiguousarray(self.labels[self.indices]).tobytes()).hexdigest()

    def batches(self, info: DistInfo, cfg: CorruptionConfig
                ) -> tuple[int, Iterator[tuple[torch.Tensor, torch.Tensor]]]:
        shard = shard_batches(self.indices, cfg.batch_size, info.rank, info.world_size)
        if self.split.kind == "folder":
            return len(shard.indices), dataset_batches(self.dataset, shard, cfg.workers)
        return len(shard.indices), array_batches(self.images, self.labels, shard, self.transform)


def _identity_map(labels: np.ndarray, split: Split, m: Loaded) -> torch.Tensor:
    """Array datasets store class indices: they must fit the checkpoint's classifier."""
    top = int(np.max(labels)) if len(labels) else -1
    if top >= m.meta.num_classes or (len(labels) and int(np.min(labels)) < 0):
        raise UserError(f"{split.labels or split.path}: labels go up to {top} but checkpoint "
                        f"{m.path} has {m.meta.num_classes} classes")
    return torch.arange(m.meta.num_classes)


def _corruption_pass(cfg: CorruptionConfig, splits: Sequence[Split], group: list[Loaded],
                     info: DistInfo, desc: str, done: dict[str, Any], ids: Sequence[str],
                     commit: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 correct counts [models, splits] and image counts [splits], summed over processes.
    A split whose counts `done` holds for every checkpoint of the group (by `ids`, their
    hashes) is taken from it, if it still holds the images counted; each split evaluated is
    summed at once and handed to `commit`."""
    correct = torch.zeros(len(group), len(splits), dtype=torch.int64)
    totals = torch.zeros(len(splits), dtype=torch.int64)
    with progress(0, desc, info.is_main) as bar:
        for k, split in enumerate(splits):
            saved = done.get(split_key(split), {})
            data = _SplitData(split, group, cfg)
            if all(i in saved.get("correct", {}) for i in ids):
                if saved["total"] != len(data.indices):  # the split changed since the kill
                    raise UserError(f"{split.path}: {len(data.indices)} images to evaluate now, "
                                    f"{saved['total']} when the killed run counted them; rerun "
                                    "without --resume to start over")
                if "images" in saved and saved["images"] != data.listing():  # older: none
                    raise UserError(f"{split.path}: other image files than when the killed run "
                                    "counted them (same number); rerun without --resume to start "
                                    "over")
                correct[:, k] = torch.tensor([saved["correct"][i] for i in ids])
                totals[k] = saved["total"]
                continue
            n_local, batches = data.batches(info, cfg)
            bar.total += n_local
            bar.set_description(f"{desc} {split.corruption}/{split.severity}")
            maps = [m.to(info.device) for m in data.maps]
            for images, labels in batches:
                images, labels = images.to(info.device), labels.to(info.device)
                with torch.no_grad(), fits_on_device(cfg.batch_size, OOM_ADVICE):
                    for j, loaded in enumerate(group):
                        correct[j, k] += correct_counts(loaded.model(images), maps[j][labels])[0]
                totals[k] += len(labels)
                bar.update(len(labels))
            counts = all_reduce_sum(torch.cat([correct[:, k], totals[k:k + 1]]))  # exact
            correct[:, k], totals[k] = counts[:-1], counts[-1]
            commit(split_key(split), dict(zip(ids, correct[:, k].tolist())), int(totals[k]),
                   data.listing())
    return correct, totals


def check_folder_classes(splits: Sequence[Split], metas: Sequence[BackboneMeta],
                         paths: Sequence[Path]) -> None:
    """Every class-folder split must hold the checkpoints' classes: checked up front, so a wrong
    tree fails before anything is written. Corrupted splits by their folder names (cheap); the
    clean split is read as pretrain reads it, since it may be Tiny-ImageNet's val layout."""
    for split in splits:
        if split.kind != "folder":
            continue
        if not split.path.is_dir():
            raise UserError(f"{split.path}: data directory does not exist")
        if split.corruption == "clean":
            classes = open_images(split.path, metas[0], Path(paths[0])).classes
        else:
            classes = sorted(e.name for e in os.scandir(split.path)
                             if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise UserError(f"{split.path}: no class folders (expected <class>/<image>)")
        for path, meta in zip(paths, metas):
            label_map(classes, meta, Path(path))


# The class count of a checkpoint whose `dataset` metadata names a CIFAR set.
CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}


def check_array_labels(splits: Sequence[Split], metas: Sequence[BackboneMeta],
                       paths: Sequence[Path]) -> None:
    """CIFAR-C labels cover every class of their set, so max(label) + 1 is its class count: it
    must be the checkpoint's, and its `dataset` where that names a CIFAR set. Only fitting in
    the classifier would let a CIFAR-100 model be scored on CIFAR-10-C without a word."""
    for labels_path in dict.fromkeys(s.labels for s in splits if s.kind == "array"):
        labels = load_npy(labels_path)
        if not len(labels) or int(np.min(labels)) < 0:
            raise UserError(f"{labels_path}: expected class indices >= 0 (CIFAR-C labels)")
        k = int(np.max(labels)) + 1
        for path, meta in zip(paths, metas):
            named = CIFAR_CLASSES.get(meta.dataset.lower().replace("-", "").replace("_", ""))
            if k != meta.num_classes:
                raise UserError(f"{labels_path}: labels cover {k} classes but checkpoint {path} "
                                f"has {meta.num_classes} (CIFAR-{k}-C needs a CIFAR-{k} model)")
            if named not in (None, k):
                raise UserError(f"{labels_path}: labels cover {k} classes but checkpoint {path} "
                                f"was trained on {meta.dataset} ({named} classes)")


def check_cifar_clean(splits: Sequence[Split], metas: Sequence[BackboneMeta]) -> None:
    """A CIFAR --clean root must hold each checkpoint's set (the one its class count names):
    checked up front, as class folders are, not once the run folder was started."""
    for split in splits:
        if split.kind == "cifar":
            for meta in metas:
                find_cifar(split.path, cifar_kind(meta.num_classes))


def run_corruption(cfg: CorruptionConfig) -> dict[str, Any]:
    """Evaluate every checkpoint on every split; rank 0 writes metrics.json."""
    if not cfg.checkpoints:
        raise UserError("no checkpoint given (--ckpt FILE)")
    if cfg.batch_size < 1 or (cfg.limit is not None and cfg.limit < 1) or cfg.workers < 0:
        raise UserError("--batch-size and --limit must be >= 1, --workers >= 0")
    metas = read_metas(cfg.checkpoints)
    layout, splits, ignored = plan_splits(cfg)
    check_folder_classes(splits, metas, cfg.checkpoints)
    check_array_labels(splits, metas, cfg.checkpoints)
    check_cifar_clean(splits, metas)
    identity = run_identity(cfg, splits)
    with distributed(cfg.device) as info:
        agree(RunDir(cfg.out, create=False).claim, "robustness", "corruption")
        # rank 0's record (its error, on every rank): every rank skips the same splits
        done: dict[str, Any] = broadcast_object(agree(
            lambda: load_progress(cfg.out, identity, "corruption")
            if cfg.resume and info.is_main else {}))
        run = (resumed_run(cfg.out) if cfg.resume else fresh_run(cfg.out)) if info.is_main else None
        if run:
            run.write_config(cfg)
            warn_ignored(cfg.data, ignored)

        def commit(key: str, counts: dict[str, int], total: int, images: str) -> None:
            entry = done.setdefault(key, {"correct": {}, "total": total, "images": images})
            entry["correct"].update(counts)
            if run:
                commit_progress(cfg.out, "corruption", identity, done)

        ids = identity["checkpoints"]
        loaded = load_all(cfg.checkpoints, info.device)
        correct = torch.zeros(len(loaded), len(splits), dtype=torch.int64)
        totals = torch.zeros(len(splits), dtype=torch.int64)
        groups = group_by_transform(metas)
        for g, group in enumerate(groups):
            t0 = time.perf_counter()
            part, totals = _corruption_pass(cfg, splits, [loaded[i] for i in group], info,
                                            f"pass {g + 1}/{len(groups)}", done,
                                            [ids[i] for i in group], commit)
            correct[group] = part
            if run:
                run.log({"pass": g, "checkpoints": [str(cfg.checkpoints[i]) for i in group],
                         "world_size": info.world_size,
                         "seconds": time.perf_counter() - t0})
        if not run:
            return {}
        results = build_results(cfg, layout, splits, ignored, loaded, correct, totals)
        run.write_metrics(stage="robustness", kind="corruption", results=results, config=cfg)
        return results


def _errors(correct: torch.Tensor, totals: torch.Tensor, splits: Sequence[Split]
            ) -> tuple[float | None, dict[str, list[float]]]:
    """Clean error and per-corruption error lists (fractions, severities in order)."""
    clean, per = None, {}
    for k, split in enumerate(splits):
        if int(totals[k]) == 0:
            raise UserError(f"{split.path}: no images to evaluate")
        err = 1.0 - int(correct[k]) / int(totals[k])
        if split.corruption == "clean":
            clean = err
        else:
            per.setdefault(split.corruption, []).append(err)
    return clean, per


def _pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


def build_results(cfg: CorruptionConfig, layout: str, splits: Sequence[Split], ignored: list[str],
                  loaded: Sequence[Loaded], correct: torch.Tensor, totals: torch.Tensor
                  ) -> dict[str, Any]:
    """The metrics.json `results` of a corruption run (errors in percent)."""
    models = []
    for j, m in enumerate(loaded):
        clean, per = _errors(correct[j], totals, splits)
        imagenet = layout == "imagenet-c"
        models.append({
            "checkpoint": checkpoint_ref(m.path, m.meta),
            "architecture": m.meta.arch,
            "clean_error": _pct(clean),
            "mCE": _pct(mean_corruption_error(per)) if imagenet else None,
            "relative_mCE": _pct(relative_mce(per, clean)) if imagenet else None,
            "mean_error": _pct(mean_error(per)),
            "per_corruption": {c: {**{str(s): 100.0 * e for s, e in enumerate(errs, 1)},
                                   "mean": 100.0 * float(np.mean(errs))}
                               for c, errs in per.items()},
        })
    evaluated = list(dict.fromkeys(s.corruption for s in splits if s.corruption != "clean"))
    return {
        "dataset": cfg.dataset or cfg.data.name,
        "layout": layout,
        "corruptions": evaluated,
        "corruptions_missing": [c for c in CORRUPTIONS if c not in evaluated],
        "complete": all(c in evaluated for c in CORRUPTIONS),
        "ignored": ignored,
        "images_per_split": {f"{s.corruption}/{s.severity}": int(totals[k])
                             for k, s in enumerate(splits)},
        "mce_reference": MCE_REFERENCE if layout == "imagenet-c" else None,
        "models": models,
    }
