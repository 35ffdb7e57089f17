"""Where a mixer's time goes per call: host (Python + dispatch + launches) or device (kernels).

`aug_overhead.py` says how much a mixer costs; this says why, so that the next cut aims right.
For each method at one setting (ResNet-18 CIFAR batch 64 by default, the setting whose goals are
the hardest), `--calls` calls are profiled with `torch.profiler` after a warm-up (CUDA graphs
captured). One JSON line per method: wall ms per call (synchronised), host ms per call (the
profiler's CPU time of the top-level ops), device ms per call (kernel time), kernels and graph
launches per call, and the top ops by host and by device time. Baseline: method `none`, same
process (its wall time is the fixed cost of a call and a synchronisation). Three last lines
profile host draws enqueued to the device (`smix.devices.upload`: pinning and a non-blocking
copy), the step every mixer takes for its permutation and λ: one upload (`upload-perm`), two
(`upload-perm-lam`, as CutMix and Mixup do), and the two packed into one (`upload-packed`).

    python benchmarks/mixer_profile.py --device cuda
    python benchmarks/mixer_profile.py --device cpu --calls 5          # a smoke run
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from smix.arch import build_model
from smix.data import CIFAR10_MEAN, CIFAR10_STD
from smix.devices import device_name, upload
from pretrain.mixers import MixContext, get_mixer

METHODS = {"none": ("none", {}), "mixup": ("mixup", {}), "cutmix": ("cutmix", {}),
           "saliencymix-batch": ("saliencymix", {"mode": "batch"}),
           "saliencymix-sample": ("saliencymix", {"mode": "sample"}),
           "guided-sr-greedy": ("guidedmixup", {"saliency": "sr", "pairing": "greedy"})}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def on_device(event) -> bool:
    """A kernel's (or copy's) own row. Kineto also adds each kernel's time to the CPU op that
    launched it, so summing every row's device time counts each kernel twice; torch's own
    table total keeps only these rows, as this does."""
    return (getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA
            and not getattr(event, "is_user_annotation", False))


def top(events, key: str, n: int = 8) -> list[list]:
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:n]
    return [[e.key, e.count, round(getattr(e, key) / 1000, 3)] for e in rows if getattr(e, key) > 0]


def profile_method(mix, x, y, ctx, device: torch.device, calls: int) -> dict:
    for k in range(3):  # warm-up: caches, graph capture
        mix(x, y, torch.Generator().manual_seed(k), ctx)
    sync(device)
    start = time.perf_counter()
    for k in range(calls):
        mix(x, y, torch.Generator().manual_seed(k), ctx)
    sync(device)
    wall = (time.perf_counter() - start) / calls
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for k in range(calls):
            mix(x, y, torch.Generator().manual_seed(k), ctx)
        sync(device)
    events = prof.key_averages()
    device_rows = [e for e in events if on_device(e)]
    device_us = sum(e.self_device_time_total for e in device_rows)
    kernels = sum(e.count for e in device_rows)
    host_us = sum(e.self_cpu_time_total for e in events)
    graphs = sum(e.count for e in events if "cudaGraphLaunch" in e.key)
    return {"wall_ms_per_call": round(wall * 1000, 4),
            "host_ms_per_call": round(host_us / calls / 1000, 4),
            "device_ms_per_call": round(device_us / calls / 1000, 4),
            "kernels_per_call": round(kernels / calls, 1),
            "graph_launches_per_call": round(graphs / calls, 2),
            "top_host_ms": top(events, "self_cpu_time_total"),
            "top_device_ms": top(device_rows, "self_device_time_total")}


def _upload_perm(images, labels, gen, ctx, device):
    """One host draw enqueued to the device (pinning + H2D copy)."""
    return upload(torch.randperm(len(labels), generator=gen), device)


def _upload_perm_lam(images, labels, gen, ctx, device):
    """Two draws, two uploads: what CutMix and Mixup enqueue per call (perm, λ)."""
    perm, lam = torch.randperm(len(labels), generator=gen), torch.rand(len(labels), generator=gen)
    return upload(perm, device), upload(lam, device)


def _upload_packed(images, labels, gen, ctx, device):
    """The same two draws packed into one byte buffer, one upload, viewed apart on the device:
    the candidate if `upload-perm-lam` costs about twice `upload-perm`."""
    perm, lam = torch.randperm(len(labels), generator=gen), torch.rand(len(labels), generator=gen)
    buf = upload(torch.cat([perm.view(torch.uint8), lam.view(torch.uint8)]), device)
    return buf[:perm.numel() * 8].view(torch.int64), buf[perm.numel() * 8:].view(torch.float32)


UPLOADS = {"upload-perm": _upload_perm, "upload-perm-lam": _upload_perm_lam,
           "upload-packed": _upload_packed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", default="cifar_resnet18")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--methods", default=",".join(METHODS))
    a = ap.parse_args()
    device = torch.device(a.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as the engine trains on CUDA
    model = build_model(a.arch, 10).to(device)
    ctx = MixContext(CIFAR10_MEAN, CIFAR10_STD, 10, model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 3, a.size, a.size, generator=g).to(device)
    y = torch.randint(0, 10, (a.batch,), generator=g).to(device)
    base = None
    for name in a.methods.split(",") + list(UPLOADS):
        if name in UPLOADS:
            mix = functools.partial(UPLOADS[name], device=device)
        else:
            method, params = METHODS[name]
            mix = get_mixer(method, **params)
        line = profile_method(mix, x, y, ctx, device, a.calls)
        base = base if base is not None else line["wall_ms_per_call"]
        print(json.dumps({"benchmark": "mixer_profile", "device": device.type,
                          "device_name": device_name(device), "arch": a.arch, "batch": a.batch,
                          "size": a.size, "method": name, "calls": a.calls,
                          "cudnn_benchmark": torch.backends.cudnn.benchmark,
                          "baseline": f"{a.methods.split(',')[0]} wall ms per call, same process",
                          "wall_minus_baseline_ms": round(line["wall_ms_per_call"] - base, 4),
                          **line}), flush=True)


if __name__ == "__main__":
    main()
