"""CUDA graphs of the detectors and the greedy walk (`smix.devices.GraphCache`).

On the CPU: the cache's keying, LRU eviction and eager fallback, with a stand-in capture (the
CPU cannot capture); that CPU tensors never reach a capture; that a graph keeps alive the cached
constants it reads. On CUDA (skipped without one): graph replays equal eager results bit for
bit, for new inputs too, outputs do not alias the graph's buffers, and a replay does not make
the host wait.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from smix.data import denormalize
from smix.devices import GraphCache, constant, graphs_enabled, recording_cached_reads
from pretrain import greedy, saliency


class FakeCapture(GraphCache):
    """A GraphCache that 'captures' CPU tensors: the entry runs fn and counts replays."""

    def __init__(self, fn, maxsize=2, fail_on=()):
        super().__init__(fn, "fake", maxsize=maxsize)
        self.captured: list[tuple] = []
        self.replays = 0
        self.fail_on = fail_on

    def eligible(self, args):
        return True

    def capture(self, args, kwargs):
        key = self.signature(args, kwargs)
        self.captured.append(key)
        if args[0].shape[0] in self.fail_on:
            raise RuntimeError("operation not permitted when stream is capturing")

        def replay(new_args):
            self.replays += 1
            return self.fn(*new_args, **kwargs)
        return replay


def double(x: torch.Tensor, *, k: int = 2) -> torch.Tensor:
    return x * k


def test_one_capture_per_signature_and_lru_eviction():
    cache = FakeCapture(double, maxsize=2)
    a, b, c = torch.ones(2), torch.ones(3), torch.ones(4)
    assert torch.equal(cache(a), torch.full((2,), 2.0))
    cache(a.clone())  # same shape, dtype, device: replayed, not captured again
    assert len(cache.captured) == 1 and cache.replays == 2
    cache(b)
    cache(a)  # a is now the most recent, so c evicts b
    cache(c)
    assert [k[0][0][0] for k in cache.entries] == [(2,), (4,)]
    cache(b)  # evicted: captured anew
    assert len(cache.captured) == 4
    # keyword values and dtypes are part of the signature
    cache(a, k=3)
    cache(a.double())
    assert len(cache.captured) == 6
    assert torch.equal(cache(a, k=3), torch.full((2,), 3.0))


def test_failed_capture_runs_eagerly_warns_once_and_is_not_retried():
    cache = FakeCapture(double, maxsize=4, fail_on=(5, 6))
    with pytest.warns(RuntimeWarning, match="fake: CUDA graph capture failed") as rec:
        out = cache(torch.arange(5.0))
        cache(torch.arange(5.0))
        cache(torch.arange(6.0))
    assert len(rec) == 1
    assert torch.equal(out, torch.arange(5.0) * 2)
    assert len(cache.captured) == 2 and cache.replays == 0  # 5 tried once, 6 once
    assert torch.equal(cache(torch.arange(3.0)), torch.tensor([0.0, 2.0, 4.0]))
    assert cache.replays == 1


def test_cpu_tensors_never_reach_a_capture(monkeypatch):
    cache = GraphCache(double, "cpu")

    def refuse(*_):
        raise AssertionError("capture attempted for CPU tensors")
    monkeypatch.setattr(cache, "capture", refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(cache(torch.ones(3)), torch.full((3,), 2.0))
    assert not cache.entries


def test_graphs_switch(monkeypatch):
    monkeypatch.setenv("SMIX_CUDA_GRAPHS", "0")
    assert not graphs_enabled()
    monkeypatch.setenv("SMIX_CUDA_GRAPHS", "1")
    assert graphs_enabled()


def test_graphs_keep_the_cached_constants_they_read():
    """What a captured function reads besides its inputs (cached plans, taps, constants) is
    recorded while it is captured, as the very objects the computation uses, so the graph
    holds them and an LRU eviction of those caches cannot free memory it still reads."""
    images = torch.full((2, 3, 40, 30), 100.0)
    with recording_cached_reads() as reads:
        saliency.fine_grained(images)
        saliency.spectral_residual(images)
        denormalize(images, (0.5,) * 3, (0.25,) * 3)
    kept = {id(r) for r in reads}
    assert id(saliency._fine_grained_plan(40, 30, images.device)) in kept
    assert id(saliency._linear_exact_taps(40, 64, images.device)) in kept
    assert id(saliency._linear_exact_taps(30, 64, images.device)) in kept
    assert id(constant((0.5,) * 3, torch.float32, images.device, (1, 3, 1, 1))) in kept
    with recording_cached_reads() as outside:
        pass
    saliency.fine_grained(images)
    assert outside == []  # nothing is recorded outside a capture


# on CUDA a capture that fails, or a Triton kernel that falls back, is an error here: both would
# still compute the right values (eagerly, with tensor ops), so a comparison alone cannot tell
pytestmark = [pytest.mark.filterwarnings("error:.*CUDA graph capture failed:RuntimeWarning"),
              pytest.mark.filterwarnings("error:.*the Triton kernel failed:RuntimeWarning")]

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def pixels(n: int, size: int, seed: int, channels_last: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 3, size // 4, size // 4, generator=g) * 255)
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear").cuda()
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def eager(fn, *args, **kwargs):
    """The same call with graphs switched off."""
    import os
    os.environ["SMIX_CUDA_GRAPHS"] = "0"
    try:
        return fn(*args, **kwargs)
    finally:
        os.environ.pop("SMIX_CUDA_GRAPHS")


@cuda
@pytest.mark.parametrize("name", ["fine_grained", "spectral_residual"])
@pytest.mark.parametrize("n,size,channels_last", [(6, 32, False), (5, 224, True)])
def test_cuda_detector_graph_equals_eager(name, n, size, channels_last):
    cache = {"fine_grained": saliency._FINE_GRAINED_GRAPHS,
             "spectral_residual": saliency._SPECTRAL_RESIDUAL_GRAPHS}[name]
    detector = saliency.get_detector(name)
    first_in, second_in = pixels(n, size, 0, channels_last), pixels(n, size, 1, channels_last)
    first = detector(first_in)
    mine = [e for k, e in cache.entries.items() if k[0][0][0] == (n, 3, size, size)]
    assert len(mine) == 1 and mine[0] is not None  # captured, not fallen back to eager
    second = detector(second_in)  # a replay on new data
    assert torch.equal(first, eager(detector, first_in))
    assert torch.equal(second, eager(detector, second_in))
    assert not torch.equal(first, second)  # the first output is not the graph's buffer


@cuda
@pytest.mark.parametrize("n", [2, 7, 64])
def test_cuda_greedy_graph_equals_eager(n):
    g = torch.Generator().manual_seed(n)
    maps = [(torch.rand(n, 8, 8, generator=g) * 3).round().cuda() for _ in range(3)]
    perms = [greedy.greedy_from_maps(m) for m in maps]
    key = GraphCache.signature((maps[0],), {})
    assert greedy._GREEDY_GRAPHS.entries.get(key) is not None  # captured, not fallen back
    for m, p in zip(maps, perms):
        assert torch.equal(p, eager(greedy.greedy_from_maps, m))
        assert sorted(p.tolist()) == list(range(n))


@cuda
def test_cuda_replay_does_not_wait_for_the_device():
    images = pixels(4, 64, 2)
    maps = torch.rand(4, 8, 8, device="cuda")
    for _ in range(2):  # capture (which synchronises) before the guarded region
        saliency.fine_grained(images), saliency.spectral_residual(images)
        greedy.greedy_from_maps(maps)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        saliency.fine_grained(images), saliency.spectral_residual(images)
        greedy.greedy_from_maps(maps)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_box_mask_and_paste_hand_computed():
    """The one-compare paste mask on non-square images, against masks written out."""
    from pretrain.mixers.boxes import box_mask, paste
    boxes = torch.tensor([[1, 2, 3, 5], [0, 0, 0, 4], [2, 4, 4, 6]])  # second box empty
    mask = box_mask(boxes, 4, 6, "cpu")
    want = torch.zeros(3, 1, 4, 6, dtype=torch.bool)
    want[0, 0, 1:3, 2:5] = True
    want[2, 0, 2:4, 4:6] = True
    assert mask.dtype == torch.bool and torch.equal(mask, want)
    target = torch.zeros(3, 2, 4, 6)
    source = torch.arange(3 * 2 * 4 * 6, dtype=torch.float32).view(3, 2, 4, 6)
    src = torch.tensor([[0, 0, 2, 3], [0, 0, 0, 4], [0, 1, 2, 3]])
    out = paste(target, source, src, boxes)  # moved: source box -> destination box
    ref = target.clone()
    ref[0, :, 1:3, 2:5] = source[0, :, 0:2, 0:3]
    ref[2, :, 2:4, 4:6] = source[2, :, 0:2, 1:3]
    assert torch.equal(out, ref)


MIXER_GRAPHS = [("saliencymix", {"mode": "batch"}),
                ("saliencymix", {"mode": "batch", "scheme": "salient_to_nonsalient"}),
                ("saliencymix", {"mode": "sample"}),
                ("saliencymix", {"mode": "sample", "detector": "spectral_residual",
                                 "scheme": "nonsalient_to_salient"}),
                ("saliencymix", {"mode": "sample", "pairing": "greedy"}),
                ("guidedmixup", {"saliency": "sr"}),
                ("guidedmixup", {"saliency": "sr", "pairing": "random"})]
# the one-pass call's graph, and sample's (plan) graph, per mixer module
CACHES = {"saliencymix": ("_STEP_GRAPHS", "_BOX_GRAPHS"),
          "guidedmixup": ("_SR_STEP_GRAPHS", "_SR_GRAPHS")}


@cuda
@pytest.mark.parametrize("name,params", MIXER_GRAPHS,
                         ids=[f"{m}-{'-'.join(p.values())}" for m, p in MIXER_GRAPHS])
def test_cuda_mixer_graphs_equal_eager(name, params):
    """A mixer's graph-captured step (`mixer(...)`: maps, boxes or pairing and mask, paste or
    blend, labels, λ) and its graph-captured plan (`apply(sample(...))`) replay exactly what
    the eager code computes, for several batches and seeds; both graphs were captured (a
    failed capture runs eagerly with a warning, which would pass the comparison), and the
    greedy walk ran as the Triton kernel where the pairing is greedy."""
    import importlib
    from pretrain import greedy
    from pretrain.mixers import MixContext, get_mixer
    from tests.test_mixers_nosync import MEAN, STD
    module = importlib.import_module(f"pretrain.mixers.{name}")
    mixer = get_mixer(name, **params)
    ctx = MixContext(MEAN, STD, 10)
    labels = torch.arange(6, device="cuda")
    for cache in CACHES[name]:
        getattr(module, cache).entries.clear()
    two_pass = lambda images, gen: mixer.apply(images, labels,
                                               mixer.sample(images, labels, gen, ctx))
    for seed in range(3):
        images = (pixels(6, 32, seed) / 255 - 0.5) / 0.25
        got = mixer(images, labels, torch.Generator().manual_seed(seed), ctx)
        want = eager(mixer, images, labels, torch.Generator().manual_seed(seed), ctx)
        planned = two_pass(images, torch.Generator().manual_seed(seed))
        for out in (got, planned):
            for a, b in ((out.images, want.images), (out.label_b, want.label_b),
                         (out.lam, want.lam)):
                assert torch.equal(a, b)
    for cache in CACHES[name]:
        entries = getattr(module, cache).entries
        assert entries and all(e is not None for e in entries.values()), cache
    if params.get("pairing", "greedy" if name == "guidedmixup" else "random") == "greedy":
        assert greedy.WALK.failed is None, greedy.WALK.failed


def test_paste_permuted_one_host_box_hand_computed():
    """CutMix's batch-wide host box takes the slicing shortcut: the patch of each permuted
    source at the same place, the rest of the target untouched, inputs not modified; an
    empty box is the identity; per-sample boxes take the mask path, with the same meaning."""
    from pretrain.mixers.boxes import paste_permuted
    images = torch.arange(3 * 1 * 4 * 5, dtype=torch.float32).view(3, 1, 4, 5)
    before = images.clone()
    perm = torch.tensor([2, 0, 1])
    box = torch.tensor([[1, 1, 3, 4]]).expand(3, 4)
    out = paste_permuted(images, perm, box)
    ref = images.clone()
    for i, j in enumerate(perm.tolist()):
        ref[i, :, 1:3, 1:4] = images[j, :, 1:3, 1:4]
    assert torch.equal(out, ref) and torch.equal(images, before)
    assert torch.equal(paste_permuted(images, perm, torch.tensor([[2, 2, 2, 5]])), images)
    per_sample = torch.tensor([[1, 1, 3, 4], [1, 1, 3, 4], [1, 1, 3, 4]])
    assert torch.equal(paste_permuted(images, perm, per_sample), ref)
