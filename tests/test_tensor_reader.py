"""The GPU path's loader workers read images as tensors (`smix.data.load_rgb_tensor`): the
pixels PIL decodes, the crop and flip the same draws give on a PIL image, and PIL's verdict on
a bad file."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import RandomResizedCrop

from pretrain.config import build_config
from pretrain.data import build_datasets
from smix import data as smix_data
from smix.data import ClassFolder, TrainAug, load_rgb, load_rgb_tensor, train_transform
from smix.errors import UserError

PHOTO = Image.fromarray(skimage.data.astronaut())  # 512x512, textured everywhere


def _pil_pixels(path: Path) -> np.ndarray:
    return np.asarray(load_rgb(path)).transpose(2, 0, 1)


@pytest.mark.parametrize("mode,fmt,options", [
    ("RGB", "JPEG", {"quality": 90}),
    ("RGB", "JPEG", {"quality": 75, "progressive": True}),
    ("RGB", "JPEG", {"quality": 95, "subsampling": 0}),
    ("L", "JPEG", {}),
    ("CMYK", "JPEG", {}),
    ("RGBA", "PNG", {}),
    ("P", "PNG", {}),
])
def test_tensor_reader_returns_the_pixels_pil_decodes(tmp_path, mode, fmt, options):
    path = tmp_path / f"x.{fmt.lower()}"
    picture = PHOTO.resize((300, 200)).convert(mode)
    picture.save(path, fmt, **options)
    pixels = load_rgb_tensor(path)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 200, 300)
    np.testing.assert_array_equal(pixels.numpy(), _pil_pixels(path))


def test_tensor_reader_agrees_with_pil_on_cmyk_ink_and_exif_orientation(tmp_path):
    """Real black ink (a CMYK picture with every channel random, saved inverted with Adobe's
    marker as PIL and Photoshop write it), and an EXIF orientation tag, which neither reader
    applies (torchvision's ImageFolder does not either)."""
    rng = np.random.default_rng(0)
    ink = Image.frombytes("CMYK", (96, 64), rng.integers(0, 256, 96 * 64 * 4, np.uint8).tobytes())
    ink.save(tmp_path / "ink.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    PHOTO.resize((120, 80)).save(tmp_path / "turned.jpg", quality=90, exif=exif)
    for name, size in (("ink.jpg", (64, 96)), ("turned.jpg", (80, 120))):
        pixels = load_rgb_tensor(tmp_path / name)
        assert pixels.shape[1:] == size
        np.testing.assert_array_equal(pixels.numpy(), _pil_pixels(tmp_path / name))


def test_a_jpeg_torchvision_refuses_goes_to_pil(tmp_path, monkeypatch):
    path = tmp_path / "x.jpg"
    PHOTO.resize((90, 60)).save(path, quality=90)

    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported")
    monkeypatch.setattr(smix_data, "decode_jpeg", refuse)
    np.testing.assert_array_equal(load_rgb_tensor(path).numpy(), _pil_pixels(path))
    (tmp_path / "bad.jpg").write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError, match="bad.jpg: cannot read image"):
        load_rgb_tensor(tmp_path / "bad.jpg")


def test_pils_pixel_limit_is_kept_and_named(tmp_path, monkeypatch):
    """A picture over twice PIL's decompression-bomb limit is refused by both readers with
    the file's name (and so skipped with skip_bad_images), not decoded by torchvision."""
    (tmp_path / "a").mkdir()
    PHOTO.resize((300, 200)).save(tmp_path / "a" / "big.jpg", quality=90)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 60,000 px > 2 x 10,000
    for read in (load_rgb, load_rgb_tensor):
        with pytest.raises(UserError, match="big.jpg: cannot read image.*DecompressionBomb"):
            read(tmp_path / "a" / "big.jpg")
    assert ClassFolder(tmp_path, skip_bad_images=True, reader=load_rgb_tensor)[0] is None


def test_libjpeg_warnings_stay_out_of_a_workers_stderr(tmp_path, capfd):
    """A JPEG with junk before its end marker decodes (as PIL decodes it) with a warning that
    libjpeg-turbo prints from C: shown when read in the training process, not from a loader
    worker, where it would repeat every epoch among the progress bars."""
    (tmp_path / "a").mkdir()
    buf = io.BytesIO()
    PHOTO.resize((64, 48)).save(buf, "JPEG", quality=90)
    damaged = buf.getvalue()[:-2] + b"\x00" * 71 + b"\xff\xd9"
    (tmp_path / "a" / "junk.jpg").write_bytes(damaged)
    expected = _pil_pixels(tmp_path / "a" / "junk.jpg")
    capfd.readouterr()
    np.testing.assert_array_equal(load_rgb_tensor(tmp_path / "a" / "junk.jpg").numpy(), expected)
    assert "Corrupt JPEG data" in capfd.readouterr().err
    loader = DataLoader(ClassFolder(tmp_path, reader=load_rgb_tensor), num_workers=1,
                        batch_size=None)
    (image, label), = list(loader)
    np.testing.assert_array_equal(image.numpy(), expected)
    assert "Corrupt JPEG data" not in capfd.readouterr().err


def test_tensor_reader_keeps_pils_verdict_on_bad_files(tmp_path):
    buf = io.BytesIO()
    PHOTO.save(buf, "JPEG", quality=90)
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "text.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    for name in ("cut.jpg", "text.jpg", "empty.jpg", "missing.jpg"):
        with pytest.raises(UserError, match=f"{name}: cannot read image"):
            load_rgb_tensor(tmp_path / name)
        with pytest.raises(UserError):  # PIL refuses each of them too
            load_rgb(tmp_path / name)


def test_skip_bad_images_with_the_tensor_reader(tmp_path):
    (tmp_path / "a").mkdir()
    PHOTO.resize((40, 30)).save(tmp_path / "a" / "good.jpg", quality=90)
    (tmp_path / "a" / "zbad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    strict = ClassFolder(tmp_path, reader=load_rgb_tensor)
    assert strict[0][0].shape == (3, 30, 40)
    with pytest.raises(UserError, match="zbad.jpg"):
        strict[1]
    assert ClassFolder(tmp_path, skip_bad_images=True, reader=load_rgb_tensor)[1] is None


def test_crop_and_flip_on_tensors_are_the_drawn_ones(tmp_path):
    """The RandomResizedCrop box and the flip are drawn from the image's size alone, so a seed
    gives the tensor path the box and flip it gives a PIL image. Checked against PIL itself:
    that box cut out and resized by PIL's bilinear filter, mirrored when the coin says so, is the
    tensor path's output within one grey level (torch's antialiased uint8 resize against
    PIL's). A different box or flip on this photo would differ by tens of levels."""
    path = tmp_path / "photo.jpg"
    PHOTO.resize((500, 375)).save(path, quality=90)
    picture = load_rgb(path)
    half = train_transform(TrainAug("imagenet", 224, (0.5,) * 3, (0.25,) * 3), on_device=True)
    flipped, means = 0, []
    for seed in range(24):
        torch.manual_seed(seed)
        top, left, h, w = RandomResizedCrop.get_params(picture, [0.08, 1.0], [3 / 4, 4 / 3])
        flip = bool(torch.rand(1) < 0.5)
        expected = picture.crop((left, top, left + w, top + h)).resize((224, 224), Image.BILINEAR)
        if flip:
            expected = expected.transpose(Image.FLIP_LEFT_RIGHT)
        torch.manual_seed(seed)
        got = half(load_rgb_tensor(path))
        assert got.dtype == torch.uint8 and got.shape == (3, 224, 224)
        diff = np.abs(got.numpy().astype(int) - np.asarray(expected).transpose(2, 0, 1))
        assert diff.max() <= 1, (seed, flip)
        flipped += flip
        means.append(diff.mean())
    assert 0 < flipped < 24 and np.mean(means) < 0.1


def test_build_datasets_reads_tensors_on_the_gpu_path_only(shapes_root, tmp_path):
    cfg = build_config("shapes-resnet18", shapes_root, tmp_path / "run", "none",
                       {"device": "cpu", "train_aug": "imagenet", "input_size": "32",
                        "resize": "32", "crop": "32"})
    on_device = build_datasets(cfg, on_device=True).train
    on_host = build_datasets(cfg, on_device=False).train
    assert on_device.reader is load_rgb_tensor and on_host.reader is load_rgb
    image, _ = on_device[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert on_host[0][0].dtype == torch.float32
