"""How many device operations a mixer call launches, and how many of them run inside a CUDA
graph (one launch for all) or outside one (a launch each), counted without a GPU.

The call runs on 'meta' tensors (shapes, no data) under a dispatch mode that counts every
operation producing or reading a device tensor (views, host draws and allocations excluded).
`smix.devices.GraphCache` is told to treat meta like CUDA: its function runs eagerly, and its
operations (nested graphs included) are counted as one graph's. Counted twice: with tensor ops
only (CPU, SMIX_TRITON=0), and with the kernels as CUDA runs where Triton is: the greedy walk
one kernel instead of 3(n-2) tensor ops; the fine-grained detector's de-normalised gray plane
blurred twice two, its on/off sums and mix two (around two cumsums and the maxima); the
spectral residual's de-normalised gray plane resized one; SaliencyMix's boxes at the map points
one, its paste one; GuidedMixup's mask and blend one (stand-ins count the launches).
`graph_copies_per_call`: a replay's copies of its inputs into the graph and clones of its
outputs (a launch each, outside the graph, on top of `launches_outside_graphs` and the graph's
own launch). A count, not a timing: each launch outside a graph costs the host a few
microseconds on a GPU, each kernel in a graph about a microsecond of device time (timed on a
GPU: mixer_profile.py).

    python benchmarks/mixer_launches.py [--batch 64 --size 32]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
from typing import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from smix import devices
from smix.data import CIFAR10_MEAN, CIFAR10_STD
from pretrain import greedy, saliency
from pretrain.mixers import MixContext, boxes, get_mixer, guidedmixup

METHODS = {"cutmix": ("cutmix", {}), "mixup": ("mixup", {}),
           "saliencymix-batch": ("saliencymix", {"mode": "batch"}),
           "saliencymix-sample": ("saliencymix", {"mode": "sample"}),
           "guided-sr-greedy": ("guidedmixup", {"saliency": "sr", "pairing": "greedy"}),
           "guided-sr-random": ("guidedmixup", {"saliency": "sr", "pairing": "random"})}
aten = torch.ops.aten
FREE = {aten.view.default, aten.slice.Tensor, aten.select.int, aten.unsqueeze.default,
        aten.squeeze.dim, aten.squeeze.default, aten.expand.default, aten.t.default,
        aten.alias.default, aten.as_strided.default, aten.permute.default,
        aten._unsafe_view.default, aten.detach.default, aten.unbind.int, aten.split.Tensor,
        aten.reshape.default, aten.lift_fresh.default, aten.is_pinned.default,
        # allocations: memory from the caching allocator, no kernel
        aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
        aten.new_empty.default, aten.new_empty_strided.default}


class CountLaunches(TorchDispatchMode):
    """Device operations, split into those inside a graph (`depth` > 0) and outside."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = self.outside = self.graphs = self.depth = self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [a for a in (*args, out) if isinstance(a, torch.Tensor)]
        if func not in FREE and any(t.device.type == "meta" for t in tensors):
            if self.depth:
                self.inside += 1
            else:
                self.outside += 1
        return out


class StandIn:
    """A Triton kernel on meta tensors: one launch, counted, writing nothing."""

    def __init__(self, counter: CountLaunches) -> None:
        self.counter = counter

    def __getattr__(self, name: str) -> "StandIn":  # kernels.on_off_sums, ...
        return self

    def __getitem__(self, grid) -> Callable[..., None]:
        def launch(*args, **kwargs) -> None:
            if self.counter.depth:
                self.counter.inside += 1
            else:
                self.counter.outside += 1
        return launch


@contextlib.contextmanager
def kernels_as_on_cuda(counter: CountLaunches) -> Iterator[None]:
    """The Triton kernels' paths, as CUDA takes them, on meta tensors: the fine-grained and
    spectral-residual detectors', the boxes', the greedy walk's and GuidedMixup's blend, each
    launch counted as one."""
    stand_in = StandIn(counter)
    real_boxes, real_blend = boxes._kernels_for, guidedmixup._blend_kernels_for
    boxes._kernels_for = guidedmixup._blend_kernels_for = lambda *tensors: stand_in
    graphs, spectral = saliency._FINE_GRAINED_GRAPHS, saliency._SPECTRAL_RESIDUAL_GRAPHS
    real_fine, real_spectral, real_cycle = graphs.fn, spectral.fn, greedy.greedy_cycle
    graphs.fn = lambda images, saturate=False, normalization=None: \
        saliency._fine_grained_with(images, saturate, stand_in, normalization=normalization)
    spectral.fn = lambda images, size=64, normalization=None: \
        saliency._spectral_residual_with(images, size, normalization, stand_in)
    greedy.greedy_cycle = functools.partial(real_cycle, use_kernel=True)
    real_get = greedy.WALK.get
    greedy.WALK.get = lambda device: stand_in
    try:
        yield
    finally:
        graphs.fn, spectral.fn, greedy.greedy_cycle = real_fine, real_spectral, real_cycle
        greedy.WALK.get, boxes._kernels_for = real_get, real_boxes
        guidedmixup._blend_kernels_for = real_blend


def count(mixer, x, y, ctx, seed: int, on_cuda: bool) -> CountLaunches:
    counter = CountLaunches()
    real = devices.GraphCache.__call__

    def as_graph(cache, *args, **kwargs):  # meta stands for CUDA: one graph per outer call
        outer = counter.depth == 0
        counter.graphs += outer
        counter.depth += 1
        try:
            out = cache.fn(*args, **kwargs)
        finally:
            counter.depth -= 1
        if outer:  # a replay copies each input into the graph and clones each output out
            outs = out if isinstance(out, (tuple, list)) else (out,)
            counter.copies += sum(isinstance(t, torch.Tensor) for t in (*args, *outs))
        return out

    devices.GraphCache.__call__ = as_graph
    try:
        with kernels_as_on_cuda(counter) if on_cuda else contextlib.nullcontext(), counter:
            mixer(x, y, torch.Generator().manual_seed(seed), ctx)
    finally:
        devices.GraphCache.__call__ = real
    return counter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    a = ap.parse_args()
    x = torch.empty(a.batch, 3, a.size, a.size, device="meta")
    y = torch.empty(a.batch, dtype=torch.long, device="meta")
    ctx = MixContext(CIFAR10_MEAN, CIFAR10_STD, 10)
    for name, (method, params) in METHODS.items():
        mixer = get_mixer(method, **params)
        mixer(x, y, torch.Generator().manual_seed(0), ctx)  # caches, plans
        ops, cuda = count(mixer, x, y, ctx, 1, False), count(mixer, x, y, ctx, 1, True)
        print(json.dumps({"benchmark": "mixer_launches", "device": "meta", "method": name,
                          "batch": a.batch, "size": a.size, "graphs_per_call": ops.graphs,
                          "ops_in_graphs": ops.inside, "launches_outside_graphs": ops.outside,
                          "graph_copies_per_call": ops.copies,
                          "ops_in_graphs_with_kernels": cuda.inside,
                          "launches_outside_graphs_with_kernels": cuda.outside}), flush=True)


if __name__ == "__main__":
    main()
