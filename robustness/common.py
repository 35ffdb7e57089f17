"""Pieces both evaluations share: loading checkpoints grouped by their evaluation transform,
exact correct-counts and the progress bar (the distributed session is `smix.dist.distributed`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from smix.checkpoint import BackboneMeta, read_meta
from smix.data import CIFAR, ClassFolder, cifar_kind, holds_cifar
from smix.errors import UserError
from smix.io import RunDir, file_sha256, read_json, write_json
from robustness.model import Normalized, load_for_eval, require_class_names


@dataclasses.dataclass
class Loaded:
    """One checkpoint ready for evaluation."""

    path: Path
    model: Normalized
    meta: BackboneMeta


def transform_key(meta: BackboneMeta) -> tuple[int, int]:
    """Checkpoints whose evaluation transforms agree can share one pass over the data: the
    [0,1] pixels depend only on resize and crop (normalisation happens inside each model)."""
    return (meta.resize, meta.crop)


def group_by_transform(metas: Sequence[BackboneMeta]) -> list[list[int]]:
    """Indices of `metas` grouped by `transform_key`, in first-seen order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, meta in enumerate(metas):
        groups.setdefault(transform_key(meta), []).append(i)
    return list(groups.values())


def read_metas(paths: Sequence[Path]) -> list[BackboneMeta]:
    """Metadata of every checkpoint first (cheap), so bad input fails before any work."""
    return [read_meta(p) for p in paths]


def load_all(paths: Sequence[Path], device: torch.device) -> list[Loaded]:
    out = []
    for p in paths:
        model, meta = load_for_eval(p, device)
        out.append(Loaded(Path(p), model, meta))
    return out


def label_map(classes: Sequence[str], meta: BackboneMeta, path: Path) -> torch.Tensor:
    """Data label -> model output index; the data's classes (class folders, or the CIFAR
    pickles' names) must be the checkpoint's."""
    require_class_names(meta, path)
    if set(classes) != set(meta.class_names):
        diff = sorted(set(classes) ^ set(meta.class_names))
        raise UserError(f"the data's classes do not match checkpoint {path} ({len(classes)} in "
                        f"the data vs {meta.num_classes}; first difference: {diff[0]!r})")
    index = {name: i for i, name in enumerate(meta.class_names)}
    return torch.tensor([index[c] for c in classes], dtype=torch.long)


def open_images(root: Path, meta: BackboneMeta, path: Path, transform: Any = None
                ) -> ClassFolder | CIFAR:
    """The evaluation images read as pretrain reads them, with the checkpoint's class names: a
    class-folder tree, Tiny-ImageNet's own val layout (`images/` + `val_annotations.txt`), or
    CIFAR-10/100's python pickles (the test set; the checkpoint's class count says which
    where a root holds both). The classes must be the checkpoint's; `label_map(dataset.classes,
    …)` then checks that (so its message names the checkpoint) and maps labels."""
    require_class_names(meta, path)
    if holds_cifar(root):
        return CIFAR(root, train=False, transform=transform, kind=cifar_kind(meta.num_classes))
    tiny = (Path(root) / "val_annotations.txt").is_file()  # its classes come from the checkpoint
    classes = sorted(meta.class_names) if tiny else None
    return ClassFolder(root, transform=transform, classes=classes)


# A run's committed partial counts: what `--resume` continues from.
PROGRESS_FILE = "progress.json"


def fresh_run(out: Path) -> RunDir:
    """The run folder, cleared of a previous run's record: a rerun into the same --out replaces
    its config, log, metrics, plot and progress instead of appending to the old log, leaving old
    numbers beside a new config should it fail, or resuming from another run's counts. Other
    files in the folder are left alone."""
    run = RunDir(out)
    for name in ("metrics.json", "accuracy_vs_eps.png", PROGRESS_FILE):
        run.file(name).unlink(missing_ok=True)
    run.write_log([])
    return run


def resumed_run(out: Path) -> RunDir:
    """The run folder of a killed run, kept as it is but for the temporaries of writes the kill
    interrupted."""
    run = RunDir(out)
    run.remove_stale_temporaries()
    return run


def checkpoint_hashes(paths: Sequence[Path]) -> list[str]:
    """The checkpoints' sha256, in order: a resumed run must evaluate the same bytes."""
    return [file_sha256(p) for p in paths]


def load_progress(out: Path, identity: dict[str, Any], kind: str) -> dict[str, Any]:
    """The `done` record of a killed run of this `kind` in `out`. Every `identity` entry (what
    makes its counts the same measurement) must equal the run's, else a one-line refusal."""
    path = Path(out) / PROGRESS_FILE
    if not path.is_file():
        raise UserError(f"{out}: nothing to resume (no {PROGRESS_FILE})")
    saved = read_json(path)
    if (not isinstance(saved, dict) or not isinstance(saved.get("done"), dict)
            or saved.get("kind", "corruption") != kind):
        raise UserError(f"{path}: not a {kind} run's progress record")
    for key, value in identity.items():
        if saved.get("identity", {}).get(key) != value:
            raise UserError(f"{path}: cannot resume with other {key} than the run's; use a new "
                            "--out (or rerun without --resume to start over)")
    return saved["done"]


def commit_progress(out: Path, kind: str, identity: dict[str, Any], done: dict[str, Any]
                    ) -> None:
    """Atomically replace the run's progress record."""
    write_json(Path(out) / PROGRESS_FILE, {"kind": kind, "identity": identity, "done": done})


def correct_counts(logits: torch.Tensor, labels: torch.Tensor, k: int = 5) -> torch.Tensor:
    """int64 [2]: how many are right at top-1 and at top-k (k capped at the class count)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top == labels.view(-1, 1)
    return torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()]).to(torch.int64).cpu()


def percent(count: int, total: int) -> float | None:
    return 100.0 * count / total if total else None


def progress(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar counting images, so its rate reads in img/s."""
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True,
                smoothing=0.1)
