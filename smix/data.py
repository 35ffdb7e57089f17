"""Dataset readers and the preprocessing contract.

Readers: class-folder trees (ImageNet, Tiny-ImageNet, the shapes data) and CIFAR-10/100 python
pickles, read from disk only (nothing is downloaded). Transforms: the training recipes of the
presets, and `eval_transform(meta)`, the one evaluation transform every stage derives from a
checkpoint's metadata.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2 as T

from smix.devices import channel_constant, constant, upload
from smix.errors import UserError
from smix.io import read_user_text

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec; `decode_jpeg` is
# unchanged there (this module and pretrain.nvjpeg use it)
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of "
                        "TorchVision are deprecated", category=DeprecationWarning)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
CIFAR10_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)  # as the official SaliencyMix code
CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
# ImageNet PCA lighting (AlexNet; as in the official CutMix / SaliencyMix ImageNet code).
_PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
_PCA_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009],
                            [-0.5808, -0.0045, -0.8140],
                            [-0.5836, -0.6948, 0.4203]])


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


# what PIL raises on a file it cannot read (DecompressionBombError: over twice its pixel limit)
UNREADABLE = (UnidentifiedImageError, OSError, ValueError, SyntaxError,
              Image.DecompressionBombError)


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB; an unreadable file is a `UserError` naming it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except UNREADABLE as e:
        raise UserError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def load_rgb_tensor(path: str | os.PathLike) -> torch.Tensor:
    """An image as uint8 `[3,H,W]` RGB, what `pil_to_tensor(load_rgb(path))` is, faster.

    A JPEG (PIL's own test: the first three bytes) is decoded by torchvision's libjpeg-turbo
    straight into a tensor: pixel for pixel what PIL decodes (RGB, greyscale, CMYK with ink,
    progressive, EXIF-rotated, all tested), in 0.35 ms where PIL's decode and RGB conversion
    take 0.44 (500x375, this repo's 2-core CPU), and in the interleaved layout that torch's
    uint8 antialiased resize reads without a copy (0.15 ms for a RandomResizedCrop to 224,
    PIL's resize 0.45). Over twice PIL's pixel limit it is refused as PIL refuses it. Other
    formats, and a JPEG torchvision refuses, are decoded by PIL from the same bytes; a bad
    file is a `UserError`, as from `load_rgb`."""
    try:
        with open(path, "rb") as f:
            data = bytearray(os.fstat(f.fileno()).st_size)
            f.readinto(data)
        if data[:3] == b"\xff\xd8\xff":
            try:
                with _libjpeg_quiet():
                    pixels = decode_jpeg(torch.frombuffer(data, dtype=torch.uint8),
                                         mode=ImageReadMode.RGB)
            except RuntimeError:
                pixels = None  # PIL decides: it reads it, or it is a bad file
            if pixels is not None:
                _pixel_limit(pixels.shape[1] * pixels.shape[2])
                return pixels
        with Image.open(io.BytesIO(data)) as image:
            return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    except UNREADABLE as e:
        raise UserError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def _pixel_limit(pixels: int) -> None:
    """PIL's refusal of a picture over twice `Image.MAX_IMAGE_PIXELS` (None: no limit)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and pixels > 2 * limit:
        raise Image.DecompressionBombError(f"Image size ({pixels} pixels) exceeds limit of "
                                           f"{2 * limit} pixels, could be decompression bomb "
                                           "DOS attack.")


_DEVNULL: list[int] = []  # this process's descriptor of os.devnull, opened once


@contextlib.contextmanager
def _libjpeg_quiet() -> Iterator[None]:
    """In a loader worker, standard error closed to libjpeg-turbo while it decodes: it prints
    its warnings on damage it recovers from ("Corrupt JPEG data: 71 extraneous bytes before
    marker 0xd9", a few ImageNet files) straight from C, every epoch, among the progress bars,
    where PIL is silent. The worker's one thread is the one decoding, so nothing else is lost;
    outside workers (`workers=0`) the warnings print."""
    if get_worker_info() is None:
        yield
        return
    if not _DEVNULL:
        _DEVNULL.append(os.open(os.devnull, os.O_WRONLY))
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(_DEVNULL[0], 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def image_files(folder: str | os.PathLike) -> list[str]:
    """The image files under a folder, sorted; hidden names are left out with their contents,
    as hidden class folders are: what copies leave beside the pictures (macOS's `._x.JPEG`
    companions, which are no picture; a NAS's `.@__thumb/` copies of them) is not data."""
    found = []
    for dp, dirs, fs in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(dp, f) for f in fs if is_image(f) and not f.startswith(".")]
    return sorted(found)


def scan_class_folders(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """Sorted class names and (path, label) samples of a class-folder tree."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: data directory does not exist")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UserError(f"{root}: no class folders (expected ROOT/<class>/<image>)")
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        files = image_files(root / name)
        if not files:
            raise UserError(f"{root / name}: class folder has no images")
        samples.extend((f, label) for f in files)
    return classes, samples


def tiny_imagenet_val(root: Path, classes: list[str]) -> tuple[list[str], list[tuple[str, int]]]:
    """Tiny-ImageNet's published val split: `val/images/*.JPEG` + `val_annotations.txt`."""
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for line in read_user_text(root / "val_annotations.txt", "annotation list").splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        if parts[1] not in index:
            raise UserError(f"{root / 'val_annotations.txt'}: class {parts[1]!r} is not a "
                            "training class")
        samples.append((str(root / "images" / parts[0]), index[parts[1]]))
    if not samples:
        raise UserError(f"{root / 'val_annotations.txt'}: no annotations")
    return classes, sorted(samples)


class ClassFolder(Dataset):
    """ImageNet-style `root/<class>/<image>`; unreadable images are fatal unless skipped.

    With `skip_bad_images`, `__getitem__` returns None for a bad file and `collate_skip` drops
    it and counts it, so the count reaches the main process even from loader workers.
    `reader`: `load_rgb` (PIL images, the default) or `load_rgb_tensor` (uint8 tensors, for
    transforms that work on tensors).
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 skip_bad_images: bool = False, classes: Sequence[str] | None = None,
                 reader: Callable[[str], Any] = load_rgb):
        self.root = Path(root)
        if (self.root / "val_annotations.txt").is_file() and classes is not None:
            found, self.samples = tiny_imagenet_val(self.root, list(classes))
        else:
            found, self.samples = scan_class_folders(self.root)
        if classes is not None and list(classes) != found:
            missing = sorted(set(classes) - set(found)) or sorted(set(found) - set(classes))
            raise UserError(f"{self.root}: class folders do not match the expected classes "
                            f"(first difference: {missing[:1] or found[:1]})")
        self.classes = found
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.reader = reader

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        path, label = self.samples[index]
        try:
            img = self.reader(path)
        except UserError:
            if self.skip_bad_images:
                return None
            raise
        return (self.transform(img) if self.transform else img), label


# kind -> (its folder in the published archive, the pickles that make it)
CIFAR_LAYOUTS = {"cifar10": ("cifar-10-batches-py", ("data_batch_1", "test_batch")),
                 "cifar100": ("cifar-100-python", ("train", "test", "meta"))}


def find_cifar(root: str | os.PathLike, kind: str | None = None) -> tuple[Path, str]:
    """Locate CIFAR-10 (`data_batch_1..5`, `test_batch`) or CIFAR-100 (`train`, `test`,
    `meta`) in `root` or in its published folder under `root`. `kind` (cifar10 | cifar100):
    that one, which a root holding both may give; else the first found, CIFAR-10 first."""
    root = Path(root)
    if kind is not None and kind not in CIFAR_LAYOUTS:
        raise UserError(f"unknown CIFAR set {kind!r}; valid: {', '.join(CIFAR_LAYOUTS)}")
    found = {}
    for name, (folder, files) in CIFAR_LAYOUTS.items():
        for cand in (root, root / folder):
            if all((cand / f).is_file() for f in files):
                found[name] = cand
                break
    if kind is not None and kind in found:
        return found[kind], kind
    if kind is not None and found:
        raise UserError(f"{root}: {kind} asked, but only {', '.join(found)} pickles are here "
                        f"(expected {CIFAR_LAYOUTS[kind][0]}/ with "
                        f"{', '.join(CIFAR_LAYOUTS[kind][1])})")
    if not found:
        raise UserError(f"{root}: no CIFAR python pickles (expected cifar-10-batches-py/ or "
                        "cifar-100-python/)")
    name = next(iter(found))
    return found[name], name


def cifar_kind(num_classes: int) -> str | None:
    """The CIFAR set a classifier of `num_classes` outputs reads (cifar10 | cifar100), where a
    root holds both; None for other class counts (`find_cifar` then takes the first found)."""
    return {10: "cifar10", 100: "cifar100"}.get(num_classes)


def holds_cifar(root: str | os.PathLike) -> bool:
    """Whether `root` (or its published folder under it) holds CIFAR's python pickles."""
    return any(all((cand / f).is_file() for f in files)
               for folder, files in CIFAR_LAYOUTS.values()
               for cand in (Path(root), Path(root) / folder))


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            # CIFAR's pickles hold only numpy arrays, lists and bytes (the published format).
            return pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise UserError(f"{path}: unreadable CIFAR pickle ({e})") from None


def _cifar_field(path: Path, key: str) -> Any:
    """`key` of a CIFAR pickle; a pickle of something else is a `UserError` naming the file."""
    d = _unpickle(path)
    if not isinstance(d, dict) or key not in d:
        raise UserError(f"{path}: not a CIFAR python pickle (no {key!r} in it)")
    return d[key]


def _cifar_batch(path: Path, key: str) -> tuple[np.ndarray, list[int]]:
    """One batch's images uint8 [N,3,32,32] and its N labels (`key`: labels | fine_labels)."""
    d = _unpickle(path)
    try:
        labels = [int(v) for v in d[key]]
        images = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    except (KeyError, IndexError, TypeError, ValueError):
        labels, images = [], None
    if images is None or len(images) != len(labels):
        raise UserError(f"{path}: not a CIFAR python pickle (expected {key!r} and 'data', one "
                        "label per image of 3x32x32 bytes)")
    return images, labels


def read_cifar(root: str | os.PathLike, train: bool, kind: str | None = None
               ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images uint8 [N,32,32,3] RGB, labels int64 [N], class names (`kind`: `find_cifar`)."""
    folder, kind = find_cifar(root, kind)
    if kind == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        names = _cifar_field(folder / "batches.meta", "label_names") \
            if (folder / "batches.meta").is_file() else [f"class_{i}" for i in range(10)]
        key = "labels"
    else:
        files = ["train" if train else "test"]
        names = _cifar_field(folder / "meta", "fine_label_names")
        key = "fine_labels"
    data, labels = [], []
    for name in files:
        images, batch_labels = _cifar_batch(folder / name, key)
        data.append(images)
        labels.extend(batch_labels)
    images = np.concatenate(data).transpose(0, 2, 3, 1).copy()
    return images, np.asarray(labels, dtype=np.int64), list(names)


class CIFAR(Dataset):
    """CIFAR-10/100 from the python pickles, as uint8 CHW tensors into the transform;
    `kind` (cifar10 | cifar100) says which, when the root may hold both."""

    def __init__(self, root: str | os.PathLike, train: bool, transform: Callable | None = None,
                 kind: str | None = None):
        images, labels, self.classes = read_cifar(root, train, kind)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def digest(self) -> str:
        """SHA-256 of the labels and pixels: which images these are (a resumed evaluation
        checks it, as it checks a class folder's file list)."""
        h = hashlib.sha256(np.asarray(self.targets, dtype=np.int64).tobytes())
        h.update(self.images.numpy().tobytes())
        return h.hexdigest()

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.images[index]
        return (self.transform(img) if self.transform else img), self.targets[index]


def collate_skip(batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Default collation minus the samples a reader skipped; returns the skipped count too."""
    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    # default_collate stacks straight into shared memory in a loader worker: a plain stack
    # would be copied there once more on its way to the main process
    images = default_collate([b[0] for b in kept])
    labels = torch.tensor([b[1] for b in kept], dtype=torch.long)
    return images, labels, skipped


class Lighting(torch.nn.Module):
    """AlexNet-style PCA colour noise on a [0,1] float tensor, from the global torch RNG."""

    def __init__(self, alphastd: float):
        super().__init__()
        self.alphastd = alphastd

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.alphastd == 0:
            return img
        alpha = torch.randn(3) * self.alphastd
        rgb = (_PCA_EIGVEC * alpha * _PCA_EIGVAL).sum(dim=1)
        return img + rgb.view(3, 1, 1)


RECIPE_NAMES = "cifar, imagenet, shapes, none"
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def jitter_lighting_batch(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                          alpha: torch.Tensor) -> torch.Tensor:
    """The `imagenet` recipe's colour ops on a whole batch on its device: ColorJitter's
    brightness, contrast and saturation (torchvision's definitions: blends of the image with
    black, with its mean grey level, with its grey image, clamped to [0,1]) in a per-sample
    order, then PCA lighting as `Lighting`.

    x: [B,3,H,W] float in [0,1]; factors: [B,3] (brightness, contrast, saturation);
    order: [B,3] long, a permutation of (0, 1, 2) per sample; alpha: [B,3] lighting draws.
    All tensor ops (no host reads), so a GPU input pipeline can run it right after decoding."""
    gray_w = channel_constant(_GRAY, x)
    for k in range(3):
        op = order[:, k].view(-1, 1, 1, 1)
        f = factors.gather(1, order[:, k:k + 1]).view(-1, 1, 1, 1).to(x.dtype)
        gray = (x * gray_w).sum(1, keepdim=True)
        base = torch.where(op == 0, torch.zeros_like(gray),
                           torch.where(op == 1, gray.mean((2, 3), keepdim=True), gray))
        x = (f * x + (1 - f) * base).clamp_(0.0, 1.0)
    vec = constant(tuple(_PCA_EIGVEC.flatten().tolist()), x.dtype, x.device, (1, 3, 3))
    val = constant(tuple(_PCA_EIGVAL.tolist()), x.dtype, x.device, (1, 3))
    rgb = (vec * (alpha.to(x.dtype) * val).unsqueeze(1)).sum(-1)  # [B,3]: Σ_j V_ij α_j λ_j
    return x + rgb.view(-1, 3, 1, 1)


def draw_jitter_lighting(n: int, generator: torch.Generator, jitter: float, lighting: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host draws for `jitter_lighting_batch`: factors ~ U[max(0, 1-j), 1+j] as ColorJitter,
    a uniformly random order of the three ops, lighting alpha ~ N(0, lighting)."""
    low = max(0.0, 1.0 - jitter)
    factors = low + torch.rand(n, 3, generator=generator) * (1.0 + jitter - low)
    order = torch.rand(n, 3, generator=generator).argsort(1)
    alpha = torch.randn(n, 3, generator=generator) * lighting
    return factors, order, alpha


@dataclasses.dataclass(frozen=True)
class TrainAug:
    """A training recipe: `cifar` (crop+pad, flip), `imagenet` (RRC, flip, jitter, lighting),
    `shapes` (mild RRC, flip), or `none` (resize only)."""

    kind: str
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    color_jitter: float = 0.4
    lighting: float = 0.1


def _to_float() -> list[Any]:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True)]


def train_transform(aug: TrainAug, on_device: bool = False) -> Callable:
    """The recipe as one per-image transform (PIL or uint8 tensor in, normalised float out).

    `on_device`: only the geometry runs per image (crop, flip; the same draws from the worker's
    RNG), returning uint8 CHW tensors: a quarter of the bytes to pin and copy, and no per-image
    float work in the loader workers; `finish_on_device` does the rest on the whole batch."""
    if on_device:
        return T.Compose(_geometry(aug) + [T.ToImage()])
    norm = T.Normalize(aug.mean, aug.std)
    if aug.kind == "cifar":
        ops = [T.ToImage(), T.RandomCrop(aug.size, padding=4), T.RandomHorizontalFlip(),
               T.ToDtype(torch.float32, scale=True), norm]
    elif aug.kind == "imagenet":
        ops = [T.RandomResizedCrop(aug.size, antialias=True), T.RandomHorizontalFlip(),
               T.ColorJitter(aug.color_jitter, aug.color_jitter, aug.color_jitter),
               *_to_float(), Lighting(aug.lighting), norm]
    elif aug.kind == "shapes":
        ops = [T.RandomResizedCrop(aug.size, scale=(0.5, 1.0), antialias=True),
               T.RandomHorizontalFlip(), *_to_float(), norm]
    elif aug.kind == "none":
        ops = [T.Resize((aug.size, aug.size), antialias=True), *_to_float(), norm]
    else:
        raise UserError(f"unknown train augmentation {aug.kind!r}; valid: {RECIPE_NAMES}")
    return T.Compose(ops)


def _geometry(aug: TrainAug) -> list[Any]:
    """The per-image geometric half of a recipe, as `train_transform` orders it."""
    if aug.kind == "cifar":
        return [T.ToImage(), T.RandomCrop(aug.size, padding=4), T.RandomHorizontalFlip()]
    if aug.kind in ("imagenet", "shapes"):
        scale = (0.08, 1.0) if aug.kind == "imagenet" else (0.5, 1.0)
        return [T.RandomResizedCrop(aug.size, scale=scale, antialias=True),
                T.RandomHorizontalFlip()]
    if aug.kind == "none":
        return [T.Resize((aug.size, aug.size), antialias=True)]
    raise UserError(f"unknown train augmentation {aug.kind!r}; valid: {RECIPE_NAMES}")


def finish_on_device(images: torch.Tensor, aug: TrainAug,
                     generator: torch.Generator) -> torch.Tensor:
    """The rest of a recipe on a uint8 batch `[B,3,H,W]` on its device (from
    `train_transform(aug, on_device=True)`): to [0,1] as torchvision's ToDtype, the `imagenet`
    recipe's colour jitter and PCA lighting (`jitter_lighting_batch`, host draws from
    `generator`: nothing waits for the device), normalisation. Within the recipe's
    distribution, not bit-identical to the per-image path: the colour ops run on float pixels
    where PIL rounds to uint8 after each."""
    if images.numel() == 0:  # every image of the batch was skipped
        return images.float()
    x = images.float().mul_(1.0 / 255.0)
    if aug.kind == "imagenet" and (aug.color_jitter or aug.lighting):
        draws = draw_jitter_lighting(len(x), generator, aug.color_jitter, aug.lighting)
        x = jitter_lighting_batch(x, *(upload(d, x.device) for d in draws))
    return normalize(x, aug.mean, aug.std)


def eval_transform(meta: Any, normalize: bool = True) -> Callable:
    """Resize (shorter side) + centre crop from the checkpoint; [0,1] pixels when not normalising.

    Attacks run in [0,1] pixel space and normalise inside the model wrapper, so they ask for
    `normalize=False`; everything else normalises here, exactly once.
    """
    ops: list[Any] = []
    if meta.resize != meta.crop:
        ops += [T.Resize(meta.resize, antialias=True), T.CenterCrop(meta.crop)]
    else:  # square resize: no crop to lose the object at the border of small images
        ops += [T.Resize((meta.crop, meta.crop), antialias=True)]
    ops += _to_float()
    if normalize:
        ops.append(T.Normalize(meta.mean, meta.std))
    return T.Compose(ops)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel; the constants reach the device once, without a sync."""
    return (x - channel_constant(mean, x)) / channel_constant(std, x)


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                scale: float = 1.0) -> torch.Tensor:
    """Back to pixel space: [0,1] by default, 0..255 with `scale=255`."""
    return (x * channel_constant(std, x) + channel_constant(mean, x)) * scale


def subset_indices(n: int, limit: int | None) -> list[int]:
    """All of range(n), or `limit` evenly spaced indices: class-folder datasets are sorted by
    class, so the first N would be one class only; evenly spaced keeps every class."""
    if limit is None or limit >= n:
        return list(range(n))
    return [i * n // limit for i in range(limit)]
