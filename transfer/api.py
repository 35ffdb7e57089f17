"""`run_transfer`: checkpoint + VOC -> fine-tuned Faster R-CNN -> VOC07 mAP in a run folder.

The one library entry point behind `smix transfer`. It validates everything a user can get wrong
before any training (checkpoint arch, VOC folders and annotations, class list, options), picks the
backend (detectron2 when importable, else torchvision; always said), runs it, and writes the run
folder: config.json (request + resolved settings + data), log.jsonl, final weights, metrics.json.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any, Callable

from smix.amp import amp_dtype
from smix.checkpoint import checkpoint_ref, read_checkpoint, read_meta
from smix.dist import pick_device
from smix.errors import UserError
from smix.io import RunDir, file_sha256, read_json
from transfer.config import (BACKENDS, Settings, TransferConfig, first_difference, get_preset,
                             recipe, resolve)
from transfer.convert import check_detection_backbone
from transfer.data import VOCSplits, load_splits, parse_sets
from transfer.voc_eval import VOCResult, metric_label

# A backend returns the evaluation (None on machines other than rank 0) and facts for metrics.
Backend = Callable[[TransferConfig, Settings, VOCSplits, RunDir, str],
                   tuple[VOCResult | None, dict]]
# Files whose presence means a run folder already holds a (possibly unfinished) run.
RUN_MARKERS = ("metrics.json", "resume.pt", "detectron2/last_checkpoint")


def detectron2_available() -> bool:
    return importlib.util.find_spec("detectron2") is not None


def _torchvision(cfg: TransferConfig, s: Settings, splits: VOCSplits, run: RunDir, sha: str
                 ) -> tuple[VOCResult | None, dict]:
    from transfer.tv_backend import run_torchvision

    return run_torchvision(cfg, s, splits, run, sha)


def _detectron2(cfg: TransferConfig, s: Settings, splits: VOCSplits, run: RunDir, sha: str
                ) -> tuple[VOCResult | None, dict]:
    if not detectron2_available():
        raise UserError("--backend detectron2: detectron2 is not installed (it is built from its "
                        "source repository); use --backend torchvision")
    from transfer.d2_backend import run_detectron2

    return run_detectron2(cfg, s, splits, run, sha)


_BACKENDS: dict[str, Backend] = {"detectron2": _detectron2, "torchvision": _torchvision}


def choose_backend(requested: str) -> str:
    if requested not in BACKENDS:
        raise UserError(f"unknown --backend {requested!r}; valid: {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested
    return "detectron2" if detectron2_available() else "torchvision"


def _guard_run_folder(run: RunDir, resume: bool, identity: dict[str, Any],
                      data: dict[str, Any], s: Settings) -> None:
    """Never overwrite a run by accident; resume only the same checkpoint/backend/arch/classes,
    the same data (sets and image counts) and the same recipe (every resolved setting but those
    of `RUN_ONLY_SETTINGS`)."""
    present = [m for m in RUN_MARKERS if run.file(m).exists()]
    if present and not resume:
        raise UserError(f"{run.path} already holds a transfer run ({present[0]}); pass --resume "
                        "to continue it or choose another --out")
    if resume and run.file("config.json").is_file():
        before = read_json(run.file("config.json"))
        settings = before.get("settings", {})
        diff = (first_difference(before.get("identity", {}), identity)
                or first_difference(_data_identity(before.get("data", {})), data)
                or first_difference(settings, recipe(s)))
        if diff:
            key, old, new = diff
            raise UserError(f"--resume: {run.path} was run with {key} {old!r}, not {new!r}; "
                            f"{_schedule_hint(key, settings, s) or 'use a new --out'}")


def _data_identity(summary: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run must train and test on: the sets and their image counts (not where
    they are: a devkit may move)."""
    return {k: summary[k] for k in ("train_sets", "train_images", "test_set", "test_images")
            if k in summary}


SCHEDULE = ("max_iter", "steps", "warmup_iters", "checkpoint_period")


def _schedule_hint(key: str, before: dict[str, Any], s: Settings) -> str:
    """Runs started before a `batch=` override rescaled the schedule (as detectron2's
    auto_scale_workers does) recorded the preset's iterations unscaled: when the recorded
    schedule is that one, how to resume with it."""
    p = get_preset(s.preset)
    old_max = before.get("max_iter")
    if (key not in SCHEDULE or s.batch == p.batch or before.get("batch") != s.batch
            or not isinstance(old_max, int)):
        return ""
    unscaled = {"steps": [int(round(x * old_max / p.max_iter)) for x in p.steps],
                "warmup_iters": min(p.warmup_iters, old_max),
                "checkpoint_period": p.checkpoint_period}
    if any(before.get(k) != v for k, v in unscaled.items()):
        return ""
    keep = {"--iters": before.get("max_iter"),
            "steps=": ",".join(map(str, before.get("steps", []))),
            "warmup=": before.get("warmup_iters"),
            "checkpoint_period=": before.get("checkpoint_period")}
    args = " ".join(f"{k}{'' if k.endswith('=') else ' '}{v}" for k, v in keep.items()
                    if v not in (None, ""))
    return (f"a batch= override now rescales the schedule as detectron2 does; to resume with "
            f"the run's recorded one, add {args}")


def _backend_note(requested: str, backend: str) -> str:
    if requested != "auto":
        return f"backend {backend} (requested)"
    return f"backend {backend} (detectron2 {'is' if backend == 'detectron2' else 'not'} importable)"


def _data_summary(splits: VOCSplits) -> dict[str, Any]:
    return {"train_sets": list(splits.train_sets), "test_set": splits.test_set,
            "train_images": len(splits.train), "test_images": len(splits.test),
            "class_names": list(splits.class_names), "skipped_sets": list(splits.skipped_sets)}


def prepare(cfg: TransferConfig) -> tuple[str, Settings, VOCSplits]:
    """Every user-facing check, before anything is written or trained."""
    backend = choose_backend(cfg.backend)
    if cfg.num_gpus < 1 or cfg.num_machines < 1 or not 0 <= cfg.machine_rank < cfg.num_machines:
        raise UserError("--num-gpus and --num-machines must be >= 1 and 0 <= --machine-rank < "
                        "--num-machines")
    if backend == "torchvision" and cfg.num_gpus * cfg.num_machines > 1:
        raise UserError("the torchvision backend runs in one process; multi-GPU and "
                        "multi-machine training go through --backend detectron2")
    s = resolve(cfg)
    world = cfg.num_gpus * cfg.num_machines
    if s.batch % world:
        raise UserError(f"batch {s.batch} is not divisible by the {world} processes")
    if s.micro_batch is not None and s.micro_batch > s.batch // world:
        raise UserError(f"micro_batch={s.micro_batch} exceeds the {s.batch // world} images each "
                        f"process trains on per iteration (batch {s.batch} / {world})")
    amp_dtype(s.amp, pick_device(cfg.device), allow_cpu=False)  # one line if it cannot run here
    if cfg.num_machines > 1 and cfg.dist_url == "auto":
        raise UserError("a multi-machine job needs --dist-url tcp://HOST:PORT (the same on all)")
    _, meta = read_checkpoint(cfg.ckpt)  # whole: a NaN or a bad tensor before anything is written
    check_detection_backbone(meta, cfg.arch)
    test_sets = parse_sets(s.test_set)
    if len(test_sets) != 1:  # (the first alone was evaluated, silently)
        raise UserError(f"test_set={s.test_set}: one VOC set is evaluated, e.g. test_set=2007:test")
    splits = load_splits(cfg.voc_root, cfg.classes, parse_sets(s.train_sets), test_sets[0])
    return backend, s, splits


def run_transfer(cfg: TransferConfig) -> dict[str, Any] | None:
    """Fine-tune and evaluate; returns the metrics.json `results` (None off the main machine)."""
    backend, s, splits = prepare(cfg)
    print(f"smix transfer: {_backend_note(cfg.backend, backend)}", file=sys.stderr)
    for missing in splits.skipped_sets:
        print(f"smix transfer: {missing} not found under {cfg.voc_root}; training without it",
              file=sys.stderr)
    run, sha = RunDir(cfg.out), file_sha256(cfg.ckpt)
    identity = {"backend": backend, "arch": cfg.arch, "class_names": splits.class_names,
                "checkpoint_sha256": sha}
    config = {"request": cfg, "identity": identity, "settings": s, "data": _data_summary(splits)}
    if cfg.machine_rank == 0:
        run.claim("transfer", "detection")
        _guard_run_folder(run, cfg.resume, identity, _data_identity(config["data"]), s)
        if cfg.resume:  # what a kill left of an atomic write (a resume state is ~300 MB)
            for folder in (run, RunDir(run.file("detectron2"), create=False)):
                folder.remove_stale_temporaries()
        run.write_config(config)
        run.log({"event": "start", "backend": backend, "preset": s.preset, "arch": cfg.arch,
                 "iters": s.max_iter, "resume": cfg.resume})
    result, facts = _BACKENDS[backend](cfg, s, splits, run, sha)
    if result is None:
        return None
    results = {**result.summary(), "per_class": result.per_class, "backend": backend,
               "preset": s.preset, "arch": cfg.arch, "iters": s.max_iter,
               "checkpoint": checkpoint_ref(cfg.ckpt, read_meta(cfg.ckpt)),
               "per_class_AP": result.per_class_ap, "metric": metric_label(splits.test_year),
               "classes_without_ground_truth": list(result.classes_without_ground_truth),
               **_data_summary(splits), **facts}
    run.log({"event": "done", **result.summary()})
    run.write_metrics(stage="transfer", kind="detection", results=results, config=config)
    return results
