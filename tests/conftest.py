"""Shared fixtures: small synthetic data in the real formats, made by the tests themselves."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from smix.shapes import ShapesConfig, generate_shapes

# One intra-op thread for the whole suite: the tests use tiny tensors, and on a shared 2-core
# machine OpenMP spin-waiting made two threads up to ~15x slower than one (measured).
torch.set_num_threads(1)

D2_MISSING = "detectron2 is not installed in this environment (the set-up builds it: see README)"


def need_detectron2(module_level: bool = False) -> None:
    """Skip a test that needs detectron2 where it is not installed — or fail it when the
    environment says REQUIRE_DETECTRON2=1 (CI), so that its tests cannot quietly not run."""
    if importlib.util.find_spec("detectron2") is not None:
        return
    if os.environ.get("REQUIRE_DETECTRON2") == "1":
        pytest.fail(f"REQUIRE_DETECTRON2=1 but {D2_MISSING}", pytrace=False)
    pytest.skip(D2_MISSING, allow_module_level=module_level)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """3 classes × 8 training images (+4 val each) at 32 px, class folders + VOC copy."""
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(ShapesConfig(root, classes=3, per_class=8, size=32, seed=1), progress=False)
    return root


def write_cifar10(root: Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> Path:
    """CIFAR-10 python pickles as published (`cifar-10-batches-py/`), tiny."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    per = n_train // 5
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(per, 3072), dtype=np.uint8)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": data, "labels": rng.integers(0, 10, per).tolist()}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8),
                     "labels": rng.integers(0, 10, n_test).tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return root



def write_cifar100(root: Path, n_train: int = 20, n_test: int = 10, seed: int = 1) -> Path:
    """CIFAR-100 python pickles as published (`cifar-100-python/train, test, meta`), tiny."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                         "fine_labels": rng.integers(0, 100, n).tolist(),
                         "coarse_labels": rng.integers(0, 20, n).tolist(),
                         "filenames": [f"img_{i}.png" for i in range(n)]}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)],
                     "coarse_label_names": [f"k{i}" for i in range(20)]}, f)
    return root

def blob_batch(mean, std, n: int = 8, size: int = 32, seed: int = 0, margin: int = 3,
               width: float = 10.0) -> torch.Tensor:
    """Normalised textured images, each with one bright Gaussian blob at a random place."""
    from smix.data import normalize

    g = torch.Generator().manual_seed(seed)
    pix = torch.rand(n, 3, size, size, generator=g) * 60 + 40
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        cy, cx = torch.randint(margin, size - margin, (2,), generator=g).tolist()
        pix[i] += 150 * torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / width)
    return normalize(pix.clamp(0, 255).round() / 255, mean, std)


def fresh_kernels(monkeypatch, checked_kernels, kernels) -> None:
    """A `smix.devices.CheckedKernels` loaded with `kernels` (a stand-in), never checked and
    never failed, for this test only."""
    monkeypatch.setattr(checked_kernels, "kernels", kernels)
    monkeypatch.setattr(checked_kernels, "checked", set())
    monkeypatch.setattr(checked_kernels, "failed", None)


# The first lines of an interpreter script whose kernels loop to a runtime bound (`for c in
# range(n)`): Triton's interpreter before 3.8 cannot, under numpy 2 ("only 0-dimensional arrays
# can be converted to Python scalars"; torch 2.11 ships Triton 3.6). There the script stops with
# a skip that `interpreted` raises: the compiled kernel is still checked where it runs, by its
# first-use check and the CUDA tests.
RUNTIME_LOOPS = r"""
import json, sys
import torch
import triton
import triton.language as tl


@triton.jit
def _loop_probe(out_ptr, n):
    total = 0
    for i in range(1, n):
        total += i
    tl.store(out_ptr, total)


_probe = torch.zeros(1, dtype=torch.int32)
try:
    _loop_probe[(1,)](_probe, 4)
except Exception as e:
    print(json.dumps({"skip": f"Triton {triton.__version__}'s interpreter cannot loop to a "
                              f"runtime bound: {e}"}))
    sys.exit(0)
assert int(_probe) == 6
"""


def interpreted(script: str, timeout: int = 600):
    """Run `script` under Triton's interpreter, which runs kernels on CPU tensors, from the
    repository root; TRITON_INTERPRET=1 must be set before Triton is imported, hence a
    subprocess. Returns its last line of output, parsed as JSON; fails with its stderr, and
    skips where the script printed ``{"skip": why}`` (`RUNTIME_LOOPS`), and under numpy 1."""
    if int(np.__version__.split(".")[0]) < 2:
        # the interpreter emulates each kernel op with numpy, as numpy 2 promotes and casts
        # (NEP 50); under numpy 1 its casts overflow ("overflow encountered in cast") and the
        # greedy walk and the GuidedMixup blend get other values than the tensor ops, with
        # Triton 3.8 (torch 2.14) too, while numpy 2.0 passes: not what the GPU computes
        pytest.skip(f"Triton's interpreter needs numpy 2 to emulate kernels (numpy "
                    f"{np.__version__} here)")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    res = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if isinstance(out, dict) and "skip" in out:
        pytest.skip(out["skip"])
    return out


class FailingKernels:
    """Stand-in Triton kernels whose every launch (`kernels.name[grid](...)`) raises `message`,
    as a specialisation that does not compile would."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __getattr__(self, name: str) -> "FailingKernels":
        return self

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError(self.message)
        return launch
