"""The box mixers' Triton kernels (`pretrain.mixers.boxes_triton`: boxes at map points, the
per-sample paste) against their tensor ops, bit for bit, and SaliencyMix's whole step with
every kernel on against its tensor ops. Triton's interpreter (TRITON_INTERPRET=1, set before
Triton is imported, hence a subprocess) runs the very kernels CUDA compiles, on CPU tensors;
on a GPU the CUDA test below compares the compiled kernels, and `BOX_KERNELS` checks them on
each device before their first use."""

from __future__ import annotations


import pytest
import torch

from tests.conftest import FailingKernels, fresh_kernels, interpreted

pytest.importorskip("triton")

SCRIPT = r"""
import json
import torch
from pretrain import saliency
from pretrain.mixers import MixContext, boxes, get_mixer
from pretrain.mixers.saliencymix import SCHEMES
from tests.conftest import blob_batch
torch.set_num_threads(1)
kernels = boxes.BOX_KERNELS.get("cpu")  # loads them and runs the first-use check
assert kernels is not None, boxes.BOX_KERNELS.failed
g = torch.Generator().manual_seed(11)
done = []
# boxes at points: one box to three programs' worth, square and not, tiny images
for n, h, w in ((1, 1, 1), (1, 5, 5), (9, 7, 3), (64, 32, 32), (130, 31, 57), (257, 224, 224)):
    idx = torch.randint(0, h * w, (2, n), generator=g)
    sides = torch.stack([torch.randint(0, h + 1, (n,), generator=g),
                         torch.randint(0, w + 1, (n,), generator=g)])
    for dst_idx in (None, idx[1]):
        want = boxes._boxes_at_points_ops(idx[0], dst_idx, sides, h, w)
        got = boxes._boxes_at_points_kernel(kernels, idx[0], dst_idx, sides, h, w)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b), (n, h, w, dst_idx is None, a, b)
        if n > 1:
            assert (got[0][:, 2:] >= got[0][:, :2]).all()  # clipped, never inverted
        done.append(["points", n, h, w, dst_idx is not None])
# the paste: layouts, dtypes, per-sample and batch-wide boxes, with and without destinations
for n, c, h, w in ((1, 3, 4, 4), (6, 3, 13, 29), (5, 1, 32, 32), (3, 4, 9, 9)):
    idx = torch.randint(0, h * w, (2, n), generator=g)
    sides = torch.stack([torch.randint(0, h + 1, (n,), generator=g),
                         torch.randint(0, w + 1, (n,), generator=g)])
    src, dst, _ = boxes._boxes_at_points_ops(idx[0], idx[1], sides, h, w)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for channels_last in (False, True):
            images = torch.randn(n, c, h, w, generator=g).to(dtype)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            perm = torch.randperm(n, generator=g)
            one = src[:1].expand(n, 4)  # one box for the batch (row stride 0)
            one_dst = boxes.place_like(one, idx[1] // w, idx[1] % w, h, w)
            # mode batch's pair (both row stride 0), a [1,4] box broadcast; the last pair's
            # sizes differ (no mixer makes such): reads clamp as the gather's
            for s, d in ((src, None), (src, dst), (one, None), (one, one_dst[:1].expand(n, 4)),
                         (one, one_dst), (src[:1], None), (one, dst)):
                want = boxes.paste(images, images[perm], s, d)
                got = boxes._paste_kernel(kernels, images, perm, s, d)
                assert torch.equal(got, want), (n, c, h, w, dtype, channels_last)
                assert got.stride() == images.stride()
                done.append(["paste", n, c, h, w, str(dtype), channels_last])
# SaliencyMix's one-pass step with the detector's and the boxes' kernels on, against tensor ops
fine = saliency.FINE_GRAINED_KERNELS.get("cpu")
assert fine is not None, saliency.FINE_GRAINED_KERNELS.failed
# the detector's gray plane blurred twice: NaN spreads, infinities clamp, as the tensor ops
odd = torch.rand(2, 3, 9, 11, generator=g) * 300 - 20
odd[0, 1, 4, 5], odd[1, 0, 0, 0], odd[1, 2, 8, 10], odd[0, 0, 2, 2] = (
    float("nan"), float("inf"), -float("inf"), -0.0)
for layout in (torch.contiguous_format, torch.channels_last):
    x = odd.contiguous(memory_format=layout)
    want = saliency._gaussian3_u8(saliency._gaussian3_u8(saliency._gray_u8(
        saliency._as_uint8_grid(x))))
    got = saliency._gray_blurred(fine, x, saliency._Workspace(want, 2, 9, 11))
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert int(got.isnan().sum()) == 25  # the NaN's 5x5 neighbourhood, nothing else
    done.append(["nan", str(layout)])
mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
images = blob_batch(mean, std, n=6, size=32, seed=3).contiguous(memory_format=torch.channels_last)
labels = torch.arange(6)
ctx = MixContext(mean, std, 10)
for on in (True, False):
    saliency._kernels_for = (lambda x: fine) if on else (lambda x: None)
    boxes._kernels_for = (lambda *t: kernels) if on else (lambda *t: None)
    outs = []
    for mode in ("batch", "sample"):
        for scheme in SCHEMES:
            mixer = get_mixer("saliencymix", mode=mode, scheme=scheme)
            for seed in (0, 1):
                out = mixer(images, labels, torch.Generator().manual_seed(seed), ctx)
                outs.append((out.images, out.label_b, out.lam))
    if on:
        with_kernels = outs
for (a, la, ma), (b, lb, mb) in zip(with_kernels, outs):
    assert torch.equal(a, b) and torch.equal(la, lb) and torch.equal(ma, mb)
    assert ma.dtype == torch.float32 and ma.is_contiguous()
done.append(["saliencymix", len(outs)])
assert not torch.equal(with_kernels[0][0], images)  # something was pasted
print(json.dumps(done))
"""


def test_box_kernels_equal_the_tensor_ops_in_the_interpreter():
    done = interpreted(SCRIPT)
    assert sum(d[0] == "points" for d in done) == 12
    assert sum(d[0] == "paste" for d in done) == 168
    assert sum(d[0] == "nan" for d in done) == 2
    assert done[-1] == ["saliencymix", 20]  # 2 modes x 5 schemes x 2 seeds


def test_wrong_paste_kernels_are_caught_before_their_first_use(monkeypatch):
    """A paste kernel that is off by one pixel is never used: the first-use check sees it."""
    from pretrain.mixers import boxes

    def shifted_paste(kernels, images, perm, src, dst):
        return boxes.paste(images, images[perm], src, dst).roll(1, dims=-1)

    monkeypatch.setattr(boxes, "_boxes_at_points_kernel",  # right boxes: only the paste errs
                        lambda kernels, *args: boxes._boxes_at_points_ops(*args))
    monkeypatch.setattr(boxes, "_paste_kernel", shifted_paste)
    fresh_kernels(monkeypatch, boxes.BOX_KERNELS, object())
    with pytest.warns(RuntimeWarning, match="mixer boxes: the Triton kernel failed.*paste"):
        assert boxes.BOX_KERNELS.get("cpu") is None
    assert boxes.BOX_KERNELS.get("cpu") is None  # for good, no second warning


def test_a_launch_that_fails_after_the_check_falls_back_once(monkeypatch):
    """Kernels that passed their check but fail to launch (a specialisation that does not
    compile): boxes and paste answer with their tensor ops, one warning, kernels off."""
    from pretrain.mixers import boxes

    broken = FailingKernels("PTX assembly failed")
    fresh_kernels(monkeypatch, boxes.BOX_KERNELS, broken)
    monkeypatch.setattr(boxes, "_kernels_for", lambda *t: broken)
    idx, sides = torch.tensor([0, 17, 99]), torch.tensor([[4, 10, 0], [6, 0, 10]])
    with pytest.warns(RuntimeWarning, match="mixer boxes: the Triton kernel failed.*PTX"):
        got = boxes.boxes_at_points(idx, idx.flip(0), sides, 10, 10)
    want = boxes._boxes_at_points_ops(idx, idx.flip(0), sides, 10, 10)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert boxes.BOX_KERNELS.get("cpu") is None  # off for good


def test_paste_permuted_takes_the_kernel_only_where_it_fits():
    """One box per image or one for the batch, a layout the kernel walks, and no gradient
    wanted (its output has none); else the tensor ops."""
    from pretrain.mixers.boxes import _paste_fits
    x = torch.zeros(4, 3, 8, 8)
    one, four, three = torch.zeros(1, 4), torch.zeros(4, 4), torch.zeros(3, 4)
    assert _paste_fits(x, four, None) and _paste_fits(x, one, four)
    assert _paste_fits(x.contiguous(memory_format=torch.channels_last), four, one)
    assert not _paste_fits(x, three, None) and not _paste_fits(x, four, three)
    assert not _paste_fits(x.transpose(2, 3), four, None)  # neither NCHW nor NHWC
    assert not _paste_fits(x.requires_grad_(), four, None)
    with torch.no_grad():
        assert _paste_fits(x, four, None)


def test_boxes_at_points_hand_computed():
    """The tensor ops the kernel must reproduce, on values worked out by hand (10x10 image):
    a 4x6 box at (5, 5) -> rows 3..7, cols 2..8; a 10x0 box at the corner -> clipped rows
    0..5, no columns; the destination of the first centred on (0, 9): shifted inside."""
    from pretrain.mixers import boxes
    idx = torch.tensor([55, 0])
    sides = torch.tensor([[4, 10], [6, 0]])
    src, dst, lam = boxes.boxes_at_points(idx, torch.tensor([9, 99]), sides, 10, 10)
    assert src.tolist() == [[3, 2, 7, 8], [0, 0, 5, 0]]
    # sizes 4x6 and 5x0; centred on (0, 9) and (9, 9), then shifted to lie inside
    assert dst.tolist() == [[0, 4, 4, 10], [5, 9, 10, 9]]
    assert torch.equal(lam, torch.tensor([1 - 24 / 100, 1.0], dtype=torch.float32))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.filterwarnings("error:.*Triton kernel failed:RuntimeWarning")
def test_cuda_box_kernels_equal_the_tensor_ops():
    """The compiled kernels on the GPU equal the tensor ops there and the CPU's, and really
    ran (passed the first-use check, no fallback)."""
    from pretrain.mixers import boxes
    kernels = boxes.BOX_KERNELS.get("cuda")
    assert kernels is not None, boxes.BOX_KERNELS.failed
    g = torch.Generator().manual_seed(3)
    n, h, w = 300, 224, 224
    idx = torch.randint(0, h * w, (2, n), generator=g)
    sides = torch.stack([torch.randint(0, h + 1, (n,), generator=g),
                         torch.randint(0, w + 1, (n,), generator=g)])
    want = boxes._boxes_at_points_ops(idx[0], idx[1], sides, h, w)
    got = boxes.boxes_at_points(idx[0].cuda(), idx[1].cuda(), sides.cuda(), h, w)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))
    images = torch.randn(n, 3, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    perm = torch.randperm(n, generator=g)
    out = boxes.paste_permuted(images.cuda(), perm.cuda(), got[0], got[1])
    assert torch.equal(out.cpu(), boxes.paste(images, images[perm], want[0], want[1]))
