"""Localisation metrics on hand-computed cases, and a hand-set model whose CAM finds the object."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from smix.arch import build_model
from smix.checkpoint import BackboneMeta, save_checkpoint
from smix.data import eval_transform
from smix.errors import UserError
from smix.io import atomic_write, read_json
from smix.voc import VOCObject, write_annotation
from cam.boxes import from_boxes_file, from_voc
from cam.localize import (GTDataset, LocalizeConfig, best_iou, best_region_iou, box_masks,
                          energy_in_boxes, find_regions, largest_region_boxes, localize,
                          localization_hits, localization_ious, localize_transform,
                          threshold_sweep, v2_hits)
from cam.methods import build_cam

CLASSES = ("bright", "other")
SIZE = 64


# --- pure metric functions ------------------------------------------------------------------

def test_largest_region_box_hand_case() -> None:
    m = np.zeros((2, 8, 8), dtype=bool)
    m[0, 2:6, 1:4] = True  # 12 px: the largest region of image 0
    m[0, 7, 7] = True  # a 1-px region elsewhere is ignored
    m[1, 0:2, 0:2] = True  # image 1: two regions of 4 px and 6 px
    m[1, 5:7, 4:7] = True
    boxes = largest_region_boxes(m)
    assert boxes.tolist() == [[1, 2, 4, 6], [4, 5, 7, 7]]
    assert largest_region_boxes(np.zeros((3, 4, 4), bool)).tolist() == [[0, 0, 0, 0]] * 3


def test_diagonal_pixels_are_one_region() -> None:
    m = np.zeros((1, 5, 5), dtype=bool)
    m[0, [0, 1, 2, 3], [0, 1, 2, 3]] = True  # 8-connected diagonal, 4 px
    m[0, 4, 0:2] = True  # a 2-px row: a region of its own
    r = find_regions(m)
    assert sorted(r.boxes[r.outer].tolist()) == [[0, 0, 4, 4], [0, 4, 2, 5]]
    # both enclose no area (contourArea 0): the tie goes to OpenCV's first contour, the row,
    # as wsolevaluation's max() takes it
    assert largest_region_boxes(m).tolist() == [[0, 4, 2, 5]]


def _wsolevaluation_boxes(mask: np.ndarray, multi_contour: bool) -> list[list[int]]:
    """Choe et al.'s `compute_bboxes_from_scoremaps` on a thresholded map, transcribed, less
    its +1 artefact (their `x + w` is an exclusive end they then read as inclusive): RETR_TREE
    contours, all of them or `max(contours, key=cv2.contourArea)`, their boundingRects."""
    import cv2
    contours = cv2.findContours(mask.astype(np.uint8), cv2.RETR_TREE,
                                cv2.CHAIN_APPROX_SIMPLE)[0]
    if not contours:
        return []
    if not multi_contour:
        contours = [max(contours, key=cv2.contourArea)]
    return [[x, y, x + w, y + h] for x, y, w, h in map(cv2.boundingRect, contours)]


def test_regions_are_wsolevaluations_contours() -> None:
    """The largest region's box and every contour's box (holes' too) equal wsolevaluation's,
    ties included (equal squares: theirs is the first maximum of OpenCV's list)."""
    pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    masks = ndimage.binary_opening(rng.random((40, 20, 20)) > 0.55, np.ones((1, 2, 2)))
    masks[3] = False
    masks[4] = False
    masks[4, 2:5, 2:5] = masks[4, 2:5, 12:15] = masks[4, 12:15, 7:10] = True  # a three-way tie
    masks[5] = False
    masks[5, 2:18, 2:18] = True  # a ring, with an island in its hole
    masks[5, 5:15, 5:15] = False
    masks[5, 8:11, 8:11] = True
    r = find_regions(masks)
    largest = largest_region_boxes(masks)
    for b in range(len(masks)):
        want = _wsolevaluation_boxes(masks[b], multi_contour=False)
        assert largest[b].tolist() == (want[0] if want else [0, 0, 0, 0]), b
        every = sorted(_wsolevaluation_boxes(masks[b], multi_contour=True))
        assert sorted(r.boxes[r.owner == b].tolist()) == every, b
    assert (r.owner == 5).sum() == 3 and not r.outer[r.owner == 5].all()  # ring, hole, island


def test_a_holes_box_counts_for_v2_as_in_wsolevaluation() -> None:
    """A ring whose hole is the object: the hole's contour box (11,11)-(29,29) matches the GT
    (12,12)-(28,28) at IoU 256/324 > 0.7; the ring's own box, 256/400, does not."""
    maps = torch.zeros(1, 40, 40)
    maps[0, 10:30, 10:30] = 1.0
    maps[0, 12:28, 12:28] = 0.0
    gt = torch.tensor([[[12.0, 12, 28, 28]]], dtype=torch.float64)
    largest, any_region = localization_ious(maps, gt, torch.ones(1, 1, dtype=torch.bool), [0.5])
    torch.testing.assert_close(largest, torch.tensor([[0.64]], dtype=torch.float64))
    torch.testing.assert_close(any_region, torch.tensor([[256 / 324]], dtype=torch.float64))
    assert v2_hits(any_region)[:, 0, 0].tolist() == [True, True, True]


def test_best_iou_hand_values() -> None:
    gt = torch.tensor([[[0.0, 0, 4, 4], [10, 10, 12, 12]], [[0, 0, 2, 2], [0, 0, 0, 0]]])
    valid = torch.tensor([[True, True], [True, False]])
    pred = torch.tensor([[0.0, 0, 4, 2], [1, 1, 3, 3]])
    # image 0: [0,0,4,2] vs [0,0,4,4] -> 8/16; image 1: [1,1,3,3] vs [0,0,2,2] -> 1/7
    torch.testing.assert_close(best_iou(pred, gt, valid), torch.tensor([0.5, 1 / 7]))
    # an invalid (padding) box never counts even when it would match
    torch.testing.assert_close(best_iou(torch.tensor([[10.0, 10, 12, 12], [0, 0, 0, 0]]), gt,
                                        valid), torch.tensor([1.0, 0.0]))


def test_energy_pointing_game_hand_value() -> None:
    maps = torch.zeros(2, 6, 6)
    maps[0, 1:5, 1:5] = 1.0  # 16 inside the box
    maps[0, 0, 5], maps[0, 5, 0] = 0.5, 1.5  # 2 outside
    gt = torch.tensor([[[1.0, 1, 5, 5]], [[0, 0, 6, 6]]], dtype=torch.float64)
    valid = torch.ones(2, 1, dtype=torch.bool)
    mask = box_masks(gt, valid, 6, 6)
    assert int(mask[0].sum()) == 16 and bool(mask[1].all())
    energy = energy_in_boxes(maps, mask)
    assert energy[0].item() == pytest.approx(16 / 18)
    assert energy[1].item() == 0.0  # an all-zero map points nowhere


def test_box_masks_use_pixel_centres() -> None:
    gt = torch.tensor([[[0.4, 0.6, 2.5, 2.4]]], dtype=torch.float64)
    mask = box_masks(gt, torch.ones(1, 1, dtype=torch.bool), 4, 4)[0]
    # centres 0.5, 1.5 in x (2.5 excluded); 1.5 only in y (0.5 < 0.6, 2.5 > 2.4)
    assert torch.nonzero(mask).tolist() == [[1, 0], [1, 1]]


def test_localization_hits_threshold_sweep() -> None:
    maps = torch.zeros(1, 10, 10)
    maps[0, 2:6, 2:6] = 1.0
    maps[0, 0:10, 0:2] = 0.3  # a wide weak band: at thresholds < 0.3 it joins the box
    gt = torch.tensor([[[2.0, 2, 6, 6]]], dtype=torch.float64)
    hits = localization_hits(maps, gt, torch.ones(1, 1, dtype=torch.bool), [0.1, 0.5], 0.5)
    assert hits[:, 0].tolist() == [False, True]  # [0,0,6,10]: IoU 16/60; then the exact box
    assert threshold_sweep(0.25) == [0.0, 0.25, 0.5, 0.75]



def test_v2_tries_every_region_where_v1_takes_the_largest() -> None:
    """A large distractor and a small region on the object: MaxBoxAcc (largest region) misses,
    MaxBoxAccV2 (every region) hits; IoU 0.3/0.5/0.7 by hand."""
    maps = torch.zeros(2, 20, 20)
    maps[0, 0:10, 10:20] = 1.0  # 100 px distractor
    maps[0, 12:16, 2:6] = 0.8  # 16 px on the object
    maps[1, 4:10, 4:10] = 1.0  # image 1: one region [4,4,10,10] against GT [4,4,12,12]
    gt = torch.tensor([[[2.0, 12, 6, 16], [0, 0, 0, 0]], [[4.0, 4, 12, 12], [15, 15, 20, 20]]],
                      dtype=torch.float64)
    valid = torch.tensor([[True, False], [True, True]])
    # the largest region: the distractor in image 0 (IoU 0), the only one in image 1
    assert localization_hits(maps, gt, valid, [0.5], 0.5).tolist() == [[False, True]]
    # image 0: the small region is the GT box (IoU 1); image 1: 36/64 = 0.5625
    ious = best_region_iou(find_regions(maps.numpy() > 0.5), gt, valid)
    torch.testing.assert_close(ious, torch.tensor([1.0, 36 / 64], dtype=torch.float64))
    largest, any_region = localization_ious(maps, gt, valid, [0.5, 0.9])
    torch.testing.assert_close(largest[0], torch.tensor([0.0, 36 / 64], dtype=torch.float64))
    hits = v2_hits(any_region)
    assert hits[:, 0].tolist() == [[True, True], [True, True], [True, False]]  # δ .3 .5 .7
    # above 0.9 image 0 keeps only the distractor (0.8 is out)
    assert hits[:, 1].tolist() == [[False, True], [False, True], [False, False]]
    # an empty mask has no region: IoU 0
    assert best_region_iou(find_regions(np.zeros((1, 5, 5), bool)), gt[:1],
                           valid[:1]).tolist() == [0.0]


def test_region_boxes_are_the_8_connected_components() -> None:
    """Every region's box (OpenCV's outer contours) against scipy's 8-connected labelling:
    rings, an island inside a hole, regions on the border, one-pixel regions and diagonal
    chains."""
    rng = np.random.default_rng(3)
    maps = ndimage.gaussian_filter(rng.random((6, 40, 48)), (0, 2.5, 2.5))
    maps[2] = 0.0
    maps[3, 10:30, 10:30] = 1.0  # a ring with an island in its hole
    maps[3, 14:26, 14:26] = 0.0
    maps[3, 18:22, 18:22] = 1.0
    maps[4, [0, 1, 2, 3], [5, 6, 7, 8]] = 2.0  # an 8-connected diagonal at the top border
    maps[4, 39, 47] = 2.0  # one pixel in the corner
    for t in (0.45, 0.5 * maps.max(), 0.55, 1.5):
        masks = maps > t
        r = find_regions(masks)
        boxes, owner = r.boxes[r.outer], r.owner[r.outer]
        for b in range(len(masks)):
            lab, _ = ndimage.label(masks[b], structure=np.ones((3, 3)))
            want = sorted((s[1].start, s[0].start, s[1].stop, s[0].stop)
                          for s in ndimage.find_objects(lab))
            got = sorted(tuple(int(v) for v in box) for box in boxes[owner == b])
            assert got == want, (t, b)
    r = find_regions(maps > 1.5)  # by hand: the diagonal and the corner pixel
    boxes, owner = r.boxes, r.owner
    assert sorted(boxes.tolist()) == [[5, 0, 9, 4], [47, 39, 48, 40]] and owner.tolist() == [4, 4]


def test_iou_of_exactly_one_half_is_a_hit_and_pixels_at_the_threshold_are_out() -> None:
    """Loc counts IoU >= 0.5 (Zhou et al.; Choe et al.), and a region is the pixels strictly
    above the CAM threshold."""
    gt = torch.tensor([[[0.0, 0, 4, 4]]], dtype=torch.float64)
    half = torch.zeros(1, 10, 10)
    half[0, 0:2, 0:4] = 1.0  # box [0,0,4,2]: IoU 8/16 = 0.5 exactly
    one = torch.ones(1, 1, dtype=torch.bool)
    assert localization_hits(half, gt, one, [0.2], 0.5).tolist() == [[True]]
    at = torch.zeros(1, 10, 10)
    at[0, 0:4, 0:4] = 1.0
    at[0, 4:10, :] = 0.5  # exactly at the threshold: not part of the region
    assert localization_hits(at, gt, one, [0.5], 0.5).tolist() == [[True]]  # the square alone
    # counted in, the region would be [0,0,10,10]: IoU 16/100
    assert localization_hits(at, gt, one, [0.49], 0.5).tolist() == [[False]]


def test_voc_class_is_the_largest_non_difficult_object_and_gt_is_all_its_boxes(tmp_path) -> None:
    """The image's class: its largest non-difficult object (a larger difficult dog does not
    decide); ground truth: every box of that class, the difficult one included (0-based)."""
    from cam.boxes import _voc_image
    from smix.voc import VOCRecord
    objs = (VOCObject("dog", (1.0, 1.0, 60.0, 60.0), difficult=True),
            VOCObject("cat", (11.0, 11.0, 20.0, 20.0)),
            VOCObject("cat", (31.0, 31.0, 35.0, 35.0), difficult=True),
            VOCObject("bird", (41.0, 41.0, 45.0, 45.0)))
    g = _voc_image(VOCRecord("a", tmp_path / "a.jpg", 64, 64, objs))
    assert g.class_name == "cat"
    assert g.boxes == ((10.0, 10.0, 20.0, 20.0), (30.0, 30.0, 35.0, 35.0))
    only_difficult = (VOCObject("dog", (1.0, 1.0, 60.0, 60.0), difficult=True),
                      VOCObject("cat", (11.0, 11.0, 20.0, 20.0), difficult=True))
    assert _voc_image(VOCRecord("b", tmp_path / "b.jpg", 64, 64, only_difficult)).class_name \
        == "dog"  # all difficult: the largest of them

# --- ground truth sources and the eval transform ---------------------------------------------

def test_boxes_follow_the_eval_resize_and_crop(tmp_path) -> None:
    """A box mapped through the checkpoint's eval transform covers the same pixels as a
    drawn rectangle pushed through it."""
    img = Image.new("RGB", (120, 90))
    img.paste((255, 255, 255), (30, 20, 70, 60))  # [30,70) x [20,60)
    path = tmp_path / "a.png"
    img.save(path)
    meta = BackboneMeta(arch="resnet18", num_classes=1, class_names=("a",), resize=72, crop=64,
                        mean=(0, 0, 0), std=(1, 1, 1))
    item = from_boxes_file(_write_boxes(tmp_path, [("a.png", "a", [30, 20, 70, 60])]))[0]
    x, _, boxes, _ = GTDataset([item], [0], [0], eval_transform(meta), False)[0]
    ys, xs = torch.nonzero(x[0] > 0.5, as_tuple=True)
    drawn = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    np.testing.assert_allclose(boxes[0].tolist(), drawn, atol=1.0)
    assert x.shape == (3, 64, 64)


def test_square_geometry_keeps_what_the_centre_crop_cuts_away(tmp_path) -> None:
    """Choe et al. resize the whole image to crop x crop; the checkpoint's resize 256 / crop 224
    cuts a box at the border of a wide image away. Hand values: 200x100 image, box [0,0,50,100)."""
    img = Image.new("RGB", (200, 100))
    img.paste((255, 255, 255), (0, 0, 50, 100))
    img.save(tmp_path / "wide.png")
    meta = BackboneMeta(arch="resnet18", num_classes=1, class_names=("a",), resize=256,
                        crop=224, mean=(0, 0, 0), std=(1, 1, 1))
    item = from_boxes_file(_write_boxes(tmp_path, [("wide.png", "a", [0, 0, 50, 100])]))[0]
    # crop: 200x100 -> 512x256, centre 224 from x=144: the box [0,128) is gone
    _, _, cut, _ = GTDataset([item], [0], [0], localize_transform(meta, "crop"), False)[0]
    assert cut[0, 2] <= cut[0, 0]  # empty: not evaluable
    x, _, kept, _ = GTDataset([item], [0], [0], localize_transform(meta, "square"), False)[0]
    assert x.shape == (3, 224, 224)
    np.testing.assert_allclose(kept[0].tolist(), [0, 0, 56, 224])  # x 224/200, y 224/100
    ys, xs = torch.nonzero(x[0] > 0.5, as_tuple=True)
    assert abs(xs.max().item() + 1 - 56) <= 1 and ys.min().item() == 0
    with pytest.raises(UserError, match="--geometry 'wsol'; valid: crop, square"):
        LocalizeConfig((Path("a"),), tmp_path, voc_root=tmp_path, geometry="wsol").check()


def _write_boxes(folder: Path, rows: list) -> Path:
    path = folder / "boxes.jsonl"
    path.write_text("".join(json.dumps({"image": i, "class": c, "box": b}) + "\n"
                            for i, c, b in rows))
    return path


def test_boxes_file_jsonl_and_csv_agree_and_largest_box_sets_the_class(tmp_path) -> None:
    j = _write_boxes(tmp_path, [("x.jpg", "cat", [0, 0, 4, 4]), ("x.jpg", "dog", [0, 0, 8, 8]),
                                ("x.jpg", "dog", [10, 10, 12, 12])])
    c = tmp_path / "boxes.csv"
    c.write_text("image,class,x0,y0,x1,y1\nx.jpg,cat,0,0,4,4\nx.jpg,dog,0,0,8,8\n"
                 "x.jpg,dog,10,10,12,12\n")
    excel = tmp_path / "excel.csv"  # Excel's "CSV UTF-8": a byte-order mark, CRLF
    excel.write_bytes(b"\xef\xbb\xbf" + c.read_text().replace("\n", "\r\n").encode())
    a, b = from_boxes_file(j), from_boxes_file(c)
    assert a == b == from_boxes_file(excel) and len(a) == 1
    assert a[0].class_name == "dog" and a[0].boxes == ((0, 0, 8, 8), (10, 10, 12, 12))
    assert a[0].image == tmp_path / "x.jpg"


@pytest.mark.parametrize("text, message", [
    ("", "boxes file is empty"),
    ('{"image": "x.jpg", "class": "a"}\n', "needs keys image, class, box"),
    ('{"image": "x.jpg", "class": "a", "box": [5, 0, 2, 4]}\n', "is empty or negative"),
    ("image,label,x0,y0,x1,y1\nx.jpg,a,0,0,1,1\n", "CSV header must be"),
    ("image,class,x0,y0,x1,y1\nx.jpg,a,0,zero,1,1\n", "not numbers"),
])
def test_bad_boxes_files_are_one_line_errors(tmp_path, text, message) -> None:
    path = tmp_path / ("b.csv" if text.startswith("image") else "b.jsonl")
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        from_boxes_file(path)


def test_voc_root_without_boxes_is_an_error(tmp_path) -> None:
    voc = tmp_path / "VOC2007"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "test.txt").write_text("a\n")
    with pytest.raises(UserError, match="missing Annotations"):
        from_voc(tmp_path)
    (voc / "Annotations").mkdir()
    atomic_write(voc / "Annotations" / "a.xml", write_annotation(voc, "a.jpg", 8, 8, []))
    with pytest.raises(UserError, match="no boxes in the test annotations"):
        from_voc(tmp_path)
    with pytest.raises(UserError, match="no VOC2012 folder"):
        from_voc(tmp_path, year="2012")


# --- a hand-set model: its CAM is the brightness map, so the box must find the square -------

def hand_set_model() -> torch.nn.Module:
    """cifar_resnet18 whose layer4 channel 0 is the input brightness sampled at stride 8
    (residual branches zero, shortcuts copy channel 0) and whose fc reads that channel:
    class `bright` +1, class `other` -1. Its CAM for `bright` is the brightness map."""
    net = build_model("cifar_resnet18", 2)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.weight.zero_()
            elif isinstance(mod, torch.nn.BatchNorm2d):
                mod.reset_parameters()
                mod.reset_running_stats()
        net.conv1.weight[0, :, 1, 1] = 1.0 / 3
        for layer in (net.layer2, net.layer3, net.layer4):
            layer[0].downsample[0].weight[0, 0, 0, 0] = 1.0
        net.fc.weight.zero_()
        net.fc.bias.zero_()
        net.fc.weight[0, 0], net.fc.weight[1, 0] = 1.0, -1.0
    return net.eval()


def square_image(box: tuple[int, int, int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = (0.1 + 0.05 * rng.random((SIZE, SIZE, 3))) * 255
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = 230
    return Image.fromarray(arr.astype(np.uint8))


def test_hand_set_model_cam_box_recovers_the_object() -> None:
    net = hand_set_model()
    box = (16, 24, 40, 48)
    x = torch.from_numpy(np.asarray(square_image(box, 0), np.float32) / 255).permute(2, 0, 1)
    res = build_cam("cam", net, "cifar_resnet18")(x[None], torch.tensor([0]))
    assert res.logits[0, 0] > 0 > res.logits[0, 1]
    found = largest_region_boxes(res.maps.numpy() > 0.2)
    gt = torch.tensor([[list(box)]], dtype=torch.float64)
    iou = best_iou(torch.from_numpy(found), gt, torch.ones(1, 1, dtype=torch.bool))
    assert iou.item() >= 0.5
    # the peak of the map lies inside the object
    peak = int(res.maps[0].flatten().argmax())
    assert box[0] <= peak % SIZE < box[2] and box[1] <= peak // SIZE < box[3]


@pytest.fixture(scope="module")
def hand_set_voc(tmp_path_factory) -> tuple[Path, Path]:
    """A VOC root of 4 images of one bright square each, and the hand-set checkpoint.
    Image 3's annotation is deliberately wrong (box in the opposite corner)."""
    root = tmp_path_factory.mktemp("handvoc")
    voc = root / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    squares = [(16, 24, 40, 48), (8, 8, 32, 32), (30, 30, 58, 58), (4, 4, 28, 28)]
    annotated = squares[:3] + [(36, 36, 60, 60)]
    for i, (sq, ann) in enumerate(zip(squares, annotated)):
        square_image(sq, i).save(voc / "JPEGImages" / f"im{i}.png")
        obj = VOCObject("bright", (ann[0] + 1.0, ann[1] + 1.0, float(ann[2]), float(ann[3])))
        atomic_write(voc / "Annotations" / f"im{i}.xml",
                     write_annotation(voc, f"im{i}.png", SIZE, SIZE, [obj]))
    (voc / "ImageSets" / "Main" / "test.txt").write_text("im0\nim1\nim2\nim3\n")
    ckpt = root / "hand.safetensors"
    save_checkpoint(ckpt, hand_set_model(), BackboneMeta(
        arch="cifar_resnet18", num_classes=2, class_names=CLASSES, input_size=SIZE,
        resize=SIZE, crop=SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
        method={"name": "handset"}))
    return root, ckpt


def test_localize_on_hand_set_model_gives_hand_computed_numbers(hand_set_voc, tmp_path) -> None:
    root, ckpt = hand_set_voc
    r = localize(LocalizeConfig((ckpt,), tmp_path / "run", voc_root=root, batch_size=3,
                                progress=False))
    m = r["models"][0]
    assert r["n_images"] == 4 and r["iou_threshold"] == 0.5 and r["cam_threshold"] == 0.2
    assert m["top1_cls"] == 100.0  # every image is bright-on-dark: class 0 wins
    assert m["gt_known_loc"] == 75.0 and m["top1_loc"] == 75.0  # the mislabelled one misses
    assert m["maxboxacc"] >= m["gt_known_loc"]
    assert m["maxboxacc"] == max(m["boxacc_curve"]["acc"])
    # pointing game by hand: the mean share of each map's mass inside its annotated box
    ds = GTDataset(from_voc(root), range(4), [0] * 4, eval_transform(
        BackboneMeta(arch="cifar_resnet18", num_classes=2, class_names=CLASSES, resize=SIZE,
                     crop=SIZE, mean=(0, 0, 0), std=(1, 1, 1))), False)
    net = hand_set_model()
    shares = []
    for x, _, boxes, _ in ds:
        cam = build_cam("cam", net, "cifar_resnet18")(x[None], torch.tensor([0])).maps[0]
        x0, y0, x1, y1 = [int(v) for v in boxes[0]]
        shares.append(float(cam[y0:y1, x0:x1].sum() / cam.sum()))
    assert m["pointing_game"] == pytest.approx(100 * np.mean(shares), abs=1e-4)
    assert shares[3] < 0.2 < min(shares[:3])
    saved = read_json(tmp_path / "run" / "metrics.json")
    assert saved["stage"] == "cam" and saved["kind"] == "localization"
    assert saved["results"]["models"][0]["checkpoint"]["sha256"]


def test_top1_loc_needs_the_right_prediction(hand_set_voc, tmp_path) -> None:
    """The hand-set model with a large bias for `other`: every image is misclassified, while
    the CAM of the true class (fc weights x features, no bias) is unchanged: GT-known Loc
    stays 75%, Top-1 Loc (localised and classified right) is 0%."""
    root, _ = hand_set_voc
    net = hand_set_model()
    with torch.no_grad():
        net.fc.bias[1] = 100.0
    ckpt = tmp_path / "biased.safetensors"
    save_checkpoint(ckpt, net, BackboneMeta(
        arch="cifar_resnet18", num_classes=2, class_names=CLASSES, input_size=SIZE,
        resize=SIZE, crop=SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
        method={"name": "handset"}))
    m = localize(LocalizeConfig((ckpt,), tmp_path / "run", voc_root=root, batch_size=4,
                                progress=False))["models"][0]
    assert (m["top1_cls"], m["gt_known_loc"], m["top1_loc"]) == (0.0, 75.0, 0.0)


def test_an_unreadable_image_is_fatal_or_skipped_and_named_once(hand_set_voc, tmp_path,
                                                               capsys) -> None:
    """With --skip-bad-images it is counted for each checkpoint and named once on stderr, by
    this process (not by each worker of each checkpoint's loader); without, one line."""
    import shutil
    root = tmp_path / "voc"
    shutil.copytree(hand_set_voc[0], root)
    broken = root / "VOC2007" / "JPEGImages" / "im1.png"
    broken.write_bytes(b"not a png")
    ckpts = (hand_set_voc[1], hand_set_voc[1])
    with pytest.raises(UserError, match="im1.png: cannot read image"):
        localize(LocalizeConfig(ckpts, tmp_path / "a", voc_root=root, progress=False))
    capsys.readouterr()
    r = localize(LocalizeConfig(ckpts, tmp_path / "b", voc_root=root, batch_size=2, workers=2,
                                skip_bad_images=True, progress=False))
    assert [(m["n_evaluated"], m["n_skipped"]) for m in r["models"]] == [(3, 1), (3, 1)]
    err = capsys.readouterr().err
    assert err.startswith(f"warning: skipping unreadable image: {broken}: cannot read image")
    assert err.count("\n") == 1, err  # one line


def test_image_class_not_in_checkpoint_is_an_error(hand_set_voc, tmp_path) -> None:
    root, ckpt = hand_set_voc
    boxes = _write_boxes(tmp_path, [(str(root / "VOC2007/JPEGImages/im0.png"), "cat",
                                     [1, 1, 5, 5])])
    with pytest.raises(UserError, match="class 'cat' .* is not a class of the checkpoint"):
        localize(LocalizeConfig((ckpt,), tmp_path / "run", boxes=boxes, progress=False))
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_localize_config_needs_exactly_one_source(hand_set_voc, tmp_path) -> None:
    root, ckpt = hand_set_voc
    with pytest.raises(UserError, match="exactly one of --voc-root DIR or --boxes FILE"):
        localize(LocalizeConfig((ckpt,), tmp_path, progress=False))
    with pytest.raises(UserError, match="--curve-interval must be in"):
        localize(LocalizeConfig((ckpt,), tmp_path, voc_root=root, curve_interval=0))
