"""The greedy pairing walk (GuidedMixup Algorithm 1): one Triton kernel against the tensor-op
walk (3 kernels per step), both replayed as CUDA graphs, in the same process.

Per batch size n: maps of 32x32, `greedy_from_maps` (distances + walk), timed as single
synchronised calls and as K calls per synchronisation (what a training loop pays per step).
Baseline: SMIX_TRITON=0 (the tensor-op walk), same maps, same process, interleaved rounds;
both results are checked equal before timing.

    python benchmarks/greedy_walk.py --device cuda
    python benchmarks/greedy_walk.py --device cpu --sizes 16 --rounds 1   # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from typing import Iterator

import torch

from smix.devices import device_name
from pretrain import greedy


@contextlib.contextmanager
def walk(kernel: bool) -> Iterator[None]:
    """The Triton walk on or off, with fresh graphs (a captured graph keeps its walk)."""
    old = os.environ.get("SMIX_TRITON")
    os.environ["SMIX_TRITON"] = "1" if kernel else "0"
    greedy._GREEDY_GRAPHS.entries.clear()
    try:
        yield
    finally:
        greedy._GREEDY_GRAPHS.entries.clear()
        if old is None:
            os.environ.pop("SMIX_TRITON")
        else:
            os.environ["SMIX_TRITON"] = old


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(maps: torch.Tensor, calls: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        greedy.greedy_from_maps(maps)
    sync(device)
    return (time.perf_counter() - start) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="64,256")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pipeline", type=int, default=16)
    a = ap.parse_args()
    device = torch.device(a.device)
    for n in (int(v) for v in a.sizes.split(",")):
        maps = torch.rand(n, 32, 32, generator=torch.Generator().manual_seed(n)).to(device)
        single = {True: [], False: []}
        piped = {True: [], False: []}
        perms = {}
        for kernel in (True, False):  # warm-up, capture, and the same result both ways
            with walk(kernel):
                perms[kernel] = greedy.greedy_from_maps(maps).cpu()
        assert torch.equal(perms[True], perms[False]), "the two walks disagree"
        for _ in range(a.rounds):
            for kernel in (True, False):
                with walk(kernel):
                    greedy.greedy_from_maps(maps)  # capture outside the timing
                    single[kernel].append(timed(maps, 1, device))
                    piped[kernel].append(timed(maps, a.pipeline, device))
        med = {k: (statistics.median(single[k]), statistics.median(piped[k])) for k in single}
        kernel_used = device.type == "cuda" and greedy.walk_kernel(device) is not None
        print(json.dumps({
            "benchmark": "greedy_walk", "device": device.type, "device_name": device_name(device),
            "n": n, "map": "32x32", "rounds": a.rounds, "pipeline": a.pipeline,
            "baseline": "tensor-op walk (SMIX_TRITON=0), same process", "kernel_ran": kernel_used,
            "kernel_ms": round(med[True][0] * 1e3, 4),
            "tensor_ops_ms": round(med[False][0] * 1e3, 4),
            "speedup": round(med[False][0] / med[True][0], 2),
            "kernel_pipelined_ms": round(med[True][1] * 1e3, 4),
            "tensor_ops_pipelined_ms": round(med[False][1] * 1e3, 4),
            "speedup_pipelined": round(med[False][1] / med[True][1], 2)}), flush=True)


if __name__ == "__main__":
    main()
