"""Images/s of the training engine (method `none`) vs a bare PyTorch loop, same process.

Both train the same architecture on the same in-memory tensors with the same batch size,
optimizer and loader settings; the runs are interleaved and the median of several epochs is
taken, so machine noise hits both alike. Prints one JSON line naming the device; goal:
ratio >= 0.97. On CUDA the bare loop trains as the engine does there (the precision, memory
format and cuDNN mode the engine resolved; batches pinned and copied without blocking), and
each of its epochs is timed between synchronisations.

    python benchmarks/train_throughput.py [--arch cifar_resnet18] [--images 512] [--batch 64]
        [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from smix.amp import autocast, grad_scaler
from smix.arch import build_model
from smix.devices import device_name
from smix.dist import init_distributed
from pretrain import engine
from pretrain.config import build_config
from pretrain.data import RunData


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_epoch(model, optimizer, dataset, batch: int, seed: int, rt: engine.Runtime) -> float:
    """Images/s of one epoch of a plain loop, on the engine's device and precision (`rt`)."""
    device = rt.dist.device
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed),
                        pin_memory=device.type == "cuda")
    scaler = grad_scaler(device, rt.amp_dtype)
    model.train()
    sync(device)
    n, start = 0, time.perf_counter()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if rt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, rt.amp_dtype):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        n += len(y)
    sync(device)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="cifar_resnet18")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    torch.manual_seed(0)
    x = torch.randn(a.images, 3, a.size, a.size)
    y = torch.randint(0, 10, (a.images,))
    data = TensorDataset(x, y)
    cfg = build_config("cifar10-resnet18", Path("."), Path("/tmp/smix-bench-unused"), "none",
                       {"arch": a.arch, "batch_size": str(a.batch), "workers": "0",
                        "progress": "false", "epochs": "1000"})
    rt = engine.build_runtime(cfg, init_distributed(a.device),
                              RunData(data, data, [str(i) for i in range(10)]))
    bare = build_model(a.arch, 10)
    bare.load_state_dict(rt.model.state_dict())
    bare = bare.to(rt.dist.device, memory_format=(torch.channels_last if rt.channels_last
                                                  else torch.preserve_format))
    opt = torch.optim.SGD(bare.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True,
                          weight_decay=cfg.weight_decay)
    engine.train_epoch(rt, 0)  # warm-up both
    bare_epoch(bare, opt, data, a.batch, 0, rt)
    eng, ref = [], []
    for r in range(a.repeats):
        eng.append(engine.train_epoch(rt, r + 1)["images_per_s"])
        ref.append(bare_epoch(bare, opt, data, a.batch, r + 1, rt))
    e, b = statistics.median(eng), statistics.median(ref)
    print(json.dumps({"bench": "train_throughput", "device": rt.dist.device.type,
                      "device_name": device_name(rt.dist.device), "arch": a.arch, "batch": a.batch,
                      "size": a.size, "engine_img_s": round(e, 2), "bare_img_s": round(b, 2),
                      "ratio": round(e / b, 4), "goal": 0.97, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
