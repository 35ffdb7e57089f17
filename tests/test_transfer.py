"""Detection transfer: presets, conversion, torchvision detectors, training/resume, CLI errors."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from smix.arch import build_model
from smix.checkpoint import BackboneMeta, read_checkpoint, save_checkpoint
from smix.cli import run as smix_run
from smix.errors import UserError
from smix.io import RunDir
from smix.shapes import ShapesConfig, generate_shapes
from transfer.config import TransferConfig, get_preset, resolve
from transfer.convert import check_detection_backbone, save_detectron2_weights, to_detectron2
from transfer.data import load_splits, parse_sets
from transfer.tv_backend import (build_from_checkpoint, load_state, lr_at, make_optimizer,
                                 predict, save_state, train)
from transfer.tv_data import BatchPlan, VOCDetection

# Tiny but real: 64px images, few proposals and RoIs so a CPU iteration takes well under a second.
FAST = ["min_size=64", "max_size=64", "batch=2", "workers=0", "roi_batch=32",
        "rpn_pre_nms_train=300", "rpn_post_nms_train=100", "rpn_pre_nms_test=300",
        "rpn_post_nms_test=50", "log_period=1", "checkpoint_period=2"]
SHAPE_CLASSES = ("circle", "square", "triangle")


def make_ckpt(path: Path, arch: str = "resnet18", classes=SHAPE_CLASSES, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    meta = BackboneMeta(arch=arch, num_classes=len(classes), class_names=tuple(classes),
                        input_size=64, resize=64, crop=64, mean=(0.5, 0.4, 0.3),
                        std=(0.2, 0.25, 0.3), dataset="shapes", method={"name": "saliencymix"})
    return save_checkpoint(path, build_model(arch, len(classes)), meta)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(ShapesConfig(out, classes=3, per_class=4, size=64, seed=1), progress=False)
    return out


@pytest.fixture(scope="module")
def ckpt18(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ckpt(tmp_path_factory.mktemp("ck") / "r18.safetensors")


def cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = smix_run("transfer", argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tcfg(ckpt: Path, root: Path, out: Path, arch: str = "fpn", iters: int = 4,
         extra: tuple[str, ...] = ()) -> TransferConfig:
    kv = tuple(tuple(x.split("=", 1)) for x in (*FAST, *extra))
    return TransferConfig(ckpt, root, out, backend="torchvision", arch=arch, classes="auto",
                          iters=iters, overrides=kv, progress=False)  # type: ignore[arg-type]


# --- presets and resolved settings ------------------------------------------------------------

def test_presets_are_the_published_recipes() -> None:
    d2 = get_preset("d2-voc")
    assert (d2.batch, d2.lr, d2.max_iter, d2.steps, d2.warmup_iters) == (16, 0.02, 18000,
                                                                         (12000, 16000), 100)
    assert d2.min_size_train == (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    assert d2.min_size_test == 800
    paper = get_preset("paper")
    assert (paper.batch, paper.lr, paper.max_iter, paper.steps) == (8, 4e-3, 41000, (33000,))
    with pytest.raises(UserError, match="valid: d2-voc, paper"):
        get_preset("coco")


def test_resolve_scales_lr_with_batch_and_steps_with_iters(tmp_path: Path) -> None:
    base = TransferConfig(tmp_path, tmp_path, tmp_path)
    s = resolve(base)
    assert (s.batch, s.lr, s.max_iter, s.steps) == (16, 0.02, 18000, (12000, 16000))
    s = resolve(TransferConfig(tmp_path, tmp_path, tmp_path, iters=900,
                               overrides=(("batch", "4"),)))
    assert s.lr == pytest.approx(0.005) and s.steps == (600, 800) and s.max_iter == 900
    s = resolve(TransferConfig(tmp_path, tmp_path, tmp_path, preset="paper",
                               overrides=(("batch", "16"), ("lr", "0.01"))))
    assert s.lr == 0.01  # an explicit lr wins over the scaling
    s = resolve(TransferConfig(tmp_path, tmp_path, tmp_path, overrides=(("min_size", "64,96"),)))
    assert s.min_size_train == (64, 96) and s.min_size_test == 96
    fpn = resolve(TransferConfig(tmp_path, tmp_path, tmp_path, arch="fpn"))
    assert fpn.rpn_pre_nms_train == 2000


def test_a_batch_override_rescales_the_schedule_as_detectron2_does(tmp_path: Path) -> None:
    """batch x k: lr x k, max_iter, steps, warmup and checkpoint period / k (auto_scale_workers);
    explicit values stay; micro_batch changes nothing of the recipe."""
    def settings(preset: str = "d2-voc", iters: int | None = None, **kv: str):
        return resolve(TransferConfig(tmp_path, tmp_path, tmp_path, preset=preset, iters=iters,
                                      overrides=tuple(kv.items())))
    s = settings(batch="8")
    assert (s.lr, s.max_iter, s.steps) == (pytest.approx(0.01), 36000, (24000, 32000))
    assert (s.warmup_iters, s.checkpoint_period) == (200, 10000)
    s = settings("paper", batch="16")  # 41000 / 2 = 20500, 33000 / 2 = 16500
    assert (s.lr, s.max_iter, s.steps) == (pytest.approx(8e-3), 20500, (16500,))
    assert (s.warmup_iters, s.checkpoint_period) == (50, 2500)
    s = settings("paper", batch="3")  # scale 3/8: int(round(41000 * 8 / 3)) = 109333
    assert (s.max_iter, s.steps, s.warmup_iters) == (109333, (88000,), 267)
    s = settings(batch="8", lr="0.05", steps="100,200", warmup="7", checkpoint_period="9")
    assert (s.lr, s.max_iter, s.steps, s.warmup_iters, s.checkpoint_period) == (
        0.05, 36000, (100, 200), 7, 9)
    s = settings(iters=900, batch="8")  # --iters is explicit: steps at its fractions
    assert (s.max_iter, s.steps, s.warmup_iters) == (900, (600, 800), 200)
    base = settings(batch="8")
    assert settings(batch="8", micro_batch="2") == dataclasses.replace(base, micro_batch=2)
    assert settings(micro_batch="1") == dataclasses.replace(settings(), micro_batch=1)


@pytest.mark.parametrize("kv, match", [
    (("colour", "red"), "unknown override 'colour'; valid: amp, anchor_sizes, batch"),
    (("batch", "two"), "not a valid value"),
    (("batch", "0"), "batch must be >= 1"),
    (("steps", "5,3"), "steps must be increasing"),
    # each of these ended in a traceback: SGD's ValueError, numpy's SeedSequence, torch.topk,
    # detectron2's MultiStepParamScheduler (milestones 0 or repeated)
    (("momentum", "-0.9"), "momentum must be >= 0, got -0.9"),
    (("weight_decay", "-1e-4"), "weight_decay must be >= 0"),
    (("seed", "-1"), "seed must be >= 0, got -1"),
    (("warmup", "-1"), "warmup_iters must be >= 0"),
    (("rpn_pre_nms_train", "-1"), "rpn_pre_nms_train must be > 0"),
    (("rpn_post_nms_test", "0"), "rpn_post_nms_test must be > 0"),
    (("steps", "3,3"), "steps must be increasing positive iterations, got \\(3, 3\\)"),
    (("steps", "0,4"), "steps must be increasing positive iterations"),
])
def test_bad_overrides_are_one_line_errors(tmp_path: Path, kv, match) -> None:
    with pytest.raises(UserError, match=match):
        resolve(TransferConfig(tmp_path, tmp_path, tmp_path, iters=8, overrides=(kv,)))


def test_fpn_needs_five_anchor_sizes_for_both_backends(tmp_path: Path) -> None:
    """detectron2 asserted (a traceback) on another count; the torchvision backend said it only
    after the run folder was written."""
    four = (("anchor_sizes", "32,64,128,256"),)
    with pytest.raises(UserError, match="--arch fpn needs five anchor sizes"):
        resolve(TransferConfig(tmp_path, tmp_path, tmp_path, arch="fpn", overrides=four))
    assert resolve(TransferConfig(tmp_path, tmp_path, tmp_path, arch="c4",
                                  overrides=four)).anchor_sizes == (32, 64, 128, 256)


def test_lr_schedule_warmup_and_steps(tmp_path: Path) -> None:
    s = resolve(TransferConfig(tmp_path, tmp_path, tmp_path))  # lr .02, warmup 100, 12k/16k
    assert lr_at(0, s) == pytest.approx(0.02 * 1e-3)
    assert lr_at(50, s) == pytest.approx(0.02 * (1e-3 * 0.5 + 0.5))
    assert lr_at(100, s) == lr_at(11999, s) == pytest.approx(0.02)
    assert lr_at(12000, s) == pytest.approx(0.002) and lr_at(16000, s) == pytest.approx(2e-4)
    # a warmup set longer than the schedule ramps over the schedule, as detectron2 caps it
    s = resolve(TransferConfig(tmp_path, tmp_path, tmp_path, iters=10, overrides=(
        ("warmup", "20"), ("steps", ""))))
    assert s.warmup_iters == 20 and lr_at(5, s) == pytest.approx(0.02 * (1e-3 * 0.5 + 0.5))


# --- conversion to detectron2 names -----------------------------------------------------------

D2_KEY = re.compile(r"^(stem\.conv1|res[2-5]\.\d+\.(conv[1-3]|shortcut))"
                    r"(\.norm)?\.(weight|bias|running_mean|running_var)$")


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_conversion_maps_every_backbone_tensor(arch: str) -> None:
    state = build_model(arch, 5).state_dict()
    conv = to_detectron2(state)
    assert conv.unconverted == ("fc.bias", "fc.weight")
    assert conv.dropped_counters == sum(k.endswith("num_batches_tracked") for k in state)
    assert len(conv.mapping) == len(state) - 2 - conv.dropped_counters
    assert len(set(conv.mapping.values())) == len(conv.mapping)  # no two keys collide
    for old, new in conv.mapping.items():
        assert D2_KEY.match(new), new
        np.testing.assert_array_equal(conv.model[new], state[old].numpy())
    m = conv.mapping
    assert m["conv1.weight"] == "stem.conv1.weight"
    assert m["bn1.running_var"] == "stem.conv1.norm.running_var"
    assert m["layer2.0.downsample.0.weight"] == "res3.0.shortcut.weight"
    assert m["layer2.0.downsample.1.bias"] == "res3.0.shortcut.norm.bias"
    assert m["layer4.1.bn2.weight"] == "res5.1.conv2.norm.weight"
    if arch in ("resnet50", "resnet101"):
        assert m["layer1.0.downsample.0.weight"] == "res2.0.shortcut.weight"  # bottleneck res2
        assert conv.model["res5.2.conv3.weight"].shape == (2048, 512, 1, 1)


def test_detectron2_pickle_format(tmp_path: Path) -> None:
    conv = to_detectron2(build_model("resnet18", 2).state_dict())
    save_detectron2_weights(tmp_path / "w.pkl", conv, author="test")
    with open(tmp_path / "w.pkl", "rb") as f:
        data = pickle.load(f)
    assert set(data) == {"model", "__author__", "matching_heuristics"}
    assert data["matching_heuristics"] is True and data["__author__"] == "test"
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in data["model"].values())


@pytest.mark.parametrize("arch, det, match", [
    ("preact_resnet18", "fpn", "not an ImageNet-stem ResNet"),
    ("cifar_resnet18", "fpn", "not an ImageNet-stem ResNet"),
    ("resnet18", "c4", "--arch c4 needs ResNet-50/101"),
    ("resnet34", "c4", "--arch c4 needs ResNet-50/101"),
])
def test_backbone_checks(arch: str, det: str, match: str) -> None:
    meta = BackboneMeta(arch=arch, num_classes=2, class_names=("a", "b"))
    with pytest.raises(UserError, match=re.escape(match)):
        check_detection_backbone(meta, det)
    check_detection_backbone(dataclasses_replace(meta, "resnet50"), det)


def dataclasses_replace(meta: BackboneMeta, arch: str) -> BackboneMeta:
    import dataclasses
    return dataclasses.replace(meta, arch=arch)


# --- torchvision detectors ---------------------------------------------------------------------

def test_fpn_detector_carries_the_checkpoint_and_the_contract(ckpt18: Path, tmp_path: Path) -> None:
    s = resolve(tcfg(ckpt18, tmp_path, tmp_path))
    model, meta = build_from_checkpoint(ckpt18, "fpn", SHAPE_CLASSES, s)
    state, _ = read_checkpoint(ckpt18)
    body = model.backbone.body
    torch.testing.assert_close(body.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    torch.testing.assert_close(body.bn1.running_var, state["bn1.running_var"])
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad
    assert model.transform.image_mean == [0.5, 0.4, 0.3]
    assert model.transform.image_std == [0.2, 0.25, 0.3]
    assert model.roi_heads.box_predictor.cls_score.out_features == len(SHAPE_CLASSES) + 1
    again, _ = build_from_checkpoint(ckpt18, "fpn", SHAPE_CLASSES, s)  # seeded new layers
    torch.testing.assert_close(again.rpn.head.conv[0][0].weight, model.rpn.head.conv[0][0].weight)


def test_c4_detector_uses_layer4_as_roi_head(tmp_path: Path) -> None:
    ckpt = make_ckpt(tmp_path / "r50.safetensors", "resnet50")
    s = resolve(tcfg(ckpt, tmp_path, tmp_path, arch="c4", extra=("rpn_post_nms_test=4",)))
    model, _ = build_from_checkpoint(ckpt, "c4", SHAPE_CLASSES, s)
    state, _ = read_checkpoint(ckpt)
    torch.testing.assert_close(model.roi_heads.box_head.res5[2].conv3.weight,
                               state["layer4.2.conv3.weight"])
    assert model.backbone.out_channels == 1024 and not hasattr(model.backbone, "layer4")
    assert model.roi_heads.box_roi_pool.output_size == (14, 14)
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])
    assert out[0]["boxes"].shape[1] == 4


def test_batch_plan_is_deterministic_and_covers_each_epoch() -> None:
    plan = BatchPlan(n=10, batch=4, seed=3, sizes=(64, 96))
    seen = [i for it in range(5) for i in plan.indices(it)]  # 20 draws = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert plan(3) == BatchPlan(10, 4, 3, (64, 96))(3)
    assert plan(3) != BatchPlan(10, 4, 4, (64, 96))(3)
    assert {plan.augment(i)[1] for i in range(20)} == {64, 96}


def test_dataset_boxes_and_flip(shapes: Path) -> None:
    splits = load_splits(shapes, "auto")
    ds = VOCDetection(splits.train, splits.class_names)
    image, target, image_id = ds[0]
    obj = splits.train[0].objects[0]
    assert image.shape == (3, 64, 64) and image_id == splits.train[0].image_id
    assert target["boxes"].tolist() == [list(obj.box0)]
    assert target["labels"].tolist() == [splits.class_names.index(obj.name) + 1]
    flipped, ftarget, _ = ds[(0, True)]
    x0, y0, x1, y1 = obj.box0
    assert ftarget["boxes"].tolist() == [[64 - x1, y0, 64 - x0, y1]]
    torch.testing.assert_close(flipped, image.flip(-1))


def test_predict_maps_torchvision_labels_to_class_indices() -> None:
    """torchvision's detector numbers the classes 1..K (0 is the background): its label 1 is
    the first class (index 0 for the evaluator), label K the last; boxes and scores pass as
    they are (original image coordinates, 0-based)."""
    class Stub(torch.nn.Module):
        transform = SimpleNamespace()

        def forward(self, images):
            return [{"boxes": torch.tensor([[1.0, 2.0, 5.0, 6.0], [0.0, 0.0, 3.0, 3.0]]),
                     "scores": torch.tensor([0.9, 0.4]),
                     "labels": torch.tensor([1, len(SHAPE_CLASSES)])} for _ in images]

    data = [(torch.zeros(3, 8, 8), {}, "a"), (torch.zeros(3, 8, 8), {}, "b")]
    s = SimpleNamespace(min_size_test=8, max_size_test=8, workers=0)
    dets = predict(Stub(), data, s, torch.device("cpu"), progress=False)
    assert dets.image_ids == ("a", "a", "b", "b")
    assert dets.labels.tolist() == [0, len(SHAPE_CLASSES) - 1] * 2
    assert dets.scores.tolist() == pytest.approx([0.9, 0.4] * 2)
    assert dets.boxes[0].tolist() == [1.0, 2.0, 5.0, 6.0] and not dets.one_based


# --- training, resume, the run folder ----------------------------------------------------------

def test_resume_continues_bit_for_bit(ckpt18: Path, shapes: Path, tmp_path: Path) -> None:
    """Train 3 iterations; or train 2, save, rebuild, resume: same step, lr and weights."""
    cfg = tcfg(ckpt18, shapes, tmp_path, iters=3, extra=("warmup=2",))
    s = resolve(cfg)
    splits = load_splits(shapes, "auto")
    data = VOCDetection(splits.train, splits.class_names)
    cpu = torch.device("cpu")

    def fresh():
        model, _ = build_from_checkpoint(ckpt18, "fpn", splits.class_names, s)
        return model, make_optimizer(model, s)

    full, opt = fresh()
    train(full, opt, data, s, RunDir(tmp_path / "a"), 0, cpu, "fp", progress=False)
    part, opt = fresh()
    train(part, opt, data, s, RunDir(tmp_path / "b"), 0, cpu, "fp", progress=False, stop=2)
    resumed, opt2 = fresh()
    start = load_state(tmp_path / "b" / "resume.pt", resumed, opt2, "fp")
    assert start == 2
    train(resumed, opt2, data, s, RunDir(tmp_path / "b"), start, cpu, "fp", progress=False)
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(2, s)) and lr_at(2, s) != lr_at(1, s)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    logged = [r["iter"] for r in RunDir(tmp_path / "b").read_log()]
    assert logged == [1, 2, 3]
    with pytest.raises(UserError, match="belongs to another run"):
        load_state(tmp_path / "b" / "resume.pt", resumed, opt2, "other")
    save_state(tmp_path / "c.pt", resumed, opt2, 7, "fp")
    assert torch.load(tmp_path / "c.pt", weights_only=True)["iteration"] == 7


def test_a_killed_run_resumes_with_one_log_line_per_iteration_and_no_temporaries(
        ckpt18: Path, shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """Killed in iteration 4 (state saved after 2, iterations 1-3 logged) and mid-write: the
    resumed run's log.jsonl lists iterations 1..4 once each, and the torn temporary is gone."""
    import transfer.tv_backend as tvb

    out = tmp_path / "run"
    argv = ["--backend", "torchvision", "--ckpt", str(ckpt18), "--voc-root", str(shapes),
            "--out", str(out), "--arch", "fpn", "--classes", "auto", "--iters", "4",
            "--no-progress", *FAST]
    step = tvb._step

    def killed(model, opt, st, images, targets, seed, it):
        if it == 3:
            raise KeyboardInterrupt
        return step(model, opt, st, images, targets, seed, it)

    with monkeypatch.context() as mp:
        mp.setattr(tvb, "_step", killed)
        assert cli(argv, capsys)[0] == 130
    assert torch.load(out / "resume.pt", weights_only=True)["iteration"] == 2
    assert [x["iter"] for x in RunDir(out).read_log() if "iter" in x] == [1, 2, 3]
    (out / ".resume.pt.x1y2z3.tmp").write_bytes(b"torn")
    code, _, err = cli([*argv, "--resume"], capsys)
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["results"]["start_iter"] == 2
    assert [x["iter"] for x in RunDir(out).read_log() if "iter" in x] == [1, 2, 3, 4]
    assert not list(out.glob(".*.tmp"))


def test_cli_torchvision_end_to_end(ckpt18: Path, shapes: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    argv = ["--ckpt", str(ckpt18), "--voc-root", str(shapes), "--out", str(out), "--arch", "fpn",
            "--classes", "auto", "--iters", "2", "--no-progress", *FAST]
    code, stdout, err = cli(["--backend", "torchvision", *argv], capsys)
    assert code == 0, err
    assert "backend torchvision (requested)" in err and "VOC2012/trainval not found" in err
    m = json.loads((out / "metrics.json").read_text())
    assert (m["format"], m["stage"], m["kind"]) == ("smix.metrics/1", "transfer", "detection")
    r = m["results"]
    assert (r["backend"], r["preset"], r["arch"], r["iters"]) == ("torchvision", "d2-voc", "fpn", 2)
    assert set(r["per_class"]) == set(SHAPE_CLASSES) and 0 <= r["AP50"] <= 100
    assert r["checkpoint"]["sha256"] and r["checkpoint"]["method"] == {"name": "saliencymix"}
    assert json.loads(stdout)["AP50"] == r["AP50"]
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["batch"] == 2 and config["settings"]["lr"] == pytest.approx(0.0025)
    assert config["settings"]["micro_batch"] is None and config["settings"]["amp"] == "off"
    assert r["amp"] == "off" and r["micro_batch"]["source"] == "auto"
    assert r["micro_batch"]["micro_batch"] == 2 and "micro_batch=2 (auto)" in err  # 64 px fit
    assert [x["iter"] for x in RunDir(out).read_log() if "iter" in x] == [1, 2]
    with safe_open(str(out / "model_final.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "smix.detector/1"
        assert json.loads(f.metadata()["class_names"]) == list(SHAPE_CLASSES)
    # an existing run is never overwritten by accident; --resume continues (here: nothing left)
    before = (out / "metrics.json").read_bytes()
    code, _, err = cli(["--backend", "torchvision", *argv], capsys)
    assert code == 2 and "already holds a transfer run" in err
    assert (out / "metrics.json").read_bytes() == before
    code, _, err = cli(["--backend", "torchvision", "--resume", *argv], capsys)
    assert code == 0, err
    again = json.loads((out / "metrics.json").read_text())["results"]
    assert again["start_iter"] == 2 and again["AP50"] == r["AP50"]
    other = make_ckpt(tmp_path / "other.safetensors", seed=1)
    code, _, err = cli(["--backend", "torchvision", "--resume", *argv[:1], str(other), *argv[2:]],
                       capsys)
    assert code == 2 and "was run with checkpoint_sha256" in err


def test_default_backend_is_said(ckpt18: Path, shapes: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    import importlib.util

    from transfer.api import choose_backend
    real = importlib.util.find_spec
    for installed, expected in ((True, "detectron2"), (False, "torchvision")):
        spec = lambda name, *a, **k: (object() if installed else None) if name == "detectron2" \
            else real(name, *a, **k)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(importlib.util, "find_spec", spec)
            assert choose_backend("auto") == expected
            assert choose_backend("torchvision") == "torchvision"  # asked for: kept
    with pytest.raises(UserError, match="valid: auto, detectron2, torchvision"):
        choose_backend("mmdet")


# --- bad input: one line, exit 2, nothing written -----------------------------------------------

def _corrupt_copy(shapes: Path, tmp_path: Path, how: str) -> Path:
    root = tmp_path / "voc"
    shutil.copytree(shapes, root)
    voc = root / "VOC2007"
    first = (voc / "ImageSets/Main/trainval.txt").read_text().split()[0]
    xml = voc / "Annotations" / f"{first}.xml"
    if how == "no_split":
        (voc / "ImageSets/Main/trainval.txt").unlink()
    elif how == "no_field":
        xml.write_text(re.sub(r"<xmin>\d+</xmin>", "", xml.read_text()))
    elif how == "outside":
        xml.write_text(re.sub(r"<xmax>\d+</xmax>", "<xmax>65</xmax>", xml.read_text()))
    elif how == "size":  # <size> wider than the picture: every box still inside it
        xml.write_text(xml.read_text().replace("<width>64</width>", "<width>80</width>"))
    elif how == "no_image":
        (voc / "JPEGImages" / f"{first}.jpg").unlink()
    elif how == "no_voc2007":
        shutil.rmtree(voc)
    elif how == "all_difficult":  # every test object difficult: AP would be NaN after training
        for name in (voc / "ImageSets/Main/test.txt").read_text().split():
            test_xml = voc / "Annotations" / f"{name}.xml"
            test_xml.write_text(test_xml.read_text().replace("<difficult>0</difficult>",
                                                             "<difficult>1</difficult>"))
    elif how == "xml_folder":  # unreadable annotation (IsADirectoryError / PermissionError)
        xml.unlink()
        xml.mkdir()
    return root


@pytest.mark.parametrize("how, match", [
    ("no_split", "trainval.txt: split file missing"),
    ("no_field", "missing <xmin>"),
    ("outside", "lies outside the 64x64 image"),
    ("no_image", "image missing"),
    ("size", "is 64x64 but its annotation"),
    ("no_voc2007", "no VOC2007/ folder"),
    ("xml_folder", ".xml: cannot read annotation"),
    ("all_difficult", "the test split test has no object that is not difficult"),
])
def test_bad_voc_data(how: str, match: str, shapes: Path, ckpt18: Path, tmp_path: Path,
                      capsys: pytest.CaptureFixture) -> None:
    root = _corrupt_copy(shapes, tmp_path, how)
    out = tmp_path / "run"
    code, _, err = cli(["--ckpt", str(ckpt18), "--voc-root", str(root), "--out", str(out),
                        "--backend", "torchvision", "--arch", "fpn", "--classes", "auto"], capsys)
    assert code == 2 and match in err
    assert err.startswith("smix transfer: error:") and err.count("\n") == 1
    assert not out.exists()


def _bad_args(tmp_path: Path, shapes: Path, ckpt18: Path) -> dict[str, tuple[list[str], str]]:
    pre = make_ckpt(tmp_path / "pre.safetensors", "preact_resnet18")
    names = tmp_path / "names.txt"
    names.write_text("circle\nsquare\n")
    base = ["--voc-root", str(shapes), "--out", str(tmp_path / "run"), "--backend", "torchvision"]
    with safe_open(str(ckpt18), framework="pt") as f:  # a NaN slipped past save_checkpoint
        tensors, header = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=header)
    return {
        "no_root": (["--ckpt", str(ckpt18), "--voc-root", str(tmp_path / "nope"),
                     "--out", str(tmp_path / "run"), "--backend", "torchvision", "--arch", "fpn"],
                    "no such directory"),
        "not_resnet": (["--ckpt", str(pre), *base, "--arch", "fpn"], "not an ImageNet-stem ResNet"),
        "c4_r18": (["--ckpt", str(ckpt18), *base], "--arch c4 needs ResNet-50/101"),
        "voc_classes": (["--ckpt", str(ckpt18), *base, "--arch", "fpn"],
                        "class 'circle' is not in the class list (20 classes)"),
        "file_classes": (["--ckpt", str(ckpt18), *base, "--arch", "fpn", "--classes", str(names)],
                         "class 'triangle' is not in the class list (2 classes)"),
        "no_class_file": (["--ckpt", str(ckpt18), *base, "--arch", "fpn", "--classes", "x.txt"],
                          "neither 'voc', 'auto' nor an existing file"),
        "no_ckpt": (["--ckpt", str(tmp_path / "none.safetensors"), *base, "--arch", "fpn"],
                    "no such checkpoint file"),
        "override": (["--ckpt", str(ckpt18), *base, "--arch", "fpn", "lr=fast"],
                     "override lr='fast': not a valid value"),
        "multi_gpu": (["--ckpt", str(ckpt18), *base, "--arch", "fpn", "--num-gpus", "2"],
                      "multi-GPU and multi-machine training go through --backend detectron2"),
        "bad_arch": (["--ckpt", str(ckpt18), *base, "--arch", "dc5"], "invalid choice: 'dc5'"),
        "amp_cpu": (["--ckpt", str(ckpt18), *base, "--arch", "fpn", "--device", "cpu",
                     "amp=bf16"], "amp=bf16 needs a CUDA device; on cpu this command trains in "
                                  "fp32: use amp=off"),
        "amp_value": (["--ckpt", str(ckpt18), *base, "--arch", "fpn", "amp=fp8"],
                      "override amp='fp8': not a valid value"),
        "micro_big": (["--ckpt", str(ckpt18), *base, "--arch", "fpn", "batch=4", "micro_batch=5"],
                      "micro_batch=5 exceeds the 4 images each process trains on per iteration"),
        "micro_zero": (["--ckpt", str(ckpt18), *base, "--arch", "fpn", "micro_batch=0"],
                       "override micro_batch='0': not a valid value"),
        "two_test_sets": (["--ckpt", str(ckpt18), *base, "--arch", "fpn", "--classes", "auto",
                           "--iters", "0", *FAST, "test_set=2007:test,2007:trainval"],
                          "test_set=2007:test,2007:trainval: one VOC set is evaluated"),
        "bad_device": (["--ckpt", str(ckpt18), *base, "--arch", "fpn", "--classes", "auto",
                        "--device", "gpu0"],
                       "device 'gpu0'; valid: auto, cpu, cuda"),
        "no_cuda": (["--ckpt", str(ckpt18), *base, "--arch", "fpn", "--classes", "auto",
                     "--device", "cuda"],
                    "device 'cuda': CUDA is not available on this machine"),
        "nan_ckpt": (["--ckpt", str(tmp_path / "nan.safetensors"), *base, "--arch", "fpn",
                      "--classes", "auto"], "layer1.0.conv1.weight"),
    }


@pytest.mark.parametrize("case", ["no_root", "not_resnet", "c4_r18", "voc_classes", "file_classes",
                                  "no_class_file", "no_ckpt", "override", "multi_gpu", "bad_arch",
                                  "amp_cpu", "amp_value", "micro_big", "micro_zero",
                                  "two_test_sets", "bad_device", "no_cuda", "nan_ckpt"])
def test_bad_arguments(case: str, shapes: Path, ckpt18: Path, tmp_path: Path,
                       capsys: pytest.CaptureFixture) -> None:
    if case == "no_cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")
    argv, match = _bad_args(tmp_path, shapes, ckpt18)[case]
    code, _, err = cli(argv, capsys)
    assert code == 2 and match in err, err
    assert err.startswith("smix transfer: error:") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_detectron2_backend_missing_is_a_clear_error(shapes: Path, ckpt18: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    from transfer.api import detectron2_available
    if detectron2_available():
        pytest.skip("detectron2 is installed here; its backend is tested in test_transfer_d2.py")
    code, _, err = cli(["--ckpt", str(ckpt18), "--voc-root", str(shapes), "--out",
                        str(tmp_path / "run"), "--backend", "detectron2", "--arch", "fpn",
                        "--classes", "auto"], capsys)
    assert code == 2 and "detectron2 is not installed" in err


def test_resume_refuses_another_recipe(ckpt18: Path, shapes: Path, tmp_path: Path, monkeypatch,
                                      capsys: pytest.CaptureFixture) -> None:
    """--resume continues the same recipe only: a changed setting is a one-line error naming it
    (config.json untouched); how the run is carried out (workers, micro_batch, ...) may change."""
    from transfer import api
    from transfer.voc_eval import Detections, evaluate_voc

    def backend(cfg, s, splits, run, sha):  # stands in for the training; evaluates nothing
        return evaluate_voc(splits.test, Detections.empty(), splits.class_names), {}
    monkeypatch.setitem(api._BACKENDS, "torchvision", backend)
    out = tmp_path / "run"
    argv = ["--backend", "torchvision", "--ckpt", str(ckpt18), "--voc-root", str(shapes), "--out",
            str(out), "--arch", "fpn", "--classes", "auto", "--iters", "4", "--no-progress", *FAST]
    assert cli(argv, capsys)[0] == 0
    config = (out / "config.json").read_bytes()
    for extra, message in [
            (["--preset", "paper", "--iters", "10", "lr=0.5"], "preset 'd2-voc', not 'paper'"),
            (["--iters", "10"], "max_iter 4, not 10"), (["lr=0.5"], "lr 0.0025, not 0.5"),
            (["steps=1"], "steps [3], not [1]"), (["seed=1"], "seed 0, not 1"),
            (["SOLVER.MOMENTUM=0.8"], "d2_options [], not [['SOLVER.MOMENTUM', '0.8']]")]:
        code, _, err = cli([*argv, *extra, "--resume"], capsys)
        assert code == 2 and err.strip().splitlines()[-1] == (
            f"smix transfer: error: --resume: {out} was run with {message}; use a new --out"), extra
        assert (out / "config.json").read_bytes() == config
    code, _, err = cli([*argv, "workers=1", "micro_batch=1", "log_period=3", "checkpoint_period=5",
                        "--resume"], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["settings"]["micro_batch"] == 1


def test_resume_refuses_other_training_data(ckpt18: Path, shapes: Path, tmp_path: Path,
                                            monkeypatch, capsys: pytest.CaptureFixture) -> None:
    """VOC2012 appearing beside VOC2007 (or found since the year-folder lookup) would switch a
    run from 07 to 07+12 halfway through its schedule: refused."""
    from transfer import api
    from transfer.voc_eval import Detections, evaluate_voc

    def backend(cfg, s, splits, run, sha):
        return evaluate_voc(splits.test, Detections.empty(), splits.class_names), {}
    monkeypatch.setitem(api._BACKENDS, "torchvision", backend)
    root = tmp_path / "voc"
    shutil.copytree(shapes, root)
    argv = ["--backend", "torchvision", "--ckpt", str(ckpt18), "--voc-root", str(root), "--out",
            str(tmp_path / "run"), "--arch", "fpn", "--classes", "auto", "--iters", "4",
            "--no-progress", *FAST]
    assert cli(argv, capsys)[0] == 0
    shutil.copytree(root / "VOC2007", root / "VOC2012")
    code, _, err = cli([*argv, "--resume"], capsys)
    assert code == 2 and err.strip().splitlines()[-1].endswith(
        "was run with train_sets ['VOC2007/trainval'], not ['VOC2007/trainval', "
        "'VOC2012/trainval']; use a new --out")


def test_resume_of_a_run_from_before_batch_scaling_says_how_to_keep_its_schedule(
        tmp_path: Path) -> None:
    from transfer.api import _schedule_hint
    p = get_preset("d2-voc")
    s = resolve(TransferConfig(tmp_path, tmp_path, tmp_path, overrides=(("batch", "8"),)))
    assert s.max_iter == 2 * p.max_iter  # batch 16 -> 8: twice the iterations now
    before = {"batch": 8, "max_iter": p.max_iter, "steps": list(p.steps),  # as it was resolved
              "warmup_iters": p.warmup_iters, "checkpoint_period": p.checkpoint_period}
    hint = _schedule_hint("max_iter", before, s)
    assert hint.endswith(f"add --iters {p.max_iter} steps={','.join(map(str, p.steps))} "
                         f"warmup={p.warmup_iters} checkpoint_period={p.checkpoint_period}")
    assert _schedule_hint("max_iter", {**before, "warmup_iters": 7}, s) == ""  # set by hand
    assert _schedule_hint("lr", before, s) == ""


def test_resume_state_names_the_setting_that_differs(tmp_path: Path) -> None:
    """The torchvision resume state records the recipe too (a second guard, without config.json)."""
    from transfer.tv_backend import _fingerprint
    cfg = tcfg(tmp_path, tmp_path, tmp_path)
    s = resolve(cfg)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fp = _fingerprint(cfg, "abc", SHAPE_CLASSES, s)
    save_state(tmp_path / "state.pt", model, opt, 3, fp)
    assert load_state(tmp_path / "state.pt", model, opt, fp) == 3
    assert load_state(tmp_path / "state.pt", model, opt,  # a run-only setting may change
                      _fingerprint(cfg, "abc", SHAPE_CLASSES, dataclasses.replace(s, workers=4)))
    with pytest.raises(UserError, match=r"another run \(it was run with lr 0.0025, not 0.5\)"):
        load_state(tmp_path / "state.pt", model, opt,
                   _fingerprint(cfg, "abc", SHAPE_CLASSES, dataclasses.replace(s, lr=0.5)))
    old = json.dumps({"backend": "torchvision", "arch": "fpn", "backbone_sha256": "abc",
                      "classes": list(SHAPE_CLASSES)})  # written before the recipe was recorded
    save_state(tmp_path / "old.pt", model, opt, 2, old)
    assert load_state(tmp_path / "old.pt", model, opt, fp) == 2
    with pytest.raises(UserError, match="it was run with backbone_sha256 'abc', not 'xyz'"):
        load_state(tmp_path / "old.pt", model, opt, _fingerprint(cfg, "xyz", SHAPE_CLASSES, s))


def test_one_line_split_file_and_custom_class_file(shapes: Path, tmp_path: Path) -> None:
    """detectron2's loader mis-reads a one-line split (np.loadtxt -> 0-d array); ours does not."""
    root = tmp_path / "voc"
    shutil.copytree(shapes, root)
    main = root / "VOC2007/ImageSets/Main"
    first = (main / "test.txt").read_text().split()[0]
    (main / "test.txt").write_text(first + "\n")
    (tmp_path / "names.txt").write_text("triangle\ncircle\nsquare\n")
    splits = load_splits(root, str(tmp_path / "names.txt"))
    assert [r.image_id for r in splits.test] == [first]
    assert splits.class_names == ("triangle", "circle", "square")  # file order is label order
    assert splits.train_sets == ("VOC2007/trainval",)
    assert splits.skipped_sets == ("VOC2012/trainval",)
    assert load_splits(root, "auto").class_names == SHAPE_CLASSES


def test_split_and_class_files_saved_with_a_byte_order_mark(shapes: Path, tmp_path: Path) -> None:
    """A split or class list edited on Windows (Notepad's UTF-8 starts with a BOM, and CRLF):
    its first id is the annotation's, not one that "is missing" while the file is there."""
    root = tmp_path / "voc"
    shutil.copytree(shapes, root)
    test = root / "VOC2007/ImageSets/Main/test.txt"
    ids = test.read_text().split()
    test.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(ids).encode() + b"\r\n")
    (tmp_path / "names.txt").write_bytes(b"\xef\xbb\xbftriangle\r\ncircle\r\nsquare\r\n")
    splits = load_splits(root, str(tmp_path / "names.txt"))
    assert [r.image_id for r in splits.test] == ids
    assert splits.class_names == ("triangle", "circle", "square")


def test_text_files_not_in_utf8_are_one_line(shapes: Path, tmp_path: Path) -> None:
    """A list saved as Windows-1252 (Excel's plain CSV, Notepad's "ANSI"): one line, not a
    UnicodeDecodeError traceback."""
    (tmp_path / "names.txt").write_bytes("caf\xe9\ncircle\n".encode("cp1252"))
    with pytest.raises(UserError, match=r"names.txt: class list is not UTF-8 text \(byte 3\)"):
        load_splits(shapes, str(tmp_path / "names.txt"))


def test_the_size_check_turns_images_upright_as_detectron2_does(tmp_path: Path) -> None:
    """A phone photo stored 64x48 with EXIF orientation 6 (turn 90 degrees) is 48x64 to
    detectron2's reader: that is the <size> its annotation must give."""
    from PIL import Image
    from smix.voc import VOCRecord
    from transfer.data import _check_size
    image = Image.new("RGB", (64, 48))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "rot.jpg", exif=exif)
    _check_size(VOCRecord("rot", tmp_path / "rot.jpg", 48, 64, ()))
    with pytest.raises(UserError, match="the image is 48x64 but its annotation rot.xml gives "
                                        "<size> 64x48"):
        _check_size(VOCRecord("rot", tmp_path / "rot.jpg", 64, 48, ()))
    # the torchvision backend reads it upright too: what the boxes were drawn on
    item = VOCDetection([VOCRecord("rot", tmp_path / "rot.jpg", 48, 64, ())], ["a"])[0]
    assert item[0].shape == (3, 64, 48)


def test_an_image_listed_twice_is_refused_before_training(shapes: Path, tmp_path: Path) -> None:
    root = tmp_path / "voc"
    shutil.copytree(shapes, root)
    test = root / "VOC2007/ImageSets/Main/test.txt"
    ids = test.read_text().split()
    test.write_text("\n".join([*ids, ids[1]]) + "\n")
    with pytest.raises(UserError, match=f"test.txt: lists image {ids[1]} more than once$"):
        load_splits(root, "auto")


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "transfer", "--ckpt", "x", "--voc-root", "y",
                        "--out", str(tmp_path / "o"), "--preset", "nope"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "invalid choice: 'nope'" in p.stderr


def test_voc07_plus_12_in_a_devkit_folder(shapes: Path, tmp_path: Path) -> None:
    devkit = tmp_path / "VOCdevkit"
    shutil.copytree(shapes / "VOC2007", devkit / "VOC2007")
    shutil.copytree(shapes / "VOC2007", devkit / "VOC2012")
    splits = load_splits(tmp_path, "auto")
    assert splits.train_sets == ("VOC2007/trainval", "VOC2012/trainval") and not splits.skipped_sets
    n07 = len((shapes / "VOC2007/ImageSets/Main/trainval.txt").read_text().split())
    assert len(splits.train) == 2 * n07 and splits.test_dir == devkit / "VOC2007"
    assert splits.test_year == "2007"
    on12 = load_splits(tmp_path, "auto", parse_sets("2007:trainval"), ("2012", "test"))
    assert on12.test_year == "2012" and on12.test_dir == devkit / "VOC2012"
    shutil.rmtree(devkit / "VOC2012")
    with pytest.raises(UserError, match="no VOC2012/ folder"):
        load_splits(tmp_path, "auto", parse_sets("2012:trainval"))


def test_a_year_folder_as_root_finds_the_other_year_beside_it(shapes: Path, tmp_path: Path) -> None:
    """--voc-root VOCdevkit/VOC2007 trains on VOC2012 too (its sibling), not silently without it."""
    devkit = tmp_path / "VOCdevkit"
    shutil.copytree(shapes / "VOC2007", devkit / "VOC2007")
    shutil.copytree(shapes / "VOC2007", devkit / "VOC2012")
    splits = load_splits(devkit / "VOC2007", "auto")
    assert splits.train_sets == ("VOC2007/trainval", "VOC2012/trainval") and not splits.skipped_sets
    assert splits.test_dir == devkit / "VOC2007"
    assert load_splits(devkit / "VOC2012", "auto").test_dir == devkit / "VOC2007"
    shutil.rmtree(devkit / "VOC2012")
    assert load_splits(devkit / "VOC2007", "auto").skipped_sets == ("VOC2012/trainval",)


@pytest.mark.parametrize("test_set,metric,label", [("2007:test", "voc07", "voc07-11point"),
                                                   ("2012:test", "area", "voc12-area")])
def test_the_test_year_picks_and_names_the_metric(shapes: Path, ckpt18: Path, tmp_path: Path,
                                                  monkeypatch, test_set, metric, label) -> None:
    """VOC2012 is scored with the area AP (the devkit from 2010 on), and said so."""
    from transfer import api
    from transfer.voc_eval import Detections, evaluate_voc
    shutil.copytree(shapes / "VOC2007", tmp_path / "voc" / "VOC2007")
    shutil.copytree(shapes / "VOC2007", tmp_path / "voc" / "VOC2012")
    asked = []

    def backend(cfg, s, splits, run, sha):  # stands in for the training; evaluates nothing
        asked.append(splits.test_year)
        from transfer.voc_eval import year_metric
        return evaluate_voc(splits.test, Detections.empty(), splits.class_names,
                            year_metric(splits.test_year)), {}
    monkeypatch.setitem(api._BACKENDS, "torchvision", backend)
    results = api.run_transfer(tcfg(ckpt18, tmp_path / "voc", tmp_path / "run",
                                    extra=(f"test_set={test_set}",)))
    assert asked == [test_set[:4]] and results["metric"] == label
