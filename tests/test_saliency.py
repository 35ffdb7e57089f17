"""Saliency detectors: parity with OpenCV contrib on real photos, batching, registry, gradient.

The parity tests need scikit-image (the photos) and opencv-contrib (cv2.saliency), both in the
project's dev extra; without them they fail with a message saying what to install.
"""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smix.data import denormalize
from smix.errors import UserError
from pretrain import saliency
from pretrain.mixers import MixContext, get_mixer
from pretrain.saliency import (fine_grained, frequency_tuned, get_detector, gradient_saliency,
                               list_detectors, normalized_saliency, register_detector,
                               spectral_residual)

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "colorwheel", "camera", "coins")
SIZES = (32, 224)
# detector -> (OpenCV class, largest 1 - Pearson correlation per photo). Measured on this
# suite's photos: fine_grained 0 (bit-exact, asserted below), spectral_residual at most
# 2.4e-7 (float32 rounding of the correlation; OpenCV's approximate atan, float32 sin/cos).
OPENCV = {"fine_grained": ("StaticSaliencyFineGrained_create", 1e-6),
          "spectral_residual": ("StaticSaliencySpectralResidual_create", 1e-6)}


def _reference_libs():
    """cv2 (with the contrib saliency module) and skimage.data, or a loud failure."""
    try:
        import cv2
        import skimage.data
    except ImportError as exc:
        pytest.fail(f"saliency parity tests need the dev extra (pip install -e '.[dev]'): {exc}")
    if not hasattr(cv2, "saliency"):
        pytest.fail("cv2 has no saliency module: install opencv-contrib-python-headless, "
                    "not opencv-python (pip install -e '.[dev]')")
    return cv2, skimage.data


@pytest.fixture(scope="module")
def photos() -> dict[int, np.ndarray]:
    """The photos as uint8 RGB [N,S,S,3] per size (grayscale ones stacked to RGB)."""
    cv2, data = _reference_libs()
    out = {}
    for size in SIZES:
        batch = []
        for name in PHOTOS:
            img = getattr(data, name)()
            img = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]
            batch.append(cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA))
        out[size] = np.stack(batch)
    return out


def _opencv_maps(detector: str, rgb: np.ndarray) -> np.ndarray:
    """OpenCV's maps the way a correct caller gets them: one uint8 BGR image at a time."""
    cv2, _ = _reference_libs()
    algo = getattr(cv2.saliency, OPENCV[detector][0])()
    maps = []
    for img in rgb:
        ok, sal = algo.computeSaliency(np.ascontiguousarray(img[..., ::-1]))
        assert ok
        maps.append(sal)
    return np.stack(maps)


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).float()


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def _argmax_yx(m: np.ndarray) -> np.ndarray:
    return np.array(np.unravel_index(int(m.argmax()), m.shape))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("detector", sorted(OPENCV))
def test_parity_with_opencv_on_photos(photos, detector, size):
    rgb = photos[size]
    ours = get_detector(detector)(_to_tensor(rgb)).numpy()
    ref = _opencv_maps(detector, rgb)
    corr = [_pearson(o, r) for o, r in zip(ours, ref)]
    near = [np.abs(_argmax_yx(o) - _argmax_yx(r)).max() <= 1 for o, r in zip(ours, ref)]
    assert max(1 - c for c in corr) <= OPENCV[detector][1], dict(zip(PHOTOS, corr))
    assert np.mean(near) >= 0.9, dict(zip(PHOTOS, near))
    if detector == "fine_grained":  # stronger than asked: the same uint8 map, pixel for pixel
        np.testing.assert_array_equal(ours, ref)


def test_fine_grained_is_bit_exact_on_non_square_images(photos):
    cv2, _ = _reference_libs()
    rgb = np.stack([cv2.resize(p, (71, 45), interpolation=cv2.INTER_AREA) for p in photos[224]])
    np.testing.assert_array_equal(fine_grained(_to_tensor(rgb)).numpy(),
                                  _opencv_maps("fine_grained", rgb))


def test_fine_grained_reproduces_opencv_uint8_wrap():
    """A mid-grey dot in a dark disc on white: on+off exceeds 255 and OpenCV's cast wraps."""
    yy, xx = np.mgrid[:128, :128]
    r = np.hypot(yy - 64, xx - 64)
    img = np.full((128, 128), 255, np.uint8)
    img[r < 20], img[r < 5] = 0, 200
    rgb = np.stack([img] * 3, -1)[None]
    wrapped = fine_grained(_to_tensor(rgb))
    saturated = fine_grained(_to_tensor(rgb), saturate=True)
    np.testing.assert_array_equal(wrapped.numpy(), _opencv_maps("fine_grained", rgb))
    assert (saturated > wrapped).any() and (saturated == 1.0).any()


@pytest.mark.parametrize("size", SIZES)
def test_spectral_residual_matches_opencv_closely(photos, size):
    rgb = photos[size]
    ours = spectral_residual(_to_tensor(rgb)).numpy()
    # only OpenCV's approximate atan and float32 sin/cos separate the two (measured 5.4e-5)
    assert np.abs(ours - _opencv_maps("spectral_residual", rgb)).max() < 1e-4


def test_lab_conversion_matches_skimage(photos):
    import skimage.color

    rgb = photos[32][:3]
    ours = saliency._rgb_to_lab(_to_tensor(rgb).double()).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, skimage.color.rgb2lab(rgb), atol=1e-3)


# ----------------------------------------------------------- properties without references


def _random_images(batch: int = 5, h: int = 37, w: int = 29, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 256, (batch, 3, 5, 4), generator=g).float()
    smooth = nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return (smooth + torch.randint(-20, 21, smooth.shape, generator=g)).clamp(0, 255).round()


@pytest.mark.parametrize("name", ["fine_grained", "spectral_residual", "frequency_tuned"])
def test_batched_equals_per_image_shapes_and_dtypes(name):
    images = _random_images()
    detector = get_detector(name)
    out = detector(images)
    assert out.shape == (5, 37, 29) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    singles = torch.cat([detector(images[i:i + 1]) for i in range(len(images))])
    torch.testing.assert_close(out, singles, rtol=0, atol=1e-6)
    # uint8 input and float input with de-normalisation noise see the same pixels
    torch.testing.assert_close(detector(images.to(torch.uint8)), out, rtol=0, atol=1e-6)
    torch.testing.assert_close(detector(images + 1e-3), out, rtol=0, atol=1e-6)


def test_detectors_do_not_mutate_input():
    images = _random_images()
    before = images.clone()
    for name in ("fine_grained", "spectral_residual", "frequency_tuned"):
        get_detector(name)(images)
    assert torch.equal(images, before)


def test_fine_grained_chunking_does_not_change_the_result(monkeypatch):
    images = _random_images(batch=6, h=24, w=24)
    whole = fine_grained(images)
    monkeypatch.setattr(saliency, "_CPU_CHUNK_PIXELS", 24 * 24)  # chunks of 1 image per thread
    assert torch.equal(fine_grained(images), whole)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        fine_grained(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="at least 3x3"):
        spectral_residual(torch.zeros(1, 3, 2, 8))
    with pytest.raises(ValueError, match=r"\(mean, std\) with 3 values each"):
        fine_grained(torch.zeros(1, 3, 8, 8), normalization=((0.5,), (0.25,)))


def test_maps_of_normalised_images_are_the_maps_of_their_pixels():
    """`normalized_saliency` (what the mixers call) equals the detector on the 0..255 pixels
    the normalised batch was made from, whether the detector takes the normalisation itself
    or gets the pixels. The reference is the known pixels, not `denormalize` of the batch (the
    code's own step): a de-normalisation that swapped mean and std, or forgot the 255, would
    agree with itself."""
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616)
    pixels = _random_images(batch=3, h=20, w=28)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    normalized = (pixels / 255 - m) / s
    for name in ("fine_grained", "spectral_residual", "frequency_tuned"):
        want = get_detector(name)(pixels)
        assert torch.equal(normalized_saliency(name, normalized, mean, std), want), name
    # the round trip lands within float32 rounding of the integer pixels (every detector reads
    # them as uint8, rounded to nearest)
    assert (denormalize(normalized, mean, std, scale=255.0) - pixels).abs().max() < 1e-3
    assert get_detector("fine_grained").takes_normalization
    assert not get_detector("frequency_tuned").takes_normalization


def test_frequency_tuned_finds_the_coloured_square():
    images = torch.full((1, 3, 40, 40), 128.0)
    images[0, :, 10:18, 22:30] = torch.tensor([220.0, 40.0, 40.0]).view(3, 1, 1)
    sal = frequency_tuned(images)[0]
    y, x = divmod(int(sal.argmax()), 40)
    assert 10 <= y < 18 and 22 <= x < 30
    inside = torch.zeros(40, 40, dtype=torch.bool)
    inside[10:18, 22:30] = True
    assert sal[inside].mean() > 5 * sal[~inside].mean()


def test_frequency_tuned_matches_achantas_formula_on_photos(photos):
    """OpenCV has no frequency-tuned detector: the reference is Achanta et al.'s formula with
    independent parts, skimage's Lab and OpenCV's separable filter with the paper's 5x5
    binomial kernel (BORDER_REFLECT_101): S = ||mean Lab - blurred Lab||, over its maximum."""
    cv2, _ = _reference_libs()
    import skimage.color

    rgb = photos[32]
    kernel = np.array([1, 4, 6, 4, 1], np.float64) / 16
    want = []
    for img in rgb:
        lab = skimage.color.rgb2lab(img)
        blurred = cv2.sepFilter2D(lab, cv2.CV_64F, kernel, kernel,
                                  borderType=cv2.BORDER_REFLECT_101)
        sal = np.linalg.norm(blurred - lab.mean((0, 1)), axis=-1)
        want.append(sal / sal.max())
    ours = frequency_tuned(_to_tensor(rgb)).numpy()
    np.testing.assert_allclose(ours, np.stack(want), rtol=0, atol=1e-4)


def test_fine_grained_of_a_uniform_image_is_zero():
    assert fine_grained(torch.full((2, 3, 16, 16), 90.0)).abs().max() == 0


# ------------------------------------------------------------------------------- registry


def test_registry_lists_builtins_and_flags_model_detectors():
    assert {"fine_grained", "spectral_residual", "frequency_tuned", "gradient"} <= set(
        list_detectors())
    assert get_detector("gradient") is gradient_saliency and gradient_saliency.needs_model
    assert not get_detector("fine_grained").needs_model


def test_unknown_detector_raises_user_error_listing_valid_names():
    with pytest.raises(UserError) as err:
        get_detector("basnett")
    message = str(err.value)
    assert "basnett" in message
    for name in list_detectors():
        assert name in message


def test_users_can_register_their_own_detector():
    @register_detector("test_brightness")
    def brightness(images: torch.Tensor) -> torch.Tensor:
        return images.float().mean(1) / 255.0

    try:
        assert get_detector("test_brightness") is brightness and not brightness.needs_model
        with pytest.raises(ValueError, match="already registered"):
            register_detector("test_brightness")(lambda images: images)
    finally:
        saliency._DETECTORS.pop("test_brightness")


# ------------------------------------------------------------------------------- gradient


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Dropout(0.0), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


@pytest.mark.parametrize("eval_mode", [False, True])
def test_gradient_saliency_leaves_the_model_untouched(eval_mode):
    model = _tiny_model().train()
    model[3].eval()  # a mixed-mode model must come back mixed
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 12, 10)
    x_before = x.clone()
    sal = gradient_saliency(model, x, torch.tensor([0, 1, 2, 1]), eval_mode=eval_mode)
    assert sal.shape == (4, 12, 10) and sal.dtype == torch.float32
    assert (sal >= 0).all() and sal.sum() > 0
    assert all(p.grad is None for p in model.parameters())
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # BatchNorm running stats included
    assert torch.equal(x, x_before) and not x.requires_grad


def test_gradient_saliency_keeps_existing_grads_and_takes_soft_labels():
    model = _tiny_model()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    soft = torch.softmax(torch.randn(2, 3), dim=1)
    sal = gradient_saliency(model, torch.randn(2, 3, 8, 8), soft)
    assert sal.shape == (2, 8, 8)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_gradient_saliency_is_the_rms_input_gradient():
    model = _tiny_model().eval()
    x = torch.randn(3, 3, 6, 6, requires_grad=True)
    y = torch.tensor([2, 0, 1])
    nn.functional.cross_entropy(model(x), y).backward()
    expected = x.grad.pow(2).mean(1).sqrt()
    torch.testing.assert_close(gradient_saliency(model, x.detach(), y), expected)


class _RedNet(torch.nn.Module):
    """A stand-in for BASNet: side outputs as a tuple, the first [B,1,h,w] map (here twice
    the normalised red plane, plus a constant the min-max removes)."""

    def forward(self, x: torch.Tensor):
        return (2 * x[:, :1] + 5, x[:, 1:2])


def _basnet_protocol_of_rednet(images: torch.Tensor) -> torch.Tensor:
    """BASNet's test protocol written out for `_RedNet`: 256x256 bilinear, [0,1], ImageNet
    normalisation, first output's channel 0, min-max per image, bilinear back."""
    x = F.interpolate(images.float() / 255, size=(256, 256), mode="bilinear", align_corners=False)
    red = 2 * (x[:, 0] - 0.485) / 0.229 + 5
    red = (red - red.amin((1, 2), keepdim=True)) / (red.amax((1, 2), keepdim=True)
                                                    - red.amin((1, 2), keepdim=True))
    return F.interpolate(red[:, None], size=images.shape[2:], mode="bilinear",
                         align_corners=False)[:, 0]


def _export(path, batch: int, dynamic: bool) -> None:
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    program = torch.export.export(_RedNet(), (torch.rand(batch, 3, 256, 256),),
                                  dynamic_shapes=shapes)
    torch.export.save(program, str(path))


def test_a_torchscript_network_is_a_detector_with_basnets_protocol(tmp_path):
    path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(_RedNet()), str(path))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 40, 56), generator=g, dtype=torch.uint8)
    want = _basnet_protocol_of_rednet(images)
    for prefix in ("network:", "torchscript:"):  # torchscript: the older spelling
        got = get_detector(f"{prefix}{path}")(images)
        assert got.shape == (2, 40, 56) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic-batch", "batch-fixed-at-3"])
def test_a_torch_export_network_is_a_detector_with_basnets_protocol(tmp_path, dynamic):
    """A .pt2 of torch.export: with a dynamic batch, or one fixed at export (3 here), which
    7 images then pass in slices of 3, 3 and 1 padded to 3."""
    path = tmp_path / "net.pt2"
    _export(path, 3, dynamic)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (7, 3, 33, 47), generator=g, dtype=torch.uint8)
    got = get_detector(f"network:{path}")(images)
    assert got.shape == (7, 33, 47) and got.dtype == torch.float32
    torch.testing.assert_close(got, _basnet_protocol_of_rednet(images), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic-batch", "batch-fixed-at-3"])
def test_an_empty_batch_gives_empty_maps(tmp_path, dynamic):
    _export(tmp_path / "net.pt2", 3, dynamic)
    got = get_detector(f"network:{tmp_path / 'net.pt2'}")(torch.zeros(0, 3, 20, 30))
    assert got.shape == (0, 20, 30)


def test_a_pt2_in_the_layout_of_torch_2_1_to_2_6_is_read(tmp_path):
    """Before the PT2 archive (torch 2.7), torch.export.save wrote a flat zip of
    serialized_exported_program.json and its tensors: torch.export.load reads it still."""
    serde = pytest.importorskip("torch._export.serde.serialize")
    schema = pytest.importorskip("torch._export.serde.schema")
    program = torch.export.export(_RedNet(), (torch.rand(2, 3, 256, 256),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    art = serde.serialize(program)
    path = tmp_path / "old.pt2"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("serialized_exported_program.json", art.exported_program)
        archive.writestr("serialized_state_dict.pt", art.state_dict)
        archive.writestr("serialized_constants.pt", art.constants)
        archive.writestr("serialized_example_inputs.pt", art.example_inputs)
        archive.writestr("version", ".".join(map(str, schema.SCHEMA_VERSION)))
    images = torch.randint(0, 256, (2, 3, 24, 40), dtype=torch.uint8)
    got = get_detector(f"network:{path}")(images)
    torch.testing.assert_close(got, _basnet_protocol_of_rednet(images), atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_torch_export_network_runs_on_cuda(tmp_path):
    path = tmp_path / "net.pt2"
    _export(path, 2, dynamic=False)
    images = torch.randint(0, 256, (3, 3, 40, 56), dtype=torch.uint8)
    got = get_detector(f"network:{path}")(images.cuda())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), _basnet_protocol_of_rednet(images), atol=1e-4, rtol=0)


def test_saliencymix_cuts_where_a_supplied_network_points(tmp_path):
    """A bright red square in each source image: a network that sees red puts the patch there."""
    path = tmp_path / "net.pt2"
    _export(path, 3, dynamic=False)  # 4 images: slices of 3 and 1
    images = torch.zeros(4, 3, 64, 64)
    spots = [(10, 12), (40, 20), (20, 50), (50, 50)]
    for i, (y, x) in enumerate(spots):
        images[i, 0, y - 3:y + 4, x - 3:x + 4] = 1.0
    mixer = get_mixer("saliencymix", mode="sample", prob=1.0, detector=f"network:{path}")
    ctx = MixContext((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 4, None)
    params = mixer.sample(images, torch.arange(4), torch.Generator().manual_seed(1), ctx)
    for i, (y0, x0, y1, x1) in zip(params.perm.tolist(), params.boxes.tolist()):
        y, x = spots[i]
        assert y0 <= y < y1 and x0 <= x < x1, (i, spots[i], (y0, x0, y1, x1))


class _TwoInputs(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return x - y


class _Classifier(torch.nn.Module):
    def forward(self, x: torch.Tensor):
        return x.mean((2, 3)) @ torch.ones(3, 10)  # [B,10] class scores, not a map


class _OnlySmall(torch.nn.Module):
    def forward(self, x: torch.Tensor):
        return x.view(x.shape[0], 3, 64, 64)[:, :1]  # only a 64x64 input fits


def test_a_supplied_network_that_gives_no_map_per_image_is_one_line(tmp_path):
    """Was an IndexError from the min-max normalisation, or a view error, at the first step."""
    torch.jit.save(torch.jit.script(_Classifier()), str(tmp_path / "cls.pt"))
    program = torch.export.export(_Classifier(), (torch.rand(2, 3, 256, 256),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "cls.pt2"))
    torch.jit.save(torch.jit.script(_OnlySmall()), str(tmp_path / "small.pt"))
    for name, message in (("cls.pt", r"first output is \(1, 10\) for one image; a detector "
                                     r"needs a map per image"),
                          ("cls.pt2", r"first output is \(1, 10\) for one image"),
                          ("small.pt", "the network fails on a 1x3x256x256 batch")):
        with pytest.raises(UserError, match=message) as e:
            get_mixer("saliencymix", detector=f"network:{tmp_path / name}")
        assert "\n" not in str(e.value)


class _Checks320(torch.nn.Module):
    def forward(self, x: torch.Tensor):
        if x.shape[-1] != 320:  # TorchScript raises this as torch.jit.Error, an Exception
            raise ValueError("this network takes 320x320 images")
        return x[:, :1]


class _Dict(torch.nn.Module):
    def forward(self, x: torch.Tensor):
        return {"map": x[:, 0]}


def test_a_supplied_network_raising_any_exception_is_one_line(tmp_path):
    """A scripted network's own check (torch.jit.Error) and a dict output (AttributeError)
    were tracebacks: only RuntimeError, ValueError, IndexError, TypeError were caught."""
    torch.jit.save(torch.jit.script(_Checks320()), str(tmp_path / "320.pt"))
    torch.jit.save(torch.jit.trace(_Dict(), torch.rand(1, 3, 8, 8), strict=False),
                   str(tmp_path / "dict.pt"))
    for name, message in (("320.pt", "this network takes 320x320 images"),
                          ("dict.pt", "has no attribute")):
        with pytest.raises(UserError, match="the network fails on a 1x3x256x256 batch") as e:
            get_detector(f"network:{tmp_path / name}")
        assert message in str(e.value) and "\n" not in str(e.value)


def test_a_supplied_network_that_runs_on_the_gpu_only_is_checked_there(tmp_path, monkeypatch):
    """A network traced on a GPU (its device in the graph) fails on the CPU; on a machine with
    a GPU, where the detector runs it, it was refused at creation (ran before the check)."""
    path = tmp_path / "gpu.pt"
    path.write_bytes(b"a network traced on a GPU")
    ran = []

    def network(p, device):
        def net(x):
            ran.append((device, x.device.type))
            if device == "cpu":
                raise RuntimeError("Expected all tensors to be on the same device")
            return torch.zeros(len(x), 64, 64)
        return net

    monkeypatch.setattr(saliency, "_network", network)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun's second process: its own GPU
    monkeypatch.setattr(saliency, "_blank_maps", lambda net, device: net(
        torch.zeros(1, 3, 256, 256, device="meta" if device != "cpu" else "cpu")))
    get_detector(f"network:{path}")  # no error
    assert [d for d, _ in ran] == ["cpu", "cuda:1"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no GPU: refused
    (tmp_path / "gpu2.pt").write_bytes(path.read_bytes())  # another path: not cached
    with pytest.raises(UserError, match="the network fails on a 1x3x256x256 batch"):
        get_detector(f"network:{tmp_path / 'gpu2.pt'}")


def test_a_supplied_network_that_is_missing_or_not_a_network_is_one_line(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        get_detector(f"network:{tmp_path / 'none.pt'}")
    (tmp_path / "w.pth").write_bytes(b"not a network")
    torch.save({"weight": torch.ones(2)}, str(tmp_path / "state.pt"))  # a zip, but weights only
    two = torch.export.export(_TwoInputs(), (torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)))
    torch.export.save(two, str(tmp_path / "two.pt2"))  # a network, but not of one image batch
    for name, message in (("w.pth", "not a torch.export .* or TorchScript file"),
                          ("state.pt", "not a torch.export .* or TorchScript file"),
                          ("two.pt2", "the network takes 2 inputs; a detector takes one")):
        with pytest.raises(UserError, match=message) as e:
            get_detector(f"network:{tmp_path / name}")
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="or network:PATH"):
        get_detector("basnet")
