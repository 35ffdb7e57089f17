"""The toolkit's VOC07 evaluator: hand-computed cases, a loop oracle, and detectron2 parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from smix.errors import UserError
from tests.conftest import need_detectron2
from smix.voc import VOCObject, VOCRecord
from transfer.voc_eval import (IOU_THRESHOLDS, Detections, average_precision, evaluate_voc,
                               metric_label, to_voc_boxes, year_metric)



def rec(image_id: str, *objects: tuple[str, tuple[int, int, int, int], bool]) -> VOCRecord:
    objs = tuple(VOCObject(n, tuple(float(v) for v in b), difficult=d) for n, b, d in objects)
    return VOCRecord(image_id, Path(f"{image_id}.jpg"), 100, 100, objs)  # type: ignore[arg-type]


def dets(*items: tuple[str, int, float, tuple[float, float, float, float]]) -> Detections:
    """(image_id, label, score, VOC 1-based box) -> Detections with 0-based boxes."""
    if not items:
        return Detections.empty()
    ids, labels, scores, boxes = zip(*items)
    b0 = np.array(boxes, np.float64)
    b0[:, :2] -= 1.0
    return Detections(tuple(ids), np.array(labels), np.array(scores, np.float64), b0)


def test_perfect_detections_score_100() -> None:
    records = [rec("a", ("cat", (10, 10, 50, 60), False)), rec("b", ("cat", (5, 5, 20, 20), False))]
    d = dets(("a", 0, 0.9, (10, 10, 50, 60)), ("b", 0, 0.8, (5, 5, 20, 20)))
    res = evaluate_voc(records, d, ["cat"])
    assert (res.AP, res.AP50, res.AP75) == pytest.approx((100.0, 100.0, 100.0))
    assert res.per_class == pytest.approx({"cat": 100.0})


def test_no_detections_score_0() -> None:
    records = [rec("a", ("cat", (10, 10, 50, 60), False))]
    res = evaluate_voc(records, Detections.empty(), ["cat"])
    assert (res.AP, res.AP50, res.AP75) == (0.0, 0.0, 0.0)


def test_duplicate_detection_is_false_positive_11point_and_area() -> None:
    # TP (0.9), duplicate of it (0.8) -> FP, TP on the second image (0.7):
    # recall [.5 .5 1], precision [1 .5 2/3].
    records = [rec("a", ("cat", (10, 10, 50, 60), False)), rec("b", ("cat", (5, 5, 20, 20), False))]
    d = dets(("a", 0, 0.9, (10, 10, 50, 60)), ("a", 0, 0.8, (10, 10, 50, 60)),
             ("b", 0, 0.7, (5, 5, 20, 20)))
    voc07 = evaluate_voc(records, d, ["cat"])
    area = evaluate_voc(records, d, ["cat"], metric="area")
    assert voc07.AP50 == pytest.approx(100 * (6 * 1.0 + 5 * 2 / 3) / 11)  # 84.85
    assert area.AP50 == pytest.approx(100 * (0.5 * 1.0 + 0.5 * 2 / 3))  # 83.33


def test_difficult_objects_neither_count_nor_penalise() -> None:
    # A detection on a difficult object is ignored; difficult objects are not positives.
    records = [rec("a", ("cat", (10, 10, 40, 40), False), ("cat", (60, 60, 90, 90), True)),
               rec("b", ("cat", (10, 10, 30, 30), True))]
    d = dets(("a", 0, 0.9, (60, 60, 90, 90)), ("a", 0, 0.8, (10, 10, 40, 40)))
    assert evaluate_voc(records, d, ["cat"]).AP50 == pytest.approx(100.0)
    # the same boxes without the difficult flags: npos 3, recall at most 2/3
    plain = [rec("a", ("cat", (10, 10, 40, 40), False), ("cat", (60, 60, 90, 90), False)),
             rec("b", ("cat", (10, 10, 30, 30), False))]
    assert evaluate_voc(plain, d, ["cat"]).AP50 == pytest.approx(100 * 7 / 11)


def test_recall_exactly_point_three_misses_the_devkit_0_3_point() -> None:
    # np.arange(0, 1.1, 0.1)[3] is 0.30000000000000004 > 3/10: the devkit counts 3 points, not 4.
    records = [rec(f"i{k}", ("cat", (10, 10, 40, 40), False)) for k in range(10)]
    d = dets(*[(f"i{k}", 0, 0.9 - k / 100, (10, 10, 40, 40)) for k in range(3)])
    assert evaluate_voc(records, d, ["cat"]).AP50 == pytest.approx(100 * 3 / 11)


def test_iou_threshold_is_strict_and_ap_averages_thresholds() -> None:
    records = [rec("a", ("cat", (1, 1, 10, 10), False))]  # 10x10 pixels, inclusive
    half = evaluate_voc(records, dets(("a", 0, 0.9, (1, 1, 10, 5))), ["cat"])  # IoU exactly 0.5
    assert half.AP50 == 0.0
    eight = evaluate_voc(records, dets(("a", 0, 0.9, (1, 1, 10, 8))), ["cat"])  # IoU exactly 0.8
    assert (eight.AP50, eight.AP75) == pytest.approx((100.0, 100.0))
    assert eight.AP == pytest.approx(60.0)  # hits at 0.50..0.75, misses at 0.80..0.95


def test_class_without_ground_truth_is_none_and_left_out_of_the_mean() -> None:
    records = [rec("a", ("cat", (10, 10, 50, 60), False))]
    res = evaluate_voc(records, dets(("a", 0, 0.9, (10, 10, 50, 60)), ("a", 1, 0.5, (1, 1, 9, 9))),
                       ["cat", "dog"])
    assert res.per_class["dog"] is None and res.per_class["cat"] == pytest.approx(100.0)
    assert res.AP50 == pytest.approx(100.0) and res.classes_without_ground_truth == ("dog",)


def test_boxes_convention_and_one_based_flag_agree() -> None:
    b0 = np.array([[9.0, 9.0, 50.0, 60.0]])
    np.testing.assert_array_equal(to_voc_boxes(b0), [[10.0, 10.0, 50.0, 60.0]])
    records = [rec("a", ("cat", (10, 10, 50, 60), False))]
    one = Detections(("a",), np.array([0]), np.array([0.9]), to_voc_boxes(b0), one_based=True)
    zero = Detections(("a",), np.array([0]), np.array([0.9]), b0)
    assert evaluate_voc(records, one, ["cat"]) == evaluate_voc(records, zero, ["cat"])


def test_bad_inputs_are_user_errors() -> None:
    records = [rec("a", ("cat", (10, 10, 50, 60), False))]
    with pytest.raises(UserError, match="not in the test split"):
        evaluate_voc(records, dets(("zz", 0, 0.9, (1, 1, 5, 5))), ["cat"])
    with pytest.raises(UserError, match="index the 1 classes"):
        evaluate_voc(records, dets(("a", 3, 0.9, (1, 1, 5, 5))), ["cat"])
    with pytest.raises(UserError, match="valid: voc07, area"):
        evaluate_voc(records, Detections.empty(), ["cat"], metric="coco")


def test_average_precision_hand_values() -> None:
    rec_, prec = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    assert average_precision(rec_, prec, "voc07") == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert average_precision(rec_, prec, "area") == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert average_precision(np.zeros(0), np.zeros(0), "voc07") == 0.0


def test_area_ap_uses_the_precision_envelope() -> None:
    """Precision that rises later lifts the earlier recall steps (the devkit's monotone
    envelope): recall [.25 .25 .5 .75], precision [1 .5 2/3 .75] -> area .25·1 + .25·.75 +
    .25·.75 = 0.625 (0.6042 without the envelope); 11-point (3·1 + 5·.75) / 11."""
    rec_, prec = np.array([0.25, 0.25, 0.5, 0.75]), np.array([1.0, 0.5, 2 / 3, 0.75])
    assert average_precision(rec_, prec, "area") == pytest.approx(0.625)
    assert average_precision(rec_, prec, "voc07") == pytest.approx((3 + 5 * 0.75) / 11)


def test_the_test_year_decides_the_metric_and_its_name() -> None:
    assert (year_metric("2007"), metric_label("2007")) == ("voc07", "voc07-11point")
    assert (year_metric("2012"), metric_label(2012)) == ("area", "voc12-area")
    # recall [.5 1], precision [1 .5]: 11-point (6·1 + 5·0.5)/11 = 0.7727…, area 0.5·1 + 0.5·0.5
    rec_, prec = np.array([0.5, 1.0]), np.array([1.0, 0.5])
    assert average_precision(rec_, prec, year_metric("2007")) == pytest.approx(8.5 / 11)
    assert average_precision(rec_, prec, year_metric("2012")) == pytest.approx(0.75)


def _loop_reference(records, d: Detections, names, t: float) -> list[float]:
    """The VOC devkit algorithm, detection by detection (the oracle for the vectorised code)."""
    out = []
    boxes = to_voc_boxes(d.boxes)
    for c, name in enumerate(names):
        gts = {r.image_id: [o for o in r.objects if o.name == name] for r in records}
        used = {k: [False] * len(v) for k, v in gts.items()}
        npos = sum(not o.difficult for v in gts.values() for o in v)
        sel = np.flatnonzero(d.labels == c)
        order = sel[np.argsort(-d.scores[sel])]
        tp, fp = [], []
        for i in order:
            bb, best, j = boxes[i], -np.inf, -1
            for k, o in enumerate(gts[d.image_ids[i]]):
                g = o.bbox
                iw = max(min(g[2], bb[2]) - max(g[0], bb[0]) + 1.0, 0.0)
                ih = max(min(g[3], bb[3]) - max(g[1], bb[1]) + 1.0, 0.0)
                uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                       + (g[2] - g[0] + 1.0) * (g[3] - g[1] + 1.0) - iw * ih)
                if iw * ih / uni > best:
                    best, j = iw * ih / uni, k
            hit = best > t
            hard = hit and gts[d.image_ids[i]][j].difficult
            new = hit and not hard and not used[d.image_ids[i]][j]
            if new:
                used[d.image_ids[i]][j] = True
            tp.append(float(new))
            fp.append(float(not hit or (not hard and not new)))
        if npos == 0:
            out.append(None)
            continue
        tpc, fpc = np.cumsum(tp), np.cumsum(fp)
        out.append(100 * average_precision(tpc / npos, tpc / np.maximum(tpc + fpc, 1e-300)))
    return out


def random_scene(seed: int, n_images: int = 12, names=("cat", "dog", "bus"), tied: bool = False):
    """Images with several objects (some difficult), jittered, duplicated and spurious boxes;
    distinct scores, or (`tied`) scores from four levels so that many tie."""
    rng = np.random.default_rng(seed)
    records, items = [], []
    for i in range(n_images):
        objs = []
        for _ in range(rng.integers(0, 4)):
            x0, y0 = rng.integers(1, 60, size=2)
            w, h = rng.integers(5, 40, size=2)
            objs.append((str(rng.choice(names)), (int(x0), int(y0), int(x0 + w), int(y0 + h)),
                         bool(rng.random() < 0.2)))
        records.append(rec(f"img{i:03d}", *objs))
        for name, box, _ in objs:
            for _ in range(rng.integers(0, 3)):  # 0..2 detections per object (duplicates)
                jitter = rng.integers(-4, 5, size=4)
                b = tuple(float(max(1, v + j)) for v, j in zip(box, jitter))
                items.append((f"img{i:03d}", names.index(name), None, b))
        for _ in range(rng.integers(0, 3)):  # spurious detections
            x0, y0 = rng.integers(1, 80, size=2)
            items.append((f"img{i:03d}", int(rng.integers(0, len(names))), None,
                          (float(x0), float(y0), float(x0 + 10), float(y0 + 12))))
    scores = rng.permutation(len(items)) / max(1, len(items)) + 0.001  # distinct
    if tied:
        scores = rng.integers(1, 5, size=len(items)) / 4
    items = [(a, b, float(s), d) for (a, b, _, d), s in zip(items, scores)]
    return records, dets(*items), list(names)


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_matching_equals_the_loop_reference(seed: int) -> None:
    records, d, names = random_scene(seed)
    res = evaluate_voc(records, d, names)
    for t, key in ((0.5, "AP50"), (0.75, "AP75")):
        ref = _loop_reference(records, d, names, t)
        ours = [res.per_class[n] for n in names] if t == 0.5 else None
        if ours is not None:
            assert ours == pytest.approx(ref)
        kept = [v for v in ref if v is not None]
        assert getattr(res, key) == pytest.approx(float(np.mean(kept)))
    all_t = [np.mean([v for v in _loop_reference(records, d, names, t) if v is not None])
             for t in IOU_THRESHOLDS]
    assert res.AP == pytest.approx(float(np.mean(all_t)))


def _both_evaluators(folder: Path, records, d: Detections, names, year: str):
    """Write `records` as a VOC test split under `folder`, feed `d` to the backend's evaluator
    (detectron2's and the toolkit's); returns the records read back and its output."""
    import torch
    from detectron2.structures import Boxes, Instances

    from smix.io import atomic_write
    from smix.voc import load_voc, write_annotation
    from transfer.d2_backend import VOCEvaluator, register

    voc = folder / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    for r in records:
        atomic_write(voc / "Annotations" / f"{r.image_id}.xml",
                     write_annotation(voc, f"{r.image_id}.jpg", 100, 100, list(r.objects)))
        (voc / "JPEGImages" / f"{r.image_id}.jpg").touch()
    atomic_write(voc / "ImageSets/Main/test.txt", "\n".join(r.image_id for r in records))
    test = load_voc(voc, "test", tuple(names))
    register("voc_eval_parity", test, names, voc, "test", year)
    ev = VOCEvaluator("voc_eval_parity", test, run_d2=True, metric=year_metric(year))
    ev.reset()
    for r in test:
        sel = [i for i, x in enumerate(d.image_ids) if x == r.image_id]
        boxes = Boxes(torch.tensor(d.boxes[sel]).float().reshape(-1, 4))
        inst = Instances((100, 100), pred_boxes=boxes,
                         scores=torch.tensor(d.scores[sel]).float(),
                         pred_classes=torch.tensor(d.labels[sel]).long())
        ev.process([{"image_id": r.image_id}], [{"instances": inst}])
    return test, ev.evaluate()


@pytest.mark.parametrize("year", ["2007", "2012"])
def test_identical_to_detectron2_pascal_voc_evaluator(tmp_path: Path, year: str) -> None:
    """Same detections into detectron2's PascalVOCDetectionEvaluator and the toolkit's: several
    objects per image, duplicates, difficult objects, distinct and tied scores; the year
    registered decides the metric in both (11-point for 2007, area for 2012)."""
    need_detectron2()
    from transfer.d2_backend import d2_rounded

    for seed, tied in ((0, False), (1, False), (2, False), (3, True), (4, True)):
        records, d, names = random_scene(100 + seed, n_images=20, tied=tied)
        assert max(len(r.objects) for r in records) >= 2
        assert (len(np.unique(d.scores)) < len(d.scores)) == tied
        test, out = _both_evaluators(tmp_path / f"s{seed}", records, d, names, year)
        assert out["detectron2"]["AP50"] == pytest.approx(out["toolkit"]["AP50"], abs=1e-9)
        assert out["detectron2"]["AP75"] == pytest.approx(out["toolkit"]["AP75"], abs=1e-9)
        assert out["detectron2"]["AP"] == pytest.approx(out["toolkit"]["AP"], abs=1e-9)
        assert 0 < out["toolkit"]["AP50"] < 100
        # and d2_rounded is only text rounding: the unrounded detections give nearly the same AP
        assert evaluate_voc(test, d, names, year_metric(year)).AP50 == pytest.approx(
            out["toolkit"]["AP50"], abs=2.0)
        assert d2_rounded("x", np.array([[0.04, 1.26, 3.0, 4.0]]), [0.12345], [1])[1].tolist() \
            == [[1.0, 2.3, 3.0, 4.0]]


@pytest.mark.parametrize("year", ["2007", "2012"])
def test_detectron2s_headline_leaves_out_classes_without_ground_truth(tmp_path: Path,
                                                                      year: str) -> None:
    """A class with detections but no (non-difficult) ground truth has no AP: detectron2's means
    would count it as 0 (11-point) or NaN (area); the backend's leave it out, as the toolkit's."""
    need_detectron2()
    records, d, names = random_scene(105, n_images=20)
    records.append(rec("img999", ("bus", (10, 10, 40, 40), False), ("cow", (5, 5, 30, 30), True)))
    names = [*names, "cow", "sheep"]  # cow: one difficult object only; sheep: none at all
    spurious = dets(*[(r.image_id, 3 + k % 2, 0.5 + k / 100, (5.0, 5.0, 30.0, 30.0))
                      for k, r in enumerate(records[:6])])
    d = Detections(d.image_ids + spurious.image_ids, np.concatenate([d.labels, spurious.labels]),
                   np.concatenate([d.scores, spurious.scores]),
                   np.concatenate([d.boxes, spurious.boxes]))
    _, out = _both_evaluators(tmp_path, records, d, names, year)
    toolkit = out["toolkit"]
    assert tuple(toolkit["classes_without_ground_truth"]) == ("cow", "sheep")
    assert 0 < toolkit["AP50"] < 100
    for key in ("AP", "AP50", "AP75"):
        assert out["detectron2"][key] == pytest.approx(toolkit[key], abs=1e-9), key


def test_chunked_overlaps_equal_one_pass() -> None:
    from transfer.voc_eval import _best_overlap, _class_ground_truth
    records, d, names = random_scene(7, n_images=30)
    gt = _class_ground_truth(records, names[0])
    index = np.array([int(i[3:]) for i in d.image_ids])
    boxes = to_voc_boxes(d.boxes)
    one = _best_overlap(gt, index, boxes)
    chunked = _best_overlap(gt, index, boxes, max_pairs=2 * gt.boxes.shape[1])
    np.testing.assert_array_equal(one[0], chunked[0])
    np.testing.assert_array_equal(one[1], chunked[1])
