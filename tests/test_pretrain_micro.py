"""Pretraining in micro-batches (`micro_batch=N`): the recipe's batch and learning rate on any
device, the passes' gradients accumulating into one step."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from pretrain import engine
from pretrain.config import build_config
from pretrain.mixers import MixContext
from pretrain.saliency import gradient_saliency
from smix.cli import main as smix
from smix.dist import DistInfo
from smix.errors import UserError

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
FAST = {"workers": "0", "batch_size": "8", "input_size": "32", "resize": "32", "crop": "32",
        "progress": "false", "milestones": "1", "device": "cpu"}


def _plain_net(classes: int) -> nn.Module:
    """No BatchNorm: a pass's statistics do not depend on the other images, so accumulating
    the passes must give exactly the whole batch's gradient."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))


def _runtime(shapes_root, tmp_path, method: str, micro: int, **params: str):
    cfg = build_config("shapes-resnet18", shapes_root, tmp_path / f"run{micro}", method,
                       {**FAST, "micro_batch": str(micro),
                        **{f"method.{k}": v for k, v in params.items()}})
    rt = engine.build_runtime(cfg, CPU)
    net = _plain_net(len(rt.data.classes))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    return dataclasses.replace(rt, model=net, ddp_model=net, optimizer=optimizer,
                               ctx=dataclasses.replace(rt.ctx, model=net))


@pytest.mark.parametrize("method,params", [
    ("cutmix", {}), ("mixup", {}), ("none", {}),
    # the model's gradients, chunked; prob 1 so that both steps mix (the preset default: 0.8)
    ("guidedmixup", {"saliency": "ap", "pairing": "greedy", "prob": "1"}),
])
def test_passes_accumulate_to_the_whole_batch_step(shapes_root, tmp_path, method, params):
    """Two steps at batch 8: one pass, against passes of 3, 3 and 2 images. Same draws, same
    mixed images, so the same loss and, after the optimiser, the same weights."""
    torch.manual_seed(5)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    results = []
    for micro in (0, 3):
        rt = _runtime(shapes_root, tmp_path, method, micro, **params)
        passes = []
        rt.model.register_forward_hook(lambda module, args, out: passes.append(len(args[0])))
        gen = torch.Generator().manual_seed(11)
        losses = [engine.train_step(rt, images, labels, gen) for _ in range(2)]
        results.append((losses, copy.deepcopy(rt.model.state_dict())))
        assert max(passes) == (8 if micro == 0 else 3) and sum(passes) % 8 == 0
    (loss_a, state_a), (loss_b, state_b) = results
    for a, b in zip(loss_a, loss_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(state_a["0.weight"], _plain_net(3).state_dict()["0.weight"])


def test_micro_batches_are_as_equal_as_can_be():
    sizes = lambda n, m: [s.stop - s.start for s in engine.micro_batches(n, m)]
    assert sizes(8, 3) == [3, 3, 2] and sizes(10, 4) == [4, 3, 3] and sizes(7, 7) == [7]
    assert sizes(7, 0) == [7] and sizes(256, 64) == [64] * 4 and sizes(6, 2) == [2, 2, 2]
    assert sizes(5, 2) == [2, 3] and sizes(3, 2) == [3]  # never a pass of one image
    parts = engine.micro_batches(257, 32)
    assert parts[0].start == 0 and parts[-1].stop == 257 and len(parts) == 9
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))


def test_gradient_saliency_in_chunks():
    """Without BatchNorm the chunked maps are the whole batch's; with it (a ResNet in train
    mode) each chunk has its statistics, and the model's buffers are still restored."""
    net = _plain_net(4)
    passes = []
    net.register_forward_hook(lambda module, args, out: passes.append(len(args[0])))
    torch.manual_seed(1)
    x, y = torch.randn(7, 3, 16, 16), torch.randint(0, 4, (7,))
    chunked = gradient_saliency(net, x, y, chunk=3)
    assert passes == [3, 2, 2]
    torch.testing.assert_close(chunked, gradient_saliency(net, x, y), rtol=1e-5, atol=1e-8)
    assert passes == [3, 2, 2, 7]
    from smix.arch import build_model
    resnet = build_model("resnet18", 4).train()
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    maps = gradient_saliency(resnet, x, y, chunk=3)
    assert maps.shape == (7, 16, 16) and bool(torch.isfinite(maps).all())
    assert all(torch.equal(before[k], v) for k, v in resnet.state_dict().items())


def test_a_run_in_micro_batches_trains_and_says_bad_sizes(shapes_root, tmp_path, capsys):
    cfg = build_config("shapes-resnet18", shapes_root, tmp_path / "run", "saliencymix",
                       {**FAST, "epochs": "1", "micro_batch": "3"})
    summary = engine.train(cfg)
    assert 0 <= summary["last"]["top1"] <= 100
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["micro_batch"] == 3
    for bad in (9, 1):
        with pytest.raises(UserError, match=f"micro_batch={bad} must be 0 .* from 2 to the 8 "):
            engine.build_runtime(dataclasses.replace(cfg, micro_batch=bad), CPU)
    capsys.readouterr()
    code = smix(["pretrain", "--preset", "shapes-resnet18", "--data", str(shapes_root),
                 "--out", str(tmp_path / "bad"), *[f"{k}={v}" for k, v in FAST.items()],
                 "micro_batch=-1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "micro_batch=-1" in err


def test_out_of_memory_is_one_line_that_says_what_to_set(shapes_root, tmp_path, monkeypatch):
    cfg = build_config("shapes-resnet18", shapes_root, tmp_path / "run", "cutmix",
                       {**FAST, "epochs": "1"})

    def full(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(engine, "train_step", full)
    with pytest.raises(UserError, match=r"out of device memory in epoch 1, step 1, at 8 images "
                                        r"per pass; rerun with micro_batch=4 \(with --resume"):
        engine.train(cfg)


def test_resume_may_change_micro_batch(shapes_root, tmp_path):
    """A step that no longer fits (another GPU, a longer run) continues in smaller passes."""
    run = tmp_path / "run"
    common = [*[f"{k}={v}" for k, v in FAST.items()]]
    assert smix(["pretrain", "--preset", "shapes-resnet18", "--data", str(shapes_root),
                 "--out", str(run), "--epochs", "1", "--method", "cutmix", *common]) == 0
    assert smix(["pretrain", "--resume", str(run), "--epochs", "2", "micro_batch=4"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["micro_batch"] == 4 and saved["epochs"] == 2
    assert len((run / "log.jsonl").read_text().splitlines()) == 2


def test_ddp_reduces_once_per_step(shapes_root, tmp_path):
    """Passes before a step's last hold DDP's gradient all-reduce back (`no_sync`): counted by
    a communication hook on a one-process gloo group, once per bucket and step."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        counts = {}
        for micro in (0, 3):
            rt = _runtime(shapes_root, tmp_path, "cutmix", micro)
            ddp = nn.parallel.DistributedDataParallel(rt.model)
            calls = []

            def hook(state, bucket, calls=calls):
                calls.append(1)
                done = torch.futures.Future()
                done.set_result(bucket.buffer())
                return done
            ddp.register_comm_hook(None, hook)
            rt = dataclasses.replace(rt, ddp_model=ddp)
            gen = torch.Generator().manual_seed(2)
            torch.manual_seed(5)
            images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
            for _ in range(2):
                engine.train_step(rt, images, labels, gen)
            counts[micro] = len(calls)
    finally:
        dist.destroy_process_group()
    assert counts[0] >= 2 and counts[3] == counts[0]  # 3 passes a step, still one reduction


@pytest.mark.dist
def test_torchrun_two_ranks_in_micro_batches_stay_identical(shapes_root, tmp_path):
    """DDP holds the gradient all-reduce back on all passes but a step's last: if it did not
    reduce on the last one, or reduced a partial gradient, the ranks would drift apart."""
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29537", "-m", "pretrain", "--preset", "shapes-resnet18",
           "--data", str(shapes_root), "--out", str(run), "--epochs", "1", "--method", "cutmix",
           *[f"{k}={v}" for k, v in FAST.items()], "micro_batch=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((run / "metrics.json").read_text())["results"]
    assert results["world_size"] == 2 and results["replicas_identical"] is True
