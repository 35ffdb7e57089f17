"""Mixers that never synchronise with the host, and whose CPU results did not change for it.

* Golden digests: every mixer's CPU output (mixed images, labels, λ, permutation, boxes, mask
  and the generator's next draw) for fixed seeds, recorded with the code of commit d4b72b6
  (before the mixers were made sync-free) and asserted bit-identical now. They are computed
  in a subprocess whose CPU code paths are pinned (`PINNED`): MKL's GEMM and FFT, oneDNN's
  convolutions and ATen's vectorised loops each pick their code by the CPU they run on, and
  Guided-SR's maps (a blur by convolution, FFTs) differ in their last bits between an AVX2
  and an AVX-512 machine. Pinned or not, GuidedMixup's maps still differ in their last bits
  between machines (an AMD EPYC gave other Guided-SR/-AP digests for the code that recorded
  them; Guided-AP's gradient saliency, through a ResNet's backward, the most): for its three
  cases the digest covers the discrete results (labels, permutation, which samples mixed, the
  generator's next draw) bit for bit, and the images, mask and λ are compared as fingerprints
  (norm and a fixed random projection) within a tolerance 3-40x above what the CPU code path
  changes on one machine (`GUIDED_TOL`), below what a 7% change of the blur's σ makes.
* A fake device: `sample`+`apply` run on 'meta' tensors (no data) under a dispatch mode that
  refuses what would stall a CUDA stream: reading a device value on the host (`.item()`,
  `bool()`, `.cpu()`, `.tolist()`, data-dependent shapes) and blocking host-to-device copies.
  Host draws from the CPU generator stay allowed: they never wait for the device.
* On CUDA (skipped without one): every mixer under `torch.cuda.set_sync_debug_mode("error")`,
  and the same results as on CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from smix.arch import build_model
from pretrain.mixers import MixContext, get_mixer
from tests.conftest import blob_batch

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# on CUDA a capture that fails (an eager run) or a Triton kernel that falls back (tensor ops),
# each with a warning, is an error here
pytestmark = [pytest.mark.filterwarnings("error:.*CUDA graph capture failed:RuntimeWarning"),
              pytest.mark.filterwarnings("error:.*the Triton kernel failed:RuntimeWarning")]

# (case, mixer, params); official SaliencyMix runs OpenCV on the host by definition.
CASES: list[tuple[str, str, dict[str, str]]] = [
    ("none", "none", {}),
    ("cutout", "cutout", {"size": "12", "prob": "0.7"}),
    ("mixup", "mixup", {"alpha": "0.4"}),
    ("mixup-greedy", "mixup", {"pairing": "greedy"}),
    ("cutmix", "cutmix", {"prob": "0.8"}),
    ("salmix-batch", "saliencymix", {"mode": "batch"}),
    ("salmix-batch-s2n", "saliencymix", {"mode": "batch", "scheme": "salient_to_nonsalient"}),
    ("salmix-sample", "saliencymix", {"mode": "sample"}),
    ("salmix-sample-n2s", "saliencymix", {"mode": "sample", "scheme": "nonsalient_to_salient",
                                          "detector": "spectral_residual"}),
    ("salmix-sample-ft", "saliencymix", {"mode": "sample", "detector": "frequency_tuned",
                                         "scheme": "salient_to_salient"}),
    ("salmix-greedy", "saliencymix", {"mode": "sample", "pairing": "greedy"}),
    ("guided-sr-greedy", "guidedmixup", {"saliency": "sr"}),
    ("guided-sr-random", "guidedmixup", {"saliency": "sr", "pairing": "random"}),
    ("guided-ap-greedy", "guidedmixup", {"saliency": "ap", "prob": "0.9"}),
]

# sha256[:16] of `digest(...)` for seeds 0, 1, 2, computed with the code of commit d4b72b6, the
# same with the code paths pinned or not.
GOLDEN: dict[str, tuple[str, str, str]] = {
    "none": ('f486720c89709f9a', 'f938bef964f77fc4', 'ca0306f7bae3b709'),
    "cutout": ('2b64c3f391ab9cb9', '628b47d46307e267', 'd56db236cf2a2833'),
    "mixup": ('6184d28d08677772', '808da50e99e16c2f', '47d3d2f72a138d3c'),
    "mixup-greedy": ('619c2c328d2a7a53', 'dfafce64406bb84d', '13b03603a4d044c7'),
    "cutmix": ('1d452d600220a55c', '7da14de26fe9e959', 'f9f44cf9fa4c19df'),
    "salmix-batch": ('b8224b9e13e80f5d', 'c5ab82dbaf7d4e5c', '388122e135624c7e'),
    "salmix-batch-s2n": ('02a4339f335cf90f', '5cf83ea508f55b36', '8124cdeb0a32e267'),
    "salmix-sample": ('6fde0de4bcf42750', 'a9387e4347c527b0', 'af76f2a8f0311ac0'),
    "salmix-sample-n2s": ('87ead31c81086768', 'aecf7d42ac2731a0', '31a63ab49722fa16'),
    "salmix-sample-ft": ('011d846cd0995228', '065bc383db7c2949', '875164e5cb975cab'),
    "salmix-greedy": ('c73cb4967c591f3e', 'c35eab08537de026', '0025854d1eec8a89'),
}
# GuidedMixup's: for seeds 0, 1, 2 the digest of the discrete results and the fingerprints of
# images, λ and mask, recorded with the same code (unchanged since its digests above were
# recorded: b334b60's, equal to d4b72b6's), pinned, on an AMD EPYC where those digests differed.
GUIDED: dict[str, tuple[tuple[str, dict[str, tuple[float, float]]], ...]] = {
    "guided-sr-greedy": (
        ('2a0c320dbf552112', {'images': (106.7113033, 82.27015484), 'lam': (1.224671503, -2.787993089), 'mask': (39.5176537, 12.66110606)}),
        ('9337470bfe341757', {'images': (106.7113033, 82.27015484), 'lam': (1.224671503, -2.787993089), 'mask': (39.5176537, 12.66110606)}),
        ('9589d5cda0091cc5', {'images': (106.7113033, 82.27015484), 'lam': (1.224671503, -2.787993089), 'mask': (39.5176537, 12.66110606)}),
    ),
    "guided-sr-random": (
        ('033a1db9dbe21f6f', {'images': (108.0945608, 93.53130465), 'lam': (1.224828973, -2.783235653), 'mask': (39.41670178, 2.965957453)}),
        ('fedef373c13c9075', {'images': (107.4092463, 93.5657568), 'lam': (1.224822702, -2.78480671), 'mask': (39.45805038, 4.874330026)}),
        ('8f530227e1550d50', {'images': (106.5533146, 104.2414618), 'lam': (1.224801062, -2.780644537), 'mask': (39.50074874, 8.233096492)}),
    ),
    "guided-ap-greedy": (
        ('ea549a5219dd141c', {'images': (106.676945, 94.16128606), 'lam': (1.224748881, -2.779653267), 'mask': (39.29587094, -2.332473271)}),
        ('cfe9e72349777875', {'images': (106.676945, 94.16128606), 'lam': (1.224748881, -2.779653267), 'mask': (39.29587094, -2.332473271)}),
        ('b62449cab90d7f49', {'images': (106.676945, 94.16128606), 'lam': (1.224748881, -2.779653267), 'mask': (39.29587094, -2.332473271)}),
    ),
}
# fraction of a tensor's norm: pinned against unpinned code paths on one machine moved
# Guided-SR's fingerprints by at most 2.4e-7 of it and Guided-AP's by 5.0e-4 (its gradient
# saliency goes through a ResNet's backward). Blurring the maps with σ 2.8 instead of 3 moves
# Guided-SR's mask by 5.2e-3 of its norm and Guided-AP's by 2.3e-3: both fail.
GUIDED_TOL = {"guided-sr-greedy": 1e-5, "guided-sr-random": 1e-5, "guided-ap-greedy": 1.5e-3}


def model_for_ap() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("cifar_resnet18", 10).train()


def batch(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    images = blob_batch(MEAN, STD, n=6, size=32, seed=3)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    return images.to(device), labels.to(device)


def run_case(mixer_name: str, params: dict[str, str], seed: int, device: str = "cpu"):
    images, labels = batch(device)
    model = model_for_ap().to(device) if params.get("saliency") == "ap" else None
    ctx = MixContext(MEAN, STD, 10, model)
    gen = torch.Generator().manual_seed(seed)
    mixer = get_mixer(mixer_name, **params)
    p = mixer.sample(images, labels, gen, ctx)
    out = mixer.apply(images, labels, p)
    return p, out, torch.randint(0, 2**31, (1,), generator=gen)


def case_digest(mixer_name: str, params: dict[str, str], seed: int) -> str | dict:
    """sha256[:16] of every result; for GuidedMixup that of the discrete results, with the
    fingerprints of its float ones (`fingerprint`)."""
    p, out, nxt = run_case(mixer_name, params, seed)
    guided = mixer_name == "guidedmixup"
    floats = (out.images, out.lam, p.mask)
    h = hashlib.sha256()
    for t in (out.images, out.label_a, out.label_b, out.lam, p.perm, p.boxes, p.dst_boxes,
              p.mask, nxt):
        if guided and any(t is f for f in floats):
            continue
        h.update(b"-" if t is None else t.detach().cpu().contiguous().numpy().tobytes())
    h.update(str(p.active).encode())
    if not guided:
        return h.hexdigest()[:16]
    return {"discrete": h.hexdigest()[:16],
            **{name: fingerprint(t) for name, t in zip(("images", "lam", "mask"), floats)}}


def fingerprint(t: torch.Tensor) -> tuple[float, float]:
    """(L2 norm, projection on a fixed N(0,1) vector) in float64: a change of L2 size d moves
    the projection by about d."""
    t = t.detach().cpu().double().flatten()
    w = torch.randn(t.numel(), generator=torch.Generator().manual_seed(12345),
                    dtype=torch.float64)
    return float(t.norm()), float(t @ w)


# the same CPU code on every x86-64 machine: MKL's conditional numerical reproducibility mode,
# ATen's unvectorised loops, oneDNN's SSE4.1 kernels, one thread
PINNED = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default",
          "ONEDNN_MAX_CPU_ISA": "SSE41", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
DIGESTS = """
import json
from tests.test_mixers_nosync import CASES, case_digest
print(json.dumps({case: [case_digest(mixer, params, seed) for seed in (0, 1, 2)]
                  for case, mixer, params in CASES}))
"""


@pytest.fixture(scope="module")
def pinned_digests() -> dict[str, list[str]]:
    """Every case's digests, computed once in a subprocess with the code paths pinned."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the golden digests were recorded with x86-64 code paths")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, **PINNED, "PYTHONPATH": str(root)}
    res = subprocess.run([sys.executable, "-c", DIGESTS], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_cpu_results_unchanged(case, pinned_digests):
    if case not in GUIDED:
        assert tuple(pinned_digests[case]) == GOLDEN[case]
        return
    tol = GUIDED_TOL[case]
    for got, (discrete, want) in zip(pinned_digests[case], GUIDED[case]):
        assert got["discrete"] == discrete
        for name, (norm, proj) in want.items():
            g_norm, g_proj = got[name]
            assert abs(g_norm - norm) <= tol * norm, (name, g_norm, norm)
            assert abs(g_proj - proj) <= tol * norm, (name, g_proj, proj)


aten = torch.ops.aten
SYNCING = (aten._local_scalar_dense.default, aten.equal.default, aten.nonzero.default,
           aten.masked_select.default, aten.item.default)


class RefuseHostSync(TorchDispatchMode):
    """Raise on every op that would make the host wait for a CUDA stream, for any tensor off
    the CPU: reading a value on the host, copying to the host, a blocking upload."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        off_cpu = any(t.device.type != "cpu" for t in tensors)
        if func in SYNCING and off_cpu:
            raise AssertionError(f"host reads a device value: {func}")
        if func is aten._to_copy.default and "device" in kwargs:
            src, dst = args[0].device.type, torch.device(kwargs["device"]).type
            if src != "cpu" and dst == "cpu":
                raise AssertionError("device-to-host copy")
            if src == "cpu" and dst != "cpu" and not kwargs.get("non_blocking", False):
                raise AssertionError("blocking host-to-device copy")
        if func is aten.copy_.default:
            dst, src = args[0].device.type, args[1].device.type
            blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
            if (src != "cpu" and dst == "cpu") or (src == "cpu" and dst != "cpu" and blocking):
                raise AssertionError(f"copy {src}->{dst} (blocking={blocking})")
        return func(*args, **kwargs)


def refuse_device_literals(monkeypatch) -> None:
    """`torch.tensor(data, device=...)` copies from the host inside C++, unseen by dispatch
    modes: refuse it for devices other than the CPU."""
    for name in ("tensor", "as_tensor"):
        real = getattr(torch, name)

        def guarded(*a, _real=real, **kw):
            dev = kw.get("device")
            if dev is not None and torch.device(dev).type != "cpu":
                raise AssertionError(f"torch.tensor(..., device={dev}) uploads blocking")
            return _real(*a, **kw)

        monkeypatch.setattr(torch, name, guarded)


SYNC_FREE = CASES  # all but mode=official, which runs OpenCV on the host by definition


@pytest.mark.parametrize("one_pass", [False, True], ids=["sample+apply", "call"])
@pytest.mark.parametrize("case,mixer_name,params", SYNC_FREE, ids=[c[0] for c in SYNC_FREE])
def test_mixers_never_wait_for_the_device(case, mixer_name, params, one_pass, monkeypatch):
    """On a fake device (meta: shapes, no data) nothing of the batch is read on the host, by
    `sample` + `apply` or by the one-pass `__call__` (what training runs; SaliencyMix and
    Guided-SR fuse sample and apply)."""
    images, labels = batch()
    model = model_for_ap().to("meta") if params.get("saliency") == "ap" else None
    images, labels = images.to("meta"), labels.to("meta")
    ctx = MixContext(MEAN, STD, 10, model)
    mixer = get_mixer(mixer_name, **params)
    refuse_device_literals(monkeypatch)
    for seed in range(3):  # also after the caches (plans, taps, constants) are filled
        gen = torch.Generator().manual_seed(seed)
        with RefuseHostSync():
            out = mixer(images, labels, gen, ctx) if one_pass else \
                mixer.apply(images, labels, mixer.sample(images, labels, gen, ctx))
        assert out.images.device.type == "meta" and out.lam.device.type == "meta"
        assert out.images.shape == images.shape and out.lam.shape == labels.shape


def run_call(mixer_name: str, params: dict[str, str], seed: int, device: str = "cpu"):
    images, labels = batch(device)
    model = model_for_ap().to(device) if params.get("saliency") == "ap" else None
    gen = torch.Generator().manual_seed(seed)
    out = get_mixer(mixer_name, **params)(images, labels, gen, MixContext(MEAN, STD, 10, model))
    return out, torch.randint(0, 2**31, (1,), generator=gen)


def same_output(a, b) -> bool:
    return (torch.equal(a.images, b.images) and torch.equal(a.label_a, b.label_a)
            and (a.label_b is None) == (b.label_b is None)
            and (a.label_b is None or torch.equal(a.label_b, b.label_b))
            and a.lam.dtype == b.lam.dtype and torch.equal(a.lam, b.lam))


@pytest.mark.parametrize("case,mixer_name,params", CASES, ids=[c[0] for c in CASES])
def test_call_is_sample_then_apply(case, mixer_name, params):
    """`mixer(...)` (fused for SaliencyMix and Guided-SR) gives apply(sample(...))'s output
    bit for bit and leaves the generator where sample leaves it; seeds 3-5 with prob 0.8
    include batches that are not mixed."""
    for seed in (0, 1, 2, 3, 4, 5):
        p = dict(params, prob="0.8") if seed >= 3 and mixer_name != "none" else params
        _, want, want_next = run_case(mixer_name, p, seed)
        got, got_next = run_call(mixer_name, p, seed)
        assert same_output(got, want), (case, seed)
        assert torch.equal(got_next, want_next)


def test_the_guard_catches_what_would_sync():
    """The guard is a real check: the old habits (`.cpu()`, `.item()`, `torch.equal`, a
    blocking upload) all raise under it."""
    x = torch.zeros(4, device="meta")
    for bad in (lambda: x.cpu(), lambda: x.sum().item(), lambda: torch.equal(x, x),
                lambda: torch.ones(4).to("meta"), lambda: x.nonzero()):
        with pytest.raises((AssertionError, RuntimeError, NotImplementedError)) as info:
            with RefuseHostSync():
                bad()
        assert info.type is AssertionError, info.value


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
HOST_DRAWN = ("none", "cutout", "mixup", "cutmix")  # every decision is a host draw


@cuda
@pytest.mark.parametrize("case,mixer_name,params", SYNC_FREE, ids=[c[0] for c in SYNC_FREE])
def test_cuda_mixers_under_sync_debug_error(case, mixer_name, params):
    """Every mixer's sample+apply on CUDA with synchronising calls turned into errors (the
    batch, model and mixer are made before); the host-drawn methods decide as on the CPU."""
    images, labels = (t.cuda() for t in batch())
    model = model_for_ap().cuda() if params.get("saliency") == "ap" else None
    ctx = MixContext(MEAN, STD, 10, model)
    mixer = get_mixer(mixer_name, **params)
    for seed in (0, 1, 2):  # warm-up: plans, cuFFT, pinned pool, constants
        mixer(images, labels, torch.Generator().manual_seed(seed), ctx)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for seed in (0, 1, 2):
            p = mixer.sample(images, labels, torch.Generator().manual_seed(seed), ctx)
            out = mixer.apply(images, labels, p)
            fused = mixer(images, labels, torch.Generator().manual_seed(seed), ctx)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert same_output(fused, out)  # the one-pass call (one graph) == sample + apply
    cpu_p, cpu_out, _ = run_case(mixer_name, params, 2)
    assert out.images.is_cuda and bool(torch.isfinite(out.images).all())
    assert bool(((out.lam >= 0) & (out.lam <= 1)).all())
    if case in HOST_DRAWN:
        for a, b in ((p.perm, cpu_p.perm), (p.boxes, cpu_p.boxes), (out.lam, cpu_out.lam)):
            assert (a is None) == (b is None) and (a is None or torch.equal(a.cpu(), b.cpu()))


@pytest.mark.parametrize("n", [24, 64])
def test_device_greedy_walk_keeps_first_index_ties(n):
    """The tensor-op walk (no host reads) against Algorithm 1 in plain Python loops, on maps
    quantised so that many distances tie."""
    from pretrain.greedy import greedy_pairing
    from tests.test_guidedmixup import brute_force_walk

    for seed in range(3):
        maps = (torch.rand(n, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2).round()
        assert greedy_pairing(n, maps=maps).tolist() == brute_force_walk(maps.numpy())
