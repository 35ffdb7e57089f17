"""The checkpoint format every stage reads and writes: one `.safetensors` file.

Tensors: the unwrapped model's `state_dict` in torchvision key names, floats as float32.
Metadata: safetensors' string header, JSON-encoded per field (see `BackboneMeta`), with
`format = "smix.backbone/1"`. Nothing is pickled. Writes are atomic; loads are validated
(format, arch, tensor names and shapes, finite values) and fail with one line naming the file
and the first bad key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from smix.arch import arch_spec, build_model, list_archs, unwrap
from smix.errors import UserError
from smix.io import atomic_save, provenance

FORMAT = "smix.backbone/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_STRIP_PREFIXES = ("module.", "_orig_mod.")


@dataclasses.dataclass(frozen=True)
class BackboneMeta:
    """Everything a consumer needs besides the weights. mean/std are RGB in [0,1] units."""

    arch: str
    num_classes: int
    class_names: tuple[str, ...]
    arch_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: int = 256
    crop: int = 224
    dataset: str = ""
    method: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "none"})
    epochs: int = 0
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("class_names", "mean", "std"):  # JSON gives lists: stored as tuples
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        problem = _meta_problem(self)
        if problem:
            raise UserError(problem)

    def to_header(self) -> dict[str, str]:
        header = {"format": FORMAT}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            header[f.name] = value if isinstance(value, str) else json.dumps(_plain(value))
        return header

    @classmethod
    def from_header(cls, header: Mapping[str, str], source: str = "checkpoint") -> "BackboneMeta":
        fmt = header.get("format")
        if isinstance(fmt, str) and fmt.startswith("smix.backbone/") and fmt != FORMAT:
            raise UserError(f"{source}: format {fmt!r} was written by another (newer) version "
                            f"of the toolkit; this one reads {FORMAT!r}")
        if fmt != FORMAT:
            raise UserError(f"{source}: not a toolkit checkpoint (format {fmt!r}, expected "
                            f"{FORMAT!r}); convert it with `smix ckpt import`")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in header:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise UserError(f"{source}: metadata field {f.name!r} is missing")
                continue
            raw = header[f.name]
            try:
                kwargs[f.name] = raw if f.name in ("arch", "dataset") else json.loads(raw)
            except json.JSONDecodeError:
                raise UserError(f"{source}: metadata field {f.name!r} is not valid JSON") from None
        for name in ("class_names", "mean", "std"):  # a string is no list (tuple("abc"))
            if name in kwargs and not isinstance(kwargs[name], list):
                raise UserError(f"{source}: metadata field {name!r} must be a list, got "
                                f"{kwargs[name]!r}")
            if name in ("mean", "std") and len(kwargs.get(name, ())) == 1:
                # earlier versions took `mean=0.5` (Normalize broadcasts it): the same for RGB
                kwargs[name] = kwargs[name] * 3
        try:
            return cls(**kwargs)
        except UserError as e:  # inconsistent fields: said with the file's name
            raise UserError(f"{source}: {e}") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _meta_problem(m: BackboneMeta) -> str:
    """The first field of `m` of the wrong type or out of range, in words ('' if none): a
    checkpoint's consumers build transforms and models from these without further checks."""
    for name in ("arch", "dataset"):
        if not isinstance(getattr(m, name), str):
            return f"metadata field {name!r} must be a string"
    if not _is_int(m.num_classes) or m.num_classes < 1:
        return f"metadata field 'num_classes' must be a positive integer, got {m.num_classes!r}"
    if not isinstance(m.class_names, tuple) or not all(isinstance(c, str) for c in m.class_names):
        return "metadata field 'class_names' must be a list of strings"
    if len(m.class_names) != m.num_classes:
        return (f"class_names has {len(m.class_names)} names but num_classes is "
                f"{m.num_classes}")
    for name in ("arch_kwargs", "method", "metrics", "provenance"):
        if not isinstance(getattr(m, name), dict):
            return f"metadata field {name!r} must be a JSON object"
    for name in ("input_size", "resize", "crop"):
        if not _is_int(getattr(m, name)) or getattr(m, name) < 1:
            return f"metadata field {name!r} must be a positive integer, got {getattr(m, name)!r}"
    if not _is_int(m.epochs) or m.epochs < 0:
        return f"metadata field 'epochs' must be an integer >= 0, got {m.epochs!r}"
    for name, low in (("mean", None), ("std", 0)):
        v = getattr(m, name)
        if not (isinstance(v, tuple) and len(v) == 3 and all(map(_is_number, v))
                and (low is None or all(x > low for x in v))):
            kind = "3 positive numbers" if low is not None else "3 numbers"
            return f"metadata field {name!r} must be {kind} (RGB), got {_plain(v)!r}"
    return ""


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DDP `module.` and torch.compile `_orig_mod.` prefixes, wherever they nest."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for p in _STRIP_PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out[key] = value
    return out


def export_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as the format stores them: CPU, contiguous, floats as float32."""
    state = strip_prefixes(unwrap(model).state_dict())
    out = {}
    for k, v in state.items():
        v = v.detach().to("cpu")
        if v.is_floating_point():
            v = v.float()
        out[k] = v.contiguous().clone()
    return out


def save_checkpoint(path: str | os.PathLike, model: nn.Module | Mapping[str, torch.Tensor],
                    meta: BackboneMeta) -> Path:
    """Write weights + metadata atomically; validates against the arch before writing."""
    state = export_state(model) if isinstance(model, nn.Module) else {
        k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in model.items()}
    if not meta.provenance:
        meta = dataclasses.replace(meta, provenance=provenance())
    validate_state(state, meta, source=str(path))
    atomic_save(path, lambda tmp: save_file(state, str(tmp), metadata=meta.to_header()))
    return Path(path)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], BackboneMeta]:
    """Read and validate a checkpoint; every failure is one `UserError` line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            meta = BackboneMeta.from_header(header, source=str(path))
            state = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise UserError(_unreadable(path, e)) from None
    validate_state(state, meta, source=str(path))
    return state, meta


def read_meta(path: str | os.PathLike) -> BackboneMeta:
    """Only the metadata (cheap: does not read the tensors)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return BackboneMeta.from_header(f.metadata() or {}, source=str(path))
    except SafetensorError as e:
        raise UserError(_unreadable(path, e)) from None


def _unreadable(path: Path, error: Exception) -> str:
    """Why safetensors cannot open `path`: a torch.save file (to import), else damage."""
    from smix.ckpt_import import sniff_format  # (imports this module)

    try:
        kind = sniff_format(path)
    except UserError:
        kind = "unknown"
    if kind == "torch":
        return (f"{path}: not a safetensors file but a torch.save checkpoint; convert it with "
                "`smix ckpt import`")
    return f"{path}: unreadable safetensors file, truncated or corrupt ({error})"


def validate_state(state: Mapping[str, torch.Tensor], meta: BackboneMeta, source: str) -> None:
    """Names and shapes must match the arch exactly, and every float must be finite."""
    if meta.arch not in list_archs():
        raise UserError(f"{source}: unknown arch {meta.arch!r}; valid: {', '.join(list_archs())}")
    try:
        reference = build_model(meta.arch, meta.num_classes, **meta.arch_kwargs).state_dict()
    except UserError as e:  # arch_kwargs the architecture does not take
        raise UserError(f"{source}: {e}") from None
    for key, ref in reference.items():
        if key not in state:
            raise UserError(f"{source}: tensor {key!r} missing for arch {meta.arch}")
        if tuple(state[key].shape) != tuple(ref.shape):
            raise UserError(f"{source}: tensor {key!r} has shape {tuple(state[key].shape)}, "
                            f"arch {meta.arch} expects {tuple(ref.shape)}")
    for key in state:
        if key not in reference:
            raise UserError(f"{source}: unexpected tensor {key!r} for arch {meta.arch}")
    for key, value in state.items():
        if value.is_floating_point() and value.dtype != torch.float32:
            raise UserError(f"{source}: tensor {key!r} is {str(value.dtype).replace('torch.', '')}"
                            ", the format stores floats as float32")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise UserError(f"{source}: tensor {key!r} contains NaN or Inf")


def load_backbone(path: str | os.PathLike, device: str | torch.device = "cpu"
                  ) -> tuple[nn.Module, BackboneMeta]:
    """Build the checkpoint's model, load its weights strictly, and return it in eval mode."""
    state, meta = read_checkpoint(path)
    model = build_model(meta.arch, meta.num_classes, **meta.arch_kwargs)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), meta


def describe(meta: BackboneMeta, state: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """A JSON-ready summary for `smix ckpt inspect`."""
    out: dict[str, Any] = {"format": FORMAT, **_plain(dataclasses.asdict(meta))}
    if state is not None:
        out["tensors"] = len(state)
        out["parameters"] = int(sum(v.numel() for k, v in state.items() if v.is_floating_point()))
    spec = arch_spec(meta.arch)
    out["cam_layer"] = spec.cam_layer
    return out


def checkpoint_ref(path: str | os.PathLike, meta: BackboneMeta) -> dict[str, Any]:
    """How a stage's metrics.json names the checkpoint it evaluated (traceable by hash)."""
    from smix.io import file_sha256

    return {
        "path": str(Path(path).resolve()),
        "sha256": file_sha256(path),
        "arch": meta.arch,
        "method": meta.method,
        "dataset": meta.dataset,
        "epochs": meta.epochs,
        "metrics": meta.metrics,
    }
