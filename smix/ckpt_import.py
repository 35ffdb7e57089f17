"""Import external checkpoints into the toolkit format, without ever fully unpickling.

Sources: torchvision / timm ResNet state dicts (`.pth`, `.pt`, `.bin`, `.safetensors`), the
official SaliencyMix / CutMix `.pth.tar` files (`{'state_dict': {'module.…'}, 'epoch', 'arch',
'best_err1', 'optimizer', …}`), and the official SaliencyMix CIFAR `.pt` files (the bare
`state_dict` of a DataParallel-wrapped Cutout ResNet: `module.…shortcut.…`, `module.linear.…`).
The reader is chosen by content, not by name; torch files are opened with
`torch.load(weights_only=True)`; anything that needs arbitrary unpickling is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from smix.arch import arch_spec, build_model, list_archs
from smix.checkpoint import BackboneMeta, save_checkpoint, strip_prefixes, validate_state
from smix.errors import UserError
from smix.io import provenance


def read_external(src: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict of an external file, plus its non-tensor extras (epoch, arch, ...)."""
    if not src.is_file():
        raise UserError(f"{src}: no such file")
    if sniff_format(src) == "safetensors":
        try:
            return dict(load_file(str(src))), {}
        except SafetensorError as e:
            raise UserError(f"{src}: unreadable safetensors file ({e})") from None
    try:  # a file object: torch.load itself would pick a reader by the name's extension
        with open(src, "rb") as f, _allowing(numpy_globals()):
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{src}: refused, it needs full unpickling of arbitrary objects, which "
                        f"this toolkit never does ({_unsafe_reason(src, e)}); save its "
                        "state_dict alone with torch.save to import it") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"{src}: cannot read as a torch checkpoint ({e})") from None
    if not isinstance(obj, Mapping):
        raise UserError(f"{src}: expected a dict of tensors, found {type(obj).__name__}")
    for key in ("state_dict", "model", "model_state", "module"):
        if isinstance(obj.get(key), Mapping):
            extras = {k: _plain(v) for k, v in obj.items()
                      if k != key and not isinstance(v, Mapping)}
            return _tensors(obj[key], src), extras
    return _tensors(obj, src), {}


def numpy_globals() -> list[Any]:
    """What unpickling numpy scalars and arrays needs, for files that store `best_acc1` or an
    epoch as numpy values: the scalar and array rebuilders, `numpy.dtype` and its classes. Each
    builds numpy data from bytes; an object array's items still go through torch's restricted
    unpickler, so nothing else becomes loadable."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed np.core
    module = getattr(np, "dtypes", None)  # numpy >= 1.25; before it, the same classes are
    # reached only as the type of each dtype (np.dtype("f8") is a numpy.dtype[float64])
    dtypes = ([getattr(module, n) for n in dir(module) if n.endswith("DType")] if module
              else list({type(np.dtype(t)) for t in np.sctypeDict.values()}))
    rebuilders = [core.multiarray.scalar, core.multiarray._reconstruct]
    # files pickled under numpy 1 (the official SaliencyMix / CutMix ones) name them
    # numpy.core.multiarray.*; under numpy 2 the same functions live in numpy._core
    aliases = [(f, f"numpy.core.multiarray.{f.__name__}") for f in rebuilders]
    return [*rebuilders, *aliases, np.ndarray, np.dtype, *dtypes]


def _allowing(names: list[Any]) -> Any:
    """torch's context that adds to what `weights_only` loads (torch >= 2.5); older torch
    refuses numpy values as before."""
    safe = getattr(torch.serialization, "safe_globals", None)
    return safe(names) if safe else contextlib.nullcontext()


def _plain(v: Any) -> Any:
    """A numpy scalar (or one-element array) as the Python number it holds."""
    if isinstance(v, np.generic) or (isinstance(v, np.ndarray) and v.size == 1):
        return v.item()
    return v


def _unsafe_reason(src: Path, error: Exception) -> str:
    """What blocked `weights_only` loading, in one line: the classes the file would unpickle
    (asked of torch for zip files; else read from its message), or torch's own reason."""
    names: list[str] = []
    if hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):  # torch >= 2.5
        try:
            with _allowing(numpy_globals()):  # only what is still refused
                names = torch.serialization.get_unsafe_globals_in_checkpoint(str(src))
        except (ValueError, RuntimeError, OSError, pickle.UnpicklingError):  # legacy files:
            # (not zip) only the message names the class
            names = []
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    names = names or re.findall(r"Unsupported global: GLOBAL (\S+)", text)
    if names:
        return f"it holds {', '.join(dict.fromkeys(names))}"
    detail = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
    return detail.group(1).strip() if detail else "an object torch will not load safely"


def sniff_format(src: Path) -> str:
    """"safetensors" or "torch" (a zip of torch.save, or a legacy pickle), read from the first
    bytes rather than the name: `r50.st` or a `.bin` may be either."""
    with open(src, "rb") as f:
        head = f.read(9)
    size = src.stat().st_size
    if len(head) == 9 and head[8:9] == b"{" and 8 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"  # u64 little-endian header length, then the JSON header
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # zip (torch >= 1.6) / pickle protocol
        return "torch"
    raise UserError(f"{src}: not a checkpoint (neither safetensors, nor a torch.save zip or "
                    "pickle)")


def _tensors(d: Mapping[str, Any], src: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state dict; numeric numpy arrays (some converted files hold weights as
    arrays) become tensors."""
    out = {}
    for k, v in strip_prefixes(d).items():
        if isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
            v = torch.from_numpy(np.array(v, order="C"))  # a copy; 0-d stays 0-d
        if isinstance(v, torch.Tensor):
            out[k] = v
    if not out:
        raise UserError(f"{src}: no tensors found")
    return out


def infer_arch(state: Mapping[str, torch.Tensor]) -> str:
    """Guess the registered arch from the tensor layout (block counts, stem kernel)."""
    blocks = {}
    for key in state:
        m = re.match(r"layer(\d)\.(\d+)\.", key)
        if m:
            blocks[int(m.group(1))] = max(blocks.get(int(m.group(1)), 0), int(m.group(2)) + 1)
    counts = tuple(blocks.get(i, 0) for i in range(1, 5))
    bottleneck = any(k.endswith("conv3.weight") for k in state)
    table = {((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34,
             ((3, 4, 6, 3), True): 50, ((3, 4, 23, 3), True): 101}
    depth = table.get((counts, bottleneck))
    conv1 = state.get("conv1.weight")
    name = None
    if depth is not None and conv1 is not None:
        name = f"cifar_resnet{depth}" if conv1.shape[-1] == 3 else f"resnet{depth}"
        if name in list_archs():
            return name
    found = f"a ResNet layout like {name}" if name else "an unknown layout"
    fits = _archs_that_fit(state)
    if not fits:  # --arch could not help: say so rather than suggest it
        raise UserError(f"the tensors are {found}, which no registered architecture has "
                        f"({', '.join(list_archs())})")
    raise UserError(f"cannot infer the architecture from the tensor names; pass --arch "
                    f"({', '.join(fits)})")


def _archs_that_fit(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The registered archs whose tensors are exactly the file's by name and shape (BN
    counters aside; the classifier's class count is the file's own)."""
    names = {k for k in state if not k.endswith("num_batches_tracked")}
    fits = []
    for arch in list_archs():
        classifier = f"{arch_spec(arch).classifier}.weight"
        classes = state[classifier].shape[0] if classifier in state else 1
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            ref = build_model(arch, classes).state_dict()
        ref_names = {k for k in ref if not k.endswith("num_batches_tracked")}
        if ref_names == names and all(ref[k].shape == state[k].shape for k in names):
            fits.append(arch)
    return fits


def rename_cutout_resnet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official SaliencyMix CIFAR ResNets (Cutout's `model/resnet.py`, uoguelph-mlrg) have
    torchvision's layout under two other names: the projection shortcut `shortcut.{0,1}`
    (conv, BN) is `downsample.{0,1}` and the classifier `linear` is `fc`. Other files pass
    unchanged (the PreAct and Wide ResNets' own `shortcut` is a bare conv, not indexed)."""
    if "linear.weight" not in state or "fc.weight" in state:
        return state
    if not any(re.match(r"layer\d\.\d+\.shortcut\.[01]\.", k) for k in state):
        return state
    out = {}
    for key, value in state.items():
        key = re.sub(r"^(layer\d\.\d+)\.shortcut\.([01])\.", r"\1.downsample.\2.", key)
        out[re.sub(r"^linear\.", "fc.", key)] = value
    return out


def import_checkpoint(src: Path, dst: Path, arch: str | None = None,
                      class_names: tuple[str, ...] | None = None, dataset: str = "",
                      method: str = "unknown", input_size: int | None = None) -> BackboneMeta:
    """Convert `src` to a validated toolkit checkpoint at `dst`."""
    state, extras = read_external(src)
    state = rename_cutout_resnet(state)
    arch = arch or infer_arch(state)
    spec = arch_spec(arch)
    fc = state.get(f"{spec.classifier}.weight")
    if fc is None:
        raise UserError(f"{src}: no {spec.classifier}.weight tensor, cannot tell the class count")
    num_classes = int(fc.shape[0])
    if class_names is None:
        class_names = tuple(f"class_{i}" for i in range(num_classes))
    elif len(class_names) != num_classes:
        raise UserError(f"{src}: its {spec.classifier}.weight has {num_classes} classes, the "
                        f"class list {len(class_names)} names")
    reference = build_model(arch, num_classes).state_dict()
    for key, ref in reference.items():  # torchvision's BN counters may be absent in old files
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(ref)
    size = input_size if input_size is not None else (32 if spec.stem == "cifar" else 224)
    meta = BackboneMeta(
        arch=arch, num_classes=num_classes, class_names=tuple(class_names),
        input_size=size, resize=size if size == 32 else 256 * size // 224, crop=size,
        dataset=dataset, method={"name": method, "imported_from": src.name},
        epochs=_epochs_done(extras.get("epoch"), extras),
        metrics=_metrics_from(extras), provenance=provenance(),
    )
    if size == 32:
        from smix.data import CIFAR10_MEAN, CIFAR10_STD
        meta = dataclasses.replace(meta, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    # a mismatch names the file that holds the bad tensor (save_checkpoint would name `dst`)
    validate_state({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                   meta, source=str(src))
    save_checkpoint(dst, state, meta)
    return meta


def _epochs_done(epoch: Any, extras: Mapping[str, Any]) -> int:
    """The official CutMix / SaliencyMix `train.py` (the files with `best_err1`) saves
    `'epoch': epoch` at the end of `for epoch in range(…, args.epochs)`, the 0-based index of
    the epoch just trained: the last file of a 300-epoch run says 299, so one more were done.
    pytorch/examples' imagenet `main.py` (the files with `best_acc1`) saves `epoch + 1`."""
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        return 0
    zero_based = ("best_err1" in extras or "best_err5" in extras) and "best_acc1" not in extras
    return epoch + 1 if zero_based else epoch


def _metrics_from(extras: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key in ("best_err1", "best_err5", "best_acc1"):
        v = extras.get(key)
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, (int, float)):
            out[key] = float(v)
    return out
