"""GuidedMixup's mask-and-blend Triton kernel (`pretrain.mixers.guided_triton`) against its
tensor ops, bit for bit, and Guided-SR's whole step with every kernel on (the spectral
residual's input, the greedy walk, the blend) against its tensor ops. Triton's interpreter
(TRITON_INTERPRET=1, set before Triton is imported, hence a subprocess) runs the very kernel
CUDA compiles, on CPU tensors; on a GPU the CUDA test compares the compiled kernel, and
`BLEND_KERNELS` checks it on each device before its first use."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.conftest import RUNTIME_LOOPS, FailingKernels, fresh_kernels, interpreted

pytest.importorskip("triton")

SCRIPT = RUNTIME_LOOPS + r"""
import functools
import json
import torch
import triton
import triton.language as tl
from pretrain import greedy, saliency
from pretrain.greedy import guided_maps
from pretrain.mixers import MixContext, get_mixer
from pretrain.mixers import guidedmixup as gm
torch.set_num_threads(1)
kernels = gm.BLEND_KERNELS.get("cpu")  # loads it and runs the first-use check
assert kernels is not None, gm.BLEND_KERNELS.failed
g = torch.Generator().manual_seed(5)
done = []
# the kernel's rounding to float16 and bfloat16 against torch's casts, NaN-aware: ties, the
# largest finite values, subnormals, infinities and NaNs (0x7FFFFFFF is a GPU's only NaN)
from pretrain.mixers.guided_triton import _rounded

@triton.jit
def rounded(x_ptr, out_ptr, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(out_ptr + i, _rounded(tl.load(x_ptr + i, mask=i < n), KIND), mask=i < n)

special = [0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x7FC00000, 0x7F800000, 0xFF800000, 0x7F7FFFFF,
           0x3F808000, 0x3F818000, 0x3F80FFFF, 0x00000001, 0x807FFFFF, 0x00000000, 0x80000000]
bits = torch.cat([torch.tensor(special, dtype=torch.int64),
                  torch.randint(0, 2**32, (4000,), generator=g)])
x = bits.to(torch.int32).view(torch.float32)  # the low 32 bits of each value
for kind, dtype in ((1, torch.float16), (2, torch.bfloat16)):
    out = torch.empty_like(x)
    rounded[(1,)](x, out, len(x), KIND=kind, BLOCK=4096)
    want = x.to(dtype).float()
    assert ((out == want) | (out.isnan() & want.isnan())).all(), str(dtype)
    done.append(["rounded", str(dtype)])
for n, c, h, w in ((1, 3, 1, 1), (2, 3, 5, 7), (6, 3, 13, 29), (64, 3, 32, 32), (3, 1, 9, 9),
                   (4, 4, 17, 3)):
    raw = torch.rand(n, h, w, generator=g)
    raw[raw < 0.4] = 0.0  # many pixels where a pair's maps are both 0
    raw[-1] = 0.0  # an image without mass: uniform after guided_maps
    for maps in (raw, guided_maps(raw * 255)):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for channels_last in (False, True):
                images = (torch.randn(n, c, h, w, generator=g) * 2).to(dtype)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                perm = torch.randperm(n, generator=g)
                want = gm._mask_and_blend_ops(images, maps, perm)
                got = gm._mask_and_blend_kernel(kernels, images, maps, perm)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), \
                    (n, c, h, w, dtype, channels_last)
                assert got[0].stride() == images.stride() and got[1].is_contiguous()
                # properties, independent of the tensor ops: M in [0, 1], 1/2 where a pair's
                # maps are both 0, M + M[perm-partner] = 1 elsewhere (up to rounding)
                m, pair = got[1][:, 0].double(), maps[perm].double()
                both_zero = (maps == 0) & (maps[perm] == 0)
                assert ((m >= 0) & (m <= 1)).all() and (m[both_zero] == 0.5).all()
                ratio = maps.double() / (maps.double() + pair)
                assert torch.allclose(m[~both_zero], ratio[~both_zero], rtol=1e-6, atol=0)
                done.append([n, c, h, w, str(dtype), channels_last])
# Guided-SR's one-pass step with the walk's, the detector's and the blend's kernels on
mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
ctx = MixContext(mean, std, 10)
mean_t, std_t = (torch.tensor(v).view(1, 3, 1, 1) for v in (mean, std))
spectral = saliency.SPECTRAL_KERNELS.get("cpu")
assert spectral is not None, saliency.SPECTRAL_KERNELS.failed
real_cycle, real_spectral, real_blend = (greedy.greedy_cycle, saliency._spectral_kernels_for,
                                         gm._blend_kernels_for)
y = torch.randint(0, 10, (16,), generator=g)
x = (torch.rand(16, 3, 32, 32, generator=g) - mean_t) / std_t
for images in (x, x.bfloat16().contiguous(memory_format=torch.channels_last)):
    for pairing in ("greedy", "random"):
        mixer = get_mixer("guidedmixup", saliency="sr", pairing=pairing)
        outs = []
        for on in (True, False):
            greedy.greedy_cycle = functools.partial(real_cycle, use_kernel=on)
            saliency._spectral_kernels_for = (lambda im: spectral) if on else (lambda im: None)
            gm._blend_kernels_for = (lambda *t: kernels) if on else (lambda *t: None)
            out = mixer(images, y, torch.Generator().manual_seed(3), ctx)
            outs.append((out.images, out.label_b, out.lam))
        greedy.greedy_cycle, saliency._spectral_kernels_for, gm._blend_kernels_for = (
            real_cycle, real_spectral, real_blend)
        assert all(torch.equal(a, b) for a, b in zip(*outs)), (images.dtype, pairing)
        # and apply(sample(...)), the two-pass call, gives the same values
        two = mixer.apply(images, y, mixer.sample(images, y, torch.Generator().manual_seed(3),
                                                  ctx))
        assert all(torch.equal(a, b) for a, b in zip(outs[0], (two.images, two.label_b,
                                                               two.lam)))
        assert not torch.equal(outs[0][0], images)  # something was mixed
        done.append(["guided-sr step", str(images.dtype), pairing])
for checked in (greedy.WALK, saliency.SPECTRAL_KERNELS, gm.BLEND_KERNELS):
    assert checked.failed is None, checked.failed
print(json.dumps(done))
"""


def test_blend_kernel_equals_the_tensor_ops_in_the_interpreter():
    done = interpreted(SCRIPT)
    assert sum(d[0] == "rounded" for d in done) == 2
    assert sum(d[0] not in ("rounded", "guided-sr step") for d in done) == 72  # 6x2 maps x3x2
    assert sum(d[0] == "guided-sr step" for d in done) == 4  # 2 dtypes x 2 pairings


def test_a_wrong_blend_kernel_is_caught_before_its_first_use(monkeypatch):
    """A blend one bfloat16 step off at one pixel is never used: the first-use check sees it."""
    from pretrain.mixers import guidedmixup as gm

    def off_by_one_step(kernels, images, maps, perm):
        mixed, mask = gm._mask_and_blend_ops(images, maps, perm)
        if images.dtype == torch.bfloat16:
            mixed = mixed.clone()
            v = mixed[0, 0, 0, 3]
            mixed[0, 0, 0, 3] = v + (v.abs() + 1) * 2**-7  # at least one bfloat16 step
        return mixed, mask

    fresh_kernels(monkeypatch, gm.BLEND_KERNELS, object())
    monkeypatch.setattr(gm, "_mask_and_blend_kernel", off_by_one_step)
    with pytest.warns(RuntimeWarning, match="guidedmixup blend: the Triton kernel failed.*"
                                            "bfloat16.*differs from the tensor ops"):
        assert gm.BLEND_KERNELS.get("cpu") is None
    assert gm.BLEND_KERNELS.get("cpu") is None  # for good, no second warning


def test_a_blend_launch_that_fails_after_the_check_falls_back_once(monkeypatch):
    """A kernel that passed its check but fails on a new shape (a specialisation that does not
    compile): the mix comes from the tensor ops, one warning, kernel off."""
    from pretrain.mixers import guidedmixup as gm
    broken = FailingKernels("PTX assembly failed")
    fresh_kernels(monkeypatch, gm.BLEND_KERNELS, broken)
    monkeypatch.setattr(gm, "_blend_kernels_for", lambda *tensors: broken)
    g = torch.Generator().manual_seed(0)
    images, maps, perm = torch.randn(5, 3, 8, 8, generator=g), torch.rand(5, 8, 8, generator=g), \
        torch.randperm(5, generator=g)
    with pytest.warns(RuntimeWarning, match="guidedmixup blend: the Triton kernel failed.*PTX"):
        got = gm.mask_and_blend(images, maps, perm)
    want = gm._mask_and_blend_ops(images, maps, perm)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert gm.BLEND_KERNELS.get("cpu") is None  # off for good


def test_the_kernel_takes_only_what_it_can_walk():
    """Float32 maps; float32/16 and bfloat16 images in NCHW or channels last, without a
    gradient wanted; anything else (and any CPU tensor) goes to the tensor ops."""
    from pretrain.mixers import guidedmixup as gm
    images, maps, perm = torch.randn(2, 3, 4, 4), torch.rand(2, 4, 4), torch.tensor([1, 0])
    assert gm._blend_fits(images, maps)
    assert gm._blend_fits(images.bfloat16().contiguous(memory_format=torch.channels_last), maps)
    assert gm._blend_fits(images.half(), maps)
    for bad_images, bad_maps in ((images.double(), maps), (images.transpose(2, 3), maps),
                                 (images[:, :, ::2], maps), (images, maps.double()),
                                 (images.clone().requires_grad_(), maps)):
        assert not gm._blend_fits(bad_images, bad_maps)
    with torch.no_grad():  # no gradient wanted: the kernel's output may lack one
        assert gm._blend_fits(images.clone().requires_grad_(), maps)
    assert gm._blend_kernels_for(images, maps, perm) is None  # CPU


def test_the_launch_turns_fma_contraction_off(monkeypatch):
    """Each product and sum must round on its own, as the tensor ops': the launch asks Triton
    for no FMA contraction, and passes the images' dtype as the kernel's KIND."""
    from pretrain.mixers import guidedmixup as gm
    launches = []

    class Recorder:
        def __getattr__(self, name):
            return self

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs)

    images, maps, perm = torch.randn(2, 3, 4, 4), torch.rand(2, 4, 4), torch.tensor([1, 0])
    for dtype, kind in ((torch.float32, 0), (torch.float16, 1), (torch.bfloat16, 2)):
        gm._mask_and_blend_kernel(Recorder(), images.to(dtype), maps, perm)
        assert launches[-1]["enable_fp_fusion"] is False and launches[-1]["KIND"] == kind


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.filterwarnings("error:.*Triton kernel failed:RuntimeWarning")
@pytest.mark.parametrize("n,h,w", [(64, 32, 32), (32, 224, 224), (3, 37, 61)])
def test_cuda_blend_kernel_equals_the_tensor_ops(n, h, w):
    """The compiled kernel on the GPU equals the tensor ops there and on the CPU, in the
    layouts and dtypes training passes, and really ran (passed its check, no fallback)."""
    from pretrain.greedy import guided_maps
    from pretrain.mixers import guidedmixup as gm
    g = torch.Generator().manual_seed(n)
    raw = torch.rand(n, h, w, generator=g)
    raw[raw < 0.4] = 0.0  # pairs whose maps are both 0: the 1/2 branch
    perm = torch.randperm(n, generator=g)
    kernels = gm.BLEND_KERNELS.get("cuda")
    assert kernels is not None, gm.BLEND_KERNELS.failed
    for maps, dtype, layout in itertools.product(
            (raw, guided_maps(raw * 255)), (torch.float32, torch.bfloat16, torch.float16),
            (torch.contiguous_format, torch.channels_last)):
        x = torch.randn(n, 3, h, w, generator=g).to(dtype).contiguous(memory_format=layout)
        got = gm.mask_and_blend(x.cuda(), maps.cuda(), perm.cuda())
        want = gm._mask_and_blend_ops(x.cuda(), maps.cuda(), perm.cuda())
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got, gm._mask_and_blend_ops(
            x, maps, perm)))
