"""Class-folder JPEGs decoded on the GPU by nvjpeg, through torchvision alone (`loader=nvjpeg`).

On an H200 the torch loader (15 workers decoding, cropping and flipping with PIL; colour on the
GPU) delivered 2392 img/s against 4719 img/s for the ResNet-50 step (issue 14). DALI is the
fastest anchor, but it is a 1.1 GB optional extra. This loader needs nothing beyond torchvision:

* Workers read each file's bytes and its header (size, colour mode: microseconds, no decoding)
  and draw the recipe's geometry there with their torch RNG, as the torch loader's workers do
  (torchvision's `RandomResizedCrop.get_params`, then a fair coin for the flip). The sampler,
  the epoch-seeded generator and the worker seeds are the torch loader's, so the order, the
  sharding over ranks and `--resume` are too. A batch travels as one byte blob.
* A feeder thread, one batch ahead of the training step and on its own CUDA stream, decodes the
  batch with one `torchvision.io.decode_jpeg(list, device="cuda")` call (nvjpeg), pads it into
  one tensor and resamples every image at once: `out = Wy · X · Wxᵀ`, two batched matmuls whose
  per-image weight matrices (`axis_weights`) hold the crop, the antialiased bilinear filter
  (the triangle filter of torchvision's tensor `resize(antialias=True)`, itself PIL's) and the
  flip. No per-image resize calls: the only per-image work is the copy into the padded batch.
* Colour jitter, PCA lighting and normalisation follow, batched on the device
  (`smix.data.finish_on_device`), exactly as after the torch loader.
* Eval: resize of the shorter side to `resize` and centre crop, as `smix.data.eval_transform`
  (a square resize when `resize == crop`), in the same two matmuls, then normalisation.

What nvjpeg is not given: PNGs and other formats, CMYK JPEGs (ImageNet's train set has a few)
and images over `max_side` pixels (a padded batch of 256 grows with its largest picture) are
decoded and resampled in the worker by PIL (JPEG DCT scaling first for large ones) and travel as
finished uint8 crops. A batch nvjpeg refuses is decoded image by image, an image it refuses by
torchvision's libjpeg-turbo on the CPU; an unreadable file is skipped with `skip_bad_images`,
else it ends the run with one line naming it.

Without CUDA the same code decodes with libjpeg-turbo in the feeder thread: slower than the
torch loader, it lets the tests run this path on a CPU. torchvision 0.29 deprecates its image
decoders in favour of TorchCodec; the call used here is unchanged there (its warning is
silenced in `smix.data`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import math
import queue
import threading
import warnings
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop

from smix.data import UNREADABLE, normalize
from smix.devices import upload
from smix.errors import UserError
from pretrain.dali import ASPECT, RECIPES, dataset_samples  # recipes both GPU loaders implement

NVJPEG_MODES = ("RGB", "L")  # JPEG colour modes nvjpeg decodes to RGB (CMYK/YCCK it does not)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What each image becomes. train: RandomResizedCrop(size, scale, 3/4..4/3) + flip p=0.5,
    or a square resize (`scale` None); eval: shorter side resized to `resize`, centre crop
    `size` (a square resize when they are equal)."""

    train: bool
    size: int
    resize: int = 0
    scale: tuple[float, float] | None = (0.08, 1.0)  # None: the `none` recipe, a square resize
    max_side: int = 1024  # larger pictures are decoded in the worker (see module docstring)

    @classmethod
    def for_recipe(cls, train_aug: str, size: int) -> "Geometry":
        """The training geometry of a recipe (`RECIPES`)."""
        return cls(True, size, scale=RECIPES[train_aug])

    def draw(self, image: Image.Image) -> tuple[list[int], bool]:
        """The per-axis sampling plan `[y_start, y_len, y_out, y_off, x_start, x_len, x_out,
        x_off]` (source window, the length it is resized to, the offset of the kept output
        window) and the flip, drawn from the torch RNG (the worker's) for training."""
        width, height = image.size
        if self.train and self.scale is not None:
            top, left, h, w = RandomResizedCrop.get_params(image, list(self.scale), list(ASPECT))
            flip = bool(torch.rand(1) < 0.5)
            return [top, h, self.size, 0, left, w, self.size, 0], flip
        if (self.train and self.scale is None) or (not self.train and self.resize == self.size):
            return [0, height, self.size, 0, 0, width, self.size, 0], False
        out_h, out_w = resized_shorter(height, width, self.resize)
        return [0, height, out_h, _centre(out_h, self.size), 0, width, out_w,
                _centre(out_w, self.size)], False


def resized_shorter(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's `Resize(size)` output: the shorter side becomes `size`, the longer
    `int(size * long / short)`."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _centre(length: int, crop: int) -> int:
    """torchvision's CenterCrop offset."""
    return int(round((length - crop) / 2.0))


def axis_weights(plan: torch.Tensor, size: int, padded: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, size, padded] resampling matrices of one axis from plans [B, 4] = (start, length,
    out, offset): output i of image b is the antialiased bilinear sample of source window
    [start, start+length) resized to `out` pixels, at resized position offset+i. The filter is
    a triangle of half-width max(scale, 1), scale = length/out, centred at start +
    scale·(offset+i+½), restricted to the window and normalised (torchvision's tensor resize
    with antialias=True, and PIL's bilinear). Rows with no tap (a crop beyond the resized
    image) are zero, as CenterCrop's padding."""
    start, length, out, offset = (plan[:, k:k + 1].float() for k in range(4))
    scale = length / out  # [B,1]
    support = scale.clamp(min=1.0).unsqueeze(-1)  # [B,1,1]
    i = torch.arange(size, device=plan.device, dtype=torch.float32)
    centre = start + scale * (offset + i + 0.5)  # [B,size]
    pos = torch.arange(padded, device=plan.device, dtype=torch.float32) + 0.5
    # in place on one [B,size,padded] buffer: at 256 x 224 x 1024 each pass moves ~0.5 GB
    w = (pos - centre.unsqueeze(-1)).abs_().div_(support).neg_().add_(1.0).clamp_(min=0.0)
    w.mul_((pos >= start.unsqueeze(-1)) & (pos < (start + length).unsqueeze(-1)))
    return w.div_(w.sum(-1, keepdim=True).clamp_(min=1e-12)).to(dtype)


def resample(images: torch.Tensor, plans: torch.Tensor, flips: torch.Tensor, size: int
             ) -> torch.Tensor:
    """Every image of a padded uint8 batch [B,3,H,W] resampled by its plan [B,8] (see
    `Geometry.draw`) and flipped where `flips`: float [B,3,size,size] in 0..255, in two batched
    matmuls. fp16 on CUDA (pixels are exact in it; weights to 2⁻¹¹: under 0.25 grey levels),
    float32 elsewhere."""
    dtype = torch.float16 if images.is_cuda else torch.float32
    wy = axis_weights(plans[:, 0:4], size, images.shape[2], dtype)
    wx = axis_weights(plans[:, 4:8], size, images.shape[3], dtype)
    wx = torch.where(flips.view(-1, 1, 1), wx.flip(1), wx)  # a mirrored column order
    cols = torch.einsum("bchw,bsw->bchs", images.to(dtype), wx)
    return torch.einsum("bth,bchs->bcts", wy, cols).float().contiguous()


class Packed(NamedTuple):
    """One batch as the workers hand it over: the JPEG bytes of the nvjpeg images in one blob,
    and the images the worker finished (uint8 crops) with their places in the batch."""

    blob: torch.Tensor  # uint8, the files' bytes back to back
    lengths: list[int]
    plans: torch.Tensor  # long [n_jpeg, 8]
    flips: torch.Tensor  # bool [n_jpeg]
    jpeg_at: list[int]  # batch positions of the nvjpeg images
    ready: torch.Tensor  # uint8 [n_ready, 3, S, S]
    ready_at: list[int]
    labels: torch.Tensor  # long [n]
    paths: list[str]  # of the nvjpeg images (error messages)
    skipped: int


class Item(NamedTuple):
    """One image from a worker: JPEG bytes for nvjpeg, or a uint8 crop it finished."""

    jpeg: bool
    data: torch.Tensor
    plan: list[int]
    flip: bool
    label: int
    path: str


class EncodedImages(Dataset):
    """A class folder's (path, label) samples as (bytes, plan, flip) for nvjpeg, or a finished
    uint8 crop for what nvjpeg is not given; None for an unreadable file with `skip_bad`."""

    def __init__(self, samples: Sequence[tuple[str, int]], geometry: Geometry,
                 skip_bad: bool = False) -> None:
        self.samples, self.geometry, self.skip_bad = list(samples), geometry, skip_bad

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            data = Path(path).read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                plan, flip = self.geometry.draw(image)
                if (image.format == "JPEG" and image.mode in NVJPEG_MODES
                        and max(image.size) <= self.geometry.max_side):
                    blob = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                    return Item(True, blob, plan, flip, label, path)
                crop = finish_on_host(image, plan, flip, self.geometry.size,
                                      self.geometry.max_side)
                return Item(False, crop, plan, False, label, path)
        except UNREADABLE as e:
            if self.skip_bad:
                return None
            raise UserError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def finish_on_host(image: Image.Image, plan: list[int], flip: bool, size: int,
                   max_side: int) -> torch.Tensor:
    """A uint8 [3,size,size] crop made in the worker by the same resampling, after PIL has
    decoded the picture; a JPEG over `max_side` at a reduced DCT scale (`draft`) that keeps
    the window at least twice the output on each side, so that the antialiasing filter, not
    the DCT, still does the final reduction (the plan is scaled to match)."""
    width0, height0 = image.size
    if image.format == "JPEG" and max(image.size) > max_side:
        image.draft(image.mode, (math.ceil(2 * width0 * plan[6] / plan[5]),
                                 math.ceil(2 * height0 * plan[2] / plan[1])))
    pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy())
    plan_t = torch.tensor([plan], dtype=torch.float64)
    plan_t[:, [0, 1]] *= pixels.shape[0] / height0  # the window in the reduced picture
    plan_t[:, [4, 5]] *= pixels.shape[1] / width0
    out = resample(pixels.permute(2, 0, 1).unsqueeze(0), plan_t, torch.tensor([flip]), size)
    return out[0].round().clamp(0, 255).to(torch.uint8)


def collate_packed(items: list[Item | None]) -> Packed:
    """`EncodedImages` items -> one `Packed` batch (runs in the worker)."""
    kept = [it for it in items if it is not None]
    jpeg = [(k, it) for k, it in enumerate(kept) if it.jpeg]
    ready = [(k, it) for k, it in enumerate(kept) if not it.jpeg]
    blobs = [it.data for _, it in jpeg]
    return Packed(
        blob=torch.cat(blobs) if blobs else torch.empty(0, dtype=torch.uint8),
        lengths=[len(b) for b in blobs],
        plans=torch.tensor([it.plan for _, it in jpeg], dtype=torch.long).view(-1, 8),
        flips=torch.tensor([it.flip for _, it in jpeg], dtype=torch.bool),
        jpeg_at=[k for k, _ in jpeg],
        ready=(torch.stack([it.data for _, it in ready]) if ready
               else torch.empty(0, dtype=torch.uint8)),
        ready_at=[k for k, _ in ready],
        labels=torch.tensor([it.label for it in kept], dtype=torch.long),
        paths=[it.path for _, it in jpeg], skipped=len(items) - len(kept))


_FALLBACK_WARNED = False


def decode(blobs: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """uint8 [3,H,W] RGB images on `device`: one batched nvjpeg call; where it refuses the
    batch, image by image, an image nvjpeg refuses by libjpeg-turbo on the CPU; None for
    what neither reads."""
    if not blobs:
        return []
    if device.type == "cuda":
        # nvjpeg writes from torchvision's own stream into outputs allocated on ours, and the
        # allocator may hand out memory our queued kernels (the last batch's copies) still
        # read: they are ordered on our stream only. Let them finish first (the feeder waits;
        # torchvision blocks it until the decode is done anyway).
        torch.cuda.current_stream(device).synchronize()
    try:
        return list(decode_jpeg(list(blobs), mode=ImageReadMode.RGB, device=device))
    except RuntimeError as e:
        if device.type == "cuda":  # the refused batch's outputs may still be written to
            torch.cuda.synchronize(device)
        global _FALLBACK_WARNED
        if not _FALLBACK_WARNED:  # once: a refusal on every batch would be a slow epoch
            _FALLBACK_WARNED = True
            warnings.warn(f"loader=nvjpeg: the decoder refused a batch of {len(blobs)} "
                          f"({str(e).splitlines()[0][:200]}); decoding such batches image by "
                          "image", RuntimeWarning, stacklevel=2)
    out: list[torch.Tensor | None] = []
    for blob in blobs:
        image = None
        for where in dict.fromkeys((device, torch.device("cpu"))):
            with contextlib.suppress(RuntimeError):
                image = decode_jpeg(blob, mode=ImageReadMode.RGB, device=where).to(device)
                break
        out.append(image)
    return out


def pad_batch(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """One uint8 [B,3,Hmax,Wmax] tensor holding every image at its top left. The rest is left
    uninitialised: `axis_weights` gives it zero weight, and uint8 holds no NaN."""
    height = max(im.shape[1] for im in images)
    width = max(im.shape[2] for im in images)
    batch = torch.empty(len(images), 3, height, width, dtype=torch.uint8, device=images[0].device)
    for row, im in enumerate(images):
        batch[row, :, :im.shape[1], :im.shape[2]].copy_(im)
    return batch


def assemble(packed: Packed, geometry: Geometry, device: torch.device, skip_bad: bool,
             norm: tuple[Sequence[float], Sequence[float]] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A `Packed` batch as (images, labels, skipped) on `device`: float 0..255 [n,3,S,S] for
    training (`finish_on_device` follows), normalised with `norm` (mean, std) for eval."""
    blobs = torch.split(packed.blob, packed.lengths) if packed.lengths else ()
    images = decode(blobs, device)
    bad = [k for k, im in enumerate(images) if im is None]
    if bad and not skip_bad:
        raise UserError(f"{packed.paths[bad[0]]}: cannot decode JPEG (nvjpeg and libjpeg-turbo "
                        "refuse it; skip_bad_images=true skips such files)")
    size, n = geometry.size, len(packed.labels)
    out = torch.empty(n, 3, size, size, device=device)
    good = [k for k, im in enumerate(images) if im is not None]
    if good:
        pick = torch.tensor(good)
        made = resample(pad_batch([images[k] for k in good]), upload(packed.plans[pick], device),
                        upload(packed.flips[pick], device), size)
        out.index_copy_(0, upload(torch.tensor([packed.jpeg_at[k] for k in good]), device), made)
    if packed.ready_at:
        out.index_copy_(0, upload(torch.tensor(packed.ready_at), device),
                        upload(packed.ready, device).float())
    labels = packed.labels
    if bad:  # drop the unreadable images (skip_bad_images)
        keep = sorted(set(range(n)) - {packed.jpeg_at[k] for k in bad})
        out, labels = out[upload(torch.tensor(keep), device)], labels[keep]
    if norm is not None:
        out = normalize(out.mul_(1.0 / 255.0), *norm)
    return out, upload(labels, device), packed.skipped + len(bad)


_END = object()


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put unless the consumer has stopped (then False)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


class DecodeLoader:
    """Batches `(images, labels, skipped)` on the device from a DataLoader of `Packed` batches,
    made by a feeder thread `depth` batches ahead of the consumer, on its own CUDA stream (the
    consumer's stream waits for each batch's event: nothing synchronises with the host). An
    error in the feeder (a `UserError` naming a file) is raised in the consumer."""

    def __init__(self, loader, make: Callable[[Packed], tuple], device: torch.device,
                 depth: int = 2) -> None:
        self.loader, self.make, self.device, self.depth = loader, make, device, depth
        self._stream: torch.cuda.Stream | None = None  # made once, on the first epoch

    def stream(self) -> torch.cuda.Stream:
        """The feeder's CUDA stream, one per loader. High priority: streams of that pool are
        not the ones `torch.cuda.graph` captures on (PyTorch hands out pool streams round
        robin, and a stream taken each epoch would in time be one a capture is using), and
        decoding is not starved by the training step's kernels."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device, priority=-1)
        return self._stream

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        batches = iter(self.loader)  # workers start from this thread
        q: queue.Queue = queue.Queue(self.depth)
        stop = threading.Event()
        feeder = threading.Thread(target=self._feed, args=(batches, q, stop), daemon=True,
                                  name="smix-nvjpeg-feeder")
        feeder.start()
        try:
            while (got := q.get()) is not _END:
                if isinstance(got, BaseException):
                    raise got
                batch, event = got
                if event is not None:
                    stream = torch.cuda.current_stream(self.device)
                    stream.wait_event(event)
                    for t in batch[:2]:
                        t.record_stream(stream)
                yield batch
        finally:
            stop.set()
            with contextlib.suppress(queue.Empty):
                while True:
                    q.get_nowait()
            feeder.join(timeout=60)

    def _feed(self, batches: Iterator, q: queue.Queue, stop: threading.Event) -> None:
        try:
            cuda = self.device.type == "cuda"
            if cuda:
                torch.cuda.set_device(self.device)
            stream = self.stream() if cuda else None
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                for packed in batches:
                    batch = self.make(packed)
                    event = torch.cuda.Event() if cuda else None
                    if event is not None:
                        event.record(stream)
                    if stop.is_set() or not _put(q, (batch, event), stop):
                        return
            _put(q, _END, stop)
        except BaseException as e:  # handed to the consumer, raised there
            _put(q, e, stop)


@functools.lru_cache(maxsize=None)
def nvjpeg_works(device: torch.device) -> str | None:
    """None when torchvision decodes JPEGs on `device` (a tiny one made here); else why not."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 30, 60)).save(buf, "JPEG")
    try:
        image = decode_jpeg(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8),
                            mode=ImageReadMode.RGB, device=device)
    except (RuntimeError, NotImplementedError) as e:
        return f"torchvision cannot decode JPEGs on {device} ({str(e).splitlines()[0]})"
    return None if tuple(image.shape) == (3, 8, 16) else "torchvision decoded a test JPEG wrongly"


def encoded_images(dataset: Dataset, geometry: Geometry, skip_bad: bool) -> EncodedImages:
    """A ClassFolder (or a Subset of one) as the dataset the engine's DataLoader reads."""
    return EncodedImages(dataset_samples(dataset), geometry, skip_bad)


def nvjpeg_loader(batches, geometry: Geometry, device: torch.device, skip_bad: bool,
                  norm: tuple[Sequence[float], Sequence[float]] | None) -> DecodeLoader:
    """The engine's loader for `loader=nvjpeg`: `batches`, the torch loader's DataLoader
    (sampler, seeds, workers) over `encoded_images` with `collate_packed`, finished on
    `device` by the feeder thread."""
    make = functools.partial(assemble, geometry=geometry, device=device, skip_bad=skip_bad,
                             norm=norm)
    return DecodeLoader(batches, make, device)
