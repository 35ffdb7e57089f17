"""VOC records as torchvision detection samples, and the deterministic training batch plan.

Which images a training iteration sees, whether each is flipped and which shorter-side size the
batch is resized to are pure functions of (seed, iteration): a resumed run continues with
exactly the batches the uninterrupted run would have seen, without saving sampler state.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import ImageOps
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from smix.data import load_rgb
from smix.voc import VOCRecord

_EPOCH_STREAM, _ITER_STREAM, _MODEL_STREAM = 1, 2, 3


def _mix(seed: int, stream: int, k: int) -> int:
    # torch's CPU generator keeps only 32 bits of a seed: mix (seed, stream, k) into them.
    return int(np.random.SeedSequence([seed, stream, k]).generate_state(1)[0])


def _generator(seed: int, stream: int, k: int) -> torch.Generator:
    return torch.Generator().manual_seed(_mix(seed, stream, k))


def iteration_seed(seed: int, it: int) -> int:
    """The seed of the model's own random draws (proposal sampling) at iteration `it`."""
    return _mix(seed, _MODEL_STREAM, it)


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=_generator(seed, _EPOCH_STREAM, epoch)).tolist())


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Iteration -> (dataset indices, horizontal flips, shorter-side size)."""

    n: int
    batch: int
    seed: int
    sizes: tuple[int, ...]

    def indices(self, it: int) -> list[int]:
        """Epoch-wise random permutations laid end to end; iteration `it` takes the next `batch`."""
        out = []
        for p in range(it * self.batch, (it + 1) * self.batch):
            epoch, pos = divmod(p, self.n)
            out.append(_permutation(self.seed, epoch, self.n)[pos])
        return out

    def augment(self, it: int) -> tuple[list[bool], int]:
        g = _generator(self.seed, _ITER_STREAM, it)
        flips = (torch.rand(self.batch, generator=g) < 0.5).tolist()
        size = self.sizes[int(torch.randint(len(self.sizes), (1,), generator=g))]
        return flips, size

    def __call__(self, it: int) -> tuple[list[int], list[bool], int]:
        flips, size = self.augment(it)
        return self.indices(it), flips, size


class PlanSampler:
    """A batch sampler yielding [(index, flip), ...] for iterations start..stop-1."""

    def __init__(self, plan: BatchPlan, start: int, stop: int):
        self.plan, self.start, self.stop = plan, start, stop

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        for it in range(self.start, self.stop):
            idx, flips, _ = self.plan(it)
            yield list(zip(idx, flips))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


class VOCDetection(Dataset):
    """(image in [0,1], target {boxes 0-based xyxy, labels 1..K}, image_id); key (index, flip)."""

    def __init__(self, records: Sequence[VOCRecord], class_names: Sequence[str]):
        self.records = list(records)
        self.label = {n: i + 1 for i, n in enumerate(class_names)}  # 0 is background

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, bool]) -> tuple[torch.Tensor, dict, str]:
        index, flip = key if isinstance(key, tuple) else (key, False)
        rec = self.records[index]
        pil = load_rgb(rec.image_path)
        ImageOps.exif_transpose(pil, in_place=True)  # upright, as detectron2 reads it
        image = F.to_dtype(F.to_image(pil), torch.float32, scale=True)
        boxes = torch.tensor([o.box0 for o in rec.objects], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.label[o.name] for o in rec.objects], dtype=torch.int64)
        if flip:
            image = image.flip(-1)
            width = image.shape[-1]
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0],
                                 boxes[:, 3]], dim=1)
        return image, {"boxes": boxes, "labels": labels}, rec.image_id


def collate_list(batch: list) -> tuple[list, list, list]:
    images, targets, ids = zip(*batch)
    return list(images), list(targets), list(ids)
