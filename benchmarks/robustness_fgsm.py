"""FGSM evaluation time against its floor, measured in one run on the same model and data.

Baseline: one forward (with input gradient) + backward to the input + one forward per epsilon on
the perturbed batch -- the least any FGSM evaluation must compute. Measured: the stage's per-batch
evaluation (`robustness.adversarial.attack_counts`: attack, clean and adversarial top-1/top-5
counts) with the shared-gradient FGSM (default) and with torchattacks' FGSM. Goal: <= 1.2x for
the shared-gradient FGSM. Prints one JSON line per variant, naming the device. With
`--device cuda` the model and batches live on the card (fp32, as the stage evaluates) and every
timer read follows a synchronisation.

    python benchmarks/robustness_fgsm.py [--arch resnet18] [--size 96] [--batch 16] [--reps 5]
        [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from smix.arch import build_model
from smix.devices import device_name
from robustness.adversarial import attack_counts
from robustness.attacks import AttackParams, get_attack
from robustness.model import Normalized


def floor_pass(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
               eps_list: Sequence[float]) -> None:
    """forward + backward to the input + one forward per epsilon: the FGSM minimum."""
    xg = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(F.cross_entropy(model(xg), y), xg)[0]
    with torch.no_grad():
        for eps in eps_list:
            model(torch.clamp(x + eps * grad.sign(), 0, 1))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def measure(model, batches, eps_list, impl: str, reps: int) -> tuple[float, float]:
    """Median seconds over `reps` of (variant, baseline), interleaved so that load drifts on the
    shared machine hit both alike."""
    attack = get_attack("fgsm", impl)[1]
    params = AttackParams()

    def variant() -> None:
        for x, y in batches:
            attack_counts(model, attack, x, y, eps_list, params, 0)

    def baseline() -> None:
        for x, y in batches:
            floor_pass(model, x, y, eps_list)

    variant(), baseline()  # warm-up (allocator, oneDNN primitive caches)
    device = batches[0][0].device
    v, b = [], []
    for _ in range(reps):
        v.append(timed(variant, device))
        b.append(timed(baseline, device))
    return statistics.median(v), statistics.median(b)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = Normalized(build_model(args.arch, args.classes), (0.485, 0.456, 0.406),
                       (0.229, 0.224, 0.225)).to(device).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    batches = [(torch.rand(args.batch, 3, args.size, args.size, generator=g).to(device),
                torch.randint(0, args.classes, (args.batch,), generator=g).to(device))
               for _ in range(args.batches)]  # drawn on the host: the same data on any device
    for impl, eps in (("shared-grad", (8,)), ("torchattacks", (8,)),
                      ("shared-grad", (1, 2, 4, 8)), ("torchattacks", (1, 2, 4, 8))):
        eps01 = [e / 255 for e in eps]
        sec, base = measure(model, batches, eps01, impl, args.reps)
        print(json.dumps({
            "benchmark": "robustness_fgsm", "device": device.type,
            "device_name": device_name(device), "impl": impl, "eps": list(eps), "arch": args.arch,
            "images": args.batch * args.batches, "size": args.size,
            "threads": torch.get_num_threads(),
            "baseline": f"forward+backward+{len(eps)}x forward (same model, same data)",
            "seconds": round(sec, 4), "baseline_seconds": round(base, 4),
            "ratio": round(sec / base, 3), "goal": 1.2 if impl == "shared-grad" else None,
        }), flush=True)


if __name__ == "__main__":
    main()
