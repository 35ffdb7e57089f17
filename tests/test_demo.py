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
    for title in ("Classification", "Detection transfer", "FGSM robustness",
                  "Weakly supervised localisation"):
        assert title in md
    with open(report / "classification.csv") as f:
        methods = [r["method"] for r in csv.DictReader(f)]
    assert methods[0] == "none" and any(m.startswith("cutmix") for m in methods)
    assert any(m.startswith("saliencymix") for m in methods)
    assert (out / "runs" / "cam-export").is_dir()
    assert "report:" in capsys.readouterr().out
    # Running it again continues rather than redoing: every step is already done.
    import importlib.util
    from smix.demo import QUICK, steps
    n_steps = len(steps(out, QUICK, importlib.util.find_spec("detectron2") is not None))
    assert smix(["demo", "--quick", "--out", str(out)]) == 0
    # the report step always re-runs (it reads whatever runs exist); every other step is skipped
    assert capsys.readouterr().out.count("already done, skipped") == n_steps - 1
