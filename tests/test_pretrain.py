"""The pretrain engine: configs, mixers of the foundation, resume bit-identity, bad input, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smix.checkpoint import read_checkpoint
from smix.cli import main as smix
from smix.dist import DistInfo
from smix import cpus as cpus_mod
from smix.errors import UserError
from pretrain import engine
from pretrain.config import build_config
from pretrain.mixers import MixContext, get_mixer
from tests.conftest import write_cifar10

FAST = {"workers": "0", "batch_size": "8", "input_size": "32", "resize": "32", "crop": "32",
        "progress": "false", "milestones": "1"}
CTX = MixContext((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 4)


def cfg(shapes_root: Path, out: Path, epochs: int = 2, method: str = "none", **extra: str):
    return build_config("shapes-resnet18", shapes_root, out, method,
                        {**FAST, "epochs": str(epochs), **extra})


def test_presets_carry_paper_settings():
    c = build_config("cifar10-resnet18", Path("d"), Path("o"), "cutmix")
    assert (c.lr, c.momentum, c.nesterov, c.weight_decay, c.batch_size) == (0.1, 0.9, True, 5e-4,
                                                                            256)
    assert c.milestones == (60, 120, 160) and c.gamma == 0.2 and c.epochs == 200
    assert c.method_params == {"prob": 0.5} and c.arch == "cifar_resnet18"
    # SaliencyMix's CIFAR recipe mixes half the batches too (its train.py: --cutmix_prob 0.5)
    s = build_config("cifar10-resnet18", Path("d"), Path("o"), "saliencymix")
    assert s.method_params["prob"] == 0.5
    i = build_config("imagenet-resnet50", Path("d"), Path("o"), "saliencymix")
    assert (i.epochs, i.batch_size, i.milestones, i.gamma) == (300, 256, (75, 150, 225), 0.1)
    assert (i.resize, i.crop, i.weight_decay) == (256, 224, 1e-4) and i.method_params["prob"] == 1.0
    w = build_config("cifar100-wrn28-10", Path("d"), Path("o"))
    assert w.arch_kwargs == {"dropout": 0.3}
    with pytest.raises(UserError, match="unknown preset 'cifar11-resnet18'; valid: .*cifar10-resnet18"):
        build_config("cifar11-resnet18", Path("d"), Path("o"))
    with pytest.raises(UserError, match="unknown setting 'lrr'"):
        build_config("cifar10-resnet18", Path("d"), Path("o"), overrides={"lrr": "1"})
    with pytest.raises(UserError, match="bad value for lr"):
        build_config("cifar10-resnet18", Path("d"), Path("o"), overrides={"lr": "fast"})


@pytest.mark.parametrize("preset", ["cifar10-resnet18", "cifar100-resnet18",
                                    "cifar100-wrn28-10", "cifar100-preactresnet18"])
def test_cifar_presets_normalise_as_the_official_codes(preset):
    # SaliencyMix_CIFAR/saliencymix.py, uoguelph-mlrg/Cutout train.py and CutMix-PyTorch
    # train.py normalise CIFAR-10 *and* CIFAR-100 with mean [125.3, 123.0, 113.9] / 255,
    # std [63.0, 62.1, 66.7] / 255
    c = build_config(preset, Path("d"), Path("o"))
    assert c.mean == pytest.approx((125.3 / 255, 123.0 / 255, 113.9 / 255))
    assert c.std == pytest.approx((63.0 / 255, 62.1 / 255, 66.7 / 255))


@pytest.mark.parametrize("preset", ["cifar100-preactresnet18", "tinyimagenet-resnet50",
                                    "imagenet-resnet50"])
@pytest.mark.parametrize("saliency,given,prob", [
    (None, {}, 0.5), ("sr", {}, 0.5), ("ap", {}, 0.8), ("ap", {"method.prob": "0.3"}, 0.3)])
def test_guidedmixup_mixes_with_the_papers_probability(preset, saliency, given, prob):
    # 3neutronstar/GuidedMixup README (CIFAR-100, Tiny-ImageNet) and FGVC/README.md: Guided-SR
    # runs with --mix_prob 0.5, Guided-AP with --mix_prob 0.8 (main.py's default is 1.0)
    extra = {"method.saliency": saliency} if saliency else {}
    c = build_config(preset, Path("d"), Path("o"), "guidedmixup", {**extra, **given})
    assert c.method_params["prob"] == prob


def _machine(monkeypatch, tmp_path, usable: int, cpus: int, local: int | None = None,
             files: dict[str, str] | None = None) -> None:
    """A machine for `smix.cpus`: this process's affinity, the machine's CPU count, torchrun's
    local world size and cgroup files (written under a stand-in /sys/fs/cgroup)."""
    root = tmp_path / f"cgroup{len(list(tmp_path.glob('cgroup*')))}"
    for name, text in (files or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    monkeypatch.setattr(cpus_mod, "CGROUP", root)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(usable)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))


@pytest.mark.parametrize("usable,cpus,local,files,expected", [
    (16, 16, None, {}, 15),                       # one process, the whole machine
    (16, 16, 4, {}, 3),                           # torchrun: 4 processes share 16 CPUs
    (1, 1, None, {}, 1),                          # at least one worker
    (256, 256, None, {}, 16),                     # at most 16
    (8, 64, 8, {}, 7),                            # each rank bound to its own 8 (srun --cpu-bind)
    (32, 64, 8, {}, 7),                           # bound to a NUMA node shared by 4 ranks
    (32, 256, 8, {"cpuset/cpuset.effective_cpus": "0-31\n"}, 3),  # container cpuset (v1)
    (32, 256, 8, {"cpuset.cpus.effective": "0-15,64-79\n"}, 3),  # container cpuset (v2)
    (256, 256, 8, {"cpu.max": "6400000 100000\n"}, 7),           # a 64-CPU quota (v2)
    (256, 256, 8, {"cpu.max": "max 100000\n"}, 16),              # no quota (v2)
    (16, 16, None, {"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
    (16, 16, None, {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 15),
])
def test_auto_workers_takes_this_process_share_of_the_cpus(monkeypatch, tmp_path, usable, cpus,
                                                           local, files, expected):
    _machine(monkeypatch, tmp_path, usable, cpus, local, files)
    assert cpus_mod.auto_workers() == expected


def test_imagenet_presets_take_every_core_for_loader_workers(monkeypatch, tmp_path):
    """`workers=auto` in the ImageNet presets, resolved when the run is configured and saved
    as a number (said in the notes); CIFAR keeps the preset's 4 unless asked."""
    _machine(monkeypatch, tmp_path, 16, 16)
    i = build_config("imagenet-resnet50", Path("d"), Path("o"))
    assert i.workers == 15 and "workers=auto: 15 on this machine" in i.notes
    assert build_config("tinyimagenet-resnet50", Path("d"), Path("o")).workers == 15
    given = build_config("imagenet-resnet50", Path("d"), Path("o"), overrides={"workers": "6"})
    assert given.workers == 6 and not any("workers" in n for n in given.notes)
    c = build_config("cifar10-resnet18", Path("d"), Path("o"))
    assert c.workers == 4 and not any("workers" in n for n in c.notes)
    asked = build_config("cifar10-resnet18", Path("d"), Path("o"), overrides={"workers": "auto"})
    assert asked.workers == 15 and "workers=auto: 15 on this machine" in asked.notes

def test_presets_normalise_with_the_published_constants():
    """The mean/std every checkpoint carries (and every stage normalises with), as published:
    torchvision's ImageNet statistics; the CIFAR statistics of the official SaliencyMix /
    Cutout code (`[x / 255.0 for x in [125.3, 123.0, 113.9]]`, std `[63.0, 62.1, 66.7]`, for
    CIFAR-100 too: `test_cifar_presets_normalise_as_the_official_codes`), all in [0,1] units,
    RGB."""
    published = {
        "imagenet-resnet50": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        "cifar10-resnet18": ((125.3 / 255, 123.0 / 255, 113.9 / 255),
                             (63.0 / 255, 62.1 / 255, 66.7 / 255)),
    }
    for preset, (mean, std) in published.items():
        c = build_config(preset, Path("d"), Path("o"), "none")
        assert tuple(c.mean) == pytest.approx(mean, abs=1e-12), preset
        assert tuple(c.std) == pytest.approx(std, abs=1e-12), preset


def test_unknown_method_lists_valid():
    with pytest.raises(UserError, match="unknown method 'mixmix'; valid: .*cutmix"):
        get_mixer("mixmix")
    with pytest.raises(UserError, match="cutmix: unknown parameter 'beta'"):
        get_mixer("cutmix", beta="1")


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("name,key", [("mixup", "alpha"), ("cutmix", "alpha"),
                                      ("saliencymix", "alpha"), ("guidedmixup", "sigma")])
def test_non_finite_mixer_parameters_are_refused(name, key, value):
    """NaN passes `alpha <= 0`: CutMix then ended in a ValueError traceback, SaliencyMix never
    mixed (Beta(nan, nan) is NaN: zero-sided boxes, λ = 1), Mixup's images became NaN and
    GuidedMixup's maps uniform (every λ 1/2)."""
    with pytest.raises(UserError, match=f"{name}: .*{key}"):
        get_mixer(name, **{key: value})


@pytest.mark.parametrize("name", ["none", "cutout", "mixup", "cutmix"])
def test_mixer_properties(name):
    torch.manual_seed(0)
    x = torch.randn(6, 3, 16, 16)
    y = torch.arange(6)
    x0 = x.clone()
    mixer = get_mixer(name)
    a = mixer(x, y, torch.Generator().manual_seed(3), CTX)
    b = mixer(x, y, torch.Generator().manual_seed(3), CTX)
    assert torch.equal(x, x0)  # input not mutated
    assert torch.equal(a.images, b.images) and torch.equal(a.lam, b.lam)  # seeded determinism
    assert a.images.shape == x.shape and a.lam.shape == (6,)
    if a.label_b is not None:
        perm = mixer.sample(x, y, torch.Generator().manual_seed(3), CTX).perm
        assert torch.equal(a.label_b, y[perm])


def test_lambda_is_drawn_from_a_symmetric_beta():
    """λ ~ Beta(α, α) (Mixup, CutMix, SaliencyMix's `--beta`): mean 1/2 and variance
    1 / (4(2α + 1)), i.e. 1/12 for α = 1 (uniform) and 0.1389 for α = 0.4; 40,000 seeded
    draws put both within a few standard errors."""
    from pretrain.mixers.base import beta
    for alpha in (1.0, 0.4):
        draws = beta(torch.Generator().manual_seed(5), alpha, size=40_000)
        assert draws.min() >= 0.0 and draws.max() <= 1.0
        assert float(draws.mean()) == pytest.approx(0.5, abs=0.01)
        assert float(draws.var()) == pytest.approx(1 / (4 * (2 * alpha + 1)), abs=0.004)


def test_mixup_pixels_hand_values():
    """x = λ·x_a + (1-λ)·x_b, pixel by pixel, and the labels λ pairs with."""
    from pretrain.mixers import MixParams
    x = torch.stack([torch.full((1, 2, 2), 2.0), torch.full((1, 2, 2), 10.0),
                     torch.tensor([[[0.0, 4.0], [8.0, -4.0]]])])
    y = torch.tensor([7, 8, 9])
    params = MixParams(perm=torch.tensor([1, 2, 0]), lam=torch.full((3,), 0.25))
    out = get_mixer("mixup").apply(x, y, params)
    assert out.images[0].flatten().tolist() == [8.0] * 4  # 0.25·2 + 0.75·10
    assert out.images[1].flatten().tolist() == [2.5, 5.5, 8.5, -0.5]  # 2.5 + 0.75·x_2
    assert out.images[2].flatten().tolist() == [1.5, 2.5, 3.5, 0.5]  # 0.25·x_2 + 1.5
    assert out.label_a.tolist() == [7, 8, 9] and out.label_b.tolist() == [8, 9, 7]
    assert out.lam.tolist() == [0.25] * 3


def test_cutmix_lambda_is_the_pasted_fraction():
    x = torch.zeros(8, 1, 20, 20)
    x += torch.arange(8).view(8, 1, 1, 1).float()  # each image a constant = its index
    y = torch.arange(8)
    mixer = get_mixer("cutmix")
    for seed in range(20):
        p = mixer.sample(x, y, torch.Generator().manual_seed(seed), CTX)
        out = mixer.apply(x, y, p)
        from_target = (out.images == x).float().mean(dim=(1, 2, 3))
        moved = p.perm != y  # a fixed point of the permutation mixes an image with itself
        assert torch.allclose(out.lam[moved], from_target[moved], atol=1e-6)


def test_cutmix_box_side_is_s_sqrt_one_minus_lambda():
    """CutMix's `rand_bbox`, written out: cut = int(S·sqrt(1 - λ)), box [c - cut//2, c + cut//2)
    clipped, so an unclipped box is 2·(cut // 2) on a side, from the λ drawn (before the
    correction to the clipped area)."""
    import math
    x, y = torch.zeros(8, 1, 40, 30), torch.arange(8)
    mixer = get_mixer("cutmix")
    unclipped = 0
    for seed in range(150):
        p = mixer.sample(x, y, torch.Generator().manual_seed(seed), CTX)
        lam = p.info["lam_sampled"]
        y0, x0, y1, x1 = p.boxes[0].tolist()
        if y0 > 0 and x0 > 0 and y1 < 40 and x1 < 30:
            unclipped += 1
            assert y1 - y0 == 2 * (int(40 * math.sqrt(1 - lam)) // 2), seed
            assert x1 - x0 == 2 * (int(30 * math.sqrt(1 - lam)) // 2), seed
        assert float(p.lam[0]) == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 1200, abs=1e-6)
    assert unclipped >= 10


def test_cutmix_lambda_one_is_identity():
    x, y = torch.randn(4, 3, 8, 8), torch.arange(4)
    mixer = get_mixer("cutmix")
    p = mixer.sample(x, y, torch.Generator().manual_seed(0), CTX)
    p.boxes = torch.zeros_like(p.boxes)  # empty box: λ = 1
    p.lam = torch.ones(4)
    assert torch.equal(mixer.apply(x, y, p).images, x)


def test_cutout_hole_is_zero_and_sized():
    x = torch.ones(5, 3, 32, 32)
    out = get_mixer("cutout", size="8")(x, torch.arange(5), torch.Generator().manual_seed(1), CTX)
    holes = (out.images[:, 0] == 0).sum(dim=(1, 2))
    assert (holes <= 64).all() and (holes > 0).all() and out.label_b is None


def test_cutout_hole_is_a_size_square_where_it_is_not_clipped():
    """DeVries & Taylor's `Cutout`: a centre (y, x) anywhere, hole rows clip(y - L//2, 0, H) to
    clip(y + L//2, 0, H) (the same for columns), so a hole away from the border is L x L and
    every hole is one rectangle."""
    x = torch.ones(64, 3, 32, 32)
    out = get_mixer("cutout", size="8")(x, torch.arange(64), torch.Generator().manual_seed(2), CTX)
    inner = 0
    for hole in out.images[:, 0] == 0:
        rows = torch.nonzero(hole.any(1)).flatten()
        cols = torch.nonzero(hole.any(0)).flatten()
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        assert int(hole.sum()) == (y1 - y0) * (x1 - x0)  # one filled rectangle
        assert y1 - y0 <= 8 and x1 - x0 <= 8
        if y0 > 0 and x0 > 0 and y1 < 32 and x1 < 32:
            inner += 1
            assert (y1 - y0, x1 - x0) == (8, 8)
    assert inner >= 20


def test_train_end_to_end_and_files(shapes_root, tmp_path):
    result = engine.train(cfg(shapes_root, tmp_path / "run", epochs=2, method="cutmix"))
    run = tmp_path / "run"
    assert {"backbone.safetensors", "best.safetensors", "resume.pt", "config.json",
            "log.jsonl", "metrics.json"} <= {p.name for p in run.iterdir()}
    log = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and log[0]["train_images"] == 24
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["stage"] == "pretrain" and metrics["results"]["best"] == result["best"]
    _, meta = read_checkpoint(run / "backbone.safetensors")
    assert meta.method["name"] == "cutmix" and meta.epochs == 2
    assert meta.class_names == ("circle", "square", "triangle")
    assert meta.metrics["last"]["epoch"] == 2
    torch.load(run / "resume.pt", weights_only=True)  # primitives and tensors only
    with pytest.raises(UserError, match="already holds a run"):
        engine.train(cfg(shapes_root, run, epochs=2, method="cutmix"))


def test_resume_is_bit_identical(shapes_root, tmp_path, monkeypatch):
    full = tmp_path / "full"
    engine.train(cfg(shapes_root, full, epochs=2, method="mixup"))
    killed = tmp_path / "killed"
    real_epoch = engine.train_epoch

    def die_in_second_epoch(rt, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(rt, epoch)

    monkeypatch.setattr(engine, "train_epoch", die_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        engine.train(cfg(shapes_root, killed, epochs=2, method="mixup"))
    monkeypatch.setattr(engine, "train_epoch", real_epoch)
    assert smix(["pretrain", "--resume", str(killed)]) == 0
    a = load_file(str(full / "backbone.safetensors"))
    b = load_file(str(killed / "backbone.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = (killed / "log.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in logs] == [1, 2]


def test_nan_loss_stops_and_keeps_last_good(shapes_root, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_loss = engine.mixed_loss
    calls = {"n": 0}

    def nan_after_first_epoch(logits, out):
        calls["n"] += 1
        loss = real_loss(logits, out)
        return loss * float("nan") if calls["n"] > 3 else loss  # 3 steps per epoch

    monkeypatch.setattr(engine, "mixed_loss", nan_after_first_epoch)
    args = ["pretrain", "--preset", "shapes-resnet18", "--data", str(shapes_root), "--out",
            str(run), "--epochs", "3", *[f"{k}={v}" for k, v in FAST.items()]]
    assert smix(args) == 2
    err = [l for l in capsys.readouterr().err.strip().splitlines() if "error" in l]
    assert len(err) == 1 and "loss became NaN/Inf in epoch 2" in err[0]
    state, meta = read_checkpoint(run / "backbone.safetensors")  # validates: all finite
    assert meta.epochs == 1


@pytest.mark.parametrize("argv,message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--preset", "shapes-resnet18", "--method", "foo"], "unknown method 'foo'"),
    (["--preset", "shapes-resnet18", "arch=resnet5"], "unknown architecture 'resnet5'"),
    # nn.Dropout's ValueError was a traceback
    (["--preset", "shapes-resnet18", "arch=preact_resnet18", "arch.dropout=1.5"],
     "bad arch_kwargs for preact_resnet18: dropout probability has to be between 0 and 1"),
    (["--preset", "shapes-resnet18", "arch=preact_resnet18", "arch.dropout=nan"],  # (was off)
     "bad arch_kwargs for preact_resnet18: dropout probability has to be between 0 and 1"),
    (["--preset", "shapes-resnet18", "arch=preact_resnet18", "arch.dropout=-0.1"],
     "bad arch_kwargs for preact_resnet18: dropout probability has to be between 0 and 1"),
    # values torch would reject deep inside, or silently misread
    (["--preset", "shapes-resnet18", "device=foo"], "bad setting: device='foo'; valid: auto"),
    (["--preset", "shapes-resnet18", "mean=0.5,0.5"], "bad setting: mean=0.5,0.5 and std="),
    (["--preset", "shapes-resnet18", "std=0.2,0,0.2"], "std above 0"),
    (["--preset", "shapes-resnet18", "lr=-1"], "bad setting: lr=-1 must be > 0"),
    (["--preset", "shapes-resnet18", "channels_last=maybe"],
     "bad setting: channels_last='maybe'; valid: auto, on, off"),
    (["--preset", "shapes-resnet18", "--epochs", "0"], "bad setting: epochs=0 must be at least 1"),
    (["--preset", "cifar10-resnet18", "input_size=64", "resize=64", "crop=64"],
     "input_size=64: CIFAR images are 32x32"),
    # the detectors' 3x3 check was a ValueError traceback on the first step
    (["--preset", "shapes-resnet18", "--method", "saliencymix", "input_size=2", "resize=2",
      "crop=2"], "input_size=2: saliencymix reads saliency in a 3x3 neighbourhood"),
    (["--preset", "shapes-resnet18", "--method", "guidedmixup", "input_size=1", "resize=1",
      "crop=1"], "input_size=1: guidedmixup reads saliency in a 3x3 neighbourhood"),
])
def test_pretrain_bad_options(shapes_root, tmp_path, capsys, argv, message):
    fast = {k: v for k, v in FAST.items() if not any(a.startswith(f"{k}=") for a in argv)}
    base = ["pretrain", "--data", str(shapes_root), "--out", str(tmp_path / "r"),
            *[f"{k}={v}" for k, v in fast.items()]]
    assert smix(base[:1] + argv + base[1:]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err


@pytest.mark.parametrize("key,value,message", [
    ("workers", "-1", "workers=-1 must not be negative"),
    ("batch_size", "1", "batch_size=1: a training step takes at least 2 images"),
    ("batch_size", "-8", "batch_size=-8 must be at least 1"),
    # non-finite numbers pass `> 0`-style checks: they trained, then diverged or failed the
    # checkpoint's metadata check after the first epoch
    ("lr", "inf", "lr=inf must be a finite number"),
    ("gamma", "inf", "gamma=inf must be a finite number"),
    ("weight_decay", "inf", "weight_decay=inf must be a finite number"),
    ("std", "inf,0.2,0.2", "std=inf,0.2,0.2 must be finite numbers"),
    ("mean", "nan,0.5,0.5", "mean=nan,0.5,0.5 must be finite numbers"),
])
def test_bad_numbers_in_fast_settings(shapes_root, tmp_path, capsys, key, value, message):
    settings = {**FAST, key: value}
    assert smix(["pretrain", "--preset", "shapes-resnet18", "--data", str(shapes_root), "--out",
                 str(tmp_path / "r"), *[f"{k}={v}" for k, v in settings.items()]]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err
    assert not (tmp_path / "r" / "backbone.safetensors").exists()


def test_small_images_are_refused_only_where_a_detector_reads_them(shapes_root, tmp_path):
    tiny = {**FAST, "input_size": "2", "resize": "2", "crop": "2"}
    for method, params in [("guidedmixup", {"method.saliency": "ap"}), ("cutmix", {}),
                           ("mixup", {})]:  # gradients and boxes have no neighbourhood
        build_config("shapes-resnet18", shapes_root, tmp_path / method, method,
                     {**tiny, **params})
    # the training images' side is what counts (the mixers never see the eval crop)
    build_config("shapes-resnet18", shapes_root, tmp_path / "s3", "saliencymix",
                 {**tiny, "input_size": "3"})
    with pytest.raises(UserError, match="needs images of at least 3x3"):
        build_config("shapes-resnet18", shapes_root, tmp_path / "s", "saliencymix", tiny)
    # greedy pairing maps the images when the mixer has no maps of its own (was the
    # detector's ValueError traceback at the first step)
    for method in ("cutmix", "mixup"):
        with pytest.raises(UserError, match="needs images of at least 3x3"):
            build_config("shapes-resnet18", shapes_root, tmp_path / f"g{method}", method,
                         {**tiny, "method.pairing": "greedy"})


def test_one_image_per_process_is_refused_not_trained_on_nothing(shapes_root, tmp_path):
    cfg = build_config("shapes-resnet18", shapes_root, tmp_path / "r", "cutmix",
                       {**FAST, "batch_size": "2"})
    two_ranks = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(UserError, match="batch_size=2 over 2 processes leaves 1 image"):
        engine.build_runtime(cfg, two_ranks)


def test_pretrain_bad_data(tmp_path, capsys):
    def run(data: Path) -> str:
        code = smix(["pretrain", "--preset", "shapes-resnet18", "--data", str(data), "--out",
                     str(tmp_path / "r"), *[f"{k}={v}" for k, v in FAST.items()]])
        assert code == 2
        return capsys.readouterr().err.strip()

    assert "does not exist" in run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "missing train/" in run(tmp_path / "empty")
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    (tmp_path / "d" / "val" / "a").mkdir(parents=True)
    assert "class folder has no images" in run(tmp_path / "d")


def test_bad_image_named_or_skipped(shapes_root, tmp_path, capsys):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(shapes_root / "train", data / "train")
    shutil.copytree(shapes_root / "val", data / "val")
    (data / "train" / "circle" / "zz_broken.jpg").write_bytes(b"\x00garbage")
    args = ["pretrain", "--preset", "shapes-resnet18", "--data", str(data), "--epochs", "1",
            *[f"{k}={v}" for k, v in FAST.items()]]
    assert smix(args + ["--out", str(tmp_path / "r1")]) == 2
    assert "zz_broken.jpg: cannot read image" in capsys.readouterr().err
    # 25 files in batches of 5: no batch is dropped, so every file is read once
    assert smix(args + ["--out", str(tmp_path / "r2"), "--skip-bad-images", "batch_size=5"]) == 0
    log = json.loads((tmp_path / "r2" / "log.jsonl").read_text().splitlines()[0])
    assert log["skipped_images"] == 1 and log["train_images"] == 24


def test_cifar_pickles_train(tmp_path):
    write_cifar10(tmp_path / "c", n_train=20, n_test=10)
    c = build_config("cifar10-resnet18", tmp_path / "c", tmp_path / "run", "cutout",
                     {"epochs": "1", "workers": "0", "batch_size": "10", "progress": "false"})
    engine.train(c)
    _, meta = read_checkpoint(tmp_path / "run" / "backbone.safetensors")
    assert meta.arch == "cifar_resnet18" and meta.num_classes == 10 and meta.crop == 32


@pytest.mark.dist
def test_torchrun_two_ranks_identical_and_written_once(shapes_root, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29533", "-m", "pretrain", "--preset", "shapes-resnet18",
           "--data", str(shapes_root), "--out", str(run), "--epochs", "1",
           *[f"{k}={v}" for k, v in FAST.items()], "device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["results"]["world_size"] == 2
    assert metrics["results"]["replicas_identical"] is True
    log = (run / "log.jsonl").read_text().splitlines()
    assert len(log) == 1  # written once, by rank 0
    assert json.loads(log[0])["val_images"] == 12  # exact shards, no padding
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
