"""The detectors' Triton kernels (`pretrain.saliency_triton`) against their tensor ops, bit for
bit, and through them against OpenCV: fine_grained's (the quantised gray plane blurred twice,
de-normalised first for normalised images, the on/off sums, the mix) and spectral_residual's
(the gray plane resized to 64x64). Triton's interpreter (TRITON_INTERPRET=1, set before
Triton is imported, hence a subprocess) runs the very kernels CUDA compiles, on CPU tensors; it
divides with numpy (IEEE, as `tl.div_rn` on the GPU). On a GPU the CUDA tests below compare the
compiled kernels with the tensor ops there, and `FINE_GRAINED_KERNELS` / `SPECTRAL_KERNELS`
check them on each device before their first use."""

from __future__ import annotations


import pytest
import torch

from tests.conftest import FailingKernels, fresh_kernels, interpreted

pytest.importorskip("triton")

SCRIPT = r"""
import json
import numpy as np
import torch
from pretrain import saliency
from smix.data import denormalize
torch.set_num_threads(1)  # the CPU chunk budget scales with the threads
assert len(saliency._chunks(70, 32 * 32, torch.device("cpu"))) == 2  # (70, 32, 32): 64 + 6
kernels = saliency.FINE_GRAINED_KERNELS.get("cpu")  # loads them and runs the first-use check
assert kernels is not None, saliency.FINE_GRAINED_KERNELS.failed
g = torch.Generator().manual_seed(5)
done = []
norm = ((0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616))  # CIFAR-10's
mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in norm)
# sizes: every scale clamped (3x3), merged scales (20x20, 32x32), non-square, a batch that
# splits into CPU chunks (the last one smaller: the off plane's stride is the workspace's)
for n, h, w in ((2, 3, 3), (3, 20, 20), (4, 32, 32), (2, 37, 61), (70, 32, 32), (1, 96, 80)):
    for kind in ("smooth", "noise", "flat", "raw", "normalized"):
        if kind == "normalized":  # within an ulp of half grey levels once de-normalised
            x = ((torch.randint(0, 255, (n, 3, h, w), generator=g) + 0.5) / 255 - mean) / std
        elif kind == "raw":  # de-normalised pixels: halves (round to even), beyond 0..255, NHWC
            x = (torch.randint(-120, 1161, (n, 3, h, w), generator=g) / 4.0).contiguous(
                memory_format=torch.channels_last)
        elif kind == "smooth":
            low = torch.rand(n, 3, max(2, h // 6), max(2, w // 6), generator=g) * 255
            x = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear")
        elif kind == "noise":
            x = torch.rand(n, 3, h, w, generator=g) * 255
        else:
            x = torch.full((n, 3, h, w), 77.0)
        opts = {"normalization": norm} if kind == "normalized" else {}
        for saturate in (False, True):
            want = saliency._fine_grained_with(x, saturate, None, **opts)
            got = saliency._fine_grained_with(x, saturate, kernels, **opts)
            if opts:  # the maps of the pixels, de-normalised beforehand as the mixers did
                pixels = denormalize(x, *norm, scale=255.0)
                assert torch.equal(want, saliency._fine_grained_with(pixels, saturate, None))
            assert got.shape == want.shape and got.dtype == want.dtype
            assert torch.equal(got, want), (n, h, w, kind, saturate,
                                            float((got - want).abs().max()))
            done.append([n, h, w, kind, saturate])
disc = saliency.wrapping_disc()  # on + off over 255: the uchar wrap, and its saturation
for saturate in (False, True):
    assert torch.equal(saliency._fine_grained_with(disc, saturate, kernels),
                       saliency._fine_grained_with(disc, saturate, None))
    done.append([1, 128, 128, "disc", saturate])
wrapped, saturated = (saliency._fine_grained_with(disc, s, kernels) for s in (False, True))
assert bool((saturated > wrapped).any()) and bool((saturated == 1.0).any())
print(json.dumps(done))
"""


def test_fine_grained_kernels_equal_the_tensor_ops_in_the_interpreter():
    done = interpreted(SCRIPT)
    assert len(done) == 62  # every size, kind and saturation ran through the kernels


SPECTRAL_SCRIPT = r"""
import json
import torch
from pretrain import saliency
from smix.data import denormalize
torch.set_num_threads(1)
kernels = saliency.SPECTRAL_KERNELS.get("cpu")  # loads it and runs the first-use check
assert kernels is not None, saliency.SPECTRAL_KERNELS.failed
g = torch.Generator().manual_seed(6)
norm = ((0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616))  # CIFAR-10's
mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in norm)
done = []
# up from 3x3 and 32x32 (a batch in five CPU chunks), 64x64 itself, down, non-square
for n, h, w in ((2, 3, 3), (3, 32, 32), (70, 32, 32), (2, 64, 64), (2, 37, 61), (1, 96, 80),
                (1, 224, 224)):
    for kind in ("noise", "raw", "normalized"):
        if kind == "normalized":  # within an ulp of half grey levels once de-normalised
            x = ((torch.randint(0, 255, (n, 3, h, w), generator=g) + 0.5) / 255 - mean) / std
        elif kind == "raw":  # de-normalised pixels: halves, beyond 0..255, NHWC
            x = (torch.randint(-120, 1161, (n, 3, h, w), generator=g) / 4.0).contiguous(
                memory_format=torch.channels_last)
        else:
            x = torch.rand(n, 3, h, w, generator=g) * 255
        opts = norm if kind == "normalized" else None
        want = saliency._spectral_residual_with(x, 64, opts, None)
        got = saliency._spectral_residual_with(x, 64, opts, kernels)
        assert got.shape == want.shape and torch.equal(got, want), (n, h, w, kind)
        if opts:  # the maps of the pixels, de-normalised beforehand as the mixers did
            pixels = denormalize(x, *norm, scale=255.0)
            assert torch.equal(want, saliency._spectral_residual_with(pixels, 64, None, None))
        done.append([n, h, w, kind])
print(json.dumps(done))
"""


def test_spectral_residual_kernel_equals_the_tensor_ops_in_the_interpreter():
    """`gray_resize` (the spectral residual's input from RGB or normalised pixels) through the
    whole detector, bit for bit (Guided-SR's step with every kernel on: test_guided_triton)."""
    done = interpreted(SPECTRAL_SCRIPT)
    assert len(done) == 21  # 7 sizes x 3 kinds


@pytest.mark.parametrize("detector", ["fine_grained", "spectral_residual"])
def test_kernels_wrong_by_one_grey_level_are_caught_before_their_first_use(monkeypatch,
                                                                           detector):
    """The first-use check compares the detector's kernel path (fine_grained: its maps;
    spectral_residual: its gray plane) against the tensor ops on the same device; kernels
    whose result is off by one grey level anywhere are never used."""
    from pretrain import saliency
    if detector == "fine_grained":
        checked, target, real = (saliency.FINE_GRAINED_KERNELS, "_fine_grained_with",
                                 saliency._fine_grained_with)

        def wrong(images, saturate, kernels, chunk_pixels=None, normalization=None):
            out = real(images, saturate, None, chunk_pixels, normalization)
            if kernels is not None:
                out = out.clone()
                out.view(-1)[7] += 1 / 255
            return out
    else:
        checked, target, real = (saliency.SPECTRAL_KERNELS, "_gray_resized",
                                 saliency._gray_resized_ops)

        def wrong(kernels, rgb, size, normalization=None):
            out = real(rgb, size, normalization).clone()
            out[0, 3, 5] += 1
            return out

    fresh_kernels(monkeypatch, checked, object())
    monkeypatch.setattr(saliency, target, wrong)
    with pytest.warns(RuntimeWarning, match=f"{detector}: the Triton kernel failed.*"
                                           "differs from the tensor ops"):
        assert checked.get("cpu") is None
    assert checked.get("cpu") is None  # for good, no second warning


@pytest.mark.parametrize("detector", ["fine_grained", "spectral_residual"])
def test_a_launch_that_fails_after_the_check_falls_back_once(monkeypatch, detector):
    """Kernels that passed their check but fail on a new shape (a specialisation that does
    not compile): the detector answers with its tensor ops, one warning, kernels off."""
    from pretrain import saliency
    broken = FailingKernels("PTX assembly failed")
    if detector == "fine_grained":
        checked, route, run = saliency.FINE_GRAINED_KERNELS, "_kernels_for", saliency._fine_grained
        eager = lambda x: saliency._fine_grained_with(x, False, None)
    else:
        checked, route, run = (saliency.SPECTRAL_KERNELS, "_spectral_kernels_for",
                               saliency._spectral_residual)
        eager = lambda x: saliency._spectral_residual_with(x, 64, None, None)
    fresh_kernels(monkeypatch, checked, broken)
    monkeypatch.setattr(saliency, route, lambda images: broken)
    x = torch.rand(40, 3, 20, 20, generator=torch.Generator().manual_seed(0)) * 255
    with pytest.warns(RuntimeWarning, match=f"{detector}: the Triton kernel failed.*PTX"):
        got = run(x)
    assert torch.equal(got, eager(x))
    assert checked.get("cpu") is None  # off for good


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.filterwarnings("error:.*Triton kernel failed:RuntimeWarning")
@pytest.mark.parametrize("n,h,w", [(6, 32, 32), (5, 224, 224), (3, 37, 61)])
def test_cuda_fine_grained_kernels_equal_the_tensor_ops(n, h, w):
    """The compiled kernels on the GPU: the detector with them equals its tensor ops on the
    GPU and the CPU's, and they really ran (passed the first-use check, no fallback)."""
    from pretrain import saliency
    g = torch.Generator().manual_seed(n)
    low = torch.rand(n, 3, h // 4, w // 4, generator=g) * 255
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear")
    kernels = saliency.FINE_GRAINED_KERNELS.get("cuda")
    assert kernels is not None, saliency.FINE_GRAINED_KERNELS.failed
    for saturate in (False, True):
        got = saliency._fine_grained_with(x.cuda(), saturate, kernels)
        assert torch.equal(got, saliency._fine_grained_with(x.cuda(), saturate, None))
        assert torch.equal(got.cpu(), saliency._fine_grained_with(x, saturate, None))
        # in chunks of 2 images (the last one smaller, as 256 images of 224x224 in training)
        chunked = saliency._fine_grained_with(x.cuda(), saturate, kernels, 2 * h * w)
        assert torch.equal(chunked, got)
    assert torch.equal(saliency.fine_grained(x.cuda()).cpu(), saliency.fine_grained(x))
    # normalised images (ImageNet's statistics), de-normalised in the first kernel, as
    # SaliencyMix passes them: float32, and bfloat16 channels last as bf16 training does
    norm = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in norm)
    xn = ((x.round() + 0.5) / 255 - mean) / std  # within an ulp of half grey levels
    for images in (xn, xn.bfloat16().contiguous(memory_format=torch.channels_last)):
        want = saliency.fine_grained(images, normalization=norm)
        assert torch.equal(saliency.fine_grained(images.cuda(), normalization=norm).cpu(), want)


@cuda
@pytest.mark.filterwarnings("error:.*Triton kernel failed:RuntimeWarning")
@pytest.mark.parametrize("n,h,w", [(64, 32, 32), (5, 224, 224), (3, 37, 61)])
def test_cuda_spectral_kernel_equals_the_tensor_ops(n, h, w):
    """The compiled `gray_resize` on the GPU: the spectral residual with it equals its tensor
    ops there (the same FFT calls after it), for pixels and for normalised bfloat16 channels-
    last images, and it really ran (passed the first-use check, no fallback)."""
    from pretrain import saliency
    g = torch.Generator().manual_seed(n)
    x = (torch.rand(n, 3, h, w, generator=g) * 255).cuda()
    kernels = saliency.SPECTRAL_KERNELS.get("cuda")
    assert kernels is not None, saliency.SPECTRAL_KERNELS.failed
    norm = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    mean, std = (torch.tensor(v, device="cuda").view(1, 3, 1, 1) for v in norm)
    xn = ((x.round() + 0.5) / 255 - mean) / std
    for images, opts in ((x, None), (xn.bfloat16().contiguous(
            memory_format=torch.channels_last), norm)):
        got = saliency._spectral_residual_with(images, 64, opts, kernels)
        assert torch.equal(got, saliency._spectral_residual_with(images, 64, opts, None))
        assert torch.equal(saliency.spectral_residual(images, normalization=opts), got)
