"""How many device operations a mixer call launches, and how many of them run inside a CUDA
graph (one launch for all) or outside one (a launch each), counted without a GPU.

The call runs on 'meta' tensors (shapes, no data) under a dispatch mode that counts every
operation producing or reading a device tensor (views, host draws and allocations excluded).
`smix.devices.GraphCache` is told to treat meta like CUDA: its function runs eagerly, and its
operations (nested graphs included) are counted as one graph's. On CUDA the greedy walk is one
Triton kernel (where it runs) instead of its 3(n-2) tensor ops: `ops_in_graphs_on_cuda`. A
count, not a timing: each launch outside a graph costs the host a few microseconds on a GPU,
each kernel in a graph about a microsecond of device time (timed on a GPU: mixer_profile.py).

    python benchmarks/mixer_launches.py [--batch 64 --size 32]
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from smix import devices
from smix.data import CIFAR10_MEAN, CIFAR10_STD
from pretrain.mixers import MixContext, get_mixer

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
        aten.reshape.default, aten.new_empty.default, aten.empty.memory_format,
        aten.lift_fresh.default, aten.is_pinned.default}


class CountLaunches(TorchDispatchMode):
    """Device operations, split into those inside a graph (`depth` > 0) and outside."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = self.outside = self.graphs = self.depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [a for a in (*args, out) if isinstance(a, torch.Tensor)]
        if func not in FREE and any(t.device.type == "meta" for t in tensors):
            if self.depth:
                self.inside += 1
            else:
                self.outside += 1
        return out


def count(mixer, x, y, ctx, seed: int) -> CountLaunches:
    counter = CountLaunches()
    real = devices.GraphCache.__call__

    def as_graph(cache, *args, **kwargs):  # meta stands for CUDA: one graph per outer call
        counter.graphs += counter.depth == 0
        counter.depth += 1
        try:
            return cache.fn(*args, **kwargs)
        finally:
            counter.depth -= 1

    devices.GraphCache.__call__ = as_graph
    try:
        with counter:
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
        c = count(mixer, x, y, ctx, 1)
        greedy = params.get("pairing") == "greedy"
        walk = 3 * (a.batch - 2) if greedy else 0  # the tensor-op walk's steps, counted here
        print(json.dumps({"benchmark": "mixer_launches", "device": "meta", "method": name,
                          "batch": a.batch, "size": a.size, "graphs_per_call": c.graphs,
                          "ops_in_graphs": c.inside, "launches_outside_graphs": c.outside,
                          "walk_ops_on_cuda": 1 if greedy else 0,
                          "ops_in_graphs_on_cuda": c.inside - walk + (1 if greedy else 0)}),
              flush=True)


if __name__ == "__main__":
    main()
