"""GuidedMixup and greedy pairing: the blur and sum-to-one maps, Algorithm 1 (one cycle, equal to
a plain transcription of the walk), the mask/λ/label arithmetic, greedy pairing for the other
mixers, AP saliency with the model, determinism, and a short training run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from smix.arch import build_model
from smix.checkpoint import read_checkpoint
from smix.cli import main as smix
from smix.data import denormalize
from smix.errors import UserError
from pretrain.greedy import gaussian_blur_maps, greedy_cycle, greedy_pairing, guided_maps
from pretrain.mixers import MixContext, MixParams, get_mixer
from pretrain.mixers.guidedmixup import mixing_mask
from pretrain.pairing import get_pairing
from pretrain.saliency import get_detector
from tests.conftest import blob_batch

MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.25, 0.25)
CTX = MixContext(MEAN, STD, 4)


def blobs(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Normalised textured images, each with a bright blob somewhere different."""
    return blob_batch(MEAN, STD, n, size, seed, margin=3, width=10.0)


# ------------------------------------------------------------------------- map preparation

def test_blur_equals_torchvision_gaussian_blur():
    maps = torch.rand(5, 32, 32)
    ref = TF.gaussian_blur(maps, [7, 7], [3.0, 3.0])  # what the official code calls
    assert torch.allclose(gaussian_blur_maps(maps, 7, 3.0), ref, atol=1e-6)


def test_guided_maps_sum_to_one_and_guard_empty_maps():
    raw = torch.rand(4, 16, 16)
    raw[1] = 0.0  # no mass (a flat image)
    raw[2, 3, 3] = float("nan")  # a detector's 0/0
    s = guided_maps(raw)
    assert torch.allclose(s.sum((1, 2)), torch.ones(4, dtype=s.dtype), atol=1e-5)
    assert torch.allclose(s[1], torch.full((16, 16), 1 / 256)) and torch.isfinite(s).all()
    expect = gaussian_blur_maps(raw[0:1])[0]
    assert torch.allclose(s[0], expect / expect.sum(), atol=1e-7)


# ------------------------------------------------------------------------- greedy pairing

def brute_force_walk(maps: np.ndarray) -> list[int]:
    """Algorithm 1 as written, in plain Python loops over float64 distances."""
    n = len(maps)
    flat = maps.reshape(n, -1).astype(np.float64)
    d = [[math.sqrt(float(((flat[i] - flat[j]) ** 2).sum())) if i != j else -math.inf
          for j in range(n)] for i in range(n)]
    best = max((d[i][j], -(i * n + j)) for i in range(n) for j in range(n))
    row, col = divmod(-best[1], n)  # the first maximum in row-major order
    first, perm, used = row, [-1] * n, {row}
    perm[row] = col
    for _ in range(n - 2):
        row = col
        used.add(row)
        cands = [(d[row][j], -j) for j in range(n) if j not in used]
        col = -max(cands)[1]
        perm[row] = col
    perm[col] = first
    return perm


def official_onecycle_cover(distance_matrix: np.ndarray) -> list[int]:
    """`onecycle_cover` of the official code (3neutronstar/GuidedMixup, pairing.pyx),
    transcribed from Cython to Python line by line; it takes the float32 distance matrix."""
    distance_matrix = np.array(distance_matrix, dtype=np.float32)
    max_idx = np.argmax(distance_matrix)
    sorted_indices = np.zeros(distance_matrix.shape[0], dtype=np.int32)
    np.fill_diagonal(distance_matrix, -np.inf)
    row, col = max_idx // distance_matrix.shape[0], max_idx % distance_matrix.shape[0]
    first_row = row
    sorted_indices[row] = col
    distance_matrix[:, row] = -np.inf
    idx = 0
    while idx < distance_matrix.shape[0] - 2:
        idx += 1
        row = col
        col = np.argmax(distance_matrix[row])
        sorted_indices[row] = col
        distance_matrix[:, row] = -np.inf
    sorted_indices[col] = first_row
    return sorted_indices.tolist()


def official_pairing(maps: torch.Tensor) -> list[int]:
    """The official greedy pairing of saliency maps: L2 distances of the flattened maps
    (numpy, float64), then `onecycle_cover`."""
    flat = maps.reshape(len(maps), -1).double().numpy()
    dist = np.sqrt(((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1))
    return official_onecycle_cover(dist)


def is_one_cycle(perm: list[int]) -> bool:
    seen, i = set(), 0
    for _ in range(len(perm)):
        seen.add(i)
        i = perm[i]
    return i == 0 and len(seen) == len(perm)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7, 10, 16])
def test_greedy_is_one_cycle_and_matches_brute_force(n):
    for seed in range(5):
        maps = torch.rand(n, 6, 6, generator=torch.Generator().manual_seed(seed))
        perm = greedy_pairing(n, maps=maps).tolist()
        assert sorted(perm) == list(range(n)) and all(p != i for i, p in enumerate(perm))
        assert is_one_cycle(perm)
        assert perm == brute_force_walk(maps.numpy()) == official_pairing(maps)


def test_greedy_walk_hand_example():
    """Points on a line at 0, 1, 3, 10: the farthest pair is (0, 3) -> start 0→3; from 3 the
    farthest unvisited is 1 (distance 9 vs 7); from 1 only 2 is left; close 2→0."""
    pos = torch.tensor([0.0, 1.0, 3.0, 10.0])
    dist = (pos[:, None] - pos[None, :]).abs()
    assert greedy_cycle(dist).tolist() == [3, 2, 0, 1]
    assert official_onecycle_cover(dist.numpy()) == [3, 2, 0, 1]  # the hand walk is the official
    # 2-D points: (0,0) (4,0) (0,3) (1,1). Farthest pair: (4,0)-(0,3), 5 -> start 1→2; from
    # (0,3): to (0,0) 3, to (1,1) √5 -> 2→0; then 0→3; close 3→1.
    pts = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    assert greedy_pairing(4, maps=pts.view(4, 1, 2)).tolist() == [3, 2, 0, 1]
    assert official_pairing(pts) == [3, 2, 0, 1]
    assert greedy_cycle(torch.zeros(1, 1)).tolist() == [0]
    # identical maps: all distances 0, still a cycle with no self-pairs (diagonal is -inf)
    assert is_one_cycle(greedy_cycle(torch.zeros(5, 5)).tolist())


def test_greedy_pairing_from_images_uses_guided_sr_maps():
    x = blobs(8, 32)
    pixels = denormalize(x, MEAN, STD, scale=255)
    maps = guided_maps(get_detector("spectral_residual")(pixels))
    assert greedy_pairing(8, images=x, ctx=CTX).tolist() == official_pairing(maps)
    with pytest.raises(ValueError, match="needs saliency maps"):
        greedy_pairing(8)


@pytest.mark.parametrize("name", ["mixup", "cutmix", "saliencymix", "guidedmixup"])
def test_pairing_is_selectable_for_every_mixer(name):
    x, y = blobs(8, 32), torch.arange(8)
    greedy = get_mixer(name, pairing="greedy")
    p = greedy.sample(x, y, torch.Generator().manual_seed(0), CTX)
    assert p.info["pairing"] == "greedy" and greedy.describe()["pairing"] == "greedy"
    maps = guided_maps(get_detector("spectral_residual")(denormalize(x, MEAN, STD, scale=255)))
    assert p.perm.tolist() == official_pairing(maps)  # on Guided-SR maps
    assert is_one_cycle(p.perm.tolist())
    rand = get_mixer(name, pairing="random").sample(x, y, torch.Generator().manual_seed(0), CTX)
    assert rand.info["pairing"] == "random" and sorted(rand.perm.tolist()) == list(range(8))


# ------------------------------------------------------------------------------ the mixer

def test_mask_lambda_and_labels_hand_computed():
    maps = torch.tensor([[[3.0, 1.0], [0.0, 0.0]], [[1.0, 1.0], [2.0, 0.0]]])
    perm = torch.tensor([1, 0])
    m = mixing_mask(maps, perm)
    # sample 0: 3/4, 1/2, 0/2, 0/0 -> 1/2 ; sample 1 is the complement
    assert m[0, 0].tolist() == [[0.75, 0.5], [0.0, 0.5]]
    assert torch.allclose(m[1], 1 - m[0])
    mixer = get_mixer("guidedmixup")
    x = torch.stack([torch.full((3, 2, 2), 10.0), torch.full((3, 2, 2), 2.0)])
    y = torch.tensor([2, 3])
    out = mixer.apply(x, y, MixParams(perm=perm, mask=m, lam=m.mean((1, 2, 3))))
    assert torch.allclose(out.images[0, 0], torch.tensor([[8.0, 6.0], [2.0, 6.0]]))
    assert torch.allclose(out.lam, torch.tensor([0.4375, 0.5625]))
    assert out.label_a.tolist() == [2, 3] and out.label_b.tolist() == [3, 2]


def test_guided_sr_sample_is_the_published_recipe():
    x, y = blobs(8, 32), torch.arange(8)
    mixer = get_mixer("guidedmixup", saliency="sr", pairing="greedy")
    p = mixer.sample(x, y, torch.Generator().manual_seed(0), CTX)
    maps = guided_maps(get_detector("spectral_residual")(denormalize(x, MEAN, STD, scale=255)))
    assert p.perm.tolist() == official_pairing(maps)
    expect = maps / (maps + maps[p.perm])
    assert torch.allclose(p.mask[:, 0], expect, atol=1e-6)
    out = mixer.apply(x, y, p)
    assert torch.allclose(out.images, p.mask * x + (1 - p.mask) * x[p.perm], atol=1e-6)
    assert torch.allclose(out.lam, expect.mean((1, 2)), atol=1e-6)  # λ_a = mean(M)
    assert p.info == {"saliency": "sr", "pairing": "greedy"}


def test_lambda_one_is_identity_and_inputs_not_mutated():
    x, y = blobs(6, 16), torch.arange(6)
    x0 = x.clone()
    mixer = get_mixer("guidedmixup")
    p = mixer.sample(x, y, torch.Generator().manual_seed(0), CTX)
    p.mask = torch.ones_like(p.mask)
    out = mixer.apply(x, y, p)
    assert torch.equal(out.images, x) and torch.equal(out.lam, torch.ones(6))
    assert torch.equal(x, x0)
    never = get_mixer("guidedmixup", prob=0.0)(x, y, torch.Generator().manual_seed(0), CTX)
    assert torch.equal(never.images, x) and never.label_b is None


def test_seeded_determinism():
    x, y = blobs(8, 16), torch.arange(8)
    for pairing in ("random", "greedy"):
        mixer = get_mixer("guidedmixup", pairing=pairing)
        a = mixer(x, y, torch.Generator().manual_seed(4), CTX)
        b = mixer(x, y, torch.Generator().manual_seed(4), CTX)
        assert torch.equal(a.images, b.images) and torch.equal(a.label_b, b.label_b)
    perms = {tuple(mixer.sample(x, y, torch.Generator().manual_seed(s), CTX).perm.tolist())
             for s in range(4)}
    assert len(perms) == 1  # greedy draws no randomness: the same batch always pairs the same
    rand = get_mixer("guidedmixup", pairing="random")
    perms = {tuple(rand.sample(x, y, torch.Generator().manual_seed(s), CTX).perm.tolist())
             for s in range(4)}
    assert len(perms) > 1


def test_guided_ap_uses_the_model_gradient_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = build_model("cifar_resnet18", 4).train()
    x, y = blobs(4, 16), torch.tensor([0, 1, 2, 3])
    ctx = MixContext(MEAN, STD, 4, model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mixer = get_mixer("guidedmixup", saliency="ap")
    p = mixer.sample(x, y, torch.Generator().manual_seed(0), ctx)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(q.grad is None for q in model.parameters())
    xg = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(model(xg), y).backward()
    raw = xg.grad.square().mean(1).sqrt()
    assert torch.allclose(mixer.saliency_maps(x, y, ctx), guided_maps(raw), atol=1e-6)
    assert p.perm.tolist() == official_pairing(guided_maps(raw))
    with pytest.raises(UserError, match="needs the model being trained"):
        mixer.sample(x, y, torch.Generator().manual_seed(0), CTX)


def test_bad_options_and_describe():
    with pytest.raises(UserError, match="unknown saliency 'basnet'; valid: sr, ap"):
        get_mixer("guidedmixup", saliency="basnet")
    with pytest.raises(UserError, match="unknown pairing 'best'; valid: greedy, random"):
        get_mixer("guidedmixup", pairing="best")
    with pytest.raises(UserError, match="blur an odd size"):
        get_mixer("guidedmixup", blur="6")
    d = get_mixer("guidedmixup", saliency="ap", pairing="random").describe()
    assert d["name"] == "guidedmixup" and d["variant"] == "guided-ap (random pairing)"
    assert (d["blur"], d["sigma"], d["pairing"]) == (7, 3.0, "random")
    assert get_pairing("greedy") is greedy_pairing


def test_smix_pretrain_guided_ap_greedy(shapes_root, tmp_path):
    run = tmp_path / "run"
    args = ["pretrain", "--preset", "shapes-resnet18", "--data", str(shapes_root), "--out",
            str(run), "--method", "guidedmixup", "--epochs", "1", "method.saliency=ap",
            "method.pairing=greedy", "workers=0", "batch_size=8", "input_size=32",
            "resize=32", "crop=32", "progress=false", "milestones=1"]
    assert smix(args) == 0
    _, meta = read_checkpoint(run / "backbone.safetensors")
    assert meta.method["name"] == "guidedmixup" and meta.method["pairing"] == "greedy"
    assert meta.method["saliency"] == "ap"
    assert meta.method["variant"] == "guided-ap (greedy pairing)"
