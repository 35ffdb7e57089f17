"""`smix cam mixed`: what each mixer makes of a pair (A, B), and where each checkpoint looks
for the class of A and of B on it — Figure 4b of the SaliencyMix paper, as one grid PNG.

Mixers come from `pretrain.mixers` by registry name (the one allowed cross-stage import, made
here only). The pair is the batch [A, B]; draws from a seeded generator are repeated until the
pairing sends B into A (`perm == [1, 0]`, a coin flip for random pairings) and the mixer is
active, so the saliency a mixer computes belongs to the image it actually pastes. Row 0 of the
mixer's output — A with B mixed in, λ = share of A — is the figure's input.
Grid: columns = A, B, then one per mixer; rows = the inputs (once when identical for every
checkpoint), then per checkpoint its CAM for A's class and for B's class.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from smix.checkpoint import BackboneMeta, checkpoint_ref
from smix.data import denormalize, eval_transform, load_rgb, normalize
from smix.dist import pick_device
from smix.errors import UserError
from smix.io import RunDir
from cam.images import class_index, folder_class
from cam.models import CamModel, load_models
from cam.render import overlay, save_grid, save_npy, save_png, to_uint8

PREFERRED = ("cutout", "mixup", "cutmix", "saliencymix", "guidedmixup")
ALIASES = {"guided": "guidedmixup"}
MAX_DRAWS = 64


@dataclasses.dataclass(frozen=True)
class MixedConfig:
    ckpts: tuple[Path, ...]
    pair: tuple[Path, Path]
    out: Path
    methods: tuple[str, ...] | None = None  # mixer names; None: every registered one but none
    mixer_args: tuple[tuple[str, str, str], ...] = ()  # (mixer, parameter, value)
    classes: tuple[str, str] = ("auto", "auto")  # per image: auto | true (folder) | pred | class
    cam_method: str | None = None
    layer: str | None = None
    seed: int = 0
    device: str = "auto"


@dataclasses.dataclass
class Column:
    """One column of the figure for one checkpoint: input pixels and the two CAMs."""

    name: str
    pixels: torch.Tensor  # [3,H,W] in [0,1]
    maps: torch.Tensor  # [2,H,W]: CAM for A's class, for B's class
    probs: tuple[float, float]  # softmax of A's and B's class on this input
    lam: float | None = None  # share of A (mixers only)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def build_mixers(cfg: MixedConfig) -> dict[str, Any]:
    """Mixers by registry name, with their `--mixer-arg` parameters; fails before any work."""
    from pretrain.mixers import get_mixer, list_mixers

    registered = list_mixers()
    if cfg.methods is None:
        names = [n for n in PREFERRED if n in registered]
        names += [n for n in registered if n not in names and n != "none"]
    else:
        names = [n if n in registered else ALIASES.get(n, n) for n in cfg.methods]
    params: dict[str, dict[str, str]] = {}
    for mixer, key, value in cfg.mixer_args:
        mixer = mixer if mixer in registered else ALIASES.get(mixer, mixer)
        if mixer not in names:
            raise UserError(f"--mixer-arg for {mixer!r}, which is not among --methods "
                            f"({', '.join(names)})")
        params.setdefault(mixer, {})[key] = value
    if not names:
        raise UserError("no mixing methods to draw")
    return {n: get_mixer(n, **params.get(n, {})) for n in names}


def mix_pair(mixer: Any, x: torch.Tensor, labels: torch.Tensor, seed: int, ctx: Any
             ) -> tuple[torch.Tensor, float, dict[str, Any]]:
    """A with B mixed in ([1,3,H,W], normalised), λ, and the mixer's info."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(MAX_DRAWS):
        params = mixer.sample(x, labels, generator, ctx)
        perm = getattr(params, "perm", None)
        if getattr(params, "active", True) and (perm is None or perm.tolist() == [1, 0]):
            out = mixer.apply(x, labels, params)
            lam = torch.as_tensor(out.lam).flatten()
            return out.images[:1], float(lam[0] if lam.numel() > 1 else lam), \
                dict(getattr(params, "info", {}) or {})
    raise UserError(f"mixer {mixer.name!r} did not mix B into A in {MAX_DRAWS} draws "
                    "(is its prob 0?)")


def _names_a_class(meta: BackboneMeta, name: str) -> bool:
    """Whether `class_index` takes `name` (a class name, or an index below the class count)."""
    try:
        class_index(meta, name, "")
    except UserError:
        return False
    return True


def _pair_labels(cfg: MixedConfig, m: CamModel, x: torch.Tensor) -> torch.Tensor:
    """The class of each image: its folder's (`true`), the model's prediction (`pred`), the
    folder's where it names a class of the checkpoint and else the prediction, said on stderr
    (`auto`: images outside class folders), or a class name/index."""
    with torch.no_grad():
        pred = m.model(x.to(m.cam.device)).argmax(1).cpu()
    out = []
    for i, (path, spec) in enumerate(zip(cfg.pair, cfg.classes)):
        folder = folder_class(path, m.meta)
        if spec == "auto":
            spec = "true" if _names_a_class(m.meta, folder) else "pred"
            if spec == "pred":
                print(f"cam mixed: {path}: its folder {folder!r} is not a class of {m.path}; "
                      f"using the predicted class {m.meta.class_names[int(pred[i])]!r} "
                      "(--classes A B to choose)", file=sys.stderr)
        if spec == "pred":
            out.append(int(pred[i]))
        elif spec == "true":
            out.append(class_index(m.meta, folder,
                                   f"folder of {path}; pass --classes A B, or pred pred"))
        else:
            out.append(class_index(m.meta, spec, f"--classes, for {m.path}"))
    return torch.tensor(out, dtype=torch.long)


def _columns(cfg: MixedConfig, m: CamModel, images: Sequence[Any], mixers: dict[str, Any]
             ) -> tuple[list[Column], torch.Tensor]:
    from pretrain.mixers import MixContext

    pixels = torch.stack([eval_transform(m.meta, normalize=False)(im) for im in images])
    x = normalize(pixels, m.meta.mean, m.meta.std)
    labels = _pair_labels(cfg, m, x)
    clean = m.cam(x[[0, 1, 0, 1]], labels[[0, 0, 1, 1]])  # A:(a), B:(a), A:(b), B:(b)
    probs = clean.logits.softmax(1)
    cols = [Column(name, pixels[i], clean.maps[[i, i + 2]],
                   (float(probs[i, labels[0]]), float(probs[i, labels[1]])))
            for i, name in enumerate(("A", "B"))]
    ctx = MixContext(mean=tuple(m.meta.mean), std=tuple(m.meta.std),
                     num_classes=m.meta.num_classes, model=m.model)
    for name, mixer in mixers.items():
        mixed, lam, info = mix_pair(mixer, x.to(m.cam.device), labels.to(m.cam.device),
                                    cfg.seed, ctx)
        res = m.cam(mixed.repeat(2, 1, 1, 1), labels)
        p = res.logits.softmax(1)
        px = denormalize(mixed.detach().cpu(), m.meta.mean, m.meta.std).clamp(0, 1)[0]
        cols.append(Column(name, px, res.maps, (float(p[0, labels[0]]), float(p[1, labels[1]])),
                           lam, info))
    return cols, labels


def mixed_cams(cfg: MixedConfig) -> dict[str, Any]:
    """Draw every mixer's output for the pair, each checkpoint's two CAMs on it, the grid."""
    if len(cfg.pair) != 2 or len(cfg.classes) != 2:
        raise UserError("--pair takes exactly two images, --classes two values")
    mixers = build_mixers(cfg)
    images = [load_rgb(p) for p in cfg.pair]
    models = load_models(cfg.ckpts, cfg.cam_method, cfg.layer, pick_device(cfg.device))
    _check_sizes(models, mixers)
    run = RunDir(cfg.out).claim("cam", "mixed")
    per_model = [(m, *_columns(cfg, m, images, mixers)) for m in models]
    entries = [_write_model(run, m, cols, labels) for m, cols, labels in per_model]
    _write_figure(run, per_model)
    results = {"pair": [str(p) for p in cfg.pair], "mixers": list(mixers),
               "mixer_params": {n: mx.describe() for n, mx in mixers.items()},
               "seed": cfg.seed, "grid": "grid.png", "models": entries}
    run.write_config(cfg)
    run.write_metrics(stage="cam", kind="mixed", results=results, config=cfg)
    return results


def _check_sizes(models: Sequence[CamModel], mixers: dict[str, Any]) -> None:
    """Each checkpoint's input (its eval crop) is large enough for every mixer: a saliency
    detector reads a 3x3 neighbourhood (`Mixer.min_image_side`); refused before any work."""
    for m in models:
        for name, mixer in mixers.items():
            side = mixer.min_image_side()
            if m.meta.crop < side:
                raise UserError(f"{m.path}: its images are {m.meta.crop}x{m.meta.crop}; mixer "
                                f"{name} reads saliency in a 3x3 neighbourhood and needs at "
                                f"least {side}x{side} (leave it out of --methods)")


def _write_model(run: RunDir, m: CamModel, cols: list[Column], labels: torch.Tensor
                 ) -> dict[str, Any]:
    names = [m.meta.class_names[int(i)] for i in labels]
    inputs = to_uint8(torch.stack([c.pixels for c in cols]))
    listing = []
    for c, rgb in zip(cols, inputs):
        files = {"input": f"{m.tag}/{c.name}_input.png"}
        save_png(run.file(files["input"]), rgb)
        for j, which in enumerate("ab"):
            stem = f"{m.tag}/{c.name}_cam_{which}"
            save_png(run.file(f"{stem}.png"), overlay(c.pixels[None], c.maps[j:j + 1])[0])
            save_npy(run.file(f"{stem}.npy"), c.maps[j].numpy())
            files[f"cam_{which}"], files[f"map_{which}"] = f"{stem}.png", f"{stem}.npy"
        listing.append({"column": c.name, "lam": c.lam, "prob_a": c.probs[0],
                        "prob_b": c.probs[1], "info": c.info, **files})
    return {"checkpoint": checkpoint_ref(m.path, m.meta), **m.describe(),
            "class_a": names[0], "class_b": names[1], "columns": listing}


def _write_figure(run: RunDir, per_model: list[tuple[CamModel, list[Column], torch.Tensor]]
                  ) -> None:
    first = per_model[0][1]
    shared = all(len(cols) == len(first) and all(
        c.pixels.shape == f.pixels.shape and torch.allclose(c.pixels, f.pixels, atol=1e-6)
        for c, f in zip(cols, first)) for _, cols, _ in per_model)
    cells: list[list[np.ndarray | None]] = []
    rows: list[str] = []
    caps: list[list[str]] = []
    for k, (m, cols, labels) in enumerate(per_model):
        if k == 0 or not shared:
            cells.append(list(to_uint8(torch.stack([c.pixels for c in cols]))))
            rows.append("input" if shared else f"{m.label}\ninput")
            caps.append(["" if c.lam is None else f"λ(A)={c.lam:.2f}" for c in cols])
        for j in range(2):
            cls = m.meta.class_names[int(labels[j])]
            maps = torch.stack([c.maps[j] for c in cols])
            pix = torch.stack([c.pixels for c in cols])
            cells.append(list(overlay(pix, maps)))
            rows.append(f"{m.label}\nCAM: {cls} ({'AB'[j]})")
            caps.append([f"p={c.probs[j]:.2f}" for c in cols])
    save_grid(run.file("grid.png"), cells, rows, [c.name for c in first], caps)
