"""`smix audit`: the detector and mixer metrics against hand-computed values, the mixers'
pixel weights against their own `apply`, and the command end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.mixers import MixContext, MixParams, get_mixer, list_mixers
from smix.audit import (AuditConfig, detector_scores, object_mask, pair_scores, pixel_weights,
                        run_audit)
from smix.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from smix.cli import main as smix
from smix.report import build_report
from smix.voc import VOCObject, write_annotation

CTX = MixContext(mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=4)


def test_object_mask_follows_voc_inclusive_boxes():
    # VOC xmin=2..xmax=3, ymin=1..ymax=1 (1-based inclusive) -> 0-based x in {1, 2}, y = 0.
    box0 = VOCObject("a", (2.0, 1.0, 3.0, 1.0)).box0
    mask = object_mask([box0], (3, 5), (3, 5))
    expected = torch.zeros(3, 5, dtype=torch.bool)
    expected[0, 1:3] = True
    assert torch.equal(mask, expected)
    # at half the resolution, pixel centres map to 1, 3 (x) and 1 (y): only x pixel 0 (centre 1)
    half = object_mask([(1.0, 0.0, 3.0, 2.0)], (4, 6), (2, 3))
    assert half.tolist() == [[True, False, False], [False, False, False]]
    # a box smaller than a pixel keeps the pixel holding its centre
    tiny = object_mask([(4.1, 4.1, 4.4, 4.4)], (8, 8), (2, 2))
    assert tiny.tolist() == [[False, False], [False, True]]


def test_detector_scores_hand_computed():
    maps = torch.tensor([
        [[0., 5., 0., 0.], [0., 0., 5., 0.], [0., 0., 0., 0.]],  # tie: first max (0,1) is outside
        [[1., 1., 1., 1.], [1., 1., 1., 1.], [1., 1., 1., 3.]],  # max (2,3) inside
        [[0., 0., 0., 0.], [0., 0., 0., 0.], [0., 0., 0., 0.]],  # no mass: counts as uniform
    ])
    box = torch.zeros(3, 4, dtype=torch.bool)
    box[1:, 2:] = True  # 4 of 12 pixels
    hit, cover, energy = detector_scores(maps, box.expand(3, 3, 4))
    assert hit.tolist() == [False, True, False]  # all-zero map: its first pixel, outside
    assert torch.allclose(cover, torch.full((3,), 4 / 12, dtype=torch.float64))
    assert energy.tolist() == pytest.approx([5 / 10, 6 / 14, 4 / 12])


def test_detector_scores_zero_map_argmax_is_first_pixel():
    box = torch.zeros(1, 2, 2, dtype=torch.bool)
    box[0, 0, 0] = True
    hit, _, _ = detector_scores(torch.zeros(1, 2, 2), box)
    assert hit.tolist() == [True]  # row-major first maximum of a flat map is pixel (0, 0)


def test_cutmix_known_box_hand_computed():
    # S = 4; target object = left half (8 px); source object = top-left 2x2 (4 px);
    # the pasted box covers rows 0-1, cols 0-1 -> M = 0 there.
    params = MixParams(active=True, perm=torch.tensor([1, 0]), lam=torch.tensor([0.75, 0.75]),
                       boxes=torch.tensor([[0, 0, 2, 2], [0, 0, 2, 2]]))
    m, wb, perm = pixel_weights(params, 2, 4)
    obj = torch.zeros(2, 4, 4, dtype=torch.bool)
    obj[0, :, :2] = True
    obj[1, :2, :2] = True
    s = pair_scores(m, wb, torch.tensor([0.75, 0.75]), obj, obj[perm])
    assert s["target_object_visible"].tolist() == [0.5, 0.0]  # 4/8; image 1's object erased
    assert s["source_object_visible"].tolist() == [1.0, 0.5]  # all 4 px; 4 of image 0's 8
    # gap = |0.25 - 1/1.5| and |0.25 - 0.5/0.5|
    assert s["label_evidence_gap"].tolist() == pytest.approx([5 / 12, 0.75])
    assert s["empty_source_rate"].tolist() == [0.0, 0.0]
    assert s["erased_target_rate"].tolist() == [0.0, 1.0]


def _batch(n: int = 8, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def test_mixup_gap_is_exactly_zero_and_target_visibility_is_lambda():
    images = _batch()
    mixer = get_mixer("mixup")
    g = torch.Generator().manual_seed(3)
    obj = torch.rand(8, 16, 16, generator=g) > 0.6
    for _ in range(5):
        params = mixer.sample(images, torch.arange(8), g, CTX)
        out = mixer.apply(images, torch.arange(8), params)
        m, wb, perm = pixel_weights(params, 8, 16)
        s = pair_scores(m, wb, out.lam, obj, obj[perm])
        lam = out.lam.double()
        assert torch.equal(s["target_object_visible"], lam)
        assert torch.equal(s["source_object_visible"], 1 - lam)
        assert torch.equal(s["label_evidence_gap"], torch.zeros(8, dtype=torch.float64))


@pytest.mark.parametrize("name", list_mixers())
def test_pixel_weights_match_what_apply_mixes(name):
    """Independent check of M and W_b: apply the mixer's own params to indicator images (one
    channel per image of the batch); channel j of mixed image i is the weight of image j."""
    bsz, size = 6, 16
    images = _batch(bsz, size, seed=1)
    extra = {"mode": "sample", "scheme": "salient_to_salient"} if name == "saliencymix" else {}
    for kw in ({}, extra) if extra else ({},):
        mixer = get_mixer(name, **kw)
        params = mixer.sample(images, torch.arange(bsz), torch.Generator().manual_seed(0), CTX)
        indicator = torch.eye(bsz).view(bsz, bsz, 1, 1).expand(bsz, bsz, size, size).contiguous()
        mixed = mixer.apply(indicator, torch.arange(bsz), params).images.double()
        m, wb, perm = pixel_weights(params, bsz, size)
        for i in range(bsz):
            if int(perm[i]) == i:
                continue
            assert torch.allclose(mixed[i, i], m[i], atol=1e-6), (name, kw, i)
            # every source pixel that reaches the mixed image, counted where it lands
            assert float(mixed[i, perm[i]].sum()) == pytest.approx(float(wb[i].sum()), abs=1e-4)


def _voc(root: Path, sizes: list[tuple[int, int]], boxes: list[list[tuple[int, int, int, int]]]
         ) -> Path:
    """A tiny VOC devkit: flat grey images with a white square in each VOC box."""
    voc = root / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    for k, ((w, h), bs) in enumerate(zip(sizes, boxes)):
        arr = np.full((h, w, 3), 90, np.uint8)
        for x0, y0, x1, y1 in bs:
            arr[y0 - 1:y1, x0 - 1:x1] = 250
        Image.fromarray(arr).save(voc / "JPEGImages" / f"im{k}.png")
        objs = [VOCObject("sq", tuple(float(v) for v in b)) for b in bs]
        (voc / "Annotations" / f"im{k}.xml").write_text(
            write_annotation(voc / "Annotations", f"im{k}.png", w, h, objs))
        ids.append(f"im{k}")
    (voc / "ImageSets/Main/test.txt").write_text("\n".join(ids) + "\n")
    return root


def test_audit_end_to_end_on_a_tiny_voc(tmp_path):
    sizes = [(40, 30), (40, 30), (32, 32), (24, 36)]
    boxes = [[(5, 5, 14, 14)], [(20, 10, 30, 20), (1, 1, 4, 4)], [(9, 9, 24, 24)], [(3, 20, 10, 30)]]
    root = _voc(tmp_path / "voc", sizes, boxes)
    cfg = AuditConfig(out=tmp_path / "audit", data=root, methods=(("mixup", {}), ("cutmix", {})),
                      detectors=("frequency_tuned",), size=16, pairs=8, batch_size=4,
                      examples=4, progress=False)
    res = run_audit(cfg)
    # chance: union share per image, by hand
    covers = [100 / 1200, (121 + 16) / 1200, 256 / 1024, 88 / 864]
    det = res["detectors"]["frequency_tuned"]
    assert det["chance"] == pytest.approx(sum(covers) / 4)
    assert det["hit_rate"] == 1.0  # the white square is the only colour far from the mean
    methods = {m["title"]: m for m in res["methods"]}
    assert methods["mixup"]["label_evidence_gap"] == 0.0
    assert methods["mixup"]["target_object_visible"] == pytest.approx(methods["mixup"]["mean_lambda"])
    assert methods["cutmix"]["pairs"] == 8
    out = tmp_path / "audit"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stage"] == "audit" and "label_evidence_gap" in metrics["definitions"]
    with open(out / "audit_methods.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["mixup", "cutmix"]
    assert (out / "examples_cutmix.png").is_file() and (out / "audit.md").is_file()
    # smix report puts the audit tables first
    build_report([out], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert md.index("Audit: saliency detectors") < md.index("Audit: mixing methods")
    assert "audit_summary.png" in md


def test_audit_cli_with_class_folders_and_a_boxes_file(shapes_root, tmp_path, capsys):
    voc_ann = shapes_root / "VOC2007" / "Annotations"
    lines = ["image,class,x0,y0,x1,y1"]
    for cls_dir in sorted((shapes_root / "val").iterdir()):
        for img in sorted(cls_dir.iterdir()):
            from smix.voc import parse_annotation
            rec = parse_annotation(voc_ann / f"{img.stem}.xml", img.parent)
            x0, y0, x1, y1 = rec.objects[0].box0
            lines.append(f"{img.relative_to(shapes_root)},{cls_dir.name},{x0},{y0},{x1},{y1}")
    boxes = shapes_root / "val_boxes.csv"
    boxes.write_text("\n".join(lines) + "\n")
    out = tmp_path / "a"
    rc = smix(["audit", "--data", str(shapes_root / "val"), "--boxes", str(boxes), "--out",
               str(out), "--methods", "cutmix,saliencymix:detector=frequency_tuned",
               "--detectors", "fine_grained", "--size", "32", "--pairs", "8",
               "--batch-size", "4", "--no-progress", "cutmix.prob=0.5"])
    assert rc == 0
    res = json.loads((out / "metrics.json").read_text())["results"]
    assert res["images"] == 12
    assert [m["title"] for m in res["methods"]] == ["cutmix(prob=0.5)",
                                                     "saliencymix(detector=frequency_tuned)"]
    assert "Audit: mixing methods" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--data", "{tmp}", "--methods", "mixup"], "no VOC2007 folder"),
    (["--data", "{voc}", "--methods", "nope"], "unknown method 'nope'"),
    (["--data", "{voc}", "--methods", "mixup", "--detectors", "gradient"], "needs a model"),
    (["--data", "{voc}", "--methods", "mixup", "cutmix.alpha=1"], "expected METHOD.param=value"),
    (["--data", "{voc}", "--methods", "cutmix", "cutmix.nope=1"], "unknown parameter 'nope'"),
    (["--data", "{voc}", "--methods", "cutmix", "--examples", "-1"], "--examples at least 0"),
])
def test_audit_user_errors(tmp_path, capsys, argv, message):
    voc = _voc(tmp_path / "voc", [(20, 20)], [[(2, 2, 9, 9)]])
    argv = [a.format(tmp=tmp_path, voc=voc) for a in argv]
    assert smix(["audit", *argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_method_values_may_hold_colons():
    """detector=network:PATH keeps its colons; a key after it still starts a new param."""
    from smix.audit import parse_methods
    from smix.errors import UserError
    got = parse_methods("cutmix,saliencymix:detector=network:/w/basnet.pt2:mode=sample", {})
    assert got == (("cutmix", {}), ("saliencymix", {"detector": "network:/w/basnet.pt2",
                                                    "mode": "sample"}))
    with pytest.raises(UserError, match="expected name:key=value"):
        parse_methods("saliencymix:sample", {})


def _refused_boxes_audit(tmp_path, capsys, rows: str) -> list[str]:
    """An audit of the images a boxes file (CSV `rows` under its header) names, which must be
    refused (exit 2); its stderr lines."""
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("image,class,x0,y0,x1,y1\n" + rows)
    assert smix(["audit", "--boxes", str(boxes), "--out", str(tmp_path / "o"), "--methods",
                 "mixup", "--detectors", "frequency_tuned", "--size", "16", "--pairs", "2",
                 "--no-progress"]) == 2
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("box", [(100, 100, 130, 130), (2, 2, 30, 9)])
def test_a_box_outside_its_image_is_a_user_error(tmp_path, capsys, box):
    """A boxes file made for other images (or a VOC image smaller than its annotation): the
    box lies past the image, and its object mask used to be one edge pixel, silently."""
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(tmp_path / "a.png")
    err = _refused_boxes_audit(tmp_path, capsys, "a.png,sq,2,2,9,9\n"
                               f"a.png,sq,{','.join(str(v) for v in box)}\n")
    assert len(err) == 1 and "a.png" in err[0] and "outside the 20x20 image" in err[0]


def test_a_refused_rerun_leaves_the_earlier_run_folder_alone(tmp_path, capsys):
    """--pairs 1 was refused after config.json was written: the folder's config then said
    pairs=1 beside the earlier run's metrics.json of pairs=4."""
    voc = _voc(tmp_path / "voc", [(20, 20)], [[(2, 2, 9, 9)]])
    argv = ["audit", "--data", str(voc), "--out", str(tmp_path / "o"), "--methods", "mixup",
            "--detectors", "frequency_tuned", "--size", "16", "--no-progress", "--pairs"]
    assert smix(argv + ["4"]) == 0
    before = (tmp_path / "o" / "config.json").read_text()
    assert smix(argv + ["1"]) == 2
    assert "--pairs and --batch-size must be at least 2" in capsys.readouterr().err
    assert (tmp_path / "o" / "config.json").read_text() == before


def test_an_image_too_small_for_the_detectors_is_a_user_error(tmp_path, capsys):
    """The detectors refuse images under 3x3 with a ValueError, which ended the audit in a
    traceback; the user's data is at fault, so it is one line naming the image."""
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((2, 2, 3), 90, np.uint8)).save(tmp_path / "tiny.png")
    err = _refused_boxes_audit(tmp_path, capsys, "a.png,sq,2,2,9,9\ntiny.png,sq,0,0,1,1\n")
    assert len(err) == 1 and "tiny.png" in err[0] and "3x3" in err[0]


def test_a_method_that_needs_the_model_is_refused_before_any_work(tmp_path, capsys):
    """Guided-AP's saliency is a gradient of the model being trained, which the audit has not:
    it was refused only at its first batch, after every image was read and scanned and the
    run folder's config.json written."""
    voc = _voc(tmp_path / "voc", [(20, 20)], [[(2, 2, 9, 9)]])
    assert smix(["audit", "--data", str(voc), "--out", str(tmp_path / "o"), "--methods",
                 "mixup,guidedmixup:saliency=ap", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "guidedmixup(saliency=ap)" in err[0] and "model" in err[0]
    assert not (tmp_path / "o").exists()
