"""The collective helpers put tensors on the process group's device (NCCL takes CUDA tensors
only), whatever device the caller's tensor is on; and ranks decide together.

CPU tests cannot run NCCL: a stand-in `torch.distributed` records the devices it is given.
Its group device is `meta` (the one non-CPU device every build has), standing in for CUDA.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.multiprocessing as mp

from smix import dist as sdist


class Recorded(Exception):
    pass


def _stand_in(monkeypatch, backend: str, world: int = 2, stop: bool = False) -> list:
    seen: list = []

    def all_reduce(t, op=None):
        seen.append(("all_reduce", t.device))
        if stop:  # a meta tensor holds no data to copy back: stop once recorded
            raise Recorded
        t.mul_(world)  # every rank holds the same values: the sum is world × them

    def all_gather(parts, t):
        seen.append(("all_gather", t.device))
        if stop:
            raise Recorded
        for p in parts:
            p.copy_(t)

    fake = types.SimpleNamespace(
        is_available=lambda: True, is_initialized=lambda: True, get_backend=lambda: backend,
        get_world_size=lambda: world, all_reduce=all_reduce, all_gather=all_gather,
        ReduceOp=types.SimpleNamespace(SUM="sum"))
    monkeypatch.setattr(sdist, "dist", fake)
    return seen


def test_nccl_group_device_is_the_current_gpu(monkeypatch):
    _stand_in(monkeypatch, "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert sdist.group_device() == torch.device("cuda", 3)
    _stand_in(monkeypatch, "gloo")
    assert sdist.group_device() == torch.device("cpu")


@pytest.mark.parametrize("helper", ["all_reduce_sum", "all_gather_tensor", "any_rank"])
def test_a_cpu_tensor_reaches_the_collective_on_the_group_device(monkeypatch, helper):
    """robustness all-reduced int64 counts on the CPU: NCCL refuses them."""
    seen = _stand_in(monkeypatch, "nccl", stop=True)
    monkeypatch.setattr(sdist, "group_device", lambda: torch.device("meta"))
    with pytest.raises(Recorded):
        if helper == "any_rank":
            sdist.any_rank(True, "cpu")
        else:
            getattr(sdist, helper)(torch.ones(3, dtype=torch.int64))
    assert [device.type for _, device in seen] == ["meta"]


def test_values_come_back_in_place_on_the_callers_device(monkeypatch):
    seen = _stand_in(monkeypatch, "gloo", world=2)
    t = torch.tensor([1, 2, 3])
    assert sdist.all_reduce_sum(t) is t and t.tolist() == [2, 4, 6]
    parts = sdist.all_gather_tensor(torch.tensor([5.0]))
    assert [p.tolist() for p in parts] == [[5.0], [5.0]]
    assert sdist.any_rank(False) is False and sdist.any_rank(True) is True
    assert {device.type for _, device in seen} == {"cpu"}


def _vote(rank: int, port: int, flags: list[bool], out) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        out.put((rank, sdist.any_rank(flags[rank]),
                 sdist.all_reduce_sum(torch.tensor([rank + 1])).item()))
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_any_rank_with_two_gloo_processes():
    """Rank 1 alone has a short batch: both ranks learn it from the one all-reduce."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_vote, args=(r, 29561, [False, True], queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == [(0, True, 3), (1, True, 3)]
