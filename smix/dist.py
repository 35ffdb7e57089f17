"""Distributed set-up, once for every stage: `torchrun` env vars -> process group.

NCCL on GPU, gloo on CPU. Without torchrun (no WORLD_SIZE) everything is a no-op and the single
process is rank 0 of 1, so stage code is written once for both cases.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import os
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from smix.errors import UserError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """The device a `--device` / `device=` value names; one it cannot be (`foo`, `cuda` on a
    machine without CUDA) is a `UserError`, not a traceback from the first tensor moved there."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device("cuda", local_rank) if preference == "cuda" else torch.device(preference)
    except (RuntimeError, ValueError):
        raise UserError(f"device {preference!r}; valid: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {preference!r}: CUDA is not available on this machine; "
                        "use cpu or auto")
    return dev


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one; return this process's place in it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=_dt.timedelta(minutes=30))
    return DistInfo(rank, world, local, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """Rank 0 of the process group, or the only process: the one that says what every rank
    would say (a warning about the checkpoint or the data, printed once, not once per rank)."""
    return not _active() or dist.get_rank() == 0


def group_device() -> torch.device:
    """The device the process group's collectives take tensors on: the current GPU for NCCL
    (which rejects CPU tensors: "No backend type associated with device type cpu"), the CPU
    for gloo and the rest."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Exact sum over ranks (use integer or float64 counts for exact totals); in place, on
    whatever device `t` lives: it travels to the group's device and back when they differ."""
    if not _active():
        return t
    device = group_device()
    work = t if t.device == device else t.to(device)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    if work is not t:
        t.copy_(work)
    return t


def all_gather_tensor(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `t` (same shape on every rank), in rank order, on `t`'s device."""
    if not _active():
        return [t]
    device = group_device()
    work = t.to(device)
    parts = [torch.empty_like(work) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, work)
    return [part.to(t.device) for part in parts]


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when `flag` is true on at least one (a decision all ranks share)."""
    if not _active():
        return flag
    return bool(all_reduce_sum(torch.tensor([int(flag)], device=device)).item() > 0)


def broadcast_object(obj: object, src: int = 0) -> object:
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """Contiguous, non-overlapping shard of range(n); shards cover it exactly (no padding,
    unlike DistributedSampler, so that evaluation totals are exact)."""
    per, extra = divmod(n, world_size)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (1 if rank < extra else 0))


def even_slices(n: int, most: int) -> list[slice]:
    """range(n) in the fewest contiguous parts of at most `most` (0: one part), sizes as equal
    as can be (a batch's micro-batches: no pass of one image where 3, 3, 1 would have one)."""
    count = 1 if most <= 0 else max(1, -(-n // most))
    return [slice(r.start, r.stop) for r in (shard_indices(n, k, count) for k in range(count))]


def micro_batches(n: int, most: int) -> list[slice]:
    """A training batch of `n` images in passes of at most `most` (0: one pass), as
    `even_slices`, but never a pass of one image (BatchNorm's statistics need two, and a 1x1
    last feature map has one value per channel): an image left over joins the pass before."""
    parts = even_slices(n, most)
    if len(parts) > 1 and parts[-1].stop - parts[-1].start == 1:
        parts[-2:] = [slice(parts[-2].start, n)]
    return parts


@contextlib.contextmanager
def distributed(device: str) -> Iterator[DistInfo]:
    """Join the torchrun group for one command; leave it only if this command joined it."""
    owned = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device)
    try:
        yield info
    finally:
        if owned:
            cleanup()


def gather_lists(local: list[Any]) -> list[Any]:
    """Concatenate every rank's list in rank order (picklable items; small metadata only)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(local)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [item for part in parts for item in part]


def agree(fn: Callable[..., T], *args: Any) -> T:
    """Run `fn` on every rank; when it raises a `UserError` on any rank, raise it on all of
    them, so that no rank is left waiting in a collective for one that has failed."""
    try:
        result, error = fn(*args), None
    except UserError as e:
        result, error = None, str(e)
    errors = gather_lists([error] if error is not None else [])
    if errors:
        raise UserError(errors[0], every_rank=True)
    return result  # type: ignore[return-value]
