"""Loader workers persist across epochs, and neither their number nor their persistence
changes what a run draws: each sample's crop, flip and colour come from a seed of
(run seed, epoch, index) (`pretrain.data.SeededSampler`)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from pretrain import engine
from pretrain.config import build_config
from smix import data as smix_data
from smix.dist import DistInfo

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def _cfg(root: Path, out: Path, epochs: int = 2, **extra: str):
    # the imagenet recipe: random crops, flips, jitter and lighting drawn in the workers
    return build_config("shapes-resnet18", root, out, "cutmix", {
        "batch_size": "8", "input_size": "32", "resize": "32", "crop": "32",
        "train_aug": "imagenet", "progress": "false", "epochs": str(epochs), "device": "cpu",
        **extra})


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "backbone.safetensors"))


def test_workers_persist_across_epochs_and_each_epoch_is_reseeded(shapes_root, tmp_path):
    rt = engine.build_runtime(_cfg(shapes_root, tmp_path / "a", workers="1"), CPU)
    loader = engine.make_loader(rt, True, 0)
    first = [torch.cat([b[1] for b in loader]).tolist()]
    workers = [w.pid for w in loader._iterator._workers]
    assert engine.make_loader(rt, True, 1) is loader
    first.append(torch.cat([b[1] for b in loader]).tolist())
    assert [w.pid for w in loader._iterator._workers] == workers  # the same processes
    assert first[0] != first[1]
    val = engine.make_loader(rt, False, 0)
    before = [torch.cat([b[1] for b in val]).tolist()]
    pids = [w.pid for w in val._iterator._workers]
    assert engine.make_loader(rt, False, 1) is val  # evaluation's workers persist too
    before.append(torch.cat([b[1] for b in val]).tolist())
    assert [w.pid for w in val._iterator._workers] == pids and before[0] == before[1]
    fresh = engine.build_runtime(_cfg(shapes_root, tmp_path / "b", workers="1",
                                      persistent_workers="false"), CPU)
    again = [torch.cat([b[1] for b in engine.make_loader(fresh, True, e)]).tolist()
             for e in (0, 1)]
    assert again == first  # the same orders without persistence


def test_worker_count_and_persistence_do_not_change_a_run(shapes_root, tmp_path):
    """Bit-identical weights on CPU: 1 persistent worker; 2 fresh ones per epoch; and a run
    killed after epoch 1 and resumed with 2 workers (`--resume workers=2`)."""
    engine.train(_cfg(shapes_root, tmp_path / "one", workers="1"))
    engine.train(_cfg(shapes_root, tmp_path / "two", workers="2", persistent_workers="false"))
    engine.train(_cfg(shapes_root, tmp_path / "cut", epochs=1, workers="1"))
    engine.train(_cfg(shapes_root, tmp_path / "cut", workers="2"), resume=True)
    ref = _weights(tmp_path / "one")
    for run in ("two", "cut"):
        got = _weights(tmp_path / run)
        assert all(torch.equal(ref[k], got[k]) for k in ref), run


def test_a_sample_is_drawn_as_after_torch_manual_seed():
    """SeededDataset seeds only the CPU generator (torch.manual_seed, which also seeds every
    accelerator, cost 96 us per sample in a worker); the transforms draw from that generator
    alone, so a sample is what it is after torch.manual_seed(seed)."""
    from torchvision.transforms import v2 as T
    from pretrain.data import SeededDataset

    image = torch.arange(3 * 40 * 50, dtype=torch.float32).view(3, 40, 50)
    recipe = T.Compose([T.RandomResizedCrop(16, antialias=True), T.RandomHorizontalFlip(),
                        T.ColorJitter(0.4, 0.4, 0.4)])

    class One(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return recipe(image / image.max())

    data = SeededDataset(One())
    for seed in (0, 7, 123456789):
        torch.manual_seed(seed)
        expected = recipe(image / image.max())
        torch.manual_seed(seed + 1)  # something else drawn meanwhile
        assert torch.equal(data[(0, seed)], expected)
    assert not torch.equal(data[(0, 1)], data[(0, 2)])


def _collate_and_report(batch):
    images, labels, skipped = smix_data.collate_skip(batch)
    return images, labels, skipped, images.is_shared()


def test_workers_collate_into_shared_memory():
    """In a worker, collate_skip stacks straight into shared memory (a stack in private
    memory would be copied there again on its way to the main process); the values are the
    stack's, with skipped samples left out."""
    items = [(torch.full((3, 4, 4), float(i)), i) for i in range(6)]
    items[2] = None
    loader = torch.utils.data.DataLoader(items, batch_size=3, num_workers=1,
                                         collate_fn=_collate_and_report)
    batches = list(loader)
    assert [b[3] for b in batches] == [True, True]  # shared where the worker made them
    assert [b[2] for b in batches] == [1, 0]
    assert torch.equal(torch.cat([b[0] for b in batches]),
                       torch.stack([it[0] for it in items if it is not None]))
    assert torch.cat([b[1] for b in batches]).tolist() == [0, 1, 3, 4, 5]
    assert smix_data.collate_skip(items[:2])[0].is_shared() is False  # no worker: plain stack
