"""SaliencyMix: λ is the mixed fraction, λ=1 is the identity, boxes sit where the scheme says,
official mode equals a transcription of the official `saliency_bbox` code, determinism, and a
short training run through `smix pretrain`."""

from __future__ import annotations

import sys
import types

import cv2
import numpy as np
import pytest
import skimage.data
import torch

from smix.checkpoint import read_checkpoint
from smix.cli import main as smix
from smix.data import denormalize, normalize
from smix.errors import UserError
from pretrain.mixers import MixContext, get_mixer
from pretrain.mixers.boxes import place_like
from pretrain.mixers.saliencymix import SCHEMES, scheme_boxes
from pretrain.saliency import get_detector
from tests.conftest import blob_batch

CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
IMNET_MEAN, IMNET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CTX = MixContext(CIFAR_MEAN, CIFAR_STD, 10)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
MODES = ("official", "batch", "sample")


def blobs(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Normalised batch of textured images, each with one bright blob at a random place."""
    return blob_batch(CIFAR_MEAN, CIFAR_STD, n, size, seed, margin=4, width=8.0)


def photos(size: int) -> torch.Tensor:
    """Real photos from scikit-image, RGB, resized (area) to size², in [0,1]."""
    out = []
    for name in PHOTOS:
        im = getattr(skimage.data, name)()[..., :3]
        out.append(torch.from_numpy(cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA)))
    return torch.stack(out).permute(0, 3, 1, 2).float() / 255


# ------------------------------------------------- transcription of the official code (test only)

def official_saliency_bbox(img: torch.Tensor, lam: float):
    """afm-shahab-uddin/SaliencyMix `saliency_bbox`, line by line (np.int -> int: np.int is gone
    from numpy >= 1.24; it was the builtin int)."""
    size = img.size()
    W = size[1]
    H = size[2]
    cut_rat = np.sqrt(1. - lam)
    cut_w = int(W * cut_rat)
    cut_h = int(H * cut_rat)
    temp_img = img.cpu().numpy().transpose(1, 2, 0)
    saliency = cv2.saliency.StaticSaliencyFineGrained_create()
    (success, saliencyMap) = saliency.computeSaliency(temp_img)
    saliencyMap = (saliencyMap * 255).astype("uint8")
    maximum_indices = np.unravel_index(np.argmax(saliencyMap, axis=None), saliencyMap.shape)
    x = maximum_indices[0]
    y = maximum_indices[1]
    bbx1 = np.clip(x - cut_w // 2, 0, W)
    bby1 = np.clip(y - cut_h // 2, 0, H)
    bbx2 = np.clip(x + cut_w // 2, 0, W)
    bby2 = np.clip(y + cut_h // 2, 0, H)
    return bbx1, bby1, bbx2, bby2


def official_step(images: torch.Tensor, rand_index: torch.Tensor, lam: float):
    """The official training-loop body after λ and rand_index are drawn."""
    images = images.clone()
    bbx1, bby1, bbx2, bby2 = official_saliency_bbox(images[rand_index[0]], lam)
    images[:, :, bbx1:bbx2, bby1:bby2] = images[rand_index, :, bbx1:bbx2, bby1:bby2]
    lam = 1 - ((bbx2 - bbx1) * (bby2 - bby1) / (images.size()[-1] * images.size()[-2]))
    return images, (bbx1, bby1, bbx2, bby2), lam


@pytest.mark.parametrize("source", ["blobs", "non-square", "photos"])
def test_official_mode_equals_transcription(source):
    if source == "blobs":
        x, ctx = blobs(8, 32), CTX
    elif source == "non-square":  # 24 rows x 40 columns: checks the official axis naming
        x, ctx = blobs(8, 40)[:, :, 8:32, :].contiguous(), CTX
    else:
        x = normalize(photos(64), IMNET_MEAN, IMNET_STD)
        ctx = MixContext(IMNET_MEAN, IMNET_STD, 10)
    mixer = get_mixer("saliencymix", mode="official")
    y = torch.arange(len(x))
    for seed, lam in [(0, 0.3), (1, 0.55), (2, 0.81), (3, 0.05), (4, 0.97)]:
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        params = mixer.plan(x, perm, torch.tensor([lam], dtype=torch.float64), ctx)
        out = mixer.apply(x, y, params)
        ref_images, (bx1, by1, bx2, by2), ref_lam = official_step(x, perm, lam)
        # official naming: bbx on dim 2 (rows), bby on dim 3 (columns)
        assert params.boxes[0].tolist() == [bx1, by1, bx2, by2]
        assert (params.boxes == params.boxes[0]).all()  # one box for the whole batch
        assert torch.equal(out.images, ref_images)
        assert torch.allclose(out.lam, torch.full((len(x),), ref_lam, dtype=torch.float32))
        assert torch.equal(out.label_b, y[perm])


def test_official_and_fixed_boxes_differ_on_photos():
    """The defect is real: on photos the official map's argmax is unrelated to the image; the
    corrected mode finds OpenCV's own argmax of the uint8 photo."""
    x01 = photos(128)
    x = normalize(x01, IMNET_MEAN, IMNET_STD)
    ctx = MixContext(IMNET_MEAN, IMNET_STD, 10)
    lam = torch.tensor([0.75], dtype=torch.float64)
    official, fixed = get_mixer("saliencymix", mode="official"), get_mixer("saliencymix")
    differ = 0
    for i in range(len(x)):
        perm = torch.roll(torch.arange(len(x)), -i)  # source of target 0 is photo i
        b_off = official.plan(x, perm, lam, ctx).boxes[0]
        b_fix = fixed.plan(x, perm, lam, ctx).boxes[0]
        rgb = (x01[i] * 255).round().byte().permute(1, 2, 0).numpy()
        pix = np.ascontiguousarray(rgb[..., ::-1])  # OpenCV reads BGR
        _, ref = cv2.saliency.StaticSaliencyFineGrained_create().computeSaliency(pix)
        ry, rx = np.unravel_index(np.argmax(ref), ref.shape)
        assert b_fix[0] <= ry < b_fix[2] and b_fix[1] <= rx < b_fix[3]
        differ += int(not torch.equal(b_off, b_fix))
    assert differ >= len(x) - 1


@pytest.mark.parametrize("cv2", [None, types.ModuleType("cv2")])  # absent; without contrib
def test_official_mode_without_opencv_contrib_is_one_clear_error(monkeypatch, cv2):
    """Said when the mixer is built (validate), not as a traceback on the first step."""
    monkeypatch.setitem(sys.modules, "cv2", cv2)
    with pytest.raises(UserError, match="install opencv-contrib-python-headless"):
        get_mixer("saliencymix", mode="official")
    get_mixer("saliencymix", mode="batch")  # the torch detectors need no OpenCV


# ---------------------------------------------------------------------------- properties

def tags(n: int, size: int) -> torch.Tensor:
    """Image j is the constant j + 1: tells every output pixel's origin."""
    return (torch.arange(n).float() + 1).view(n, 1, 1, 1).expand(n, 3, size, size).clone()


# official mode has only the published scheme (other schemes raise, tested below)
VARIANTS = [("official", "salient_to_corresponding")] + [
    (mode, scheme) for mode in ("batch", "sample") for scheme in SCHEMES]


@pytest.mark.parametrize("mode,scheme", VARIANTS)
def test_lambda_is_the_mixed_fraction(mode, scheme):
    x, y = blobs(8, 24), torch.arange(8)
    mixer = get_mixer("saliencymix", mode=mode, scheme=scheme)
    checked = 0
    for seed in range(4):
        p = mixer.sample(x, y, torch.Generator().manual_seed(seed), CTX)
        out = mixer.apply(tags(8, 24), y, p)
        from_target = (out.images == tags(8, 24)).float().mean(dim=(1, 2, 3))
        source_tag = (p.perm + 1).float().view(8, 1, 1, 1)
        from_source = (out.images == source_tag).float().mean((1, 2, 3))
        moved = p.perm != y
        assert torch.allclose(out.lam[moved], from_target[moved], atol=1e-6)
        assert torch.allclose(from_target[moved] + from_source[moved], torch.ones(int(moved.sum())))
        checked += int(moved.sum())
        if mode != "sample":
            assert (out.lam == out.lam[0]).all()
    assert checked >= 16
    if mode == "sample":
        assert len(set(out.lam.tolist())) > 1  # λ per sample


@pytest.mark.parametrize("mode", MODES)
def test_lambda_one_is_identity_and_inputs_not_mutated(mode):
    x, y = blobs(6, 16), torch.arange(6)
    x0 = x.clone()
    mixer = get_mixer("saliencymix", mode=mode)
    perm = torch.tensor([1, 2, 3, 4, 5, 0])
    lam = torch.ones(6 if mode == "sample" else 1, dtype=torch.float64)
    out = mixer.apply(x, y, mixer.plan(x, perm, lam, CTX))
    assert torch.equal(out.images, x) and torch.equal(out.lam, torch.ones(6))
    out = mixer(x, y, torch.Generator().manual_seed(0), CTX)
    assert torch.equal(x, x0)


def _maps(x: torch.Tensor) -> torch.Tensor:
    return get_detector("fine_grained")(denormalize(x, CIFAR_MEAN, CIFAR_STD, scale=255))


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_each_scheme_puts_the_patch_where_it_says(scheme):
    x, y = blobs(8, 32, seed=3), torch.arange(8)
    maps = _maps(x)
    src_kind, dst_kind = SCHEMES[scheme]
    for mode in ("sample", "batch"):
        mixer = get_mixer("saliencymix", mode=mode, scheme=scheme)
        perm = torch.tensor([3, 0, 1, 2, 7, 4, 5, 6])
        lam = torch.full((8 if mode == "sample" else 1,), 0.6, dtype=torch.float64)
        p = mixer.plan(x, perm, lam, CTX)
        out = mixer.apply(x, y, p)
        dst = p.boxes if p.dst_boxes is None else p.dst_boxes
        targets = range(8) if mode == "sample" else [0]
        for i in targets:
            sy0, sx0, sy1, sx1 = p.boxes[i].tolist()
            dy0, dx0, dy1, dx1 = dst[i].tolist()
            src_map, dst_map = maps[perm[i]], maps[i]
            point = lambda m, kind: divmod(int(m.argmax() if kind == "max" else m.argmin()), 32)
            py, px = point(src_map, src_kind)
            assert sy0 <= py < sy1 and sx0 <= px < sx1  # the source box holds its point
            if dst_kind is None:
                assert (dy0, dx0, dy1, dx1) == (sy0, sx0, sy1, sx1)
            else:
                qy, qx = point(dst_map, dst_kind)
                assert dy0 <= qy < dy1 and dx0 <= qx < dx1
            assert (dy1 - dy0, dx1 - dx0) == (sy1 - sy0, sx1 - sx0)
            assert 0 <= dy0 and dy1 <= 32 and 0 <= dx0 and dx1 <= 32
            assert torch.equal(out.images[i, :, dy0:dy1, dx0:dx1], x[perm[i], :, sy0:sy1, sx0:sx1])
        if mode == "batch":  # one box for the batch, from source perm[0] and target 0
            assert (p.boxes == p.boxes[0]).all() and (dst == dst[0]).all()


def test_clipping_reconciles_source_and_destination_boxes():
    """Hand-computed: 10×10, λ=0.75 -> side int(10·0.5)=5, half 2. Source point (1, 8): box
    rows [0,3) (clipped), cols [6,10) -> 3×4. Destination point (9, 0): same 3×4 box centred
    there (top-left (8, -2)) shifted inside -> rows [7,10), cols [0,4). λ = 1 - 12/100."""
    src_map, dst_map = torch.zeros(1, 10, 10), torch.zeros(1, 10, 10)
    src_map[0, 1, 8] = 1.0
    dst_map[0, 9, 0] = 1.0
    lam = torch.tensor([0.75], dtype=torch.float64)
    src, dst = scheme_boxes(src_map, dst_map, lam, "salient_to_salient", 10, 10)
    assert src.tolist() == [[0, 6, 3, 10]] and dst.tolist() == [[7, 0, 10, 4]]
    src, dst = scheme_boxes(src_map, dst_map, lam, "salient_to_corresponding", 10, 10)
    assert src.tolist() == dst.tolist() == [[0, 6, 3, 10]]
    # a box never leaves the image, whatever the point
    box = torch.tensor([[0, 0, 7, 9]])
    for cy in range(10):
        for cx in range(10):
            placed = place_like(box, torch.tensor([cy]), torch.tensor([cx]), 10, 10)
            y0, x0, y1, x1 = placed[0].tolist()
            assert (y1 - y0, x1 - x0) == (7, 9) and 0 <= y0 and y1 <= 10 and 0 <= x0 and x1 <= 10
            assert y0 <= cy < y1 and x0 <= cx < x1


@pytest.mark.parametrize("mode", MODES)
def test_seeded_determinism(mode):
    x, y = blobs(8, 16), torch.arange(8)
    mixer = get_mixer("saliencymix", mode=mode, pairing="random")
    a = mixer(x, y, torch.Generator().manual_seed(5), CTX)
    b = mixer(x, y, torch.Generator().manual_seed(5), CTX)
    assert torch.equal(a.images, b.images) and torch.equal(a.lam, b.lam)
    assert torch.equal(a.label_b, b.label_b)
    c = [mixer(x, y, torch.Generator().manual_seed(s), CTX).lam for s in range(6, 9)]
    assert any(not torch.equal(a.lam, ci) for ci in c)


def test_probability_and_sampling_match_official_draw_order():
    x, y = blobs(6, 16), torch.arange(6)
    never = get_mixer("saliencymix", prob=0.0)(x, y, torch.Generator().manual_seed(0), CTX)
    assert torch.equal(never.images, x) and never.label_b is None
    # The official loop (train.py): `r = np.random.rand(1)`; if r < salmix_prob:
    # `lam = np.random.beta(beta, beta)`, then `rand_index = torch.randperm(B)`. The same three
    # draws in that order from one generator give the mixer's λ and permutation; any other
    # order gives other values (checked for the two swaps below).
    from pretrain.mixers.base import bernoulli, beta
    from pretrain.pairing import random_pairing

    def official(seed: int, order: str) -> tuple[float, list[int]]:
        g = torch.Generator().manual_seed(seed)
        draws = {}
        for step in order:
            if step == "coin":
                bernoulli(g, 1.0)
            elif step == "lam":
                draws["lam"] = float(beta(g, 1.0))
            else:
                draws["perm"] = random_pairing(6, g).tolist()
        return draws["lam"], draws["perm"]

    mixer = get_mixer("saliencymix", mode="batch", prob=1.0)
    for seed in range(3):
        p = mixer.sample(x, y, torch.Generator().manual_seed(seed), CTX)
        lam, perm = official(seed, ("coin", "lam", "perm"))
        assert p.active and p.info["lam_sampled"] == lam and p.perm.tolist() == perm
        for other in (("lam", "coin", "perm"), ("coin", "perm", "lam")):
            assert official(seed, other) != (lam, perm)
    mixer = get_mixer("saliencymix", mode="sample")
    p = mixer.sample(x, y, torch.Generator().manual_seed(1), CTX)
    assert p.active and sorted(p.perm.tolist()) == list(range(6))
    assert p.info == {"mode": "sample", "scheme": "salient_to_corresponding", "pairing": "random",
                      "detector": "fine_grained"}
    for det in ("spectral_residual", "frequency_tuned"):
        out = get_mixer("saliencymix", detector=det)(x, y, torch.Generator().manual_seed(1), CTX)
        assert out.images.shape == x.shape


def test_greedy_pairing_with_saliencymix():
    from pretrain.greedy import greedy_pairing
    x, y = blobs(8, 16), torch.arange(8)
    mixer = get_mixer("saliencymix", mode="sample", pairing="greedy")
    p = mixer.sample(x, y, torch.Generator().manual_seed(0), CTX)
    assert torch.equal(p.perm, greedy_pairing(8, images=x, ctx=CTX))
    assert p.info["pairing"] == "greedy" and (p.perm != y).all()


def test_bad_options_are_one_line_errors():
    with pytest.raises(UserError, match="unknown mode 'per'; valid: official, batch, sample"):
        get_mixer("saliencymix", mode="per")
    with pytest.raises(UserError, match="unknown scheme 'x'; valid: salient_to_corresponding"):
        get_mixer("saliencymix", scheme="x")
    with pytest.raises(UserError, match="unknown saliency detector 'bas'; valid detectors: "):
        get_mixer("saliencymix", detector="bas")
    with pytest.raises(UserError, match="needs the model"):
        get_mixer("saliencymix", detector="gradient")
    with pytest.raises(UserError, match="unknown pairing 'best'; valid: greedy, random"):
        get_mixer("saliencymix", pairing="best")
    with pytest.raises(UserError, match="mode=official reproduces the published code only"):
        get_mixer("saliencymix", mode="official", scheme="salient_to_salient")
    with pytest.raises(UserError, match="bad value for prob"):
        get_mixer("saliencymix", prob="often")


def test_describe_records_the_variant():
    d = get_mixer("saliencymix", mode="official").describe()
    assert d["name"] == "saliencymix" and d["mode"] == "official"
    assert "official defect" in d["saliency_input"] and d["boxes"] == "one per batch"
    d = get_mixer("saliencymix", mode="sample", scheme="nonsalient_to_salient").describe()
    assert d["scheme"] == "nonsalient_to_salient" and d["boxes"] == "one per sample"
    assert d["saliency_input"] == "de-normalised 0..255 image"


def test_smix_pretrain_saliencymix_sample(shapes_root, tmp_path):
    run = tmp_path / "run"
    args = ["pretrain", "--preset", "shapes-resnet18", "--data", str(shapes_root), "--out",
            str(run), "--method", "saliencymix", "--epochs", "1", "method.mode=sample",
            "method.scheme=salient_to_salient", "workers=0", "batch_size=8", "input_size=32",
            "resize=32", "crop=32", "progress=false", "milestones=1"]
    assert smix(args) == 0
    _, meta = read_checkpoint(run / "backbone.safetensors")
    assert meta.method["name"] == "saliencymix" and meta.method["mode"] == "sample"
    assert meta.method["scheme"] == "salient_to_salient" and meta.method["prob"] == 1.0
