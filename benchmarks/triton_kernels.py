"""The Triton kernels against the tensor ops they replace, both replayed as CUDA graphs, in
the same process: the greedy pairing walk (GuidedMixup Algorithm 1; 3 kernels per step as
tensor ops), the fine-grained detector on normalised channels-last batches as SaliencyMix
passes them (its de-normalised gray plane blurred twice, about 27 passes as tensor ops, its
padded integral image, on/off sums and mix, about 8 passes per scale and 20 more), the
spectral residual on the same batches (Guided-SR's; its de-normalised gray plane resized to
64x64, about 22 passes as tensor ops; its FFTs and the rest are the same in both),
SaliencyMix's boxes at the map points and per-sample paste (about 30 small kernels), and
GuidedMixup's mask and blend (12 passes as tensor ops).

Per case, timed as single synchronised calls and as K calls per synchronisation (what a
training loop pays per step). Baseline: SMIX_TRITON=0 (tensor ops), same inputs, same
process, interleaved rounds; both results are checked equal before timing, and each line
says whether the kernel really ran (`kernel_ran`: false on CPU, or where it fell back).

    python benchmarks/triton_kernels.py --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from typing import Callable, Iterator

import torch

from smix.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from smix.devices import GraphCache, device_name
from pretrain import greedy, saliency
from pretrain.greedy import guided_maps
from pretrain.mixers import boxes, guidedmixup


@torch.no_grad()
def boxes_and_paste(images: torch.Tensor, points: torch.Tensor, sides: torch.Tensor,
                    perm: torch.Tensor) -> torch.Tensor:
    """SaliencyMix's step after its maps: boxes at the points, then the per-sample paste."""
    h, w = images.shape[2:]
    src, dst, lam = boxes.boxes_at_points(points[0].index_select(0, perm), points[1], sides,
                                          h, w)
    return boxes.paste_permuted(images, perm, src, dst).sum() + lam.sum()


_BOX_GRAPHS = GraphCache(boxes_and_paste, "benchmark boxes")


@torch.no_grad()
def blend_step(images: torch.Tensor, maps: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Guided-SR's step after its maps and pairing: the mask, the blend and λ."""
    mixed, mask = guidedmixup.mask_and_blend(images, maps, perm)
    return mixed.sum() + mask.mean((1, 2, 3)).sum()


_BLEND_GRAPHS = GraphCache(blend_step, "benchmark blend")


@contextlib.contextmanager
def triton(on: bool) -> Iterator[None]:
    """The Triton kernels on or off, with fresh graphs (a captured graph keeps its path)."""
    old = os.environ.get("SMIX_TRITON")
    os.environ["SMIX_TRITON"] = "1" if on else "0"
    caches = (greedy._GREEDY_GRAPHS, saliency._FINE_GRAINED_GRAPHS,
              saliency._SPECTRAL_RESIDUAL_GRAPHS, _BOX_GRAPHS, _BLEND_GRAPHS)
    for c in caches:
        c.entries.clear()
    try:
        yield
    finally:
        for c in caches:
            c.entries.clear()
        if old is None:
            os.environ.pop("SMIX_TRITON")
        else:
            os.environ["SMIX_TRITON"] = old


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


IMAGENET_MEAN_T, IMAGENET_STD_T = (torch.tensor(v).view(1, 3, 1, 1)
                                   for v in (IMAGENET_MEAN, IMAGENET_STD))


def cases(a: argparse.Namespace, device: torch.device):
    """(name, shape label, call, the CheckedKernels whose use is reported)."""
    for n in (int(v) for v in a.walk.split(",") if v):
        maps = torch.rand(n, 32, 32, generator=torch.Generator().manual_seed(n)).to(device)
        yield "greedy_walk", f"{n} maps of 32x32", lambda m=maps: greedy.greedy_from_maps(m), \
            greedy.WALK
    for spec in (v for v in a.detector.split(",") if v):
        n, size = (int(v) for v in spec.split("x"))
        g = torch.Generator().manual_seed(size)
        low = torch.rand(n, 3, size // 8, size // 8, generator=g) * 255
        x = torch.nn.functional.interpolate(low, size=size, mode="bilinear")
        x = ((x / 255 - IMAGENET_MEAN_T) / IMAGENET_STD_T).to(device).contiguous(
            memory_format=torch.channels_last)
        for name, kernels in (("fine_grained", saliency.FINE_GRAINED_KERNELS),
                              ("spectral_residual", saliency.SPECTRAL_KERNELS)):
            yield name, f"{n} normalised images of {size}x{size}, channels last", \
                lambda x=x, name=name: saliency.normalized_saliency(
                    name, x, IMAGENET_MEAN, IMAGENET_STD), kernels
    for spec in (v for v in a.boxes.split(",") if v):
        n, size = (int(v) for v in spec.split("x"))
        g = torch.Generator().manual_seed(size + 1)
        images = torch.randn(n, 3, size, size, generator=g).to(device).contiguous(
            memory_format=torch.channels_last)
        points = torch.randint(0, size * size, (2, n), generator=g).to(device)
        sides = torch.randint(0, size + 1, (2, n), generator=g).to(device)
        perm = torch.randperm(n, generator=g).to(device)
        yield "boxes_and_paste", f"{n} images of {size}x{size}, channels last", \
            lambda args=(images, points, sides, perm): _BOX_GRAPHS(*args).view(1), \
            boxes.BOX_KERNELS
    for spec in (v for v in a.blend.split(",") if v):
        n, size = (int(v) for v in spec.split("x"))
        g = torch.Generator().manual_seed(size + 2)
        images = torch.randn(n, 3, size, size, generator=g).to(device).contiguous(
            memory_format=torch.channels_last)
        maps = guided_maps(torch.rand(n, size, size, generator=g) * 255).to(device)
        perm = torch.randperm(n, generator=g).to(device)
        yield "mask_and_blend", f"{n} images of {size}x{size}, channels last", \
            lambda args=(images, maps, perm): _BLEND_GRAPHS(*args).view(1), \
            guidedmixup.BLEND_KERNELS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--walk", default="64,256", help="batch sizes of the greedy walk")
    ap.add_argument("--detector", default="64x32,32x224,256x224",
                    help="fine-grained batches, NxSIZE")
    ap.add_argument("--boxes", default="64x32,32x224,256x224",
                    help="boxes-and-paste batches, NxSIZE")
    ap.add_argument("--blend", default="64x32,32x224,256x224",
                    help="mask-and-blend batches, NxSIZE")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pipeline", type=int, default=16)
    a = ap.parse_args()
    device = torch.device(a.device)
    for name, shape, call, checked in cases(a, device):
        if device.type != "cuda":  # the kernels run on CUDA only: nothing to compare
            print(json.dumps({"benchmark": "triton_kernels", "case": name, "shape": shape,
                              "device": device.type, "device_name": device_name(device),
                              "kernel_ran": False, "note": "Triton kernels run on CUDA only"}),
                  flush=True)
            continue
        results = {}
        for on in (True, False):  # warm-up, capture, and the same result both ways
            with triton(on):
                results[on] = call().cpu()
        assert torch.equal(results[True], results[False]), f"{name}: the two paths disagree"
        single: dict[bool, list[float]] = {True: [], False: []}
        piped: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(a.rounds):
            for on in (True, False):
                with triton(on):
                    call()  # capture outside the timing
                    single[on].append(timed(call, 1, device))
                    piped[on].append(timed(call, a.pipeline, device))
        med = {k: (statistics.median(single[k]), statistics.median(piped[k])) for k in single}
        print(json.dumps({
            "benchmark": "triton_kernels", "case": name, "shape": shape, "device": device.type,
            "device_name": device_name(device), "rounds": a.rounds, "pipeline": a.pipeline,
            "baseline": "tensor ops (SMIX_TRITON=0), same process",
            "kernel_ran": device.type == "cuda" and checked.get(device) is not None,
            "kernel_ms": round(med[True][0] * 1e3, 4),
            "tensor_ops_ms": round(med[False][0] * 1e3, 4),
            "speedup": round(med[False][0] / med[True][0], 2),
            "kernel_pipelined_ms": round(med[True][1] * 1e3, 4),
            "tensor_ops_pipelined_ms": round(med[False][1] * 1e3, 4),
            "speedup_pipelined": round(med[False][1] / med[True][1], 2)}), flush=True)


if __name__ == "__main__":
    main()
