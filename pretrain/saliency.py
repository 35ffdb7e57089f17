"""Saliency detectors as pure batched torch functions, registered by name.

Contract: a detector takes RGB images ``[B,3,H,W]`` in the 0..255 range (uint8 or float, any
device) and returns float32 saliency ``[B,H,W]`` on the same device. Never feed normalised
tensors: that is the defect of the official SaliencyMix code (see DESIGN.md). Float input is
rounded to the uint8 grid first, because the OpenCV references only ever see uint8 pixels and a
de-normalised batch carries float noise (127.99998 must count as 128, not 127).

Registry (one per kind, as timm does it)::

    @register_detector("my_detector")
    def my_detector(images: torch.Tensor) -> torch.Tensor: ...

    get_detector("fine_grained")(images)   # unknown names raise UserError listing valid ones
    get_detector("network:basnet.pt2")  # a network with weights the user supplies (BASNet)

A detector registered with ``needs_model=True`` (``gradient``) is called as
``fn(model, images_normalized, labels)`` instead; callers branch on ``fn.needs_model``. One
registered with ``takes_normalization=True`` also accepts normalised images with
``normalization=(mean, std)`` (``normalized_saliency`` passes it; the others get pixels).

Detectors and their parity with OpenCV contrib 5.0 (``cv2.saliency``), as measured by
``tests/test_saliency.py`` on 10 scikit-image photos resized to 32x32 and to 224x224:

* ``fine_grained`` -- Montabone & Soto, exactly as ``StaticSaliencyFineGrained``: BGR2GRAY in
  OpenCV's 15-bit fixed point, two bit-exact 3x3 Gaussian blurs, six centre-surround box means
  from an integral image, its uint8 truncations, and its uint8 *wrap-around* where on+off
  exceeds 255 (``saturate=True`` clamps instead). Bit-identical at both sizes: max abs
  difference 0, correlation 1, argmax identical on 20/20 photos; also on 300 random,
  degenerate and non-square images. Only above ~256x256 pixels can it differ: OpenCV keeps the
  integral image in float32, which rounds once sums pass 2^24, while ours stays exact (measured
  on the photos: 2 of 524288 pixels differ by 1/255 at 256x256, 9 of 720000 at 300x300).
* ``spectral_residual`` -- Hou & Zhang as ``StaticSaliencySpectralResidual``: bit-exact grayscale
  and INTER_LINEAR_EXACT resize to 64x64, FFT, log amplitude minus its 3x3 box blur, inverse
  FFT with the original phase, 5x5 Gaussian (sigma 8), square, divide by the max, bilinear
  resize back. Exact parity is impossible: OpenCV's ``cartToPolar`` approximates atan (about
  1.6e-4 rad error) and ``polarToCart`` uses float32 sin/cos, while we keep the exact phase; we
  also compute in float32 where OpenCV uses float64 (1.7e-6 apart, far below the former).
  Measured: max abs difference 3.6e-5 (32x32) / 5.4e-5 (224x224) on maps in [0,1],
  1 - correlation <= 2e-7, argmax identical on 20/20 photos.
* ``frequency_tuned`` -- Achanta et al. 2009 (no OpenCV counterpart): distance in CIE Lab
  (sRGB, D65) between the mean image colour and a 5x5 binomial-blurred image, scaled to [0,1].
* ``network:PATH`` -- a salient-object network with weights the user supplies (BASNet),
  exported with torch.export (``.pt2``) or TorchScript; BASNet's test-time preprocessing; see
  ``network_detector``.
* ``gradient`` -- GuidedMixup's "AP" saliency, sqrt(mean_c (dCE/dx)^2), from one forward and
  backward of the model being trained; see ``gradient_saliency``.

Speed (``benchmarks/bench_saliency.py``, 2-core Xeon, 64 images of 224x224): fine_grained takes
~88 ms on one thread and ~53 ms on two, against 0.45-0.64 s for the per-image OpenCV loop
(5.4-6.8x and 8.6-11.7x; OpenCV's time swings with machine load). It is ~100 unfused
elementwise passes per cache-sized chunk, memory-bound where OpenCV runs one fused per-pixel
loop; a larger margin needs kernel fusion (a C++/compiled op), not more tensor algebra.
spectral_residual is ~1.8x (one thread) to ~2.2x (two) faster than OpenCV's already cheap
64x64 FFT path. The passes are short enough that intra-op threads wait on each other: when other
processes keep the cores busy (e.g. DataLoader workers), use ``torch.set_num_threads(1)`` --
measured 13 ms on one thread vs 3.4 s on two for 10 images of 224x224 with one core taken.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from smix.data import denormalize
from smix.devices import (CheckedKernels, GraphCache, constant, device_cache, on_device_of,
                          upload)
from smix.dist import micro_batches
from smix.errors import UserError

Detector = Callable[..., torch.Tensor]
Normalization = tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) of normalised images

_DETECTORS: dict[str, Detector] = {}

# Montabone & Soto's centre-surround half-widths, in OpenCV's order.
_FINE_GRAINED_NEIGHBOURHOODS = (12, 24, 48, 28, 56, 112)
# Pixels per chunk and thread on CPU. The detectors are chains of elementwise passes over the
# batch; chunks this small keep a chunk's planes in cache between passes (whole-batch passes:
# 1.6x slower for 64 images of 224x224) while each op still has work to split across threads.
_CPU_CHUNK_PIXELS = 1 << 16
# Elsewhere (GPU) chunks only bound the scratch memory, roughly 100 bytes per pixel.
_DEVICE_CHUNK_PIXELS = 1 << 22


# --------------------------------------------------------------------------------- registry


def register_detector(name: str, *, needs_model: bool = False,
                      takes_normalization: bool = False) -> Callable[[Detector], Detector]:
    """Register a detector under ``name``; ``needs_model`` marks ``fn(model, images, labels)``,
    ``takes_normalization`` a ``normalization=(mean, std)`` keyword for normalised images."""

    def decorator(fn: Detector) -> Detector:
        if name in _DETECTORS and _DETECTORS[name] is not fn:
            raise ValueError(f"saliency detector {name!r} is already registered")
        fn.needs_model = needs_model  # type: ignore[attr-defined]
        fn.takes_normalization = takes_normalization  # type: ignore[attr-defined]
        _DETECTORS[name] = fn
        return fn

    return decorator


def list_detectors() -> list[str]:
    """Names of the registered detectors, sorted."""
    return sorted(_DETECTORS)


def get_detector(name: str) -> Detector:
    """The detector registered as ``name``, or ``network:PATH``, a saliency network the user
    supplies (`network_detector`); a user-facing error lists the valid names."""
    for prefix in _NETWORK_PREFIXES:
        if name.startswith(prefix):
            return network_detector(name[len(prefix):])
    try:
        return _DETECTORS[name]
    except KeyError:
        raise UserError(f"unknown saliency detector {name!r}; valid detectors: "
                        f"{', '.join(list_detectors())}, or {NETWORK}PATH (a saliency "
                        "network you supply, e.g. BASNet)") from None


# ------------------------------------------------------------ networks the user supplies

NETWORK = "network:"
_NETWORK_PREFIXES = (NETWORK, "torchscript:")  # torchscript: is the older spelling
NETWORK_INPUT = 256  # BASNet's RescaleT(256): what the exported network is given
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=None)
def network_detector(path: str) -> Detector:
    """A salient-object network as a detector, from weights the user supplies (nothing is
    downloaded), e.g. BASNet (Qin et al. 2019) from its official code and weights, exported
    once by the user either way:

    * torch.export (``.pt2``): ``torch.export.save(torch.export.export(net.eval(),
      (torch.rand(2, 3, 256, 256),), dynamic_shapes=({0: torch.export.Dim("batch")},)),
      "basnet.pt2")``; a batch size fixed at export is run in slices of that size;
    * TorchScript: ``torch.jit.save(torch.jit.trace(net.eval(), torch.rand(1, 3, 256, 256)),
      "basnet.pt")`` (deprecated by torch 2.10, still read);

    then ``detector=network:basnet.pt2`` (the file's contents tell which kind it is).

    BASNet's test-time protocol: the image resized to 256x256 (bilinear), scaled to [0,1],
    normalised with ImageNet's mean and std; the first output (its fused map; a tuple or list
    gives its first element, a [B,C,h,w] map its channel 0), min-max normalised per image
    (its ``normPRED``), resized back to the image's size."""
    if not Path(path).is_file():
        raise UserError(f"detector {NETWORK}{path}: no such file")
    _check_maps(path)  # a file that is neither kind, or no map per image, fails here

    def detect(images: torch.Tensor) -> torch.Tensor:
        images = _check_images(images)
        x = F.interpolate(_as_uint8_grid(images) / 255.0, size=(NETWORK_INPUT, NETWORK_INPUT),
                          mode="bilinear", align_corners=False)
        mean = constant(_IMAGENET_MEAN, torch.float32, x.device, (1, 3, 1, 1))
        std = constant(_IMAGENET_STD, torch.float32, x.device, (1, 3, 1, 1))
        with torch.no_grad():
            out = _network(path, str(x.device))((x - mean) / std)
        lo = out.amin(dim=(1, 2), keepdim=True)
        span = out.amax(dim=(1, 2), keepdim=True) - lo
        out = (out - lo) / span.clamp_min(1e-12)
        return F.interpolate(out[:, None], size=images.shape[2:], mode="bilinear",
                             align_corners=False)[:, 0]

    detect.needs_model = False  # type: ignore[attr-defined]
    detect.takes_normalization = False  # type: ignore[attr-defined]
    return detect


def _check_maps(path: str) -> None:
    """Run the network once on the CPU on one blank image of its input size: a file that is
    not a network, or a network that does not give one map per image (a classifier's scores,
    a fixed input size other than 256), is a one-line error now, not a traceback at the
    first step. A network that fails on the CPU but runs on this machine's GPU (traced there
    with the device in its graph) is checked there."""
    net = _network(path, "cpu")  # a file that is neither kind fails here, in one line
    try:
        maps = _blank_maps(net, "cpu")
    except Exception as e:  # the user's code: TorchScript raises torch.jit.Error, not these
        maps = _gpu_blank_maps(path)
        if maps is None:
            raise UserError(f"detector {NETWORK}{path}: the network fails on a 1x3x"
                            f"{NETWORK_INPUT}x{NETWORK_INPUT} batch, the detector's input "
                            f"({_error_line(e)})") from None
    if maps.dim() != 3 or maps.shape[0] != 1 or min(maps.shape) < 1:
        raise UserError(f"detector {NETWORK}{path}: the network's first output is "
                        f"{tuple(maps.shape)} for one image; a detector needs a map per image "
                        "([B,1,h,w] or [B,h,w])")


def _error_line(e: Exception) -> str:
    """The line of an exception that says what failed: its first, or for an error inside
    TorchScript (whose first line only says so) its last, the exception itself."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return lines[-1] if lines[0].startswith("The following operation failed in the "
                                            "TorchScript interpreter") else lines[0]


def _blank_maps(net: Callable[[torch.Tensor], torch.Tensor], device: str) -> torch.Tensor:
    """The network's maps of one blank image of its input size, on `device`."""
    with torch.no_grad():
        return net(torch.zeros(1, 3, NETWORK_INPUT, NETWORK_INPUT, device=device))


def _gpu_blank_maps(path: str) -> torch.Tensor | None:
    """`_blank_maps` on this process's GPU (torchrun's LOCAL_RANK, as `smix.dist` picks it:
    not every rank on GPU 0); None without one, or where it fails there too."""
    if not torch.cuda.is_available():
        return None
    local = os.environ.get("LOCAL_RANK", "")
    index = int(local) if local.isdigit() and int(local) < torch.cuda.device_count() else \
        torch.cuda.current_device()
    device = f"cuda:{index}"
    try:
        return _blank_maps(_network(path, device), device)
    except Exception:
        return None


def _first_map(out) -> torch.Tensor:
    """A network's saliency map [B,h,w], float32: its first output, channel 0 of a [B,C,h,w]."""
    out = out[0] if isinstance(out, (tuple, list)) else out
    return (out[:, 0] if out.dim() == 4 else out).float()


class _InSlices:
    """A network exported for one batch size: run on slices of that size, the last one padded
    with copies of its final image (whose maps are dropped)."""

    def __init__(self, module: Callable, batch: int):
        self.module, self.batch = module, batch

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not len(x):
            return x.new_zeros((0, *x.shape[2:]))
        maps = []
        for start in range(0, len(x), self.batch):
            part = x[start:start + self.batch]
            short = self.batch - len(part)
            if short:
                part = torch.cat([part, part[-1:].expand(short, *part.shape[1:])])
            maps.append(_first_map(self.module(part))[:self.batch - short])
        return torch.cat(maps)


@device_cache(maxsize=8)
def _network(path: str, device: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network on `device` as images -> maps [B,h,w], loaded once (kept alive for the CUDA
    graphs that read it)."""
    try:
        if _is_exported_program(path):
            return _exported_network(path, device)
        with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; it still loads
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(path, map_location=device).eval()
        return lambda x: _first_map(module(x))
    except (RuntimeError, ValueError, OSError, KeyError) as e:
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else \
            type(e).__name__
        raise UserError(f"detector {NETWORK}{path}: not a torch.export (.pt2) or TorchScript "
                        f"file ({first}); export the network with torch.export.save or "
                        "torch.jit.save") from None


def _is_exported_program(path: str) -> bool:
    """Whether `path` is a torch.export archive: a zip with an ``archive_format`` record (torch
    >= 2.7) or a ``serialized_exported_program.json`` (the flat layout torch 2.1-2.6 wrote);
    TorchScript's zips have neither."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = {name.rsplit("/", 1)[-1] for name in archive.namelist()}
    except (zipfile.BadZipFile, OSError):
        return False
    return bool(names & {"archive_format", "serialized_exported_program.json"})


def _exported_network(path: str, device: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A torch.export program on `device`; a batch size fixed at export runs `_InSlices`."""
    program = torch.export.load(path)
    try:
        from torch.export.passes import move_to_device_pass  # torch >= 2.6
    except ImportError:
        move_to_device_pass = None
    if move_to_device_pass is not None:  # also a program exported on a GPU, run on the CPU
        program = move_to_device_pass(program, device)
    inputs = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    user_inputs = program.graph_signature.user_inputs
    if len(user_inputs) != 1:
        raise UserError(f"detector {NETWORK}{path}: the network takes {len(user_inputs)} "
                        "inputs; a detector takes one, the image batch")
    batch = inputs[user_inputs[0]].meta["val"].shape[0]
    module = program.module()
    if move_to_device_pass is None:
        module = module.to(device)  # older torch: constants made at export stay on its device
    if isinstance(batch, int):
        return _InSlices(module, batch)
    return lambda x: _first_map(module(x))


# ------------------------------------------------------------------------ shared pixel helpers


def normalized_saliency(name: str, images: torch.Tensor, mean: Sequence[float],
                        std: Sequence[float]) -> torch.Tensor:
    """Detector `name`'s maps of normalised images: the maps of their 0..255 pixels,
    `denormalize(images.float(), mean, std, 255)` (never of the normalised tensor itself).
    fine_grained and spectral_residual take the de-normalisation into their first Triton
    kernel on CUDA (the same values, three full passes over the batch fewer); the others get
    the pixels."""
    detector = get_detector(name)
    if detector.takes_normalization:
        return detector(images, normalization=(tuple(map(float, mean)), tuple(map(float, std))))
    return detector(denormalize(images.detach().float(), mean, std, scale=255.0))


def _check_normalization(normalization: Normalization | None) -> Normalization | None:
    """(mean, std) of RGB images: three values each (the kernels read exactly three)."""
    if normalization is not None and (len(normalization) != 2
                                      or any(len(v) != 3 for v in normalization)):
        raise ValueError(f"normalization must be (mean, std) with 3 values each, got "
                         f"{normalization!r}")
    return normalization


def _pixels_of(images: torch.Tensor, normalization: Normalization | None) -> torch.Tensor:
    """The tensor ops' 0..255 pixels: the images, or with `normalization` their
    `denormalize(images.float(), mean, std, 255)`."""
    if normalization is None:
        return images
    return denormalize(images.float(), *normalization, scale=255.0)


def _check_images(images: torch.Tensor) -> torch.Tensor:
    """Validate ``[B,3,H,W]`` and detach (detectors are not differentiable)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images [B,3,H,W], got shape {tuple(images.shape)}")
    if images.shape[2] < 3 or images.shape[3] < 3:
        raise ValueError(f"images must be at least 3x3, got {tuple(images.shape[2:])}")
    return images.detach()


def _as_uint8_grid(images: torch.Tensor) -> torch.Tensor:
    """Float32 holding the uint8 values OpenCV would see: round half to even (as its
    saturate_cast), clamp."""
    if images.dtype == torch.uint8:
        return images.float()
    return images.float().round().clamp_(0.0, 255.0)


def _gray_u8(rgb: torch.Tensor) -> torch.Tensor:
    """cv2.cvtColor(BGR2GRAY) on uint8, bit-exact: 15-bit fixed point, round half up.

    OpenCV callers pass BGR, so its B weight applies to our channel 2 (blue). All products and
    sums are integers below 2^24, hence exact in float32."""
    s = rgb[:, 0] * 9798.0
    s.add_(rgb[:, 1], alpha=19235.0).add_(rgb[:, 2], alpha=3735.0).add_(16384.0)
    return s.mul_(1.0 / 32768.0).floor_()  # power-of-two scaling is exact; div "floor" is slow


def _gaussian3_u8(gray: torch.Tensor) -> torch.Tensor:
    """cv2.GaussianBlur(ksize 3, sigma 0) on uint8, bit-exact: [1,2,1]^2/16, round half up,
    BORDER_REFLECT_101 (torch's "reflect")."""
    p = F.pad(gray.unsqueeze(1), (1, 1, 1, 1), mode="reflect").squeeze(1)
    h = torch.add(p[:, :, :-2], p[:, :, 2:]).add_(p[:, :, 1:-1], alpha=2.0)
    s = torch.add(h[:, :-2], h[:, 2:]).add_(h[:, 1:-1], alpha=2.0)
    return s.add_(8.0).mul_(1.0 / 16.0).floor_()


def _chunks(batch: int, pixels: int, device: torch.device, budget: int | None = None
            ) -> list[slice]:
    """Batch slices: cache-sized on CPU (not a per-image loop: 64 images of 32x32 per thread
    at once), memory-bounded elsewhere (80 images of 224x224 at once); `budget` pixels per
    chunk instead, where given."""
    if budget is None:
        budget = _CPU_CHUNK_PIXELS * torch.get_num_threads() if device.type == "cpu" \
            else _DEVICE_CHUNK_PIXELS
    per = max(1, budget // pixels)
    return [slice(i, min(i + per, batch)) for i in range(0, batch, per)]


# ----------------------------------------------------------------------------- fine grained


@device_cache(maxsize=32)
def _fine_grained_plan(height: int, width: int, device: torch.device
                       ) -> tuple[list[tuple[int, int, int]], torch.Tensor, torch.Tensor,
                                  tuple[int, int]]:
    """Per image size: distinct (clamped) scales with multiplicity, window areas, padding.

    A half-width beyond the image clamps to the same window as the image size, so on small
    images several of the six scales coincide and are computed once."""
    counts: dict[tuple[int, int], int] = {}
    for n in _FINE_GRAINED_NEIGHBOURHOODS:
        key = (min(n, height), min(n, width))
        counts[key] = counts.get(key, 0) + 1
    y = torch.arange(height, dtype=torch.float32, device=device)  # made there: no upload
    x = torch.arange(width, dtype=torch.float32, device=device)
    areas = []
    for ny, nx in counts:
        h = (y + ny + 1).clamp(0, height) - (y - ny + 1).clamp(0, height)
        w = (x + nx + 1).clamp(0, width) - (x - nx + 1).clamp(0, width)
        areas.append(h[:, None] * w[None, :])
    area = torch.stack(areas)
    scales = [(ny, nx, c) for (ny, nx), c in counts.items()]
    pad = (max(s[0] for s in scales), max(s[1] for s in scales))
    return scales, area, area - 1.0, pad


class _Workspace:
    """Scratch tensors of one chunk, reused by every chunk of a call.

    On CPU a fresh 0.2-0.8 MB tensor costs page faults comparable to the arithmetic done on
    it, so the hot loop writes into these with ``out=`` and in-place ops instead."""

    def __init__(self, like: torch.Tensor, batch: int, height: int, width: int,
                 padded: bool = True) -> None:
        scales, self.area, self.den, (py, px) = _fine_grained_plan(height, width, like.device)
        self.scales, self.pad = scales, (py, px)
        exact = _exact_dtype(height, width)
        if padded:  # the tensor ops read the integral image's clamped corners as slices
            # zeros above/left stay zero: they are the integral's first row/column, clamped
            self.integral = like.new_zeros((batch, height + 2 * py, width + 2 * px),
                                           dtype=exact)
            self.cols = like.new_empty((batch, height + 2 * py, width), dtype=exact)
        else:  # the kernels clamp the corners themselves: no padding, nothing to zero
            self.integral = like.new_empty((batch, height, width), dtype=exact)
            self.cols = None
        self.t = like.new_empty((batch, height, width), dtype=exact)
        # on/off (and their scratch) side by side, so one op serves both maps in the mix
        pair = (2, batch, height, width)
        self.sums = like.new_empty(pair, dtype=exact)
        self.scaled, self.scratch = like.new_empty(pair), like.new_empty(pair)

    def view(self, n: int) -> dict[str, torch.Tensor]:
        """The buffers for a chunk of ``n`` images (the last chunk may be smaller)."""
        out = {k: getattr(self, k)[:n] for k in ("integral", "cols", "t")
               if getattr(self, k) is not None}
        out.update({k: getattr(self, k)[:, :n] for k in ("sums", "scaled", "scratch")})
        return out


def _fill_integral(gray: torch.Tensor, integral: torch.Tensor, py: int, px: int) -> None:
    """Write the integral image so that every clamped corner OpenCV reads is a plain slice:
    (pre-zeroed) zeros above/left, edge replicas below/right."""
    _, h, w = gray.shape
    torch.cumsum(gray.to(integral.dtype), 2, out=integral[:, py:py + h, px:px + w]).cumsum_(1)
    integral[:, py + h:, :] = integral[:, py + h - 1:py + h, :]
    integral[:, :, px + w:] = integral[:, :, px + w - 1:px + w]


def _on_off_sums(gray: torch.Tensor, ws: _Workspace) -> torch.Tensor:
    """Sums over scales of the truncated on- and off-centre differences, ``[2,B,H,W]``
    (the input of ``mixScales``).

    OpenCV's mean excludes the centre: (boxsum - g) / (area - 1); the on value is
    trunc(g - mean) = trunc((g*area - boxsum) / (area - 1)) with integer numerator and
    denominator (< 2^24), so one float division truncates exactly as OpenCV does."""
    b, h, w = gray.shape
    buf, (py, px) = ws.view(b), ws.pad
    _fill_integral(gray, buf["integral"], py, px)
    on, signed = buf["sums"]
    for i, (ny, nx, count) in enumerate(ws.scales):
        t = signed if i == 0 else buf["t"]  # the first scale initialises the sums
        rows = buf["integral"][:, py - ny:py + h + ny]
        cols = torch.sub(rows[:, :, px - nx:px - nx + w], rows[:, :, px + nx:px + nx + w],
                         out=buf["cols"][:, :h + 2 * ny])  # minus the row-window sums
        torch.sub(cols[:, 2 * ny:2 * ny + h], cols[:, :h], out=t)  # minus the box sums
        t.addcmul_(gray, ws.area[i]).div_(ws.den[i], rounding_mode="trunc")
        if count > 1:
            t.mul_(count)
        if i == 0:
            torch.clamp(t, min=0.0, out=on)
        else:
            signed.add_(t)
            on.add_(t.clamp_(min=0.0))
    torch.sub(on, signed, out=signed)  # off = on - signed
    return buf["sums"]


def _scale_to_255(sums: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """(uchar)(255. * (float)(s / (float)max)) of ``mixScales``, exactly, without float64;
    overwrites ``sums`` and ``scratch``.

    The double product 255*q of a float32 q is 256q - q; floor it in float32, then undo the one
    case where float32 rounding lands on the next integer k (256q - k is exact by Sterbenz, and
    the sign of a float difference is exact). An all-zero map stays 0, as OpenCV's NaN cast.
    Comparisons are written as arithmetic: bool masks cost 10x more than a float op here."""
    q = sums.div_(sums.amax((-2, -1), keepdim=True).clamp_(min=1.0))  # sums are integers
    q256 = torch.mul(q, 256.0, out=scratch)
    k = torch.sub(q256, q, out=out).floor_()
    q.sub_(q256.sub_(k)).sign_().clamp_(min=0.0)  # 1 where 256q - k < q, i.e. 255q < k
    return k.sub_(q)


def _mix_on_off(sums: torch.Tensor, saturate: bool, buf: dict[str, torch.Tensor],
                out: torch.Tensor) -> None:
    """OpenCV's ``mixScales`` + ``mixOnOff`` of the on/off ``sums`` into ``out``, in [0,1].

    ``mixOnOff`` divides 255*(on+off) by max(max on, max off), which is 255 whenever a map is
    non-zero (its peak pixel scales to exactly 255), so the result is on+off itself, cast to
    uchar: values above 255 wrap modulo 256 in OpenCV (``saturate`` clamps them instead)."""
    on, off = _scale_to_255(sums.to(out.dtype), buf["scaled"], buf["scratch"])
    total = torch.add(on, off, out=out)
    if saturate:
        total.clamp_(max=255.0)
    else:
        wrap = torch.sub(total, 255.0, out=buf["scratch"][0]).clamp_(0.0, 1.0)
        total.sub_(wrap, alpha=256.0)
    total.mul_(1.0 / 255.0)


@register_detector("fine_grained", takes_normalization=True)
@torch.no_grad()
def fine_grained(images: torch.Tensor, *, saturate: bool = False,
                 normalization: Normalization | None = None) -> torch.Tensor:
    """Montabone & Soto fine-grained saliency, bit-exact with OpenCV's
    ``StaticSaliencyFineGrained`` on uint8 BGR input (``saturate`` clamps its uint8 wrap).
    With ``normalization=(mean, std)`` the images are normalised ones, and the map is that of
    their 0..255 pixels (``normalized_saliency``). On CUDA one graph replay per batch shape
    (``GraphCache``); elsewhere eager."""
    return _FINE_GRAINED_GRAPHS(_check_images(images), saturate=saturate,
                                normalization=_check_normalization(normalization))


def _fine_grained(images: torch.Tensor, saturate: bool = False,
                  normalization: Normalization | None = None) -> torch.Tensor:
    """The fine-grained detector's computation, on checked images; on CUDA with its
    elementwise stages as Triton kernels where they run (`FINE_GRAINED_KERNELS`)."""
    run = lambda kernels: _fine_grained_with(images, saturate, kernels,
                                             normalization=normalization)
    return FINE_GRAINED_KERNELS.run(_kernels_for(images), run, lambda: run(None))


def _kernels_for(images: torch.Tensor):
    """The fine-grained kernels for these images: on CUDA, float32-exact sizes, where Triton
    runs and passed its check; else None (tensor ops)."""
    h, w = images.shape[2:]
    if not images.is_cuda or _exact_dtype(h, w) != torch.float32:
        return None
    return FINE_GRAINED_KERNELS.get(images.device)


def _fine_grained_with(images: torch.Tensor, saturate: bool, kernels,
                       chunk_pixels: int | None = None,
                       normalization: Normalization | None = None) -> torch.Tensor:
    """`_fine_grained` with the kernels given (`pretrain.saliency_triton`), or tensor ops;
    `chunk_pixels` overrides the device's chunk size (the first-use check's partial chunk)."""
    b, _, h, w = images.shape
    out = torch.empty((b, h, w), device=images.device)
    parts = _chunks(b, h * w, images.device, chunk_pixels)
    ws = _Workspace(out, parts[0].stop, h, w, padded=kernels is None)
    for part in parts:  # quantised per chunk too: a whole-batch copy costs 15% in page faults
        if kernels is None:
            rgb = _pixels_of(images[part], normalization)
            gray = _gaussian3_u8(_gaussian3_u8(_gray_u8(_as_uint8_grid(rgb))))
            _mix_on_off(_on_off_sums(gray, ws), saturate, ws.view(len(gray)), out[part])
        else:
            gray = _gray_blurred(kernels, images[part], ws, normalization)
            _on_off_and_mix(kernels, gray, ws, saturate, out[part])
    return out


_FINE_GRAINED_GRAPHS = GraphCache(_fine_grained, "saliency fine_grained")
_KERNEL_BLOCK = 1024


def _kernel_pixels(rgb: torch.Tensor) -> torch.Tensor:
    """Pixels as the kernels read them: float32, float16 and bfloat16 as they are (widening to
    float32 is exact: no converted copy), anything else as `.float()`."""
    return rgb if rgb.dtype in (torch.float32, torch.float16, torch.bfloat16) else rgb.float()


def _affine(normalization: Normalization | None, like: torch.Tensor) -> torch.Tensor:
    """The kernels' de-normalisation, [std, mean] as float32 on `like`'s device (cached);
    without normalisation `like` itself, a pointer the kernel never reads."""
    if normalization is None:
        return like
    return constant(tuple(float(v) for v in (*normalization[1], *normalization[0])),
                    torch.float32, like.device)


def _gray_blurred(kernels, rgb: torch.Tensor, ws: _Workspace,
                  normalization: Normalization | None = None) -> torch.Tensor:
    """`_gaussian3_u8(_gaussian3_u8(_gray_u8(_as_uint8_grid(rgb))))` in two launches of the
    `blur3` kernel (quantise, gray and blur per tap; then blur), into two of the workspace's
    buffers that the kernels' path leaves free (`scaled`, `t`); with `normalization`, of
    `denormalize(rgb.float(), mean, std, 255)`, de-normalised per tap too."""
    rgb = _kernel_pixels(rgb)
    b, _, h, w = rgb.shape
    buf = ws.view(b)
    once, twice = buf["scaled"][0], buf["t"]
    affine = _affine(normalization, once)
    total = b * h * w
    grid = (-(-total // _KERNEL_BLOCK),)
    with on_device_of(rgb):  # no FMA: x * std + mean rounds twice, as the tensor ops
        kernels.blur3[grid](rgb, once, affine, total, h, w, *rgb.stride(), FROM_RGB=True,
                            NORMALIZED=normalization is not None, BLOCK=_KERNEL_BLOCK,
                            enable_fp_fusion=False)
        kernels.blur3[grid](once, twice, affine, total, h, w, h * w, 0, w, 1, FROM_RGB=False,
                            NORMALIZED=False, BLOCK=_KERNEL_BLOCK, enable_fp_fusion=False)
    return twice


def _on_off_and_mix(kernels, gray: torch.Tensor, ws: _Workspace, saturate: bool,
                    out: torch.Tensor) -> None:
    """`_mix_on_off(_on_off_sums(...))` as two Triton kernels around the per-image maxima:
    the same float32 operations per pixel (see `pretrain.saliency_triton`)."""
    b, h, w = gray.shape
    buf = ws.view(b)
    integral, sums = buf["integral"], buf["sums"]
    torch.cumsum(gray, 2, out=integral).cumsum_(1)  # unpadded: the kernel clamps its corners
    scales = constant(tuple(v for s in ws.scales for v in s), torch.int32, gray.device,
                      (len(ws.scales), 3))
    total = b * h * w
    grid = (-(-total // _KERNEL_BLOCK),)
    with on_device_of(gray):
        kernels.on_off_sums[grid](gray, integral, ws.area, scales, sums, total, sums.stride(0),
                                  h, w, N_SCALES=len(ws.scales), BLOCK=_KERNEL_BLOCK,
                                  enable_fp_fusion=False)
        peaks = sums.amax((-2, -1)).clamp_(min=1.0)  # [2,b]: on and off maxima per image
        kernels.scale_and_mix[grid](sums, peaks, out, total, sums.stride(0), h * w,
                                    SATURATE=saturate, BLOCK=_KERNEL_BLOCK,
                                    enable_fp_fusion=False)


def _exact_dtype(height: int, width: int) -> torch.dtype:
    """Float32 holds the integral image exactly below 2^24; beyond (over 256x256) float64."""
    return torch.float32 if height * width * 255 < 2**24 else torch.float64


def _load_detector_kernels():
    from pretrain import saliency_triton
    return saliency_triton


_CHECK_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # ImageNet's


def _half_level_batches(n: int, h: int, w: int, g: torch.Generator,
                        device: torch.device | str) -> Iterator[torch.Tensor]:
    """The first-use checks' normalised images (`_CHECK_NORMALIZATION`): values that
    de-normalise to within an ulp of a half grey level, where x * std + mean rounded once (an
    FMA) lands on the other level for ~6% of them; float32, float16 and bfloat16 (read as
    they are), each NCHW and channels last (Triton compiles a channel stride of 1 apart)."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in _CHECK_NORMALIZATION)
    halves = torch.randint(0, 255, (n, 3, h, w), generator=g) + 0.5
    normalized = ((halves / 255.0) - mean) / std
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for layout in (torch.contiguous_format, torch.channels_last):
            yield normalized.to(device, dtype).contiguous(memory_format=layout)


def _layout(images: torch.Tensor) -> str:
    return "NCHW" if images.is_contiguous() else "channels last"


def _check_fine_grained_kernels(kernels, device: torch.device) -> str | None:
    """Why the kernels cannot be trusted on `device` (None: they can): the detector with them
    against the tensor ops on the same device, bit for bit, with and without saturation, on
    0..255 images: three sizes (several scales clamped to the image and merged, a non-square
    one, 224x224 with all six), the first in chunks of two images (a partial last chunk),
    with a flat image, a hard edge, and a grey dot in a dark disc on white (on + off over 255:
    OpenCV's uchar cast wraps); and de-normalised pixels as training passes them: quarter
    steps from -30 to 290 (halves round to even, the rest is clamped), channels last; with NaN
    and infinities, the gray plane blurred twice (the maps' NaN handling is not compared);
    bfloat16 pixels; normalised images de-normalised in the kernel (`_half_level_batches`)."""
    g = torch.Generator().manual_seed(20232)
    batches = []
    for n, h, w in ((3, 32, 32), (2, 40, 56), (2, 224, 224)):
        low = torch.rand(n, 3, max(2, h // 8), max(2, w // 8), generator=g) * 255
        images = F.interpolate(low, size=(h, w), mode="bilinear").round()
        if n > 2:
            images[0] = 128.0  # flat: every sum zero
        images[-1, :, :, : w // 2] = 0.0  # a hard edge: the largest differences
        images[-1, :, :, w // 2:] = 255.0
        batches.append((images.to(device), 2 * h * w if n > 2 else None))
    batches.append((wrapping_disc(device), None))
    raw = torch.randint(-120, 1161, (2, 3, 17, 23), generator=g) / 4.0
    batches.append((raw.to(device).contiguous(memory_format=torch.channels_last), None))
    batches.append((raw.to(device, torch.bfloat16).contiguous(memory_format=torch.channels_last),
                    None))
    for images, chunk in batches:
        for saturate in (False, True):
            want = _fine_grained_with(images, saturate, None, chunk)
            got = _fine_grained_with(images, saturate, kernels, chunk)
            if not torch.equal(got, want):
                n, _, h, w = images.shape
                return (f"its map of {n} images of {h}x{w} (saturate={saturate}) differs "
                        "from the tensor ops'")
    norm = _CHECK_NORMALIZATION  # normalised images, de-normalised in the kernel
    for images in _half_level_batches(2, 17, 23, g, device):
        want = _fine_grained_with(images, False, None, normalization=norm)
        if not torch.equal(_fine_grained_with(images, False, kernels, normalization=norm), want):
            return (f"its map of normalised {images.dtype} images "
                    f"{_layout(images)} differs from the tensor ops'")
    # the gray plane blurred twice keeps NaN and clamps infinities as the tensor ops
    raw[0, 1, 4, 5], raw[1, 0, 0, 0] = float("nan"), float("inf")
    raw[1, 2, 16, 22] = -float("inf")
    images = raw.to(device)
    want = _gaussian3_u8(_gaussian3_u8(_gray_u8(_as_uint8_grid(images))))
    got = _gray_blurred(kernels, images, _Workspace(want, 2, 17, 23))
    if not (torch.equal(got.isnan(), want.isnan())
            and torch.equal(got.nan_to_num(), want.nan_to_num())):
        return "its gray plane of images with NaN and infinities differs from the tensor ops'"
    return None


def wrapping_disc(device: torch.device | str = "cpu", size: int = 128) -> torch.Tensor:
    """[1,3,size,size] 0..255: a mid-grey dot in a dark disc on white, where the fine-grained
    map's on + off exceeds 255 (OpenCV's uchar cast wraps it)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r = torch.hypot((yy - size // 2).float(), (xx - size // 2).float())
    img = torch.full((size, size), 255.0)
    img[r < 20] = 0.0
    img[r < 5] = 200.0
    return img.expand(1, 3, size, size).contiguous().to(device)


# the on/off sums and the mix as Triton kernels where Triton is (SMIX_TRITON=0: tensor ops)
FINE_GRAINED_KERNELS = CheckedKernels("saliency fine_grained", _load_detector_kernels,
                                      _check_fine_grained_kernels)


# ------------------------------------------------------------------------ spectral residual


@device_cache(maxsize=64)
def _linear_exact_taps(src: int, dst: int, device: torch.device):
    """Source offsets and 8-bit fixed-point weights of OpenCV's INTER_LINEAR_EXACT (uint8).

    Mirrors ``interpolationLinear::getCoeffs``: half-pixel centres, clamp to the edge pixel
    outside the image, fractional weight rounded (half to even) to 1/256."""
    scale = 1.0 / (dst / src)  # OpenCV: inv_scale = dst/src as double, then 1/inv_scale
    first, w_second = [], []
    for d in range(dst):
        f = scale * (d + 0.5) - 0.5
        i = math.floor(f)
        inside = src > 1 and 0 <= i < src - 1
        first.append(i if inside else (0 if i < 0 or src == 1 else src - 1))
        w_second.append(round((f - i) * 256) if inside else 0)
    w1 = torch.tensor(w_second, dtype=torch.float32)
    idx0 = torch.tensor(first)
    idx1 = (idx0 + 1).clamp_(max=src - 1)
    return tuple(upload(t, device) for t in (idx0, idx1, 256.0 - w1, w1))


def _resize_u8_exact(gray: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """cv2.resize(INTER_LINEAR_EXACT) of uint8 ``[B,H,W]``, bit-exact.

    Two passes in 1/256 units and one rounding at the end, as OpenCV's fixed point; every value
    stays an integer below 2^24, so float32 gathers and multiply-adds are exact and the pass
    order is free. Both passes gather whole rows (plain copies; a last-dim gather is ~20x
    slower on CPU): rows, then columns of the transposed result."""
    y0, y1, wy0, wy1 = _linear_exact_taps(gray.shape[1], height, gray.device)
    x0, x1, wx0, wx1 = _linear_exact_taps(gray.shape[2], width, gray.device)
    v = gray.index_select(1, y0) * wy0[:, None]
    v = v.addcmul_(gray.index_select(1, y1), wy1[:, None]).transpose(1, 2).contiguous()
    out = v.index_select(1, x0) * wx0[:, None]
    out.addcmul_(v.index_select(1, x1), wx1[:, None])
    return out.add_(32768.0).mul_(1.0 / 65536.0).floor_().transpose(1, 2)


def _filter2d_reflect(x: torch.Tensor, kernel: tuple[float, ...]) -> torch.Tensor:
    """Separable 'same' filtering of ``[N,H,W]`` by a symmetric odd kernel, BORDER_REFLECT_101.

    Taps are shifted slices, mirrored pairs summed before scaling: for 3- and 5-tap kernels
    this beats conv2d (which has no fast float64 path on CPU) and works on any device."""
    r = len(kernel) // 2
    p = F.pad(x.unsqueeze(1), (r, r, r, r), mode="reflect").squeeze(1)
    for dim in (2, 1):  # columns, then rows
        n = p.shape[dim] - 2 * r
        out = p.narrow(dim, r, n) * kernel[r]
        for j in range(1, r + 1):
            out.add_(p.narrow(dim, r - j, n) + p.narrow(dim, r + j, n), alpha=kernel[r + j])
        p = out
    return p


def _gaussian_kernel(size: int, sigma: float) -> tuple[float, ...]:
    """cv2.getGaussianKernel(size, sigma, CV_64F)."""
    taps = [math.exp(-((i - (size - 1) / 2) ** 2) / (2 * sigma * sigma)) for i in range(size)]
    return tuple(t / sum(taps) for t in taps)


def _planes(z: torch.Tensor) -> torch.Tensor:
    """Real and imaginary parts of a complex tensor as contiguous planes ``[2,...]``: ops on
    the interleaved ``.real``/``.imag`` views are several times slower on CPU."""
    return torch.view_as_real(z).movedim(-1, 0).contiguous()


def _spectral_residual_small(small: torch.Tensor) -> torch.Tensor:
    """The spectral residual of ``[B,S,S]`` float32 images, normalised to a peak of 1.

    FFT; log amplitude minus its 3x3 box blur; back with the original phase, applied as
    spectrum * residual/|spectrum| on the real and imaginary planes (complex abs/angle/polar
    are slow on CPU); a zero bin has phase 0, as OpenCV's atan2(0, 0). Unscaled inverse DFT
    (OpenCV has no DFT_SCALE), magnitude, 5x5 Gaussian with sigma 8, square."""
    re, im = _planes(torch.fft.fft2(small))
    mag = torch.addcmul(re * re, im, im).sqrt_()
    log_amp = torch.log(mag + 1.0)
    residual = torch.exp(log_amp - _filter2d_reflect(log_amp, (1 / 3, 1 / 3, 1 / 3)))
    scale = residual / mag
    nonzero = mag > 0
    new = torch.complex(torch.where(nonzero, re * scale, residual),
                        torch.where(nonzero, im * scale, torch.zeros_like(scale)))
    re, im = _planes(torch.fft.ifft2(new, norm="forward"))
    sal = torch.addcmul(re * re, im, im).sqrt_()
    sal = _filter2d_reflect(sal, _gaussian_kernel(5, 8.0)).square_()
    return sal.div_(sal.amax((1, 2), keepdim=True)).float()


@register_detector("spectral_residual", takes_normalization=True)
@torch.no_grad()
def spectral_residual(images: torch.Tensor, *, size: int = 64,
                      normalization: Normalization | None = None) -> torch.Tensor:
    """Hou & Zhang spectral residual saliency as OpenCV's ``StaticSaliencySpectralResidual``
    computes it (``size`` is its resImWidth/Height, 64). ``normalization=(mean, std)``: the
    images are normalised ones (``normalized_saliency``). On CUDA one graph replay per batch
    shape (``GraphCache``); elsewhere eager."""
    return _SPECTRAL_RESIDUAL_GRAPHS(_check_images(images), size=size,
                                     normalization=_check_normalization(normalization))


def _spectral_residual(images: torch.Tensor, size: int = 64,
                       normalization: Normalization | None = None) -> torch.Tensor:
    """The spectral-residual detector's computation, on checked images; on CUDA its input
    (gray, resized) is one Triton kernel where it runs (`SPECTRAL_KERNELS`)."""
    run = lambda kernels: _spectral_residual_with(images, size, normalization, kernels)
    return SPECTRAL_KERNELS.run(_spectral_kernels_for(images), run, lambda: run(None))


def _spectral_kernels_for(images: torch.Tensor):
    """The spectral residual's kernel on CUDA, where Triton runs and it passed its check
    there; else None (tensor ops)."""
    return SPECTRAL_KERNELS.get(images.device) if images.is_cuda else None


def _spectral_residual_with(images: torch.Tensor, size: int,
                            normalization: Normalization | None, kernels) -> torch.Tensor:
    """`_spectral_residual` with the kernel given (`pretrain.saliency_triton`), or tensor ops
    (None)."""
    b, _, h, w = images.shape
    small = torch.empty((b, size, size), device=images.device)
    for part in _chunks(b, max(h * w, size * size), images.device):
        if kernels is None:
            gray = _gray_resized_ops(images[part], size, normalization)
        else:
            gray = _gray_resized(kernels, images[part], size, normalization)
        small[part] = _spectral_residual_small(gray)
    if (h, w) == (size, size):
        return small
    # float maps: OpenCV's INTER_LINEAR_EXACT falls back to INTER_LINEAR (half-pixel, 2 taps).
    return F.interpolate(small.unsqueeze(1), size=(h, w), mode="bilinear",
                         align_corners=False).squeeze(1)


_SPECTRAL_RESIDUAL_GRAPHS = GraphCache(_spectral_residual, "saliency spectral_residual")


def _gray_resized_ops(rgb: torch.Tensor, size: int,
                      normalization: Normalization | None = None) -> torch.Tensor:
    """The spectral residual's input in tensor ops: OpenCV's uint8 gray plane of the pixels
    (de-normalised first with `normalization`), resized to size x size (INTER_LINEAR_EXACT)."""
    return _resize_u8_exact(_gray_u8(_as_uint8_grid(_pixels_of(rgb, normalization))), size,
                            size)


def _gray_resized(kernels, rgb: torch.Tensor, size: int,
                  normalization: Normalization | None = None) -> torch.Tensor:
    """`_gray_resized_ops` in one launch of the `gray_resize` kernel, in its layout (a
    transposed view)."""
    rgb = _kernel_pixels(rgb)
    b, _, h, w = rgb.shape
    y0, y1, _, wy = _linear_exact_taps(h, size, rgb.device)
    x0, x1, _, wx = _linear_exact_taps(w, size, rgb.device)
    out = torch.empty((b, size, size), device=rgb.device)  # [B, W', H']: written transposed
    total = b * size * size
    with on_device_of(rgb):  # no FMA: x * std + mean rounds twice, as the tensor ops
        kernels.gray_resize[(-(-total // _KERNEL_BLOCK),)](
            rgb, out, _affine(normalization, out), y0, y1, wy, x0, x1, wx, total, size, size,
            *rgb.stride(), NORMALIZED=normalization is not None, BLOCK=_KERNEL_BLOCK,
            enable_fp_fusion=False)
    return out.transpose(1, 2)


def _check_spectral_kernels(kernels, device: torch.device) -> str | None:
    """Why the kernel cannot be trusted on `device` (None: it can): the detector's input with
    it against the tensor ops on the same device, bit for bit and in the same layout (so the
    FFTs after it are the same calls), then one whole detector call both ways. Sizes: up from
    3x3 and 32x32, down from 224x224, non-square, 64x64 itself; 0..255 images, de-normalised
    pixels (quarter steps from -30 to 290, channels last; float32 and bfloat16), NaN and
    infinities; normalised images within an ulp of half grey levels
    (`_half_level_batches`)."""
    g = torch.Generator().manual_seed(20233)
    cases = []
    for n, h, w in ((2, 3, 3), (3, 32, 32), (2, 224, 224), (2, 37, 61), (1, 64, 64)):
        cases.append((torch.rand(n, 3, h, w, generator=g) * 255, None))
        raw = torch.randint(-120, 1161, (n, 3, h, w), generator=g) / 4.0
        raw[0, 1, h // 2, w // 3], raw[-1, 0, 0, 0] = float("nan"), float("inf")
        raw[-1, 2, h - 1, w - 1] = -float("inf")
        cases.append((raw.contiguous(memory_format=torch.channels_last), None))
        cases.append((raw.bfloat16().contiguous(memory_format=torch.channels_last), None))
        cases += [(x, _CHECK_NORMALIZATION) for x in _half_level_batches(n, h, w, g, "cpu")]
    for images, normalization in cases:
        images = images.to(device)  # (keeps the layout)
        want = _gray_resized_ops(images, 64, normalization)
        got = _gray_resized(kernels, images, 64, normalization)
        if not (got.stride() == want.stride() and torch.equal(got.isnan(), want.isnan())
                and torch.equal(got.nan_to_num(), want.nan_to_num())):
            n, _, h, w = images.shape
            return (f"its gray plane of {n} {images.dtype} images of {h}x{w} "
                    f"({'normalised' if normalization else 'pixels'}, {_layout(images)}) "
                    "differs from the tensor ops'")
    images = (torch.rand(3, 3, 40, 56, generator=g) * 255).to(device)
    if not torch.equal(_spectral_residual_with(images, 64, None, kernels),
                       _spectral_residual_with(images, 64, None, None)):
        return "its detector maps differ from the tensor ops'"
    return None


# the spectral residual's input as a Triton kernel where Triton is (SMIX_TRITON=0: tensor ops)
SPECTRAL_KERNELS = CheckedKernels("saliency spectral_residual", _load_detector_kernels,
                                  _check_spectral_kernels)


# -------------------------------------------------------------------------- frequency tuned


def _rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB 0..255 ``[B,3,H,W]`` to CIE Lab (D65, 2 degree observer), as skimage.color.rgb2lab."""
    c = rgb / 255.0
    linear = torch.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = constant((0.412453, 0.357580, 0.180423, 0.212671, 0.715160, 0.072169,
                  0.019334, 0.119193, 0.950227), rgb.dtype, rgb.device, (3, 3))
    white = constant((0.95047, 1.0, 1.08883), rgb.dtype, rgb.device)
    xyz = torch.einsum("ij,bjhw->bihw", m, linear) / white.view(1, 3, 1, 1)
    eps = (6.0 / 29.0) ** 3
    f = torch.where(xyz > eps, xyz.clamp(min=eps) ** (1.0 / 3.0),
                    xyz / (3 * (6.0 / 29.0) ** 2) + 4.0 / 29.0)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


@register_detector("frequency_tuned")
@torch.no_grad()
def frequency_tuned(images: torch.Tensor) -> torch.Tensor:
    """Achanta et al. (CVPR 2009): ||mean Lab colour - blurred Lab pixel||, scaled to [0,1].

    The blur is the paper's 5x5 separable binomial kernel [1,4,6,4,1]/16 (reflect border)."""
    lab = _rgb_to_lab(_as_uint8_grid(_check_images(images)))
    b, _, h, w = lab.shape
    binomial = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)
    blurred = _filter2d_reflect(lab.reshape(b * 3, h, w), binomial).view(b, 3, h, w)
    diff = blurred - lab.mean((2, 3), keepdim=True)
    # the channel norm spelled out: `norm(dim=1)` is a strided reduction, ~40x slower on CPU
    # (measured 15 ms vs 0.4 ms for one 432x432 image)
    sal = (diff[:, 0].square() + diff[:, 1].square() + diff[:, 2].square()).sqrt_()
    return sal / sal.amax((1, 2), keepdim=True).clamp(min=1e-12)  # a flat image stays 0


# --------------------------------------------------------------------------------- gradient


def gradient_saliency(model: nn.Module, images_normalized: torch.Tensor,
                      labels: torch.Tensor, *, eval_mode: bool = False, chunk: int = 0
                      ) -> torch.Tensor:
    """GuidedMixup's "AP" saliency: sqrt(mean over channels of (dCE/dx)^2), ``[B,H,W]``.

    As the official code: one forward+backward in the model's current mode (train mode during
    training, so BatchNorm uses batch statistics) with the batch-mean cross-entropy; ``labels``
    are class indices or soft targets. Unlike the official code, nothing of the model changes:
    the gradient is taken w.r.t. the input only (no ``.grad`` on parameters), BatchNorm running
    statistics are restored, and with ``eval_mode`` every module's mode is restored after.
    Pass the bare module, not a DistributedDataParallel wrapper: its forward arms gradient
    all-reduce hooks that an input-only backward never fires. `chunk` (training in
    micro-batches): at most that many images per pass, each pass's loss weighted by its share
    of the batch, so that every image's gradient is the batch-mean loss's (exactly so without
    BatchNorm; with it, statistics are the chunk's, as in the training passes)."""
    modes = [(m, m.training) for m in model.modules()]
    saved = [buf.detach().clone() for buf in model.buffers()]
    x = images_normalized.detach().clone()
    n = len(x)
    parts = micro_batches(n, chunk)
    grads = []
    try:
        if eval_mode:
            model.eval()
        with torch.enable_grad():
            for part in parts:
                xs = x[part].requires_grad_(True)
                loss = F.cross_entropy(model(xs), labels[part])
                if len(parts) > 1:
                    loss = loss * (len(xs) / n)
                grads.append(torch.autograd.grad(loss, xs)[0])
        grad = grads[0] if len(grads) == 1 else torch.cat(grads)
    finally:
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for buf, old in zip(model.buffers(), saved):
                buf.copy_(old)
    return grad.float().square().mean(1).sqrt()


register_detector("gradient", needs_model=True)(gradient_saliency)
