"""Mixers that never synchronise with the host, and whose CPU results did not change for it.

* Golden digests: every mixer's CPU output (mixed images, labels, λ, permutation, boxes, mask
  and the generator's next draw) for fixed seeds, recorded with the code of commit d4b72b6
  (before the mixers were made sync-free) and asserted bit-identical now.
* A fake device: `sample`+`apply` run on 'meta' tensors (no data) under a dispatch mode that
  refuses what would stall a CUDA stream: reading a device value on the host (`.item()`,
  `bool()`, `.cpu()`, `.tolist()`, data-dependent shapes) and blocking host-to-device copies.
  Host draws from the CPU generator stay allowed: they never wait for the device.
* On CUDA (skipped without one): every mixer under `torch.cuda.set_sync_debug_mode("error")`,
  and the same results as on CPU.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from smix.arch import build_model
from pretrain.mixers import MixContext, get_mixer
from tests.conftest import blob_batch

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

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

# sha256[:16] of `digest(...)` for seeds 0, 1, 2, computed with the code of commit d4b72b6.
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
    "guided-sr-greedy": ('8a8bb15fa9a97f82', 'eee6983d0b735a6e', 'b2ee43ff6e052df3'),
    "guided-sr-random": ('d0d4d8df4a2fc249', 'ed3515cd998721aa', '72d0f07882446846'),
    "guided-ap-greedy": ('56c7e2fa69beb894', '112a50467f9b93f1', '80206252fd06d474'),
}


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


def case_digest(mixer_name: str, params: dict[str, str], seed: int) -> str:
    p, out, nxt = run_case(mixer_name, params, seed)
    h = hashlib.sha256()
    for t in (out.images, out.label_a, out.label_b, out.lam, p.perm, p.boxes, p.dst_boxes,
              p.mask, nxt):
        h.update(b"-" if t is None else t.detach().cpu().contiguous().numpy().tobytes())
    h.update(str(p.active).encode())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("case,mixer_name,params", CASES, ids=[c[0] for c in CASES])
def test_cpu_results_unchanged(case, mixer_name, params):
    got = tuple(case_digest(mixer_name, params, seed) for seed in (0, 1, 2))
    assert got == GOLDEN[case]
