"""The detectron2 backend: runs where detectron2 is importable, skipped (reason shown) elsewhere,
failed where REQUIRE_DETECTRON2=1 says it must be there (CI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import need_detectron2

need_detectron2(module_level=True)

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.modeling import build_model as d2_build_model  # noqa: E402
from detectron2.solver import build_lr_scheduler  # noqa: E402

from smix.arch import build_model  # noqa: E402
from smix.checkpoint import BackboneMeta, read_checkpoint, save_checkpoint  # noqa: E402
from smix.cli import run as smix_run  # noqa: E402
from smix.errors import UserError  # noqa: E402
from smix.io import RunDir  # noqa: E402
from smix.shapes import ShapesConfig, generate_shapes  # noqa: E402
from transfer.config import TransferConfig, resolve  # noqa: E402
from transfer.convert import save_detectron2_weights, to_detectron2  # noqa: E402
from transfer.d2_config import build_d2_config  # noqa: E402
from transfer.tv_backend import lr_at  # noqa: E402

FAST = ["min_size=64", "max_size=64", "batch=2", "workers=0", "roi_batch=32",
        "rpn_pre_nms_train=300", "rpn_post_nms_train=100", "rpn_pre_nms_test=300",
        "rpn_post_nms_test=50", "log_period=1", "checkpoint_period=2"]
CLASSES = ("circle", "square", "triangle")
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def make_ckpt(path: Path, arch: str) -> tuple[Path, BackboneMeta]:
    torch.manual_seed(0)
    meta = BackboneMeta(arch=arch, num_classes=3, class_names=CLASSES, input_size=64, resize=64,
                        crop=64, mean=MEAN, std=STD, method={"name": "saliencymix"})
    return save_checkpoint(path, build_model(arch, 3), meta), meta


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(ShapesConfig(out, classes=3, per_class=4, size=64, seed=1), progress=False)
    return out


def d2cfg(meta: BackboneMeta, arch: str, tmp_path: Path, extra: tuple = ()):
    s = resolve(TransferConfig(tmp_path, tmp_path, tmp_path, arch=arch, iters=10,
                               overrides=tuple(tuple(x.split("=", 1)) for x in extra)))
    return build_d2_config(meta, arch, CLASSES, s, weights=tmp_path / "w.pkl",
                           output_dir=tmp_path / "d2", train=["tr"], test=["te"], device="cpu"), s


@pytest.mark.parametrize("arch, det", [("resnet50", "c4"), ("resnet101", "fpn"),
                                       ("resnet18", "fpn")])
def test_config_has_the_contract(arch: str, det: str, tmp_path: Path) -> None:
    meta = BackboneMeta(arch=arch, num_classes=3, class_names=CLASSES, mean=MEAN, std=STD)
    cfg, s = d2cfg(meta, det, tmp_path)
    assert cfg.MODEL.PIXEL_MEAN == pytest.approx([127.5, 102.0, 76.5])
    assert cfg.MODEL.PIXEL_STD == pytest.approx([51.0, 63.75, 76.5])
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    assert cfg.MODEL.RESNETS.NORM == "FrozenBN" and cfg.MODEL.BACKBONE.FREEZE_AT == 2
    assert cfg.MODEL.RESNETS.DEPTH == int(arch[6:]) and cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3
    assert cfg.MODEL.ROI_HEADS.NAME == ("Res5ROIHeads" if det == "c4" else "StandardROIHeads")
    assert cfg.MODEL.BACKBONE.NAME == ("build_resnet_backbone" if det == "c4"
                                       else "build_resnet_fpn_backbone")
    assert cfg.MODEL.RESNETS.RES2_OUT_CHANNELS == (64 if arch == "resnet18" else 256)
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER) == (16, 0.02, 10)
    assert cfg.INPUT.MIN_SIZE_TRAIN == tuple(range(480, 801, 32)) and cfg.INPUT.MIN_SIZE_TEST == 800
    assert cfg.SOLVER.REFERENCE_WORLD_SIZE == 0 and cfg.MODEL.MASK_ON is False


def test_raw_detectron2_overrides(tmp_path: Path) -> None:
    meta = BackboneMeta(arch="resnet50", num_classes=3, class_names=CLASSES)
    cfg, _ = d2cfg(meta, "c4", tmp_path, ("MODEL.RPN.NMS_THRESH=0.6",))
    assert cfg.MODEL.RPN.NMS_THRESH == 0.6
    with pytest.raises(UserError, match="detectron2 override rejected"):
        d2cfg(meta, "c4", tmp_path, ("MODEL.NO_SUCH_KEY=1",))


def _d2_key(new: str, det: str) -> str:
    if det == "c4":
        return ("roi_heads." if new.startswith("res5.") else "backbone.") + new
    return "backbone.bottom_up." + new


@pytest.mark.parametrize("arch, det", [("resnet50", "c4"), ("resnet18", "fpn"),
                                       ("resnet34", "fpn")])
def test_converted_weights_land_in_every_detectron2_backbone_tensor(arch: str, det: str,
                                                                    tmp_path: Path) -> None:
    ckpt, meta = make_ckpt(tmp_path / "c.safetensors", arch)
    state, _ = read_checkpoint(ckpt)
    conv = to_detectron2(state)
    save_detectron2_weights(tmp_path / "w.pkl", conv, author="test")
    cfg, _ = d2cfg(meta, det, tmp_path)
    model = d2_build_model(cfg)
    DetectionCheckpointer(model).load(str(tmp_path / "w.pkl"))
    d2_state = model.state_dict()
    resnet_keys = {k for k in d2_state if k.startswith(("backbone.bottom_up.", "roi_heads.res5."))
                   or (det == "c4" and k.startswith("backbone."))}
    assert resnet_keys == {_d2_key(new, det) for new in conv.mapping.values()}
    for old, new in conv.mapping.items():
        torch.testing.assert_close(d2_state[_d2_key(new, det)], state[old], msg=old)


def test_lr_schedule_equals_detectron2s(tmp_path: Path) -> None:
    # (a warmup set longer than the schedule: detectron2 ramps over the schedule, the
    # torchvision backend ramped over the warmup and never reached the rate)
    for preset, iters, extra in (("d2-voc", 6, ()), ("d2-voc", 400, (("warmup", "50"),)),
                                 ("paper", 300, ()), ("d2-voc", 10, (("warmup", "20"),))):
        s = resolve(TransferConfig(tmp_path, tmp_path, tmp_path, preset=preset, iters=iters,
                                   overrides=extra))
        meta = BackboneMeta(arch="resnet50", num_classes=3, class_names=CLASSES)
        cfg, _ = d2cfg(meta, "c4", tmp_path)
        cfg.defrost()
        cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = s.lr, s.max_iter, s.steps
        cfg.SOLVER.WARMUP_ITERS = s.warmup_iters
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=s.lr)
        sched = build_lr_scheduler(cfg, opt)
        for it in range(s.max_iter):
            assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(it, s), rel=1e-12), it
            opt.step()
            sched.step()


@pytest.mark.parametrize("preset, batch", [("d2-voc", 8), ("d2-voc", 32), ("paper", 16),
                                           ("paper", 3)])
def test_batch_scaling_equals_detectron2s_auto_scale_workers(preset: str, batch: int,
                                                             tmp_path: Path) -> None:
    """The preset on one image per worker, rescaled by detectron2 to `batch` workers."""
    from detectron2.engine import DefaultTrainer
    from transfer.config import get_preset
    p = get_preset(preset)
    meta = make_ckpt(tmp_path / "r18.safetensors", "resnet18")[1]
    cfg, _ = d2cfg(meta, "fpn", tmp_path)
    cfg.defrost()
    cfg.SOLVER.merge_from_list(["IMS_PER_BATCH", p.batch, "BASE_LR", p.lr, "MAX_ITER",
                                p.max_iter, "STEPS", p.steps, "WARMUP_ITERS", p.warmup_iters,
                                "CHECKPOINT_PERIOD", p.checkpoint_period,
                                "REFERENCE_WORLD_SIZE", p.batch])
    ref = DefaultTrainer.auto_scale_workers(cfg, batch).SOLVER
    s = resolve(TransferConfig(tmp_path, tmp_path, tmp_path, preset=preset,
                               overrides=(("batch", str(batch)),)))
    assert s.batch == ref.IMS_PER_BATCH and s.lr == pytest.approx(ref.BASE_LR, rel=1e-12)
    assert (s.max_iter, s.steps, s.warmup_iters, s.checkpoint_period) == (
        ref.MAX_ITER, tuple(ref.STEPS), ref.WARMUP_ITERS, ref.CHECKPOINT_PERIOD)


def _argv(ckpt: Path, shapes: Path, out: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(ckpt), "--voc-root", str(shapes), "--out", str(out), "--arch", "fpn",
            "--classes", "auto", "--no-progress", *FAST, *extra]


def test_end_to_end_and_resume(shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt, _ = make_ckpt(tmp_path / "r18.safetensors", "resnet18")
    out = tmp_path / "run"
    argv = _argv(ckpt, shapes, out, "--iters", "4")
    assert smix_run("transfer", argv) == 0
    stdout, err = capsys.readouterr()
    assert json.loads(stdout)["backend"] == "detectron2"  # stdout is the result's JSON line
    assert "backend detectron2 (detectron2 is importable)" in err and "fc.bias, fc.weight" in err
    r = json.loads((out / "metrics.json").read_text())["results"]
    assert (r["backend"], r["arch"], r["iters"], r["start_iter"]) == ("detectron2", "fpn", 4, 0)
    assert r["conversion"]["unconverted"] == ["fc.bias", "fc.weight"]
    assert r["evaluator"] == "detectron2.PascalVOCDetectionEvaluator"
    assert r["toolkit_evaluator"]["AP50"] == pytest.approx(r["AP50"], abs=1e-9)
    assert set(r["per_class"]) == set(CLASSES)
    d2 = out / "detectron2"
    for name in ("model_final.pth", "model_0000001.pth", "config.yaml", "backbone_d2.pkl"):
        assert (d2 / name).is_file(), name
    # Simulate a run killed after 2 iterations, then resume it.
    (d2 / "model_final.pth").unlink()
    (d2 / "model_0000003.pth").unlink()
    (d2 / "last_checkpoint").write_text("model_0000001.pth")
    (out / "metrics.json").unlink()
    (d2 / ".model_0000003.pth.x1y2z3.tmp").write_bytes(b"torn")  # killed mid-write
    assert smix_run("transfer", argv + ["--resume"]) == 0
    r = json.loads((out / "metrics.json").read_text())["results"]
    assert r["start_iter"] == 2
    s = resolve(TransferConfig(ckpt, shapes, out, arch="fpn", iters=4,
                               overrides=tuple(tuple(x.split("=", 1)) for x in FAST)))
    # the killed run's lines after its checkpoint are dropped: each iteration is logged once
    logged = [x for x in RunDir(out).read_log() if "total_loss" in x]
    assert [x["iter"] for x in logged] == [1, 2, 3, 4]
    assert [x["lr"] for x in logged[2:]] == pytest.approx([lr_at(2, s), lr_at(3, s)])
    assert (d2 / "model_final.pth").is_file() and not list(d2.glob(".*.tmp"))


def test_split_file_with_blank_lines_and_a_second_column(shapes: Path, tmp_path: Path) -> None:
    """The toolkit's reader skips blank lines and keeps the first column; detectron2's evaluator
    reads the same ids (not the split file, which its voc_eval would read as image "")."""
    import shutil
    root = tmp_path / "voc"
    shutil.copytree(shapes, root)
    split = root / "VOC2007/ImageSets/Main/test.txt"
    ids = split.read_text().split()
    split.write_text(f"{ids[0]}  1\n\n" + "\n".join(ids[1:]) + "\n\n\n")
    ckpt, _ = make_ckpt(tmp_path / "r18.safetensors", "resnet18")
    out = tmp_path / "run"
    assert smix_run("transfer", _argv(ckpt, root, out, "--iters", "0")) == 0
    r = json.loads((out / "metrics.json").read_text())["results"]
    assert r["evaluator"] == "detectron2.PascalVOCDetectionEvaluator"
    assert r["test_images"] == len(ids)
    assert r["toolkit_evaluator"]["AP50"] == pytest.approx(r["AP50"], abs=1e-9)
    assert (out / "detectron2" / "test_ids.txt").read_text().split("\n") == [*ids, ""]


@pytest.mark.slow
def test_two_processes_through_detectron2s_launcher(shapes: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    """--num-gpus 2 on CPU: detectron2's launcher spawns 2 gloo workers, DDP without device ids."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ckpt, _ = make_ckpt(tmp_path / "r18.safetensors", "resnet18")
    out = tmp_path / "run"
    assert smix_run("transfer", _argv(ckpt, shapes, out, "--iters", "2", "--num-gpus", "2")) == 0
    r = json.loads((out / "metrics.json").read_text())["results"]
    assert r["world_size"] == 2 and r["backend"] == "detectron2"
    assert r["toolkit_evaluator"]["AP50"] == pytest.approx(r["AP50"], abs=1e-9)
    assert r["detections"] >= 0 and (out / "detectron2" / "model_final.pth").is_file()


@pytest.mark.slow
def test_c4_resnet50_trains_and_evaluates(shapes: Path, tmp_path: Path) -> None:
    ckpt, _ = make_ckpt(tmp_path / "r50.safetensors", "resnet50")
    out = tmp_path / "run"
    argv = ["--ckpt", str(ckpt), "--voc-root", str(shapes), "--out", str(out), "--arch", "c4",
            "--classes", "auto", "--no-progress", "--iters", "1", *FAST, "rpn_post_nms_test=8"]
    assert smix_run("transfer", argv) == 0
    r = json.loads((out / "metrics.json").read_text())["results"]
    assert r["arch"] == "c4" and r["conversion"]["converted"] == 265


def test_annotations_detectron2s_evaluator_cannot_read_are_detected(shapes: Path,
                                                                     tmp_path: Path) -> None:
    from transfer.d2_backend import d2_evaluator_problem, to_d2_dicts
    from transfer.data import load_splits
    splits = load_splits(shapes, "auto")
    ids = [r.image_id for r in splits.test]
    assert d2_evaluator_problem(splits.test_dir, ids) is None
    voc = tmp_path / "VOC2007"
    voc.mkdir()
    (voc / "Annotations").mkdir()
    text = (splits.test_dir / "Annotations" / f"{ids[0]}.xml").read_text()
    (voc / "Annotations" / f"{ids[0]}.xml").write_text(text.replace("<pose>Unspecified</pose>", ""))
    assert "has no <pose>" in d2_evaluator_problem(voc, ids[:1])
    d = to_d2_dicts(splits.test[:1], splits.class_names)[0]
    obj = splits.test[0].objects[0]
    x0, y0, x1, y1 = obj.bbox
    assert d["annotations"][0]["bbox"] == [x0 - 1, y0 - 1, x1, y1]
    assert d["image_id"] == ids[0] and d["height"] == d["width"] == 64


def _final_weights(ckpt: Path, shapes: Path, out: Path, iters: int, *extra: str) -> dict:
    argv = _argv(ckpt, shapes, out, "--backend", "detectron2", "--iters", str(iters), "batch=4",
                 "warmup=0", "lr=0.02", *extra)
    assert smix_run("transfer", argv) == 0
    return torch.load(out / "detectron2" / "model_final.pth", weights_only=True)["model"]


def test_micro_batches_equal_the_big_batch(shapes: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    """AccumTrainer: batch=4 in one pass vs four passes of one image, two iterations, FrozenBN
    ResNet-18 FPN, same seed -> the same weights. Valid because the RPN/RoI sampling is seeded
    per image (without it the passes would draw other anchors; the torchvision test shows that
    control failing). --iters 0 gives the initial weights, to compare the updates too."""
    from tests.test_transfer_micro import relative_distance, updates
    ckpt, _ = make_ckpt(tmp_path / "r18.safetensors", "resnet18")
    w0 = _final_weights(ckpt, shapes, tmp_path / "w0", 0)
    big = _final_weights(ckpt, shapes, tmp_path / "big", 2, "micro_batch=4")
    small = _final_weights(ckpt, shapes, tmp_path / "small", 2, "micro_batch=1")
    assert "micro_batch=1 (set): 4 images per iteration in 4 passes (1, 1, 1, 1)" in \
        capsys.readouterr().err
    step = updates(big, w0)
    assert relative_distance(step, {k: 0 * v for k, v in step.items()}) > 1e-3  # it trained
    assert relative_distance(big, small) < 1e-5
    assert relative_distance(step, updates(small, w0)) < 1e-4
    r = json.loads((tmp_path / "small" / "metrics.json").read_text())["results"]
    assert r["micro_batch"]["micro_batch"] == 1 and r["micro_batch"]["batch"] == 4
    assert r["amp"] == "off" and r["backend"] == "detectron2"


def test_cuda_out_of_memory_ends_in_one_line(shapes: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    from transfer.d2_backend import AccumTrainer

    def oom(self, data):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(AccumTrainer, "_accumulate", oom)
    ckpt, _ = make_ckpt(tmp_path / "r18.safetensors", "resnet18")
    code = smix_run("transfer", _argv(ckpt, shapes, tmp_path / "run", "--iters", "2"))
    err = capsys.readouterr().err
    # (not "Traceback" in general: detectron2's cached log handler may still point at an earlier
    # test's closed capture stream, which makes `logging` print its own errors here)
    assert code == 2 and "Exception during training" not in err and "OutOfMemoryError" not in err
    assert err.strip().splitlines()[-1].startswith(
        "smix transfer: error: CUDA out of memory in iteration 1 with micro_batch=2; rerun with "
        "--resume and micro_batch=1")


def test_detectron2_logger_prints_each_line_once_across_runs(tmp_path, capsys):
    """Runs in one process (the demo) must not stack detectron2's handlers."""
    import logging

    from transfer.d2_backend import fresh_d2_logger
    for run in ("a", "b", "c"):
        (tmp_path / run).mkdir()
        fresh_d2_logger(tmp_path / run / "log.txt")
    logging.getLogger("detectron2").info("hello once")
    out = capsys.readouterr()
    assert out.err.count("hello once") == 1 and "hello once" not in out.out  # stdout: results
    assert "hello once" in (tmp_path / "c" / "log.txt").read_text()
    assert "hello once" not in (tmp_path / "a" / "log.txt").read_text()


def test_upstream_deprecations_are_not_printed() -> None:
    """fvcore's `torch.jit.script` at import (torch >= 2.14) and detectron2's `torch.meshgrid`
    without `indexing` are upstream's to fix: `smix transfer` does not print them. A fresh
    process, since each warning is printed once per process."""
    import subprocess
    import sys

    code = ("import torch, transfer.d2_backend\n"
            "from detectron2.modeling.anchor_generator import DefaultAnchorGenerator\n"
            "gen = DefaultAnchorGenerator(sizes=[[32]], aspect_ratios=[[1.0]], strides=[16])\n"
            "gen([torch.zeros(1, 4, 3, 3)])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], check=True)
    assert "Warning" not in done.stderr, done.stderr
