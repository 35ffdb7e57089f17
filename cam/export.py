"""`smix cam export`: per image and checkpoint an overlay PNG and the map (.npy), plus a
figure grid (rows = checkpoints labelled with their training method, columns = images), as
Figure 4a of the SaliencyMix paper.

Layout of OUT: `<tag>/<nnnn>_<image>.png|.npy` per checkpoint (tag = `<k>_<method>`),
`grid.png`, `config.json`, `metrics.json`. Maps are float32 [H,W] in [0,1] at the model's input
resolution (after the checkpoint's eval resize/crop), the same the overlay shows.
Under torchrun the images are sharded; each rank writes the files of its own images, rank 0 the
grid and metrics.json. A rerun into OUT removes the overlays and maps of the earlier export that
it did not write again (those the earlier metrics.json lists); other files stay.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from smix.checkpoint import checkpoint_ref
from smix.data import eval_transform, normalize
from smix.devices import fits_on_device
from smix.dist import (DistInfo, agree, barrier, distributed, gather_lists,
                           shard_indices)
from smix.errors import UserError
from smix.io import RunDir, read_json
from cam.images import file_stem, image_loader, list_images, resolve_targets, say_skipped
from cam.models import CamModel, load_models
from cam.render import overlay, read_png, save_grid, save_npy, save_png


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    ckpts: tuple[Path, ...]
    images: tuple[Path, ...]
    out: Path
    method: str | None = None  # None: plain CAM for GAP+FC archs
    target: str = "pred"  # pred | true | a class name or index
    layer: str | None = None  # None: the arch registry's cam_layer
    batch_size: int = 32
    skip_bad_images: bool = False
    grid_max: int = 8  # columns of grid.png (the first images written)
    workers: int = 0
    device: str = "auto"
    progress: bool = True

    def check(self) -> None:
        if self.batch_size < 1 or self.workers < 0 or self.grid_max < 0:
            raise UserError("--batch-size must be >= 1, --workers and --grid-max >= 0")


def export_cams(cfg: ExportConfig) -> dict[str, Any]:
    """Write overlays, maps, the grid and metrics.json; returns the metrics `results`."""
    cfg.check()
    paths = list_images(cfg.images)
    with distributed(cfg.device) as info:
        models = load_models(cfg.ckpts, cfg.method, cfg.layer, info.device)
        targets = [resolve_targets(cfg.target, paths, m.meta, m.path) for m in models]
        agree(RunDir(cfg.out, create=False).claim, "cam", "export")  # (on every rank)
        run = RunDir(cfg.out)
        previous = recorded_files(run) if info.is_main else set()
        shard = list(shard_indices(len(paths), info.rank, info.world_size))
        records, bad = agree(_export_shard, cfg, paths, shard, models, targets, run, info)
        records, bad = gather_lists(records), sorted(set(gather_lists(bad)))
        if not records:
            raise UserError(f"no readable image among the {len(paths)} given")
        results = _summary(cfg, paths, models, records, [paths[i] for i in bad], run)
        if info.is_main:
            results["grid"] = _write_grid(cfg, models, results, run)
            run.write_config(cfg)
            run.write_metrics(stage="cam", kind="export", results=results, config=cfg)
            remove_stale(run, previous - recorded_files(run))
        barrier()
    return results


def recorded_files(run: RunDir) -> set[str]:
    """The overlays and maps a run folder's metrics.json lists (relative paths; none when it
    has no readable export record)."""
    try:
        results = read_json(run.file("metrics.json")).get("results") or {}
    except (UserError, AttributeError):
        return set()
    if not isinstance(results, dict):
        return set()
    return {str(entry[key]) for m in results.get("models") or [] if isinstance(m, dict)
            for entry in m.get("images") or [] if isinstance(entry, dict)
            for key in ("overlay", "map") if entry.get(key)}


def remove_stale(run: RunDir, names: set[str]) -> None:
    """Delete what an earlier export into this folder wrote and this one did not, so that the
    folder's overlays are this run's alone (other files are the user's and are left alone)."""
    root = run.path.resolve()
    for name in sorted(names):
        path = (root / name).resolve()
        if root in path.parents:  # only inside the run folder
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # its tag folder, once empty
                path.parent.rmdir()


def _export_shard(cfg: ExportConfig, paths: list[Path], shard: list[int],
                  models: Sequence[CamModel], targets: Sequence[torch.Tensor | None],
                  run: RunDir, info: DistInfo) -> tuple[list[dict], list[int]]:
    records: list[dict] = []
    bad: set[int] = set()
    n_batches = -(-len(shard) // cfg.batch_size) * len(models)
    bar = tqdm(total=n_batches, desc="cam export", unit="batch",
               disable=not (cfg.progress and info.is_main))
    for k, m in enumerate(models):
        loader = image_loader(paths, shard, eval_transform(m.meta, normalize=False),
                              cfg.batch_size, cfg.workers, cfg.skip_bad_images)
        for pixels, idx, skipped, errors in loader:
            bar.update()
            bad.update(skipped)
            say_skipped(errors)
            if pixels is None:
                continue
            wanted = None if targets[k] is None else targets[k][idx]
            with fits_on_device(cfg.batch_size, "rerun with a smaller --batch-size"):
                res = m.cam(normalize(pixels, m.meta.mean, m.meta.std), wanted)
            records.extend(_write_batch(run, m, k, paths, idx, pixels, res))
    bar.close()
    return records, sorted(bad)


def _write_batch(run: RunDir, m: CamModel, k: int, paths: list[Path], idx: list[int],
                 pixels: torch.Tensor, res: Any) -> list[dict]:
    images = overlay(pixels, res.maps)
    probs = res.logits.softmax(1)
    preds = res.logits.argmax(1)
    out = []
    for j, i in enumerate(idx):
        stem = file_stem(i, paths[i])
        save_png(run.file(f"{m.tag}/{stem}.png"), images[j])
        save_npy(run.file(f"{m.tag}/{stem}.npy"), res.maps[j].numpy())
        t, p = int(res.targets[j]), int(preds[j])
        out.append({"model": k, "index": i, "image": str(paths[i]),
                    "overlay": f"{m.tag}/{stem}.png", "map": f"{m.tag}/{stem}.npy",
                    "target": t, "target_class": m.meta.class_names[t],
                    "target_prob": float(probs[j, t]), "pred": p,
                    "pred_class": m.meta.class_names[p]})
    return out


def _summary(cfg: ExportConfig, paths: list[Path], models: Sequence[CamModel],
             records: list[dict], bad: list[Path], run: RunDir) -> dict[str, Any]:
    per_model = []
    for k, m in enumerate(models):
        mine = sorted((r for r in records if r["model"] == k), key=lambda r: r["index"])
        per_model.append({"checkpoint": checkpoint_ref(m.path, m.meta), **m.describe(),
                          "images": [{x: r[x] for x in r if x != "model"} for r in mine]})
    written = len({r["index"] for r in records})
    return {"target": cfg.target, "n_images": len(paths), "n_written": written,
            "n_skipped": len(bad), "skipped": [str(p) for p in bad], "models": per_model,
            "out": str(run.path)}


def _write_grid(cfg: ExportConfig, models: Sequence[CamModel], results: dict[str, Any],
                run: RunDir) -> str | None:
    """Rows = checkpoints, columns = the first `grid_max` images every checkpoint wrote."""
    firsts = [r["index"] for r in results["models"][0]["images"]][: cfg.grid_max]
    if not firsts:
        return None
    cells, captions = [], []
    for entry in results["models"]:
        by_index = {r["index"]: r for r in entry["images"]}
        row = [by_index[i] for i in firsts]
        cells.append([read_png(run.file(r["overlay"])) for r in row])
        captions.append([f"{r['target_class']} {r['target_prob']:.2f}" for r in row])
    cols = [Path(results["models"][0]["images"][c]["image"]).name[:24] for c in range(len(firsts))]
    save_grid(run.file("grid.png"), cells, [m.label for m in models], cols, captions)
    return "grid.png"
