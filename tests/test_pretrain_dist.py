"""Pretraining under DDP (2 gloo processes on CPU): each rank draws its own randomness, and the
recipe's batch is the batch the processes train together."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from smix.dist import DistInfo
from smix.errors import UserError
from pretrain import engine
from pretrain.config import build_config

FAST = {"workers": "0", "batch_size": "8", "input_size": "32", "resize": "32", "crop": "32",
        "progress": "false", "milestones": "1", "epochs": "1", "train_aug": "cifar",
        "device": "cpu"}


def _draws(rank: int, world: int, port: int, data: str, out: str, queue) -> None:
    """One epoch of cutmix on `rank` of `world`; per step: the first image (its crop and flip
    are drawn in this process with workers=0), the mixer's λ, and the next global draw (the
    stream dropout would use)."""
    import torch.distributed as dist
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
    try:
        torch.set_num_threads(1)
        # the same batch per process whatever the world size (4 images)
        cfg = build_config("shapes-resnet18", Path(data), Path(out), "cutmix",
                           {**FAST, "batch_size": str(4 * world)})
        rt = engine.build_runtime(cfg, DistInfo(rank, world, rank, torch.device("cpu")))
        seen: list = []

        def step(rt, images, labels, generator):  # the step's draws, without its training
            lam = float(rt.mixer(images, labels, generator, rt.ctx).lam.flatten()[0])
            seen.append((lam, float(torch.rand(()))))
            return torch.zeros(())
        engine.train_step = step
        engine.train_epoch(rt, 0)
        queue.put((rank, seen))
    finally:
        if world > 1:
            dist.destroy_process_group()


def _run(world: int, port: int, data: Path, out: Path) -> dict[int, list]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_draws, args=(r, world, port, str(data), str(out), queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return results


@pytest.mark.dist
def test_ranks_draw_their_own_mixing_and_global_randomness(shapes_root, tmp_path):
    """Both ranks drew the same λ, boxes and global stream (dropout; crops and flips without
    workers) at every step: the mixing of a 2-process batch was one process's draw twice."""
    two = _run(2, 29571, shapes_root, tmp_path / "two")
    assert len(two[0]) == len(two[1]) >= 2
    lams = [[lam for lam, _ in two[r]] for r in (0, 1)]
    draws = [[d for _, d in two[r]] for r in (0, 1)]
    assert lams[0] != lams[1]
    assert all(a != b for a, b in zip(draws[0], draws[1]))
    # rank 0 keeps the single-process streams: runs (and resumes) of one process are unchanged
    one = _run(1, 0, shapes_root, tmp_path / "one")
    n = len(two[0])
    assert [lam for lam, _ in one[0]][:n] == lams[0]
    assert [d for _, d in one[0]][:n] == draws[0]


@pytest.mark.parametrize("batch,world", [(9, 2), (10, 4)])
def test_a_batch_that_does_not_split_over_the_processes_is_refused(shapes_root, tmp_path,
                                                                    batch, world):
    """batch_size=9 on 2 processes trained steps of 4 + 4 = 8 images at the lr scaled for 9."""
    cfg = build_config("shapes-resnet18", shapes_root, tmp_path / "run", "none",
                       {**FAST, "batch_size": str(batch)})
    with pytest.raises(UserError, match=f"batch_size={batch} does not split evenly over "
                                        f"{world} processes"):
        engine.build_runtime(cfg, DistInfo(0, world, 0, torch.device("cpu")))


@pytest.mark.parametrize("limit,expected", [(12, 12), (24, 24)])
def test_every_process_keeps_a_short_last_batch_as_one_process_does(shapes_root, tmp_path, limit,
                                                                    expected):
    """12 training images, batch 8: one process trains 8 + 4; two processes dropped each one's
    last 2 of 6 images (the whole set's size, not the process's share, chose `drop_last`)."""
    cfg = build_config("shapes-resnet18", shapes_root, tmp_path / "run", "none",
                       {**FAST, "limit_train": str(limit)})
    one = engine.build_runtime(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    n_one = sum(len(b[1]) for b in engine.make_loader(one, train=True, epoch=0))
    n_two = 0
    for rank in (0, 1):  # the loaders of both processes (no process group needed to build them)
        rt = dataclasses.replace(one, dist=DistInfo(rank, 2, rank, torch.device("cpu")),
                                 loaders={})
        n_two += sum(len(b[1]) for b in engine.make_loader(rt, train=True, epoch=0))
    assert n_one == n_two == expected


def test_the_refusal_names_process_counts_a_resumed_run_can_take(shapes_root, tmp_path):
    """--resume keeps batch_size, so `use a multiple of 3` alone (batch 8 of a run resumed on
    3 processes) named a way out that --resume refuses: the counts that divide 8 (1, 2, 4,
    each at least 2 images a process) are named, and each of them starts."""
    cfg = build_config("shapes-resnet18", shapes_root, tmp_path / "run", "none", FAST)
    with pytest.raises(UserError) as e:
        engine.build_runtime(cfg, DistInfo(0, 3, 0, torch.device("cpu")))
    assert str(e.value).endswith("use a multiple of 3 or 1, 2, 4 processes "
                                 "(--resume keeps the batch)")
    import torch.distributed as dist  # DDP wraps the model of a world over 1: a group of one
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        for world in (1, 2, 4):
            engine.build_runtime(cfg, DistInfo(0, world, 0, torch.device("cpu")))
    finally:
        dist.destroy_process_group()
