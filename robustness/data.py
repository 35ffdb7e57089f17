"""Evaluation data for this stage: subsets, batch-aligned shards and batch iterators.

Shards are whole global batches (`shard_batches`): with torchrun each process evaluates exactly
the batches a single process would have formed, so per-batch seeds (PGD's random start) and even
batch-size-dependent floating point are identical, and the reduced totals equal the 1-process
numbers exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from smix.data import subset_indices  # noqa: F401  (this stage's callers import it here)
from smix.dist import shard_indices


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's part of a split: positions into the (sub)sampled index list."""

    indices: tuple[int, ...]  # dataset indices this process evaluates, in order
    first_batch: int  # global index of its first batch (for per-batch seeds)
    batch_size: int


def shard_batches(indices: Sequence[int], batch_size: int, rank: int, world_size: int) -> Shard:
    """The contiguous run of whole global batches that rank `rank` evaluates."""
    n_batches = math.ceil(len(indices) / batch_size)
    mine = shard_indices(n_batches, rank, world_size)
    lo, hi = mine.start * batch_size, min(mine.stop * batch_size, len(indices))
    return Shard(tuple(indices[lo:hi]), mine.start, batch_size)


def dataset_batches(dataset: Dataset, shard: Shard, workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of a map-style dataset restricted to the shard."""
    if not shard.indices:
        return iter(())
    loader = DataLoader(Subset(dataset, list(shard.indices)), batch_size=shard.batch_size,
                        shuffle=False, num_workers=workers, persistent_workers=False)
    return ((torch.as_tensor(x).as_subclass(torch.Tensor), y) for x, y in loader)


def index_batches(dataset: Dataset, batches: Sequence[Sequence[int]], workers: int
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) for each list of dataset indices in `batches`, in order: one loader
    over batches that need not be contiguous (a process's part of each commit chunk)."""
    if not batches:
        return iter(())
    loader = DataLoader(dataset, batch_sampler=[list(b) for b in batches], num_workers=workers,
                        persistent_workers=False)
    return ((torch.as_tensor(x).as_subclass(torch.Tensor), y) for x, y in loader)


def array_batches(images: np.ndarray, labels: np.ndarray, shard: Shard,
                  transform: Callable[[torch.Tensor], torch.Tensor]
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of an NHWC uint8 array (memory-mapped .npy), transformed a whole batch at once."""
    idx = np.asarray(shard.indices, dtype=np.int64)
    for start in range(0, len(idx), shard.batch_size):
        take = idx[start:start + shard.batch_size]
        x = torch.from_numpy(np.ascontiguousarray(images[take])).permute(0, 3, 1, 2)
        y = torch.from_numpy(np.asarray(labels[take], dtype=np.int64))
        yield torch.as_tensor(transform(x)).as_subclass(torch.Tensor), y
