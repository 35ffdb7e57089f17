"""The whole pipeline, end to end, as a newcomer runs it (quick size)."""

from __future__ import annotations

import csv

import pytest

from smix.cli import main as smix


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert smix(["demo", "--quick", "--out", str(out)]) == 0
    report = out / "report"
    md = (report / "report.md").read_text()
    for title in ("Audit: saliency detectors", "Audit: mixing methods", "Classification",
                  "Detection transfer", "FGSM robustness", "Weakly supervised localisation"):
        assert title in md
    # the audit is the report's first table and first figure
    assert md.index("## Audit: saliency detectors") == md.index("## ")
    assert md.index("![audit_summary]") == md.index("![")
    with open(report / "classification.csv") as f:
        methods = [r["method"] for r in csv.DictReader(f)]
    assert methods[0] == "none" and any(m.startswith("cutmix") for m in methods)
    assert any(m == "saliencymix(detector=frequency_tuned)" for m in methods)
    assert (out / "runs" / "cam-export").is_dir()
    assert "report:" in capsys.readouterr().out
    # Running it again continues rather than redoing: every step is already done.
    import importlib.util
    from smix.demo import QUICK, steps
    n_steps = len(steps(out, QUICK, importlib.util.find_spec("detectron2") is not None))
    assert smix(["demo", "--quick", "--out", str(out)]) == 0
    # the report step always re-runs (it reads whatever runs exist); every other step is skipped
    assert capsys.readouterr().out.count("already done, skipped") == n_steps - 1


def test_class_coloured_shapes_and_their_options(tmp_path, capsys):
    """`--class-colours`: each class's object in its palette colour (± jitter, + JPEG noise);
    `--radius` bounds the box size; bad options are one-line errors."""
    import numpy as np
    from PIL import Image

    from smix.shapes import JITTER, PALETTE
    from smix.voc import load_voc

    out = tmp_path / "s"
    assert smix(["data", "shapes", str(out), "--classes", "2", "--per-class", "4", "--size", "64",
                 "--radius", "0.3,0.35", "--texture", "0", "--class-colours"]) == 0
    for rec in load_voc(out / "VOC2007", "trainval"):
        (obj,) = rec.objects
        x0, y0, x1, y1 = (int(v) for v in obj.bbox)
        width = 2.0 if obj.name == "circle" else 2 ** 0.5  # a square's radius is its corner's
        assert width * 0.3 * 64 - 2 <= x1 - x0 + 1 <= width * 0.35 * 64 + 2
        pixel = np.asarray(Image.open(rec.image_path))[(y0 + y1) // 2 - 1, (x0 + x1) // 2 - 1]
        expected = np.array(PALETTE[("circle", "square").index(obj.name)])
        assert np.abs(pixel.astype(int) - expected).max() <= JITTER + 15
    capsys.readouterr()
    assert smix(["data", "shapes", str(tmp_path / "t"), "--radius", "0.3"]) == 2
    assert "--radius" in capsys.readouterr().err


def test_demo_refuses_a_folder_of_another_size(tmp_path, capsys):
    """`smix demo` after `smix demo --quick` in the same --out would skip every step whose
    output exists and report the smoke run: it stops instead, and deletes nothing."""
    from smix.demo import FULL, QUICK, check_demo_size
    from smix.io import RunDir, write_json

    old = tmp_path / "old"  # a --quick demo from before demo.json: judged by its data
    write_json(old / "data" / "shapes.json", {"classes": ["circle", "square", "triangle"],
                                              "size": QUICK.size})
    RunDir(old / "runs" / "pretrain-none").write_metrics(
        stage="pretrain", kind="classification", results={"epochs_done": 1, "epochs": 1})
    assert smix(["demo", "--out", str(old)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "another size" in err and "another --out" in err
    assert (old / "runs" / "pretrain-none" / "metrics.json").is_file()
    check_demo_size(old, QUICK)  # the same size continues, and is now recorded
    with pytest.raises(Exception, match="another size"):
        check_demo_size(old, FULL)
    new = tmp_path / "new"
    check_demo_size(new, FULL)
    check_demo_size(new, FULL)
    with pytest.raises(Exception, match="another size"):
        check_demo_size(new, QUICK)
