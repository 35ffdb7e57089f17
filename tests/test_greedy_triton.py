"""The greedy walk's Triton kernel against the tensor-op walk and against Algorithm 1 written
out in Python loops. Triton's interpreter (TRITON_INTERPRET=1, which must be set before Triton
is imported, hence a subprocess) runs the very kernel CUDA compiles, on CPU tensors; on a GPU
the CUDA tests of tests/test_graphs.py compare the compiled kernel with the CPU walk."""

from __future__ import annotations


import pytest
import torch

from tests.conftest import RUNTIME_LOOPS, FailingKernels, fresh_kernels, interpreted

pytest.importorskip("triton")

SCRIPT = RUNTIME_LOOPS + r"""
from pretrain import greedy
from tests.test_guidedmixup import brute_force_walk
assert greedy.WALK.get("cpu") is not None
g = torch.Generator().manual_seed(0)
done = []
for n in (2, 3, 5, 17, 64, 130):
    for kind in ("uniform", "ties", "flat"):
        maps = torch.rand(n, 6, 6, generator=g)
        if kind == "ties":
            maps = (maps * 2).round()   # many equal distances: first-index ties decide
        elif kind == "flat":
            maps = torch.zeros(n, 6, 6)  # every distance 0
        dist = greedy.pairwise_distances(maps)
        kernel = greedy.greedy_cycle(dist, use_kernel=True)
        tensor_ops = greedy.greedy_cycle(dist, use_kernel=False)
        assert greedy.WALK.failed is None, greedy.WALK.failed
        assert kernel.dtype == torch.long and kernel.shape == (n,)
        assert torch.equal(kernel, tensor_ops), (n, kind, kernel, tensor_ops)
        if n <= 64:
            assert kernel.tolist() == brute_force_walk(maps.numpy()), (n, kind)
        done.append([n, kind])
print(json.dumps(done))
"""


def test_triton_walk_equals_the_tensor_op_walk_in_the_interpreter():
    """The kernel's logic (masking, visiting, closing the cycle) on CPU. Not its tie rule:
    the interpreter's argmax is numpy's, leftmost whatever `tie_break_left` says; that rule is
    checked where it is compiled, by `WALK`'s first-use check and the CUDA test below."""
    done = interpreted(SCRIPT, timeout=300)
    assert len(done) == 18  # every size and kind ran through the kernel


def test_switched_off_or_missing_triton_walks_with_tensor_ops(monkeypatch):
    from pretrain import greedy
    monkeypatch.setenv("SMIX_TRITON", "0")
    assert greedy.WALK.get("cpu") is None
    maps = torch.rand(9, 4, 4, generator=torch.Generator().manual_seed(1))
    dist = greedy.pairwise_distances(maps)
    perm = greedy.greedy_cycle(dist, use_kernel=True)  # asked for, but off: the same walk
    assert torch.equal(perm, greedy.greedy_cycle(dist, use_kernel=False))


def test_a_failing_kernel_falls_back_once_with_a_warning(monkeypatch):
    from pretrain import greedy

    broken = FailingKernels("no C compiler for the launcher")
    fresh_kernels(monkeypatch, greedy.WALK, broken)
    maps = torch.rand(7, 4, 4, generator=torch.Generator().manual_seed(2))
    dist = greedy.pairwise_distances(maps)
    with pytest.warns(RuntimeWarning,
                      match="greedy pairing: the Triton kernel failed.*no C compiler"):
        perm = greedy.greedy_cycle(dist, use_kernel=True)
    assert torch.equal(perm, greedy.greedy_cycle(dist, use_kernel=False))
    assert greedy.WALK.get("cpu") is None  # for good: no second warning per step


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("n", [2, 7, 64, 256])
def test_cuda_triton_walk_equals_the_cpu_walk(n):
    """The compiled kernel on the GPU against the tensor-op walk on the CPU, same distances
    (quantised maps: many ties), inside a captured graph too; it really ran (no fallback)."""
    from pretrain import greedy
    g = torch.Generator().manual_seed(n)
    for _ in range(3):
        maps = (torch.rand(n, 8, 8, generator=g) * 3).round()
        dist = greedy.pairwise_distances(maps)
        want = greedy.greedy_cycle(dist)
        assert torch.equal(greedy.greedy_cycle(dist.cuda()).cpu(), want)
        assert greedy.WALK.failed is None, greedy.WALK.failed
        assert torch.equal(greedy.greedy_from_maps(maps.cuda()).cpu(),
                           greedy.greedy_from_maps(maps))


def test_a_kernel_that_walks_wrong_is_caught_before_its_first_use(monkeypatch):
    """The first-use check compares the kernel's cycles with the tensor-op walk's on the same
    device; a kernel that returns another (valid) cycle is never used."""
    from pretrain import greedy

    class OtherCycle:
        def __getitem__(self, grid):
            def launch(d, start, perm, n, BLOCK, **options):
                perm.copy_(torch.arange(1, n + 1) % n)  # 0 -> 1 -> ... -> n-1 -> 0
            return launch

    fresh_kernels(monkeypatch, greedy.WALK, OtherCycle())
    maps = torch.rand(11, 4, 4, generator=torch.Generator().manual_seed(3))
    dist = greedy.pairwise_distances(maps)
    with pytest.warns(RuntimeWarning, match="differs from the tensor-op walk"):
        perm = greedy.greedy_cycle(dist, use_kernel=True)
    assert torch.equal(perm, greedy.greedy_cycle(dist, use_kernel=False))
    assert greedy.WALK.get("cpu") is None


def test_a_checked_kernel_is_checked_once_per_device(monkeypatch):
    from pretrain import greedy
    calls = []
    fresh_kernels(monkeypatch, greedy.WALK, object())
    monkeypatch.setattr(greedy.WALK, "check", lambda k, dev: calls.append(dev))
    for _ in range(3):
        assert greedy.WALK.get("cpu") is not None
    assert calls == [torch.device("cpu")]
