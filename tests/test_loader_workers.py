"""Loader workers persist across epochs, and neither their number nor their persistence
changes what a run draws: each sample's crop, flip and colour come from a seed of
(run seed, epoch, index) (`pretrain.data.SeededSampler`)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from pretrain import engine
from pretrain.config import build_config
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
