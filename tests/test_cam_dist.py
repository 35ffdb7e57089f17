"""torchrun with 2 gloo processes on CPU gives what one process gives (export and localize)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from smix.arch import build_model
from smix.checkpoint import BackboneMeta, save_checkpoint
from smix.cli import run
from smix.io import read_json
from smix.shapes import ShapesConfig, generate_shapes

pytestmark = [pytest.mark.dist, pytest.mark.slow]  # ~1 min: torchrun start-up on busy cores


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("camdist")
    generate_shapes(ShapesConfig(root / "shapes", classes=3, per_class=6, size=48), progress=False)
    ckpt = root / "m.safetensors"
    torch.manual_seed(0)
    save_checkpoint(ckpt, build_model("resnet18", 3), BackboneMeta(
        arch="resnet18", num_classes=3, class_names=("circle", "square", "triangle"),
        input_size=48, resize=48, crop=48, method={"name": "mixup"}))
    (root / "shapes" / "val" / "circle" / "zz_broken.jpg").write_bytes(b"junk")
    return {"root": root, "ckpt": ckpt, "shapes": root / "shapes"}


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "cam", *args],
                          capture_output=True, text=True, timeout=300, env=env)


def _pair(setup: dict[str, Path], out: Path, command: list[str]) -> None:
    proc = _torchrun(command + ["--out", str(out / "two"), "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run("cam", command + ["--out", str(out / "one"), "--device", "cpu"]) == 0


def test_export_two_processes_equal_one(setup, tmp_path) -> None:
    cmd = ["export", "--ckpt", str(setup["ckpt"]), "--images", str(setup["shapes"] / "val"),
           "--skip-bad-images", "--batch-size", "4", "--no-progress", "--method", "gradcam"]
    _pair(setup, tmp_path, cmd)
    one, two = (read_json(tmp_path / n / "metrics.json")["results"] for n in ("one", "two"))
    assert one["n_written"] == two["n_written"] == 12
    assert one["n_skipped"] == two["n_skipped"] == 1 and one["skipped"] == two["skipped"]
    strip = lambda r: [{k: v for k, v in i.items() if k != "target_prob"} for i in r]
    assert strip(one["models"][0]["images"]) == strip(two["models"][0]["images"])
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.npy"))
    assert len(files) == 12
    for f in files:
        np.testing.assert_allclose(np.load(tmp_path / "one" / f), np.load(tmp_path / "two" / f),
                                   atol=1e-4)
    assert (tmp_path / "two" / "grid.png").is_file()


def test_localize_two_processes_equal_one(setup, tmp_path) -> None:
    cmd = ["localize", "--ckpt", str(setup["ckpt"]), "--voc-root", str(setup["shapes"]),
           "--batch-size", "3", "--no-progress"]
    _pair(setup, tmp_path, cmd)
    one, two = (read_json(tmp_path / n / "metrics.json")["results"] for n in ("one", "two"))
    assert one["n_images"] == two["n_images"] == 12
    a, b = one["models"][0], two["models"][0]
    for key in ("gt_known_loc", "top1_loc", "top1_cls", "maxboxacc", "n_evaluated"):
        assert a[key] == b[key], key
    assert a["pointing_game"] == pytest.approx(b["pointing_game"], abs=1e-6)
    assert a["boxacc_curve"] == b["boxacc_curve"]
    assert json.dumps(a["checkpoint"]) == json.dumps(b["checkpoint"])


def test_a_bad_image_on_one_rank_fails_every_rank_with_one_line(setup, tmp_path) -> None:
    """The broken file is in rank 0's shard only; rank 1 must not wait for it forever."""
    proc = _torchrun(["export", "--ckpt", str(setup["ckpt"]), "--images",
                      str(setup["shapes"] / "val"), "--out", str(tmp_path / "o"),
                      "--device", "cpu", "--no-progress"])
    assert proc.returncode != 0
    assert "smix cam: error:" in proc.stderr and "zz_broken.jpg: cannot read image" in proc.stderr
    assert proc.stderr.count("zz_broken.jpg: cannot read image") == 1  # not once per process
    assert not (tmp_path / "o" / "metrics.json").exists()
