"""Augmentation overhead per training step, as GuidedMixup's Table 2 defines it:
overhead = (T_method - T_none) / T_none, T = one step (mixer + forward + backward + SGD step).

Baseline: method `none` on the same model, batch and process. For ResNet-18 CIFAR (batch 64,
32²) and ResNet-50 (batch 32, 224²), every mixer, plus the reference path of per-sample
SaliencyMix done the usual way (OpenCV fine-grained per image on CPU numpy, per-sample boxes).
Full steps are timed interleaved (warm-up first; each round times `none`, every method in
alternating order, `none` again; medians over rounds), so machine noise hits every method
alike. Because a few-% effect drowns in the noise of a handful of multi-second steps on a busy
CPU, the mixer alone is also timed (median of more repeats): the convolutions cost the same
whatever the pixels, so T_method = T_none + T_mix and `overhead_mix` = T_mix / T_none
estimates the same quantity with less variance; the goals are checked on it. On CUDA the
mixers replay CUDA graphs (`smix.devices.GraphCache`); each mixer is also timed with them
switched off in the same rounds (`t_mix_eager_s`, `overhead_mix_eager`), and the methods of
the goals with the Triton kernels off (SMIX_TRITON=0, tensor ops in graphs of their own:
`t_mix_tensor_ops_s`, `overhead_mix_tensor_ops`, and pipelined): what the kernels save.
Each mixer is also timed as `apply(sample(...))` in the same rounds (`t_mix_two_pass_s`,
`overhead_mix_two_pass`, and pipelined): a call that SaliencyMix and Guided-SR now make in one
pass (one upload, one graph), the others in the same two steps as before.

Pipelined figures (`--pipeline K`, default 16 on CUDA, 1 on CPU). A synchronised single call
costs host time + device time + the wake-up, where a training loop never waits for the device
between steps: the host queues step k+1 while the GPU runs step k. So on CUDA each timed sample
is also K consecutive calls and one synchronisation, divided by K: `t_step_pipelined_s` /
`overhead_pipelined` for full steps (what training with the method costs, per step) and
`t_mix_pipelined_s` / `overhead_mix_pipelined` for the mixer alone (max of its host and device
time per call). The single-call figures stay as they were, comparable with earlier runs. The
OpenCV rows (`HOST_BOUND`: they copy to the host and back by design) are not pipelined.

On CUDA cuDNN's benchmark mode is on, as the engine trains (`cudnn_benchmark`).
One JSON line per (device, model, method), naming the device (the card, or the CPU model).
`--quick` is a CI-sized run (tiny batches). On CUDA the mixers make no host round-trip
(tests/test_mixers_nosync.py), so `t_mix` is the time of their kernels, not of a drained queue.

    python benchmarks/aug_overhead.py [--quick] [--models r18,r50] [--device cpu|cuda|all]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import time
import warnings
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from smix.arch import build_model
from smix.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from smix.data import CIFAR10_MEAN, CIFAR10_STD
from smix.devices import GraphCache, device_name, graphs_enabled
from pretrain.engine import mixed_loss
from pretrain.mixers import MixContext, Mixer, MixOutput, get_mixer

MixFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator, MixContext], MixOutput]

METHODS: list[tuple[str, str, dict[str, str]]] = [
    ("none", "none", {}),
    ("cutout", "cutout", {}),
    ("mixup", "mixup", {}),
    ("cutmix", "cutmix", {}),
    ("saliencymix-official", "saliencymix", {"mode": "official"}),
    ("saliencymix-batch", "saliencymix", {"mode": "batch"}),
    ("saliencymix-sample", "saliencymix", {"mode": "sample"}),
    ("guided-sr-random", "guidedmixup", {"saliency": "sr", "pairing": "random"}),
    ("guided-sr-greedy", "guidedmixup", {"saliency": "sr", "pairing": "greedy"}),
    ("guided-ap-greedy", "guidedmixup", {"saliency": "ap", "pairing": "greedy"}),
]
REFERENCE = "reference-opencv-sample"
HOST_BOUND = ("saliencymix-official", REFERENCE)  # OpenCV on the host: nothing to pipeline
GOALS = {"cutmix": 0.03, "saliencymix-sample": 0.03, "guided-sr-greedy": 0.05}  # issue 14


@dataclasses.dataclass(frozen=True)
class Setting:
    model: str
    arch: str
    batch: int
    size: int
    classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    repeats: int  # full-step rounds
    mix_repeats: int  # mixer-only repeats


def settings(quick: bool, r18_repeats: int, r50_repeats: int,
             mix_repeats: int | None = None) -> dict[str, Setting]:
    if quick:
        return {"r18": Setting("resnet18-cifar", "cifar_resnet18", 8, 32, 10, CIFAR10_MEAN,
                               CIFAR10_STD, 1, 2),
                "r50": Setting("resnet50", "resnet50", 4, 64, 1000, IMAGENET_MEAN, IMAGENET_STD,
                               1, 2)}
    return {"r18": Setting("resnet18-cifar", "cifar_resnet18", 64, 32, 10, CIFAR10_MEAN,
                           CIFAR10_STD, r18_repeats, mix_repeats or 5),
            "r50": Setting("resnet50", "resnet50", 32, 224, 1000, IMAGENET_MEAN, IMAGENET_STD,
                           r50_repeats, mix_repeats or 3)}


def reference_saliencymix(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator,
                          ctx: MixContext) -> MixOutput:
    """Per-sample SaliencyMix the straightforward way: to CPU numpy, per image uint8 BGR,
    OpenCV fine-grained map, argmax, box, paste; back to the device."""
    import cv2
    x = images.detach().cpu().numpy()
    b, _, h, w = x.shape
    lam = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen))).beta(1, 1, b)
    perm = torch.randperm(b, generator=gen).numpy()
    mean, std = np.array(ctx.mean).reshape(3, 1, 1), np.array(ctx.std).reshape(3, 1, 1)
    out, lam_actual = x.copy(), np.empty(b)
    detector = cv2.saliency.StaticSaliencyFineGrained_create()
    for i in range(b):
        src = x[perm[i]]
        pix = np.clip(np.rint((src * std + mean) * 255), 0, 255).astype(np.uint8)
        _, sal = detector.computeSaliency(np.ascontiguousarray(pix.transpose(1, 2, 0)[..., ::-1]))
        cy, cx = np.unravel_index(np.argmax(sal), sal.shape)
        cut = math.sqrt(1.0 - lam[i])
        ch, cw = int(h * cut), int(w * cut)
        y0, y1 = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch // 2, 0, h)
        x0, x1 = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw // 2, 0, w)
        out[i, :, y0:y1, x0:x1] = src[:, y0:y1, x0:x1]
        lam_actual[i] = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    perm_t = torch.from_numpy(perm).to(labels.device)
    return MixOutput(torch.from_numpy(out).to(images.device), labels, labels[perm_t],
                     torch.from_numpy(lam_actual).float().to(images.device))


def has_opencv_saliency() -> bool:
    try:
        import cv2
    except ImportError:
        return False
    return hasattr(cv2, "saliency")


def mixers(setting: Setting) -> dict[str, MixFn]:
    """Every method of the table; the two OpenCV rows only where cv2.saliency exists."""
    opencv = has_opencv_saliency()
    fns: dict[str, MixFn] = {}
    for label, name, params in METHODS:
        if params.get("mode") == "official" and not opencv:
            continue
        extra = {"prob": "1.0"} if name != "none" else {}
        if name == "cutout":
            extra["size"] = str(setting.size // 2)
        fns[label] = get_mixer(name, **params, **extra)
    if opencv:
        fns[REFERENCE] = reference_saliencymix
    return fns


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batch(setting: Setting, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random pixel images, normalised (costs do not depend on the content)."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand(setting.batch, 3, 8, 8, generator=g)
    pix = torch.nn.functional.interpolate(low, size=setting.size, mode="bilinear")
    pix = (pix + 0.05 * torch.rand(pix.shape, generator=g)).clamp(0, 1)
    m = torch.tensor(setting.mean).view(1, 3, 1, 1)
    s = torch.tensor(setting.std).view(1, 3, 1, 1)
    y = torch.randint(0, setting.classes, (setting.batch,), generator=g)
    return ((pix - m) / s).to(device), y.to(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def timed_many(fn: Callable[[int], object], count: int, device: torch.device) -> float:
    """Seconds per call of `count` calls queued back to back (seeds 0..count-1), one sync."""
    sync(device)
    start = time.perf_counter()
    for k in range(count):
        fn(k)
    sync(device)
    return (time.perf_counter() - start) / count


def measure(setting: Setting, device: torch.device, bar: tqdm, verbose: bool = False,
            pipeline: int = 1) -> dict[str, dict[str, float]]:
    """Median full-step and mixer-only times per method, interleaved; with `pipeline` > 1 also
    per call of `pipeline` calls between synchronisations, in the same rounds."""
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as the engine trains on CUDA
    model = build_model(setting.arch, setting.classes).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    ctx = MixContext(setting.mean, setting.std, setting.classes, model)
    x, y = make_batch(setting, device)
    fns = mixers(setting)

    def step(fn: MixFn, seed: int) -> None:
        out = fn(x, y, torch.Generator().manual_seed(seed), ctx)
        loss = mixed_loss(model(out.images), out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for fn in fns.values():  # warm-up of every path timed below: lazy imports, caches and
        # graph captures (apply(sample(...)) and the eager path have caches of their own)
        fn(x, y, torch.Generator().manual_seed(0), ctx)
        if isinstance(fn, Mixer):
            fn.apply(x, y, fn.sample(x, y, torch.Generator().manual_seed(0), ctx))
        if device.type == "cuda":
            with graphs_off():
                fn(x, y, torch.Generator().manual_seed(0), ctx)
    kernels_off = [k for k in fns if k in GOALS and device.type == "cuda"]
    with tensor_ops():  # their own graphs, captured here, not in a timed call
        for k in kernels_off:
            fns[k](x, y, torch.Generator().manual_seed(0), ctx)
    for _ in range(2):  # warm-up, last before timing: allocator, kernels, page faults
        timed(lambda: step(fns["none"], 0), device)
    steps: dict[str, list[float]] = {k: [] for k in fns}
    mix: dict[str, list[float]] = {k: [] for k in fns}
    steps_pipe: dict[str, list[float]] = {k: [] for k in fns}
    mix_pipe: dict[str, list[float]] = {k: [] for k in fns}
    others = [k for k in fns if k != "none"]
    for r in range(setting.repeats):
        # `none` brackets every round; the others alternate direction (no position bias)
        order = ["none", *(others if r % 2 == 0 else reversed(others)), "none"]
        for name in order:
            steps[name].append(timed(lambda: step(fns[name], r + 1), device))
            if pipeline > 1 and name not in HOST_BOUND:
                steps_pipe[name].append(timed_many(
                    lambda k: step(fns[name], 1000 * (r + 1) + k), pipeline, device))
            if verbose:
                tqdm.write(f"{setting.model} {name} {steps[name][-1]:.3f}s")
            bar.update(1)
    mix_once = lambda name, r: timed(
        lambda: fns[name](x, y, torch.Generator().manual_seed(r), ctx), device)
    eager: dict[str, list[float]] = {k: [] for k in fns}
    two_pass: dict[str, list[float]] = {k: [] for k in fns}
    two_pass_pipe: dict[str, list[float]] = {k: [] for k in fns}
    off: dict[str, list[float]] = {k: [] for k in fns}
    off_pipe: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(setting.mix_repeats):
        for name in fns:
            mix[name].append(mix_once(name, r))
            if pipeline > 1 and name not in HOST_BOUND:
                mix_pipe[name].append(timed_many(
                    lambda k: fns[name](x, y, torch.Generator().manual_seed(1000 * r + k), ctx),
                    pipeline, device))
            if device.type == "cuda":  # the same mixer without CUDA graphs, same round
                with graphs_off():
                    eager[name].append(mix_once(name, r))
            if name in kernels_off:  # the same mixer with tensor ops for the kernels, same round
                with tensor_ops():
                    off[name].append(mix_once(name, r))
                    if pipeline > 1:
                        off_pipe[name].append(timed_many(
                            lambda k: fns[name](x, y, torch.Generator().manual_seed(1000 * r + k),
                                                ctx), pipeline, device))
            m = fns[name]
            if isinstance(m, Mixer):  # apply(sample(...)): the call before the one-pass fusion
                two = lambda gen, m=m: m.apply(x, y, m.sample(x, y, gen, ctx))
                two_pass[name].append(timed(lambda: two(torch.Generator().manual_seed(r)),
                                            device))
                if pipeline > 1:
                    two_pass_pipe[name].append(timed_many(
                        lambda k: two(torch.Generator().manual_seed(1000 * r + k)), pipeline,
                        device))
        bar.update(1)
    times = {k: {"t_step": statistics.median(steps[k]), "t_mix": statistics.median(mix[k])}
             for k in fns}
    for k in fns:
        if eager[k]:
            times[k]["t_mix_eager"] = statistics.median(eager[k])
        if off[k]:
            times[k]["t_mix_tensor_ops"] = statistics.median(off[k])
        if off_pipe[k]:
            times[k]["t_mix_tensor_ops_pipelined"] = statistics.median(off_pipe[k])
        if two_pass[k]:
            times[k]["t_mix_two_pass"] = statistics.median(two_pass[k])
        if two_pass_pipe[k]:
            times[k]["t_mix_two_pass_pipelined"] = statistics.median(two_pass_pipe[k])
        if steps_pipe[k]:
            times[k]["t_step_pipelined"] = statistics.median(steps_pipe[k])
            times[k]["t_mix_pipelined"] = statistics.median(mix_pipe[k])
    return times


@contextlib.contextmanager
def graphs_off() -> Iterator[None]:
    """Run the block eagerly (SMIX_CUDA_GRAPHS=0), as before the graphs existed."""
    old = os.environ.get("SMIX_CUDA_GRAPHS")
    os.environ["SMIX_CUDA_GRAPHS"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SMIX_CUDA_GRAPHS")
        else:
            os.environ["SMIX_CUDA_GRAPHS"] = old


@contextlib.contextmanager
def tensor_ops() -> Iterator[None]:
    """Run the block with the Triton kernels off (SMIX_TRITON=0), on CUDA graphs of its own: a
    captured graph keeps the path it captured, so every `GraphCache` swaps its graphs for a
    second set while the block runs."""
    with warnings.catch_warnings():  # isinstance on some of torch's objects warns
        warnings.simplefilter("ignore")
        caches = [o for o in gc.get_objects() if isinstance(o, GraphCache)]
    old = os.environ.get("SMIX_TRITON")
    os.environ["SMIX_TRITON"] = "0"
    for c in caches:
        c.entries, c.other_entries = getattr(c, "other_entries", collections.OrderedDict()), \
            c.entries
    try:
        yield
    finally:
        for c in caches:
            c.entries, c.other_entries = c.other_entries, c.entries
        if old is None:
            os.environ.pop("SMIX_TRITON")
        else:
            os.environ["SMIX_TRITON"] = old


def report(setting: Setting, device: torch.device, times: dict[str, dict[str, float]],
           pipeline: int = 1) -> None:
    t_none = times["none"]["t_step"]
    for name, t in times.items():
        line = {"benchmark": "aug_overhead", "device": device.type,
                "device_name": device_name(device), "model": setting.model,
                "batch": setting.batch, "size": setting.size, "method": name,
                "t_step_s": round(t["t_step"], 4), "t_none_s": round(t_none, 4),
                "overhead": round((t["t_step"] - t_none) / t_none, 4),
                "t_mix_s": round(t["t_mix"], 5),
                "overhead_mix": round((t["t_mix"] - times["none"]["t_mix"]) / t_none, 4),
                "cuda_graphs": device.type == "cuda" and graphs_enabled(),
                "cudnn_benchmark": torch.backends.cudnn.benchmark,
                "baseline": "none (same model, batch and process)",
                "rounds": setting.repeats, "mix_repeats": setting.mix_repeats,
                "threads": torch.get_num_threads(),
                "load_avg_1m": round(os.getloadavg()[0], 2)}
        if "t_mix_eager" in t:  # same run, graphs off: what the graphs save
            line["t_mix_eager_s"] = round(t["t_mix_eager"], 5)
            line["overhead_mix_eager"] = round(
                (t["t_mix_eager"] - times["none"]["t_mix_eager"]) / t_none, 4)
        if "t_mix_tensor_ops" in t:  # same rounds, SMIX_TRITON=0: what the kernels save
            line["t_mix_tensor_ops_s"] = round(t["t_mix_tensor_ops"], 5)
            line["overhead_mix_tensor_ops"] = round(
                (t["t_mix_tensor_ops"] - times["none"]["t_mix"]) / t_none, 4)
        if "t_mix_tensor_ops_pipelined" in t:
            line["overhead_mix_tensor_ops_pipelined"] = round(
                (t["t_mix_tensor_ops_pipelined"] - times["none"]["t_mix_pipelined"])
                / times["none"]["t_step_pipelined"], 4)
        if "t_mix_two_pass" in t:  # same rounds, apply(sample(...)) instead of the call
            line["t_mix_two_pass_s"] = round(t["t_mix_two_pass"], 5)
            line["overhead_mix_two_pass"] = round(
                (t["t_mix_two_pass"] - times["none"]["t_mix_two_pass"]) / t_none, 4)
        if "t_mix_two_pass_pipelined" in t:
            line["overhead_mix_two_pass_pipelined"] = round(
                (t["t_mix_two_pass_pipelined"] - times["none"]["t_mix_two_pass_pipelined"])
                / times["none"]["t_step_pipelined"], 4)
        if "t_step_pipelined" in t:  # K calls per sync: what a training loop pays
            none = times["none"]
            line["pipeline"] = pipeline
            line["t_step_pipelined_s"] = round(t["t_step_pipelined"], 5)
            line["overhead_pipelined"] = round(
                (t["t_step_pipelined"] - none["t_step_pipelined"]) / none["t_step_pipelined"], 4)
            line["t_mix_pipelined_s"] = round(t["t_mix_pipelined"], 6)
            line["overhead_mix_pipelined"] = round(
                (t["t_mix_pipelined"] - none["t_mix_pipelined"]) / none["t_step_pipelined"], 4)
        if name in GOALS and device.type == "cuda":  # the goals are an H100's/H200's
            line["goal"] = GOALS[name]
            line["goal_met"] = bool(line["overhead_mix"] <= GOALS[name])
            if "overhead_mix_pipelined" in line:
                line["goal_met_pipelined"] = bool(line["overhead_mix_pipelined"] <= GOALS[name])
        print(json.dumps(line), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI-sized batches and repeats")
    p.add_argument("--models", default="r18,r50", help="comma list of r18, r50")
    p.add_argument("--device", default="all", help="cpu, cuda, or all (cpu + cuda if present)")
    p.add_argument("--r18-repeats", type=int, default=3, help="full-step rounds, ResNet-18")
    p.add_argument("--r50-repeats", type=int, default=1, help="full-step rounds, ResNet-50")
    p.add_argument("--mix-repeats", type=int, default=None,
                   help="mixer-only repeats (default 5 for ResNet-18, 3 for ResNet-50)")
    p.add_argument("--pipeline", type=int, default=None,
                   help="also time this many calls per synchronisation (default: 16 on CUDA, "
                        "off on CPU)")
    p.add_argument("--verbose", action="store_true", help="print every timed step (stderr)")
    a = p.parse_args()
    devices = (["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
               if a.device == "all" else [a.device])
    chosen = settings(a.quick, a.r18_repeats, a.r50_repeats, a.mix_repeats)
    if not has_opencv_saliency():
        print("# cv2.saliency missing (opencv-contrib): the official and OpenCV rows are left out",
              file=sys.stderr)
    runs = [(chosen[m.strip()], torch.device(d)) for d in devices for m in a.models.split(",")]
    total = sum((s.repeats * (len(mixers(s)) + 1)) + s.mix_repeats for s, _ in runs)
    with tqdm(total=total, desc="aug_overhead", unit="step", leave=False) as bar:
        for setting, device in runs:
            k = a.pipeline if a.pipeline is not None else (16 if device.type == "cuda" else 1)
            report(setting, device, measure(setting, device, bar, a.verbose, k), k)


if __name__ == "__main__":
    main()
