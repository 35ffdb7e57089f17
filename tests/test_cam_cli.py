"""`smix cam export|mixed|localize` end to end on generated shapes data and tiny checkpoints."""

from __future__ import annotations

import runpy
import shutil
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

from smix.arch import build_model
from smix.checkpoint import BackboneMeta, load_backbone, save_checkpoint
from smix.cli import run
from smix.data import eval_transform, load_rgb
from smix.io import read_json
from smix.shapes import ShapesConfig, generate_shapes
from cam.methods import build_cam
from cam.render import GridLayout, read_png

CLASSES = ("circle", "square", "triangle")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("camcli")
    generate_shapes(ShapesConfig(root / "shapes", classes=3, per_class=6, size=64), progress=False)
    out = {"root": root, "shapes": root / "shapes", "val": root / "shapes" / "val"}
    for k, method in enumerate(("cutmix", "saliencymix")):
        torch.manual_seed(k)
        path = root / f"{method}.safetensors"
        save_checkpoint(path, build_model("resnet18", 3), BackboneMeta(
            arch="resnet18", num_classes=3, class_names=CLASSES, input_size=64, resize=72,
            crop=64, method={"name": method}))
        out[method] = path
    return out


def _smix(args: list[str], capsys) -> tuple[int, str]:
    rc = run("cam", args)
    return rc, capsys.readouterr().err


def _export(data, out: Path, *extra: str) -> list[str]:
    return ["export", "--ckpt", str(data["cutmix"]), "--ckpt", str(data["saliencymix"]),
            "--images", str(data["val"]), "--out", str(out), "--no-progress", *extra]


def test_export_writes_overlays_maps_grid_and_metrics(data, tmp_path, capsys) -> None:
    rc, err = _smix(_export(data, tmp_path / "e", "--target", "true", "--grid-max", "5"), capsys)
    assert rc == 0, err
    res = read_json(tmp_path / "e" / "metrics.json")
    assert (res["stage"], res["kind"]) == ("cam", "export")
    r = res["results"]
    assert r["n_images"] == r["n_written"] == 12 and r["n_skipped"] == 0
    assert [m["label"] for m in r["models"]] == ["cutmix\nresnet18", "saliencymix\nresnet18"]
    assert [m["checkpoint"]["method"]["name"] for m in r["models"]] == ["cutmix", "saliencymix"]
    first = r["models"][0]["images"][0]
    assert first["target_class"] == Path(first["image"]).parent.name  # --target true
    cam = np.load(tmp_path / "e" / first["map"])
    assert cam.shape == (64, 64) and cam.dtype == np.float32 and 0 <= cam.min() <= cam.max() <= 1
    # the PNG is exactly 0.5·image + 0.5·jet(map) in RGB order (a BGR swap would fail)
    meta = BackboneMeta(arch="resnet18", num_classes=3, class_names=CLASSES, resize=72, crop=64)
    pixels = eval_transform(meta, normalize=False)(load_rgb(first["image"])).permute(1, 2, 0)
    want = np.round((0.5 * pixels.numpy() + 0.5 * matplotlib.colormaps["jet"](cam)[..., :3]) * 255)
    got = read_png(tmp_path / "e" / first["overlay"]).astype(float)
    assert np.abs(got - want).max() <= 1
    # the map and the probability are the CAM of that image, computed here without the
    # export's loader: the checkpoint's own eval transform (normalising) and the method
    model, ck_meta = load_backbone(data["cutmix"])
    x = eval_transform(ck_meta)(load_rgb(first["image"]))[None]
    target = torch.tensor([CLASSES.index(first["target_class"])])
    direct = build_cam(r["models"][0]["cam_method"], model.eval(), "resnet18")(x, target)
    np.testing.assert_allclose(cam, direct.maps[0].numpy(), atol=1e-5)
    prob = float(direct.logits.softmax(1)[0, target])
    assert first["target_prob"] == pytest.approx(prob, abs=1e-5)
    grid = read_png(tmp_path / "e" / "grid.png")
    width, height = GridLayout(2, 5).size_px
    assert grid.shape == (height, width, 3)
    assert len(list((tmp_path / "e" / "01_saliencymix").glob("*.png"))) == 12


def test_a_rerun_replaces_the_earlier_exports_files(data, tmp_path, capsys) -> None:
    out = tmp_path / "e"
    assert _smix(_export(data, out), capsys)[0] == 0
    before = {p.relative_to(out) for p in out.rglob("*.npy")}
    (out / "01_saliencymix" / "mine.txt").write_text("the user's")  # not the export's
    one = sorted(data["val"].glob("circle/*.jpg"))[:2]
    rc, err = _smix(["export", "--ckpt", str(data["cutmix"]), "--images", *map(str, one),
                     "--out", str(out), "--no-progress"], capsys)
    assert rc == 0, err
    r = read_json(out / "metrics.json")["results"]
    now = {p.relative_to(out) for p in out.rglob("*.npy")}
    assert len(before) == 24 and now == {Path(i["map"]) for i in r["models"][0]["images"]}
    assert len(now) == 2 and len(list(out.rglob("*.png"))) == 2 + 1  # + grid.png
    assert (out / "01_saliencymix" / "mine.txt").read_text() == "the user's"


def test_export_batched_equals_one_at_a_time(data, tmp_path, capsys) -> None:
    for bs in ("3", "1"):
        rc, err = _smix(["export", "--ckpt", str(data["cutmix"]), "--images",
                         str(data["val"] / "circle"), str(data["val"] / "square"), "--out",
                         str(tmp_path / bs), "--batch-size", bs, "--method", "gradcam",
                         "--no-progress"], capsys)
        assert rc == 0, err
    maps = sorted((tmp_path / "3").rglob("*.npy"))
    assert len(maps) == 8
    for a in maps:
        b = tmp_path / "1" / a.relative_to(tmp_path / "3")
        np.testing.assert_allclose(np.load(a), np.load(b), atol=1e-4)


def test_unreadable_image_is_fatal_or_skipped_by_flag(data, tmp_path, capsys) -> None:
    folder = tmp_path / "imgs" / "circle"
    shutil.copytree(data["val"] / "circle", folder)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    rc, err = _smix(_export(data, tmp_path / "a") [:5] + ["--images", str(tmp_path / "imgs"),
                    "--out", str(tmp_path / "a"), "--no-progress"], capsys)
    assert rc == 2 and "broken.jpg: cannot read image" in err and err.count("\n") == 1
    assert not (tmp_path / "a" / "metrics.json").exists()
    # named once, by this process: not by each of 2 workers, each of 2 checkpoints' loaders
    rc, err = _smix(_export(data, tmp_path / "b")[:5] + [
        "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "b"), "--skip-bad-images",
        "--workers", "2", "--no-progress"], capsys)
    assert rc == 0 and err.count("\n") == 1, err  # one line
    assert err.startswith(f"warning: skipping unreadable image: {folder / 'broken.jpg'}: cannot")
    r = read_json(tmp_path / "b" / "metrics.json")["results"]
    assert r["n_skipped"] == 1 and r["skipped"][0].endswith("broken.jpg")
    assert r["n_written"] == 4 and r["n_images"] == 5


@pytest.mark.parametrize("args, message", [
    (["--target", "hexagon"], "class 'hexagon' (--target, for"),
    (["--method", "smoothgrad"], "unknown CAM method 'smoothgrad'; valid: cam, gradcam"),
    (["--layer", "layer7"], "unknown layer 'layer7' for resnet18"),
    (["--method", "cam", "--layer", "layer2"], "method 'cam' needs the layer that feeds"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--device", "foo"], "device 'foo'; valid: auto, cpu, cuda, cuda:N"),
    pytest.param(["--device", "cuda"], "device 'cuda': CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
])
def test_export_user_errors_are_one_line(data, tmp_path, capsys, args, message) -> None:
    rc, err = _smix(_export(data, tmp_path / "x", *args), capsys)
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_target_true_needs_class_folders(data, tmp_path, capsys) -> None:
    img = tmp_path / "loose" / "pic.jpg"
    img.parent.mkdir()
    shutil.copy(next((data["val"] / "circle").iterdir()), img)
    rc, err = _smix(["export", "--ckpt", str(data["cutmix"]), "--images", str(img), "--out",
                     str(tmp_path / "o"), "--target", "true"], capsys)
    assert rc == 2 and "class 'loose' (folder of" in err


def test_target_true_reads_tiny_imagenets_train_layout(data, tmp_path, capsys) -> None:
    """train/<class>/images/<image>, as Tiny-ImageNet ships it: the class is the folder above."""
    for name in ("square", "triangle"):
        (tmp_path / "tiny" / name / "images").mkdir(parents=True)
        shutil.copy(next((data["val"] / name).iterdir()), tmp_path / "tiny" / name / "images")
    rc, err = _smix(["export", "--ckpt", str(data["cutmix"]), "--images", str(tmp_path / "tiny"),
                     "--out", str(tmp_path / "o"), "--target", "true", "--no-progress"], capsys)
    assert rc == 0, err
    images = read_json(tmp_path / "o" / "metrics.json")["results"]["models"][0]["images"]
    assert [m["target_class"] for m in images] == ["square", "triangle"]


def test_only_a_class_folder_above_images_names_the_class() -> None:
    from cam.images import folder_class
    meta = BackboneMeta(arch="resnet18", num_classes=3, class_names=CLASSES)
    assert folder_class(Path("tiny/train/square/images/a.JPEG"), meta) == "square"
    assert folder_class(Path("runs/2/images/a.png"), meta) == "images"  # not class index 2
    assert folder_class(Path("val/circle/a.png"), meta) == "circle"


def test_localize_cli_on_the_shapes_voc_copy(data, tmp_path, capsys) -> None:
    rc, err = _smix(["localize", "--ckpt", str(data["cutmix"]), "--ckpt", str(data["saliencymix"]),
                     "--voc-root", str(data["shapes"]), "--out", str(tmp_path / "loc"),
                     "--no-progress", "--curve-interval", "0.05"], capsys)
    assert rc == 0, err
    res = read_json(tmp_path / "loc" / "metrics.json")
    r = res["results"]
    assert (res["stage"], res["kind"]) == ("cam", "localization")
    assert r["n_images"] == 12 and r["iou_threshold"] == 0.5 and r["cam_threshold"] == 0.2
    for m in r["models"]:
        for key in ("gt_known_loc", "top1_loc", "top1_cls", "maxboxacc", "pointing_game"):
            assert 0 <= m[key] <= 100
        assert m["top1_loc"] <= min(m["gt_known_loc"], m["top1_cls"])
        assert m["maxboxacc"] >= m["gt_known_loc"]  # 0.2 is on the 0.05 sweep
        # V2 tries every region (the largest among them) at IoU 0.3, 0.5, 0.7
        v2 = m["maxboxacc_v2_per_iou"]
        assert v2["30"] >= v2["50"] >= v2["70"] and v2["50"] >= m["maxboxacc"]
        assert m["maxboxacc_v2"] == pytest.approx((v2["30"] + v2["50"] + v2["70"]) / 3)
        assert all(max(m["boxacc_v2_curves"][d]) == v2[d] for d in v2)
        assert len(m["boxacc_curve"]["acc"]) == 20
        assert m["checkpoint"]["path"].endswith(".safetensors")
    assert len((tmp_path / "loc" / "log.jsonl").read_text().splitlines()) == 2
    # top-1 classification, computed here: each checkpoint on its own eval transform of the
    # VOC test images (one object each, its class the image's)
    from smix.voc import find_year_dir, load_voc
    records = load_voc(find_year_dir(data["shapes"], "2007"), "test")
    labels = torch.tensor([CLASSES.index(rec.objects[0].name) for rec in records])
    for m, key in zip(r["models"], ("cutmix", "saliencymix")):
        model, meta = load_backbone(data[key])
        x = torch.stack([eval_transform(meta)(load_rgb(rec.image_path)) for rec in records])
        with torch.no_grad():
            pred = model.eval()(x).argmax(1)
        assert m["top1_cls"] == pytest.approx(100 * float((pred == labels).float().mean()))


@pytest.mark.parametrize("box", ["100,100,130,130", "64,10,65,20", "2,2,30,70"])
def test_localize_refuses_a_box_outside_its_image(data, tmp_path, capsys, box) -> None:
    """A boxes file made for other images: past the far edge (was caught), or starting at
    the edge, a box one pixel wide past the image (was not: its mask was empty)."""
    image = sorted((data["val"] / "circle").iterdir())[0]
    w, h = load_rgb(image).size
    assert (w, h) == (64, 64)
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(f"image,class,x0,y0,x1,y1\n{image},circle,{box}\n")
    rc, err = _smix(["localize", "--ckpt", str(data["cutmix"]), "--boxes", str(boxes),
                     "--out", str(tmp_path / "r"), "--no-progress"], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert f"{image}: box [" in err and "lies outside the 64x64 image" in err


def test_localize_voc_root_without_annotations(data, tmp_path, capsys) -> None:
    (tmp_path / "VOC2007" / "JPEGImages").mkdir(parents=True)
    rc, err = _smix(["localize", "--ckpt", str(data["cutmix"]), "--voc-root", str(tmp_path),
                     "--out", str(tmp_path / "r")], capsys)
    assert rc == 2 and "missing Annotations/" in err and err.count("\n") == 1


def test_mixed_draws_each_mixer_and_both_cams(data, tmp_path, capsys) -> None:
    a = sorted((data["val"] / "circle").iterdir())[0]
    b = sorted((data["val"] / "square").iterdir())[0]
    rc, err = _smix(["mixed", "--ckpt", str(data["cutmix"]), "--ckpt", str(data["saliencymix"]),
                     "--pair", str(a), str(b), "--methods", "cutout,mixup,cutmix",
                     "--mixer-arg", "cutout.size=24", "--out", str(tmp_path / "m")], capsys)
    assert rc == 0, err
    r = read_json(tmp_path / "m" / "metrics.json")["results"]
    assert r["mixers"] == ["cutout", "mixup", "cutmix"]
    assert r["mixer_params"]["cutout"]["size"] == 24
    model = r["models"][0]
    assert (model["class_a"], model["class_b"]) == ("circle", "square")
    cols = {c["column"]: c for c in model["columns"]}
    assert list(cols) == ["A", "B", "cutout", "mixup", "cutmix"]
    out = tmp_path / "m"
    img_a, img_b = read_png(out / cols["A"]["input"]), read_png(out / cols["B"]["input"])
    cut = read_png(out / cols["cutmix"]["input"]).astype(int)
    from_b = (np.abs(cut - img_b).max(2) <= 1) & (np.abs(cut - img_a).max(2) > 1)
    from_a = np.abs(cut - img_a).max(2) <= 1
    assert (from_a | from_b).all()  # every pixel comes from A or from B: B pasted into A
    assert 1 - cols["cutmix"]["lam"] == pytest.approx(from_b.mean(), abs=0.03)
    assert cols["cutout"]["lam"] == 1.0 and 0 < cols["mixup"]["lam"] < 1
    ma, mb = np.load(out / cols["mixup"]["map_a"]), np.load(out / cols["mixup"]["map_b"])
    assert ma.shape == mb.shape == (64, 64) and not np.allclose(ma, mb)
    grid = read_png(out / "grid.png")
    # shared inputs (same preprocessing, model-free mixers): 1 input row + 2 rows per checkpoint
    assert grid.shape[:2] == GridLayout(5, 5).size_px[::-1]


def test_mixed_images_outside_class_folders_take_the_prediction(data, tmp_path, capsys) -> None:
    """`--pair a.png b.png` from a figures folder: the folder names no class, so by default each
    image gets the model's prediction, said on stderr; `true` refuses with a usable hint."""
    figs = tmp_path / "figs"
    figs.mkdir()
    for name, cls in (("a.png", "circle"), ("b.png", "square")):
        shutil.copy(sorted((data["val"] / cls).iterdir())[0], figs / name)
    base = ["mixed", "--ckpt", str(data["cutmix"]), "--pair", str(figs / "a.png"),
            str(figs / "b.png"), "--methods", "cutmix"]
    rc, err = _smix(base + ["--out", str(tmp_path / "auto")], capsys)
    assert rc == 0, err
    notes = [line for line in err.splitlines() if "is not a class of" in line]
    assert len(notes) == 2 and "its folder 'figs'" in notes[0] and "using the predicted" in notes[0]
    model, meta = load_backbone(data["cutmix"])
    x = torch.stack([eval_transform(meta)(load_rgb(figs / n)) for n in ("a.png", "b.png")])
    with torch.no_grad():
        pred = [meta.class_names[i] for i in model.eval()(x).argmax(1).tolist()]
    got = read_json(tmp_path / "auto" / "metrics.json")["results"]["models"][0]
    assert [got["class_a"], got["class_b"]] == pred
    rc, err = _smix(base + ["--classes", "true", "true", "--out", str(tmp_path / "t")], capsys)
    assert rc == 2 and "class 'figs' (folder of" in err and "pred pred" in err
    (tmp_path / "2").mkdir()  # a folder named by a class index is that class, as with `true`
    shutil.copy(figs / "a.png", tmp_path / "2" / "a.png")
    base[4] = str(tmp_path / "2" / "a.png")
    rc, err = _smix(base + ["--out", str(tmp_path / "num")], capsys)
    got = read_json(tmp_path / "num" / "metrics.json")["results"]["models"][0]
    assert rc == 0 and got["class_a"] == meta.class_names[2] and err.count("is not a class") == 1


def test_flags_are_not_abbreviated(data, tmp_path, capsys) -> None:
    """`--method` is `cam export`'s flag; in `cam mixed` it must not pass for `--methods`."""
    a = sorted((data["val"] / "circle").iterdir())[0]
    rc, err = _smix(["mixed", "--ckpt", str(data["cutmix"]), "--pair", str(a), str(a),
                     "--method", "gradcam", "--out", str(tmp_path / "m")], capsys)
    assert rc == 2 and "unrecognized arguments: --method gradcam" in err


def test_mixed_refuses_a_saliency_mixer_on_images_below_3x3(data, tmp_path, capsys) -> None:
    """A checkpoint of 2x2 images (CutMix trains on them): SaliencyMix, Guided-SR and greedy
    pairing detect saliency in 3x3 neighbourhoods (was the detector's ValueError traceback,
    after the run folder was claimed); CutMix still draws."""
    tiny = tmp_path / "tiny.safetensors"
    save_checkpoint(tiny, build_model("resnet18", 3), BackboneMeta(
        arch="resnet18", num_classes=3, class_names=CLASSES, input_size=2, resize=2, crop=2,
        method={"name": "cutmix"}))
    a, b = sorted((data["val"] / "circle").iterdir())[:2]
    base = ["mixed", "--ckpt", str(tiny), "--pair", str(a), str(b)]
    for methods, extra in (("cutmix,saliencymix", []), ("guidedmixup", []),
                           ("cutmix", ["--mixer-arg", "cutmix.pairing=greedy"])):
        rc, err = _smix(base + ["--methods", methods, *extra, "--out", str(tmp_path / "r")],
                        capsys)
        assert rc == 2 and err.count("\n") == 1, err
        assert "its images are 2x2" in err and "needs at least 3x3" in err
        assert not (tmp_path / "r").exists()
    rc, err = _smix(base + ["--methods", "cutmix", "--out", str(tmp_path / "ok")], capsys)
    assert rc == 0, err


def test_mixed_unknown_mixer_lists_the_registered_ones(data, tmp_path, capsys) -> None:
    a = sorted((data["val"] / "circle").iterdir())[0]
    rc, err = _smix(["mixed", "--ckpt", str(data["cutmix"]), "--pair", str(a), str(a),
                     "--methods", "cutmix,fmix", "--out", str(tmp_path / "m")], capsys)
    assert rc == 2 and "unknown method 'fmix'; valid:" in err and "cutmix" in err


def test_python_dash_m_cam_exit_code_and_single_line(data, tmp_path, monkeypatch, capsys) -> None:
    """`python -m cam` runs the same dispatcher (run in-process: a subprocess costs seconds of
    imports on busy cores)."""
    missing = tmp_path / "missing.safetensors"
    monkeypatch.setattr(sys, "argv", ["cam", "export", "--ckpt", str(missing), "--images",
                                      str(data["val"]), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("cam", run_name="__main__")
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"smix cam: error: {missing}: no such checkpoint file"]


def test_no_readable_image_at_all_is_an_error(data, tmp_path, capsys) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    rc, err = _smix(["export", "--ckpt", str(data["cutmix"]), "--images", str(tmp_path / "bad.png"),
                     "--out", str(tmp_path / "o"), "--skip-bad-images", "--no-progress"], capsys)
    assert rc == 2 and "no readable image among the 1 given" in err
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_a_batch_out_of_device_memory_is_one_line(data, tmp_path, capsys, monkeypatch) -> None:
    """As robustness: a --batch-size the GPU cannot hold (Grad-CAM keeps a backward graph) ends
    in one line naming it, not a torch.OutOfMemoryError traceback (simulated here)."""
    from cam.methods import CamMethod

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(CamMethod, "__call__", oom)
    for args in (_export(data, tmp_path / "e", "--batch-size", "4"),
                 ["localize", "--ckpt", str(data["cutmix"]), "--voc-root", str(data["shapes"]),
                  "--out", str(tmp_path / "l"), "--no-progress", "--batch-size", "4"]):
        rc, err = _smix(args, capsys)
        assert rc == 2 and "Traceback" not in err and err.count("\n") == 1, err
        assert ("error: out of device memory at --batch-size 4; rerun with a smaller "
                "--batch-size") in err
