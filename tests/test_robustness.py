"""robustness/: attacks against closed-form and torchattacks references, the preprocessing
contract (normalise once, eval mode), run-level numbers against direct computation, corruption
readers and mCE, bad input, and the sharded (torchrun) run against the single-process one."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from smix.arch import build_model
from smix.checkpoint import BackboneMeta, load_backbone, save_checkpoint
from smix.cli import run as cli_run
from smix.data import ClassFolder, eval_transform, read_cifar
from smix.errors import UserError
from smix.shapes import ShapesConfig, generate_shapes
from robustness import adversarial as adversarial_mod
from robustness.adversarial import AttackConfig, batch_seed, commit_chunks, run_attack
from robustness.attacks import AttackParams, get_attack, list_attacks
from robustness.common import PROGRESS_FILE, group_by_transform
from robustness.corruption import (CorruptionConfig, mean_corruption_error, relative_mce,
                                   run_corruption)
from robustness import corruption as corruption_mod
from robustness.corruption_data import scan_cifar_c, scan_imagenet_c
from robustness.data import shard_batches, subset_indices
from robustness.model import Normalized, load_for_eval
from tests.conftest import write_cifar10, write_cifar100

CLASSES = ("circle", "square", "triangle")
SIZE = 32
REPO = Path(__file__).resolve().parent.parent


def make_ckpt(path: Path, seed: int, classes=CLASSES, arch="resnet18", **meta_kw) -> Path:
    torch.manual_seed(seed)
    kw = dict(input_size=SIZE, resize=SIZE, crop=SIZE, dataset="shapes",
              method={"name": f"m{seed}"}, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))
    kw.update(meta_kw)
    meta = BackboneMeta(arch=arch, num_classes=len(classes), class_names=tuple(classes), **kw)
    return save_checkpoint(path, build_model(arch, len(classes)), meta)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rob")
    generate_shapes(ShapesConfig(out=root / "shapes", classes=3, per_class=6, size=SIZE, seed=1))
    return {"root": root, "val": root / "shapes" / "val",
            "a": make_ckpt(root / "a.safetensors", 1), "b": make_ckpt(root / "b.safetensors", 2)}


def images_labels(seed: int = 0, n: int = 6, k: int = 3, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    x[:, :, 0, 0], x[:, :, 0, 1] = 0.0, 1.0  # pixels at both ends of the range
    return x, torch.randint(0, k, (n,), generator=g)


# --- attacks ------------------------------------------------------------------------------------

def linear_two_class():
    """A two-class linear model behind the normalisation, 5 images and their labels, and the
    sign of d(CE)/dx per image: that of (W_other - W_true) / std, whatever x is."""
    g = torch.Generator().manual_seed(3)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    with torch.no_grad():
        lin[1].weight.copy_(torch.randn(2, 192, generator=g) * 0.01)
        lin[1].bias.zero_()
    model = Normalized(lin, (0.5, 0.4, 0.3), (0.2, 0.3, 0.25)).eval()
    x, y = images_labels(n=5, k=2, size=8)
    w = lin[1].weight.detach().view(2, 3, 8, 8)
    direction = torch.stack([torch.sign(w[1 - t] - w[t]) for t in y.tolist()])
    return model, x, y, direction


@pytest.mark.parametrize("impl", ["shared-grad", "torchattacks"])
def test_fgsm_equals_closed_form_on_linear_model(impl):
    """Two-class linear model: d(CE)/dx has the sign of (W_other - W_true) / std, so the FGSM image
    is clip(x + eps * sign(W_other - W_true), 0, 1) whatever x is."""
    model, x, y, direction = linear_two_class()
    assert (direction != 0).all()
    eps = [1 / 255, 8 / 255, 0.5]
    _, attack = get_attack("fgsm", impl)
    out = attack(model, x, y, eps, AttackParams(), 0)
    for e, adv in zip(eps, out.adversarial):
        assert torch.equal(adv, torch.clamp(x + e * direction, 0, 1))


@pytest.mark.parametrize("step,steps,eps,moved", [(1, 2, 4, 2), (1, 10, 4, 4), (2, 3, 16, 6)])
def test_pgd_equals_closed_form_on_linear_model(step, steps, eps, moved):
    """The two-class linear model's input gradient has a constant sign d (see the FGSM test),
    so PGD without random start walks `steps` steps of `step` along d, projected on the
    ε-ball and on [0,1]: clip(x + min(steps·step, ε)·d, 0, 1), all in /255."""
    model, x, y, direction = linear_two_class()
    params = AttackParams(step=step / 255, steps=steps, random_start=False)
    adv = next(get_attack("pgd")[1](model, x, y, [eps / 255], params, 0).adversarial)
    torch.testing.assert_close(adv, torch.clamp(x + moved / 255 * direction, 0, 1),
                               atol=1e-6, rtol=0)


def test_shared_grad_fgsm_equals_torchattacks_on_resnet():
    torch.manual_seed(0)
    model = Normalized(build_model("resnet18", 3), (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)).eval()
    x, y = images_labels(size=SIZE)
    eps = [1 / 255, 2 / 255, 8 / 255]
    shared = get_attack("fgsm", "shared-grad")[1](model, x, y, eps, AttackParams(), 0)
    ref = get_attack("fgsm", "torchattacks")[1](model, x, y, eps, AttackParams(), 0)
    assert ref.clean_logits is None
    with torch.no_grad():
        assert torch.allclose(shared.clean_logits, model(x), atol=1e-5)
    for a, b in zip(shared.adversarial, ref.adversarial):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name,impl", [("fgsm", "shared-grad"), ("fgsm", "torchattacks"),
                                       ("pgd", "torchattacks")])
def test_perturbation_within_eps_and_pixels_in_range(name, impl):
    torch.manual_seed(1)
    model = Normalized(build_model("resnet18", 3), (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)).eval()
    x, y = images_labels(size=SIZE)
    x_before = x.clone()
    eps = [1 / 255, 4 / 255, 16 / 255]
    out = get_attack(name, impl)[1](model, x, y, eps, AttackParams(step=2 / 255, steps=3), 7)
    for e, adv in zip(eps, out.adversarial):
        assert adv.shape == x.shape and not adv.requires_grad
        assert float((adv - x).abs().max()) <= e + 1e-6
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
        assert float((adv - x).abs().max()) > e / 2  # it did move
    assert torch.equal(x, x_before)  # inputs not mutated


def test_pgd_single_full_step_is_fgsm_and_random_start_is_seeded():
    torch.manual_seed(2)
    model = Normalized(build_model("resnet18", 3), (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)).eval()
    x, y = images_labels(size=SIZE)
    e = 4 / 255
    pgd = get_attack("pgd")[1]
    one_step = next(pgd(model, x, y, [e], AttackParams(step=e, steps=1, random_start=False), 0)
                    .adversarial)
    fgsm = next(get_attack("fgsm")[1](model, x, y, [e], AttackParams(), 0).adversarial)
    assert torch.allclose(one_step, fgsm, atol=1e-6)
    p = AttackParams(step=1 / 255, steps=2, random_start=True)
    state = torch.get_rng_state()
    a = next(pgd(model, x, y, [e], p, 11).adversarial)
    b = next(pgd(model, x, y, [e], p, 11).adversarial)
    c = next(pgd(model, x, y, [e], p, 12).adversarial)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is left alone


class RangeProbe(nn.Module):
    """Fails unless it sees inputs normalised exactly once, in eval mode."""

    def __init__(self, lo: float, hi: float):
        super().__init__()
        self.lo, self.hi, self.seen = lo, hi, []
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        assert not self.training, "attacked in training mode"
        lo, hi = float(x.detach().min()), float(x.detach().max())
        assert self.lo - 1e-5 <= lo and hi <= self.hi + 1e-5, \
            f"input range [{lo}, {hi}] is not normalised once"
        self.seen.append((lo, hi))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("name,impl", [("fgsm", "shared-grad"), ("fgsm", "torchattacks"),
                                       ("pgd", "torchattacks")])
def test_normalisation_applied_exactly_once(name, impl):
    # mean 0.5, std 0.25: [0,1] pixels become [-2, 2]; twice would give [-10, 6], never [0, 1]
    probe = RangeProbe(-2.0, 2.0)
    model = Normalized(probe, (0.5,) * 3, (0.25,) * 3).eval()
    x, y = images_labels()
    out = get_attack(name, impl)[1](model, x, y, [8 / 255], AttackParams(steps=2), 0)
    list(out.adversarial)
    assert probe.seen and min(lo for lo, _ in probe.seen) == pytest.approx(-2.0, abs=1e-5)
    assert max(hi for _, hi in probe.seen) == pytest.approx(2.0, abs=1e-5)


def test_load_for_eval_normalises_once_in_eval_mode(world):
    wrapped, meta = load_for_eval(world["a"], torch.device("cpu"))
    plain, _ = load_backbone(world["a"])
    x, _ = images_labels(size=SIZE)
    assert not wrapped.training and not any(p.requires_grad for p in wrapped.parameters())
    m, s = torch.tensor(meta.mean).view(1, 3, 1, 1), torch.tensor(meta.std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(wrapped(x), plain((x - m) / s), atol=1e-6)


def test_registry_lists_attacks_and_rejects_unknown():
    assert {"fgsm", "pgd"} <= set(list_attacks())
    with pytest.raises(UserError, match="valid: .*fgsm"):
        get_attack("nope")
    with pytest.raises(UserError, match="valid: shared-grad, torchattacks"):
        get_attack("fgsm", "magic")


# --- data plumbing --------------------------------------------------------------------------------

def test_subset_and_batch_shards_cover_exactly():
    assert subset_indices(10, 4) == [0, 2, 5, 7]
    assert subset_indices(3, 10) == [0, 1, 2]
    idx = subset_indices(23, None)
    for world_size in (1, 2, 3, 5):
        shards = [shard_batches(idx, 4, r, world_size) for r in range(world_size)]
        assert [i for s in shards for i in s.indices] == idx
        for s in shards:
            assert s.indices == tuple(idx[s.first_batch * 4: s.first_batch * 4 + len(s.indices)])


def test_group_by_transform():
    def meta(resize, crop):
        return BackboneMeta(arch="resnet18", num_classes=1, class_names=("a",), resize=resize, crop=crop)
    assert group_by_transform([meta(32, 32), meta(36, 32), meta(32, 32)]) == [[0, 2], [1]]


# --- whole runs -------------------------------------------------------------------------------------

def direct_clean_top1(ckpt: Path, val: Path) -> float:
    """Reference: the checkpoint's own eval transform with normalisation, no wrapper."""
    model, meta = load_backbone(ckpt)
    ds = ClassFolder(val, transform=eval_transform(meta), classes=meta.class_names)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        pred = model(x).argmax(1)
    return 100.0 * float((pred == torch.tensor(ds.targets)).float().mean())


def direct_fgsm_top1(ckpt: Path, val: Path, eps255: float) -> float:
    """Reference: torchattacks' FGSM on the bare model, told the checkpoint's normalisation
    (`set_normalization_used`, not the toolkit's `Normalized` wrapper), on the [0,1] pixels of
    the checkpoint's eval transform; top-1 of the adversarial images."""
    import torchattacks

    model, meta = load_backbone(ckpt)
    model.eval()
    ds = ClassFolder(val, transform=eval_transform(meta, normalize=False), classes=meta.class_names)
    x, y = torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor(ds.targets)
    attack = torchattacks.FGSM(model, eps=eps255 / 255)
    attack.set_normalization_used(mean=list(meta.mean), std=list(meta.std))
    adv = attack(x, y)
    m, s = torch.tensor(meta.mean).view(1, 3, 1, 1), torch.tensor(meta.std).view(1, 3, 1, 1)
    with torch.no_grad():
        pred = model((adv - m) / s).argmax(1)
    return 100.0 * float((pred == y).float().mean())


def test_fgsm_run_eps0_is_clean_and_numbers_trace(world, tmp_path):
    out = tmp_path / "run"
    cfg = AttackConfig(attack="fgsm", checkpoints=(world["a"], world["b"]), data=world["val"],
                       out=out, eps=(0.0, 8.0), batch_size=5, workers=0, device="cpu")
    res = run_attack(cfg)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["stage"] == "robustness" and saved["kind"] == "fgsm"
    assert saved["results"] == json.loads(json.dumps(res))
    assert res["n_images"] == 12 and res["passes"] == 1 and res["eps"] == [0.0, 8.0]
    for m, ck in zip(res["models"], (world["a"], world["b"])):
        assert m["adversarial"]["0"] == m["clean"]
        assert m["clean_acc"] == pytest.approx(direct_clean_top1(ck, world["val"]))
        assert m["robust_acc"] == m["adversarial"]["8"]["top1"]
        # the adversarial number itself, against torchattacks run directly on the model
        assert m["robust_acc"] == pytest.approx(direct_fgsm_top1(ck, world["val"], 8.0))
        assert m["clean"]["top5"] == 100.0  # 3 classes
        assert m["checkpoint"]["sha256"] and m["architecture"] == "resnet18"
    assert (out / "accuracy_vs_eps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "config.json").read_text())["attack"] == "fgsm"


def test_fgsm_reads_the_cifar_test_pickles(tmp_path, capsys):
    """CIFAR models are attacked on the test set of the python pickles, as pretrain read it
    (it asked for class folders); a root holding both sets gives each checkpoint its own."""
    import torchattacks

    root = tmp_path / "cifar"
    write_cifar10(root, n_test=10)
    write_cifar100(root, n_test=6)
    c10 = make_ckpt(tmp_path / "c10.safetensors", 4, classes=tuple(f"c{i}" for i in range(10)),
                    input_size=32, resize=32, crop=32, dataset="cifar10")
    c100 = make_ckpt(tmp_path / "c100.safetensors", 5, input_size=32, resize=32, crop=32,
                     classes=tuple(f"f{i}" for i in range(100)), dataset="cifar100")
    for ck, kind, n in ((c10, "cifar10", 10), (c100, "cifar100", 6)):
        out = tmp_path / kind
        assert cli_run("robustness", ["fgsm", "--ckpt", str(ck), "--data", str(root), "--eps",
                                      "2,8", "--out", str(out), "--workers", "0",
                                      "--device", "cpu", "--batch-size", "4"]) == 0
        r = json.loads((out / "metrics.json").read_text())["results"]
        m = r["models"][0]
        assert r["n_images"] == n
        # reference: the pickle's pixels in [0,1] (32x32 models: no resize), torchattacks on
        # the bare model told the normalisation, labels as the pickle stores them
        pixels, labels, _ = read_cifar(root, train=False, kind=kind)
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
        y = torch.from_numpy(labels)
        model, meta = load_backbone(ck)
        model.eval()
        mean = torch.tensor(meta.mean).view(1, 3, 1, 1)
        std = torch.tensor(meta.std).view(1, 3, 1, 1)
        with torch.no_grad():
            clean = 100 * float((model((x - mean) / std).argmax(1) == y).float().mean())
        assert m["clean_acc"] == pytest.approx(clean)
        for eps in (2, 8):
            attack = torchattacks.FGSM(model, eps=eps / 255)
            attack.set_normalization_used(mean=list(meta.mean), std=list(meta.std))
            adv = attack(x, y)
            with torch.no_grad():
                top1 = 100 * float((model((adv - mean) / std).argmax(1) == y).float().mean())
            assert m["adversarial"][str(eps)]["top1"] == pytest.approx(top1)
    capsys.readouterr()
    # a CIFAR-10 model where only CIFAR-100's pickles are: one line, nothing written
    only100 = tmp_path / "only100"
    write_cifar100(only100)
    code, err = cli(["fgsm", "--ckpt", str(c10), "--data", str(only100), "--out",
                     str(tmp_path / "x"), "--device", "cpu"], capsys)
    assert code == 2 and "\n" not in err and "cifar10 asked, but only cifar100" in err
    assert not (tmp_path / "x").exists()


def test_a_killed_pgd_run_on_the_cifar_pickles_resumes(tmp_path, monkeypatch, capsys):
    """PGD on the CIFAR pickles, 2 loader workers (the dataset is pickled to them) and
    --limit: killed in its 4th batch, --resume refuses pickles whose pixels changed since
    (CIFAR.digest) and otherwise gives the uninterrupted run's numbers."""
    root = write_cifar10(tmp_path / "cifar", n_test=14)
    ck = make_ckpt(tmp_path / "c10.safetensors", 4, classes=tuple(f"c{i}" for i in range(10)),
                   input_size=32, resize=32, crop=32, dataset="cifar10")
    args = ["pgd", "--ckpt", str(ck), "--data", str(root), "--eps", "2,8", "--steps", "2",
            "--batch-size", "2", "--limit", "12", "--workers", "2", "--device", "cpu"]
    assert cli_run("robustness", args + ["--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())["results"]
    assert (whole["n_images"], whole["dataset"]) == (12, "cifar10")
    attacked = kill_at_attack(monkeypatch, 4)
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        cli_run("robustness", args + ["--out", str(out)])
    assert json.loads((out / PROGRESS_FILE).read_text())["done"]["0"]["batches"] == 3
    capsys.readouterr()
    pickle_file = root / "cifar-10-batches-py" / "test_batch"
    kept = pickle_file.read_bytes()
    batch = pickle.loads(kept)
    batch["data"][0, 0] ^= 1  # one pixel of one image
    pickle_file.write_bytes(pickle.dumps(batch))
    assert cli_run("robustness", args + ["--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot resume with other image names than the run's" in err
    pickle_file.write_bytes(kept)
    attacked.clear()
    assert cli_run("robustness", args + ["--out", str(out), "--resume"]) == 0
    assert attacked == [batch_seed(0, b) for b in range(3, 6)]
    assert _numbers(out / "metrics.json") == _numbers(tmp_path / "whole" / "metrics.json")


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_run_hands_the_attack_eps_and_step_in_255ths(world, tmp_path, monkeypatch, attack):
    """The config speaks /255 (eps 2 and 8, step 2): the attack must get 2/255, 8/255 and a
    step of 2/255 in [0,1] pixel units (both implementations run the same conversion)."""
    seen = []
    impl, real = get_attack(attack)

    def spy(model, images, labels, eps01, params, seed):
        seen.append((list(eps01), params))
        return real(model, images, labels, eps01, params, seed)

    monkeypatch.setattr(adversarial_mod, "get_attack", lambda name, _=None: (impl, spy))
    res = run_attack(AttackConfig(attack=attack, checkpoints=(world["a"],), data=world["val"],
                                  out=tmp_path / "run", eps=(2.0, 8.0), step=2.0, steps=4,
                                  batch_size=6, limit=6, workers=0, device="cpu"))
    assert len(seen) == 1
    eps01, params = seen[0]
    assert eps01 == pytest.approx([2 / 255, 8 / 255], rel=1e-12)
    assert params.step == pytest.approx(2 / 255, rel=1e-12) and params.steps == 4
    assert res["eps"] == [2.0, 8.0]


def test_two_transforms_two_passes_and_impls_agree(world, tmp_path):
    other = make_ckpt(tmp_path / "c.safetensors", 3, resize=36)
    base = dict(attack="fgsm", data=world["val"], eps=(2.0, 8.0), batch_size=6, workers=0,
                device="cpu", limit=9)
    r1 = run_attack(AttackConfig(checkpoints=(world["a"], other), out=tmp_path / "r1", **base))
    r2 = run_attack(AttackConfig(checkpoints=(world["a"],), out=tmp_path / "r2",
                                 impl="torchattacks", **base))
    assert r1["passes"] == 2 and r1["n_images"] == 9
    assert len((tmp_path / "r1" / "log.jsonl").read_text().splitlines()) == 2
    assert r2["impl"] == "torchattacks"
    for key in ("clean", "adversarial"):
        assert r1["models"][0][key] == r2["models"][0][key]


def test_pgd_step_budget_short_of_eps_warns_and_is_recorded(world, tmp_path, capsys):
    """10 steps of 1/255 reach at most 10/255: ε = 16 is under-attacked. The step is kept as
    given; the warning is one line on stderr and the ε is listed in metrics.json."""
    base = dict(attack="pgd", checkpoints=(world["a"],), data=world["val"], batch_size=6,
                limit=2, workers=0, device="cpu", steps=2)
    res = run_attack(AttackConfig(out=tmp_path / "short", eps=(1.0, 4.0, 16.0), **base))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "under-attacked" in line]
    assert len(lines) == 1 and "2 steps of 1/255 move at most 2/255" in lines[0]
    assert "ε = 4, 16/255" in lines[0] and "2.5·ε/steps gives --step 20 for ε = 16" in lines[0]
    assert res["under_attacked_eps"] == [4.0, 16.0] and res["warnings"] == [lines[0]]
    assert res["params"] == {"step": 1.0, "steps": 2, "random_start": True}  # kept as given
    saved = json.loads((tmp_path / "short" / "metrics.json").read_text())["results"]
    assert saved["under_attacked_eps"] == [4.0, 16.0]
    ok = run_attack(AttackConfig(out=tmp_path / "ok", eps=(4.0,), step=2.0, **base))
    assert ok["under_attacked_eps"] == [] and ok["warnings"] == []
    assert "under-attacked" not in capsys.readouterr().err


def test_rerun_into_the_same_folder_replaces_the_previous_record(world, tmp_path):
    out = tmp_path / "run"
    base = dict(attack="fgsm", checkpoints=(world["a"],), data=world["val"], out=out,
                batch_size=6, limit=3, workers=0, device="cpu")
    run_attack(AttackConfig(eps=(8.0,), **base))
    (out / "notes.txt").write_text("mine")
    res = run_attack(AttackConfig(eps=(2.0,), **base))
    log = (out / "log.jsonl").read_text().splitlines()
    assert len(log) == 1 and json.loads(log[0])["pass"] == 0  # not appended to the first run's
    assert json.loads((out / "metrics.json").read_text())["results"]["eps"] == res["eps"] == [2.0]
    assert json.loads((out / "config.json").read_text())["eps"] == [2.0]
    assert (out / "notes.txt").read_text() == "mine"


def test_commit_chunks_cover_the_rest_in_whole_rounds_of_batches():
    for n, world_size, start in [(782, 1, 0), (782, 3, 100), (6, 2, 0), (5, 4, 3), (1, 1, 0)]:
        chunks = commit_chunks(start, n, world_size)
        assert [b for c in chunks for b in c] == list(range(start, n))  # each batch once, in order
        assert all(len(c) % world_size == 0 for c in chunks[:-1])  # every process has work
    # 782 batches: chunks of ceil(782 / 20) = 40 -> 20 chunks; with 8 processes 5 each -> 40 again;
    # with 64, one batch each: chunks of 64 -> ceil(782 / 64) = 13
    assert [len(commit_chunks(0, 782, w)) for w in (1, 8, 64)] == [20, 20, 13]
    assert len(commit_chunks(0, 782, 8)[0]) == 40
    assert commit_chunks(6, 6, 2) == []


def test_a_killed_pgd_run_resumes_from_its_last_commit(world, tmp_path, monkeypatch, capsys):
    """Two passes (two transforms) over 12 images in batches of 2: one commit per batch. The run
    is killed in pass 1's 4th batch; --resume attacks only the batches after the last commit and
    gives an uninterrupted run's numbers, PGD's random starts included."""
    other = make_ckpt(tmp_path / "c.safetensors", 3, resize=36)
    val = tmp_path / "val"
    shutil.copytree(world["val"], val)
    args = ["pgd", "--ckpt", str(world["a"]), "--ckpt", str(world["b"]), "--ckpt", str(other),
            "--data", str(val), "--eps", "2,8", "--steps", "2", "--batch-size", "2",
            "--workers", "0", "--device", "cpu"]
    assert cli_run("robustness", args + ["--out", str(tmp_path / "whole")]) == 0
    attacked = kill_at_attack(monkeypatch, 7)  # a, b of batches 0-2, a of 3
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        cli_run("robustness", args + ["--out", str(out)])
    progress = json.loads((out / PROGRESS_FILE).read_text())
    assert progress["kind"] == "pgd" and progress["done"]["0"]["batches"] == 3
    assert not (out / "metrics.json").exists()
    capsys.readouterr()
    for change, what in [(["--seed", "1"], "seed"), (["--steps", "3"], "steps"),
                         (["--batch-size", "3"], "batch_size"), (["--limit", "5"], "limit")]:
        flags = args + change + ["--out", str(out), "--resume"]
        assert cli_run("robustness", flags) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"cannot resume with other {what} than the run's" in err
    # the folder changed between the kill and the resume: one image fewer, or one renamed
    image = sorted((val / "circle").iterdir())[0]
    for change, what in [(lambda: image.rename(tmp_path / "away.png"), "images"),
                         (lambda: (tmp_path / "away.png").rename(val / "square" / "x.png"),
                          "image names")]:
        change()
        assert cli_run("robustness", args + ["--out", str(out), "--resume"]) == 2
        assert f"cannot resume with other {what} than the run's" in capsys.readouterr().err
    (val / "square" / "x.png").rename(image)
    attacked.clear()
    assert cli_run("robustness", args + ["--out", str(out), "--resume"]) == 0
    # pass 1: batches 3-5 of a and b; pass 2: all 6 batches of c; the seeds are the batches'
    assert attacked == [batch_seed(0, b) for b in (3, 3, 4, 4, 5, 5)] + \
        [batch_seed(0, b) for b in range(6)]
    assert _numbers(out / "metrics.json") == _numbers(tmp_path / "whole" / "metrics.json")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["resumed_at_batch"] for r in log] == [3, 0]
    # a fresh run into the folder forgets the progress; a folder of another kind is refused
    assert cli_run("robustness", args + ["--out", str(tmp_path / "new"), "--resume"]) == 2
    assert "nothing to resume (no progress.json)" in capsys.readouterr().err
    fgsm = ["fgsm"] + args[1:args.index("--steps")] + args[args.index("--batch-size"):]
    assert cli_run("robustness", fgsm + ["--out", str(out), "--resume"]) == 2
    assert ("killed holds another run (its metrics.json: stage robustness, kind pgd)"
            in capsys.readouterr().err)
    (out / "metrics.json").unlink()  # a pgd run killed before its end
    assert cli_run("robustness", fgsm + ["--out", str(out), "--resume"]) == 2
    assert "progress.json: not a fgsm run's progress record" in capsys.readouterr().err


# --- corruptions ------------------------------------------------------------------------------------

def test_mce_hand_computed():
    errs = {"gaussian_noise": [0.5] * 5, "fog": [0.2, 0.4, 0.6, 0.8, 1.0], "spatter": [0.9] * 5}
    ce_g, ce_f = 0.5 / 0.886428, 0.6 / 0.819324  # spatter has no AlexNet reference: not in mCE
    assert mean_corruption_error(errs) == pytest.approx((ce_g + ce_f) / 2, rel=1e-12)
    assert mean_corruption_error(errs) == pytest.approx(0.6481863, rel=1e-6)  # (0.5640618 + 0.7323110) / 2
    r = ((0.5 - 0.1) / (0.886428 - 0.43478) + (0.6 - 0.1) / (0.819324 - 0.43478)) / 2
    assert relative_mce(errs, 0.1) == pytest.approx(r, rel=1e-12)
    assert relative_mce(errs, None) is None
    # AlexNet's top-1 error per corruption and severity 1..5 on ImageNet-C (Hendrycks &
    # Dietterich 2019; the per-severity table ImageNet-C evaluation code distributes), not the
    # module's per-corruption means: fed through the mCE formula, AlexNet scores 100%.
    per_severity = {
        "gaussian_noise": (0.69528, 0.82542, 0.93554, 0.98138, 0.99452),
        "shot_noise": (0.71224, 0.85108, 0.93574, 0.98182, 0.99146),
        "impulse_noise": (0.78374, 0.89808, 0.9487, 0.9872, 0.99548),
        "defocus_blur": (0.65624, 0.73202, 0.85036, 0.91364, 0.94714),
        "glass_blur": (0.64308, 0.75054, 0.88806, 0.91622, 0.93344),
        "motion_blur": (0.5843, 0.70048, 0.82108, 0.8975, 0.92638),
        "zoom_blur": (0.70008, 0.76992, 0.80784, 0.84198, 0.87198),
        "snow": (0.71726, 0.88392, 0.86468, 0.9187, 0.94952),
        "frost": (0.6139, 0.79734, 0.8879, 0.89942, 0.9343),
        "fog": (0.67474, 0.7605, 0.84378, 0.8726, 0.945),
        "brightness": (0.4514, 0.48502, 0.54048, 0.62166, 0.7244),
        "contrast": (0.64548, 0.7615, 0.88874, 0.9776, 0.9927),
        "elastic_transform": (0.52596, 0.70116, 0.55686, 0.64076, 0.80554),
        "pixelate": (0.52218, 0.5462, 0.73728, 0.87092, 0.91262),
        "jpeg_compression": (0.51002, 0.54718, 0.57294, 0.65458, 0.74778)}
    assert mean_corruption_error(per_severity) == pytest.approx(1.0, abs=1e-9)
    assert relative_mce(per_severity, 0.43478) == pytest.approx(1.0, abs=1e-9)  # 1 - 0.56522
    # half of AlexNet's error on gaussian noise, the rest equal: mCE = 1 - 0.5/15
    half = {**per_severity, "gaussian_noise": tuple(e / 2 for e in per_severity["gaussian_noise"])}
    assert mean_corruption_error(half) == pytest.approx(1 - 0.5 / 15, abs=1e-9)


def test_mean_error_averages_the_benchmark_corruptions_only():
    """The unnormalised mean corruption error (CIFAR-C's headline): the mean over the 15
    benchmark corruptions evaluated of their mean over severities; ImageNet-C's 4 extra
    corruptions (spatter, ...) stay out unless nothing else was evaluated."""
    errs = {"gaussian_noise": [0.5] * 5, "fog": [0.2, 0.4, 0.6, 0.8, 1.0], "spatter": [0.9] * 5}
    assert corruption_mod.mean_error(errs) == pytest.approx((0.5 + 0.6) / 2, rel=1e-12)
    assert corruption_mod.mean_error({"spatter": [0.9] * 5, "speckle_noise": [0.3] * 5}) \
        == pytest.approx(0.6, rel=1e-12)


def write_imagenet_c(root: Path, val: Path, corruptions=("gaussian_noise", "fog"), skip=None):
    """Noisy copies of the val images in the ImageNet-C layout (noise grows with severity)."""
    rng = np.random.default_rng(0)
    for c in corruptions:
        for s in range(1, 6):
            if skip == (c, s):
                continue
            for f in sorted(val.glob("*/*.jpg")):
                img = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)
                noisy = np.clip(img + rng.normal(0, 25 * s, img.shape), 0, 255).astype(np.uint8)
                dst = root / c / str(s) / f.parent.name / (f.stem + ".JPEG")
                dst.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(noisy).save(dst, quality=90)
    (root / "README_stuff").mkdir(parents=True, exist_ok=True)


def direct_error(model: nn.Module, meta: BackboneMeta, folder: Path) -> float:
    ds = ClassFolder(folder, transform=eval_transform(meta), classes=meta.class_names)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) != torch.tensor(ds.targets)).float().mean())


def test_imagenet_c_run_matches_direct_errors(world, tmp_path):
    root = tmp_path / "imagenet-c"
    write_imagenet_c(root, world["val"])
    splits, ignored = scan_imagenet_c(root)
    assert [(s.corruption, s.severity) for s in splits][:6] == \
        [("gaussian_noise", s) for s in range(1, 6)] + [("fog", 1)]
    assert len(splits) == 10 and ignored == ["README_stuff"]
    cfg = CorruptionConfig(checkpoints=(world["a"],), data=root, out=tmp_path / "run",
                           clean=world["val"], batch_size=5, workers=0, device="cpu")
    res = run_corruption(cfg)
    m = res["models"][0]
    assert res["layout"] == "imagenet-c" and not res["complete"]
    assert res["corruptions"] == ["gaussian_noise", "fog"] and len(res["corruptions_missing"]) == 13
    per = {c: [m["per_corruption"][c][str(s)] / 100 for s in range(1, 6)] for c in res["corruptions"]}
    model, meta = load_backbone(world["a"])
    for c in res["corruptions"]:
        for s in range(1, 6):
            assert m["per_corruption"][c][str(s)] == pytest.approx(
                direct_error(model, meta, root / c / str(s)))
    clean = direct_error(model, meta, world["val"])
    assert m["clean_error"] == pytest.approx(clean)
    assert m["mCE"] == pytest.approx(100 * mean_corruption_error(per))
    assert m["relative_mCE"] == pytest.approx(100 * relative_mce(per, clean / 100))
    assert m["mean_error"] == pytest.approx(np.mean([np.mean(v) for v in per.values()]) * 100)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["kind"] == "corruption"


class Killed(Exception):
    pass


def kill_at_attack(monkeypatch, call: int) -> list[int]:
    """Make the `call`-th checkpoint-batch attack raise `Killed` (once: a resumed run goes on);
    returns the list of the batch seeds attacked, which grows as the runs go."""
    attacked, state = [], {"kill": True}
    real = adversarial_mod.attack_counts

    def attack_counts(model, attack, images, labels, eps01, params, seed):
        attacked.append(seed)
        if len(attacked) == call and state.pop("kill", False):
            raise Killed
        return real(model, attack, images, labels, eps01, params, seed)

    monkeypatch.setattr(adversarial_mod, "attack_counts", attack_counts)
    return attacked


def test_a_killed_corruption_run_resumes_from_its_finished_splits(world, tmp_path, monkeypatch,
                                                                  capsys):
    root = tmp_path / "imagenet-c"
    write_imagenet_c(root, world["val"])
    args = ["corruption", "--ckpt", str(world["a"]), "--ckpt", str(world["b"]), "--data",
            str(root), "--clean", str(world["val"]), "--batch-size", "4", "--workers", "0",
            "--device", "cpu"]
    assert cli_run("robustness", args + ["--out", str(tmp_path / "whole")]) == 0
    evaluated = []
    real = corruption_mod._SplitData.batches

    def batches(self, info, cfg):  # the run is killed while the 5th split is evaluated
        evaluated.append(corruption_mod.split_key(self.split))
        if len(evaluated) == 5 and not cfg.resume:
            raise Killed
        return real(self, info, cfg)

    monkeypatch.setattr(corruption_mod._SplitData, "batches", batches)
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        cli_run("robustness", args + ["--out", str(out)])
    # both checkpoints share one transform: one pass, 11 splits (clean + 2 x 5)
    progress = json.loads((out / PROGRESS_FILE).read_text())
    assert list(progress["done"]) == evaluated[:4] and not (out / "metrics.json").exists()
    evaluated.clear()
    capsys.readouterr()
    assert cli_run("robustness", args + ["--out", str(out), "--corruptions", "fog",
                                         "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot resume with other splits than the run's" in err
    image = next((root / "gaussian_noise" / "1").rglob("*.JPEG"))  # a finished split changed
    image.rename(tmp_path / "away.JPEG")
    assert cli_run("robustness", args + ["--out", str(out), "--resume"]) == 2
    assert "11 images to evaluate now, 12 when the killed run counted" in capsys.readouterr().err
    (tmp_path / "away.JPEG").rename(image.with_name("z" + image.name))  # same count, renamed
    assert cli_run("robustness", args + ["--out", str(out), "--resume"]) == 2
    assert "other image files than when the killed run counted them" in capsys.readouterr().err
    image.with_name("z" + image.name).rename(image)
    evaluated.clear()
    assert cli_run("robustness", args + ["--out", str(out), "--resume"]) == 0
    assert len(evaluated) == 11 - 4 and evaluated[0] == "gaussian_noise/4"  # only the rest
    assert _numbers(out / "metrics.json") == _numbers(tmp_path / "whole" / "metrics.json")
    assert cli_run("robustness", args + ["--out", str(tmp_path / "new"), "--resume"]) == 2
    assert "nothing to resume (no progress.json)" in capsys.readouterr().err


def write_cifar_c(root: Path, n: int = 8, k: int = 10, names=("snow", "contrast")) -> np.ndarray:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, k, n)
    base[-1] = k - 1  # as published, the labels reach the last class
    labels = np.tile(base, 5).astype(np.int64)
    np.save(root / "labels.npy", labels)
    for name in names:
        arr = rng.integers(0, 256, (5 * n, SIZE, SIZE, 3), dtype=np.uint8)
        arr[:, 0, 0, 0] = np.repeat(np.arange(1, 6), n) * 10  # marks the severity of each row
        np.save(root / f"{name}.npy", arr)
    return labels


def test_cifar_c_reader_and_run(tmp_path):
    root = tmp_path / "CIFAR-10-C"
    labels = write_cifar_c(root)
    splits, _ = scan_cifar_c(root)
    assert [(s.corruption, s.severity, s.start, s.count) for s in splits[:2]] == \
        [("snow", 1, 0, 8), ("snow", 2, 8, 8)]  # benchmark order, then severities
    assert [s.corruption for s in splits[::5]] == ["snow", "contrast"]
    for s in splits:
        arr = np.load(s.path)
        assert (arr[s.start:s.start + s.count, 0, 0, 0] == 10 * s.severity).all()
    names = tuple(f"class_{i}" for i in range(10))  # placeholders are fine: labels are indices
    ck = make_ckpt(tmp_path / "c10.safetensors", 4, classes=names)
    res = run_corruption(CorruptionConfig(checkpoints=(ck,), data=root, out=tmp_path / "run",
                                          batch_size=3, workers=0, device="cpu"))
    model, meta = load_backbone(ck)
    tf = eval_transform(meta)
    m = res["models"][0]
    for s in splits:
        x = tf(torch.from_numpy(np.load(root / f"{s.corruption}.npy")[s.start:s.start + s.count])
               .permute(0, 3, 1, 2))
        with torch.no_grad():
            wrong = (model(x).argmax(1) != torch.from_numpy(labels[s.start:s.start + s.count]))
        assert m["per_corruption"][s.corruption][str(s.severity)] == pytest.approx(
            100 * float(wrong.float().mean()))
    assert m["mCE"] is None and res["layout"] == "cifar-c"
    assert m["mean_error"] == pytest.approx(np.mean([m["per_corruption"][c]["mean"]
                                                     for c in ("snow", "contrast")]))



def test_cifar100_c_clean_error_reads_cifar100_where_both_sets_are(tmp_path):
    """`--clean /data/cifar` holding both sets: the checkpoint's 100 classes pick CIFAR-100's
    test pickle, whose error is computed here directly (CIFAR-10's differs)."""
    root = tmp_path / "CIFAR-100-C"
    write_cifar_c(root, n=4, k=100, names=("snow",))
    clean = tmp_path / "cifar"
    write_cifar10(clean, n_test=10)
    write_cifar100(clean, n_test=6)
    ck = make_ckpt(tmp_path / "c100.safetensors", 5, classes=tuple(f"f{i}" for i in range(100)))
    res = run_corruption(CorruptionConfig(checkpoints=(ck,), data=root, out=tmp_path / "run",
                                          clean=clean, batch_size=4, workers=0, device="cpu"))
    model, meta = load_backbone(ck)
    errors = {}
    for kind in ("cifar10", "cifar100"):
        images, labels, _ = read_cifar(clean, train=False, kind=kind)
        x = eval_transform(meta)(torch.from_numpy(images).permute(0, 3, 1, 2))
        with torch.no_grad():
            errors[kind] = 100 * float((model(x).argmax(1) != torch.from_numpy(labels))
                                       .float().mean())
    assert res["models"][0]["clean_error"] == pytest.approx(errors["cifar100"])
    assert errors["cifar100"] != pytest.approx(errors["cifar10"])


def test_cifar_c_clean_pickles_without_the_checkpoints_set_fail_before_anything_is_written(
        tmp_path):
    """`--clean` CIFAR pickles that lack the checkpoint's set (CIFAR-100's for a CIFAR-10-C run)
    are refused up front, as a wrong class-folder --clean is: not after the run folder was
    started, which cleared a finished run's record in that --out."""
    root = tmp_path / "CIFAR-10-C"
    write_cifar_c(root, n=4, names=("snow",))
    ck = make_ckpt(tmp_path / "c10.safetensors", 4, classes=tuple(f"c{i}" for i in range(10)))
    out = tmp_path / "run"
    run_corruption(CorruptionConfig(checkpoints=(ck,), data=root, out=out, batch_size=4,
                                    workers=0, device="cpu"))
    before = (out / "metrics.json").read_bytes()
    wrong = write_cifar100(tmp_path / "c100", n_test=4)
    with pytest.raises(UserError, match="cifar10 asked, but only cifar100 pickles are here"):
        run_corruption(CorruptionConfig(checkpoints=(ck,), data=root, out=out, clean=wrong,
                                        batch_size=4, workers=0, device="cpu"))
    assert (out / "metrics.json").read_bytes() == before
    with pytest.raises(UserError, match="cifar10 asked"):
        run_corruption(CorruptionConfig(checkpoints=(ck,), data=root, out=tmp_path / "new",
                                        clean=wrong, batch_size=4, workers=0, device="cpu"))
    assert not (tmp_path / "new").exists()


def test_fgsm_refuses_cifar10_and_cifar100_checkpoints_in_one_run(tmp_path, capsys):
    """A root holding both CIFAR sets: each checkpoint would take its own, but one run reads one
    test set; a CIFAR-10 and a CIFAR-100 model together are refused in one line naming the
    cause (was: 'the data's classes do not match … (100 in the data vs 10)'), before writing."""
    clean = tmp_path / "cifar"
    write_cifar10(clean, n_test=4)
    write_cifar100(clean, n_test=4)
    c10 = make_ckpt(tmp_path / "c10.safetensors", 4, classes=tuple(f"c{i}" for i in range(10)))
    c100 = make_ckpt(tmp_path / "c100.safetensors", 5, classes=tuple(f"f{i}" for i in range(100)))
    code, err = cli(["fgsm", "--ckpt", str(c100), "--ckpt", str(c10), "--data", str(clean),
                     "--out", str(tmp_path / "o"), "--workers", "0", "--device", "cpu"], capsys)
    assert code == 2 and "\n" not in err and not (tmp_path / "o").exists()
    assert "checkpoints have 10 and 100 classes" in err and "separately" in err


def test_cifar_c_labels_must_have_the_checkpoints_class_count(tmp_path, capsys):
    """CIFAR-10-C labels (0..9) fit a CIFAR-100 classifier, but they are not its classes: the
    run must refuse, before writing anything, as it must a CIFAR-10-sized model whose metadata
    says it was trained on CIFAR-100."""
    root = tmp_path / "CIFAR-10-C"
    write_cifar_c(root, names=("snow",))
    c100 = make_ckpt(tmp_path / "c100.safetensors", 5, classes=tuple(f"f{i}" for i in range(100)),
                     dataset="cifar100")
    code, err = cli(["corruption", "--ckpt", str(c100), "--data", str(root), "--out",
                     str(tmp_path / "o"), "--workers", "0", "--device", "cpu"], capsys)
    assert code == 2 and "\n" not in err and not (tmp_path / "o").exists()
    assert "labels cover 10 classes but checkpoint" in err and "has 100" in err
    odd = make_ckpt(tmp_path / "odd.safetensors", 6, classes=tuple(f"c{i}" for i in range(10)),
                    dataset="CIFAR-100")
    with pytest.raises(UserError, match="was trained on CIFAR-100 \\(100 classes\\)"):
        run_corruption(CorruptionConfig(checkpoints=(odd,), data=root, out=tmp_path / "o",
                                        workers=0, device="cpu"))
    assert not (tmp_path / "o").exists()


def test_cifar_c_bad_arrays(tmp_path):
    root = tmp_path / "c"
    write_cifar_c(root)
    np.save(root / "snow.npy", np.zeros((39, SIZE, SIZE, 3), np.uint8))
    with pytest.raises(UserError, match="5 severities"):
        scan_cifar_c(root)
    np.save(root / "snow.npy", np.zeros((40, SIZE, SIZE, 3), np.float32))
    with pytest.raises(UserError, match="uint8"):
        scan_cifar_c(root)


# --- bad input through the CLI: one line, exit 2 ----------------------------------------------------

def cli(argv, capsys) -> tuple[int, str]:
    code = cli_run("robustness", argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("eps", ["0", "256", "-1", "abc", "1,,300"])
def test_cli_rejects_eps_outside_range(world, tmp_path, capsys, eps):
    code, err = cli(["fgsm", "--ckpt", str(world["a"]), "--data", str(world["val"]),
                     "--out", str(tmp_path / "o"), "--eps", eps], capsys)
    assert code == 2 and err.startswith("smix robustness: error:") and "\n" not in err
    assert "eps" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("eps, meant", [("0.03", "8"), ("0.0039,0.0314", "1,8"),
                                       ("0.001", "0.26")])
def test_cli_refuses_eps_in_unit_range_units_unless_asked(world, tmp_path, capsys, eps, meant):
    """--eps 0.03 meant 8/255 (torchattacks' units) and would run 0.03/255."""
    base = ["fgsm", "--ckpt", str(world["a"]), "--data", str(world["val"]), "--workers", "0",
            "--limit", "2", "--device", "cpu", "--eps", eps]
    code, err = cli(base + ["--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "\n" not in err and not (tmp_path / "o").exists()
    assert "looks like [0,1] units" in err and f"did you mean {meant}?" in err
    assert cli_run("robustness", base + ["--out", str(tmp_path / "ok"),
                                         "--allow-subpixel-eps"]) == 0
    res = json.loads((tmp_path / "ok" / "metrics.json").read_text())["results"]
    assert res["eps"] == [float(e) for e in eps.split(",")]
    code, _ = cli(["fgsm", "--ckpt", str(world["a"]), "--data", str(world["val"]), "--eps",
                   "0.5,2", "--out", str(tmp_path / "mixed"), "--limit", "2", "--workers", "0",
                   "--device", "cpu"], capsys)
    assert code == 0  # one value >= 1: the units are /255


def write_tiny_val(val: Path, out: Path) -> Path:
    """A class-folder val set rewritten in Tiny-ImageNet's own val layout (what pretrain reads):
    `out/images/*` + `out/val_annotations.txt` (file, wnid, box)."""
    (out / "images").mkdir(parents=True)
    lines = []
    for f in sorted(val.glob("*/*.jpg")):
        name = f"{f.parent.name}_{f.name}"
        (out / "images" / name).write_bytes(f.read_bytes())
        lines.append(f"{name}\t{f.parent.name}\t0\t0\t8\t8")
    (out / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return out


def test_tiny_imagenet_val_layout_is_read_as_pretrain_reads_it(world, tmp_path, capsys):
    """The same images as the class-folder val set, so the same numbers; before, the `images`
    folder was taken for a class and the run refused."""
    tiny = write_tiny_val(world["val"], tmp_path / "tiny" / "val")
    code = cli_run("robustness", ["fgsm", "--ckpt", str(world["a"]), "--data", str(tiny),
                                  "--out", str(tmp_path / "f"), "--eps", "8", "--workers", "0",
                                  "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "f" / "metrics.json").read_text())["results"]
    assert res["n_images"] == 12
    assert res["models"][0]["clean_acc"] == pytest.approx(direct_clean_top1(world["a"], world["val"]))
    root = tmp_path / "ic"
    write_imagenet_c(root, world["val"], corruptions=("snow",))
    res = run_corruption(CorruptionConfig(checkpoints=(world["a"],), data=root, clean=tiny,
                                          out=tmp_path / "c", workers=0, device="cpu"))
    model, meta = load_backbone(world["a"])
    assert res["models"][0]["clean_error"] == pytest.approx(direct_error(model, meta, world["val"]))
    two = make_ckpt(tmp_path / "two.safetensors", 7, classes=CLASSES[:2])
    code, err = cli(["fgsm", "--ckpt", str(two), "--data", str(tiny), "--out",
                     str(tmp_path / "o")], capsys)
    assert code == 2 and "class 'triangle' is not a" in err and not (tmp_path / "o").exists()


def test_tiny_imagenet_annotations_with_a_bom_or_not_utf8(world, tmp_path, capsys):
    """val_annotations.txt is a list: UTF-8 with or without the byte-order mark an editor
    adds (before, the BOM became part of the first file name, which then could not be read);
    a file in another encoding is one line (before, a UnicodeDecodeError traceback)."""
    tiny = write_tiny_val(world["val"], tmp_path / "tiny" / "val")
    notes = tiny / "val_annotations.txt"
    notes.write_bytes(b"\xef\xbb\xbf" + notes.read_bytes())
    code = cli_run("robustness", ["fgsm", "--ckpt", str(world["a"]), "--data", str(tiny),
                                  "--out", str(tmp_path / "f"), "--eps", "8", "--workers", "0",
                                  "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0, err
    res = json.loads((tmp_path / "f" / "metrics.json").read_text())["results"]
    assert res["n_images"] == 12
    assert res["models"][0]["clean_acc"] == pytest.approx(direct_clean_top1(world["a"], world["val"]))
    notes.write_bytes(notes.read_bytes() + "x.JPEG\tcircl\xe9\n".encode("latin-1"))
    code, err = cli(["fgsm", "--ckpt", str(world["a"]), "--data", str(tiny), "--out",
                     str(tmp_path / "o"), "--workers", "0"], capsys)
    assert code == 2 and "\n" not in err and "not UTF-8" in err, err


def test_cli_bad_data_and_checkpoints(world, tmp_path, capsys):
    base = ["fgsm", "--ckpt", str(world["a"]), "--out", str(tmp_path / "o"), "--workers", "0"]
    code, err = cli(base + ["--data", str(tmp_path / "missing")], capsys)
    assert code == 2 and "does not exist" in err
    four = tmp_path / "four"
    generate_shapes(ShapesConfig(out=four, classes=4, per_class=1, size=16, seed=0))
    capsys.readouterr()
    code, err = cli(base + ["--data", str(four / "val")], capsys)
    assert code == 2 and "\n" not in err
    assert f"the data's classes do not match checkpoint {world['a']} (4 in the data vs 3;" in err
    anon = make_ckpt(tmp_path / "anon.safetensors", 5, classes=("class_0", "class_1", "class_2"))
    code, err = cli(["pgd", "--ckpt", str(anon), "--data", str(world["val"]), "--out",
                     str(tmp_path / "o")], capsys)
    assert code == 2 and "no class names" in err
    state = build_model("resnet18", 3).state_dict()
    header = {k: v for k, v in BackboneMeta("resnet18", 3, CLASSES).to_header().items()
              if k != "class_names"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "nn.safetensors"), header)
    code, err = cli(["fgsm", "--ckpt", str(tmp_path / "nn.safetensors"), "--data",
                     str(world["val"]), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "class_names" in err
    code, err = cli(base + ["--data", str(world["val"]), "--impl", "nope"], capsys)
    assert code == 2 and "invalid choice" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("kind", ["fgsm", "corruption"])
def test_cli_device_cuda_without_cuda_is_one_line(world, tmp_path, capsys, kind):
    root = tmp_path / "ic"
    write_imagenet_c(root, world["val"], corruptions=("snow",))
    data = world["val"] if kind == "fgsm" else root
    code, err = cli([kind, "--ckpt", str(world["a"]), "--data", str(data), "--out",
                     str(tmp_path / "o"), "--workers", "0", "--device", "cuda"], capsys)
    assert code == 2 and "\n" not in err and "CUDA is not available" in err, err
    assert not (tmp_path / "o").exists()


def test_a_batch_out_of_device_memory_is_one_line_naming_the_batch_size(world, tmp_path,
                                                                        monkeypatch, capsys):
    """As pretrain and transfer: a --batch-size the GPU cannot hold (PGD keeps a graph per
    step) ends in one line that says what to change, not a torch.OutOfMemoryError traceback."""
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(adversarial_mod, "attack_counts", oom)
    code, err = cli(["pgd", "--ckpt", str(world["a"]), "--data", str(world["val"]), "--out",
                     str(tmp_path / "p"), "--workers", "0", "--batch-size", "4"], capsys)
    assert code == 2 and "Traceback" not in err and "OutOfMemoryError" not in err, err
    assert err.splitlines()[-1].startswith("smix robustness: error: out of device memory at "
                                           "--batch-size 4; rerun with a smaller")
    monkeypatch.setattr(corruption_mod, "correct_counts", oom)
    root = tmp_path / "ic"
    write_imagenet_c(root, world["val"], corruptions=("snow",))
    code, err = cli(["corruption", "--ckpt", str(world["a"]), "--data", str(root), "--out",
                     str(tmp_path / "c"), "--workers", "0", "--batch-size", "8"], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("smix robustness: error: out of device memory at "
                                           "--batch-size 8; continue with --resume")


def test_cli_corruption_missing_severity(world, tmp_path, capsys):
    root = tmp_path / "ic"
    write_imagenet_c(root, world["val"], corruptions=("snow",), skip=("snow", 3))
    code, err = cli(["corruption", "--ckpt", str(world["a"]), "--data", str(root), "--out",
                     str(tmp_path / "o")], capsys)
    assert code == 2 and "severity folder(s) 3 missing" in err and not (tmp_path / "o").exists()
    code, err = cli(["corruption", "--ckpt", str(world["a"]), "--data", str(root),
                     "--corruptions", "snoww", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "unknown corruption 'snoww'" in err


def test_cli_marks_an_mce_over_part_of_the_corruptions(world, tmp_path, capsys):
    root = tmp_path / "ic"
    write_imagenet_c(root, world["val"], corruptions=("snow",))
    code = cli_run("robustness", ["corruption", "--ckpt", str(world["a"]), "--data", str(root),
                                  "--clean", str(world["val"]), "--out", str(tmp_path / "o"),
                                  "--workers", "0", "--device", "cpu"])
    lines = [l for l in capsys.readouterr().out.splitlines() if "mCE" in l]
    assert code == 0 and len(lines) == 1
    assert lines[0].endswith("(incomplete: 1 of 15 corruptions)")


def test_cli_fgsm_end_to_end(world, tmp_path, capsys):
    code = cli_run("robustness", ["fgsm", "--ckpt", str(world["b"]), "--data", str(world["val"]),
                                  "--out", str(tmp_path / "o"), "--eps", "8", "--workers", "0",
                                  "--limit", "6"])
    out = capsys.readouterr().out
    assert code == 0 and "eps 8:" in out
    res = json.loads((tmp_path / "o" / "metrics.json").read_text())["results"]
    assert res["n_images"] == 6 and res["eps"] == [8.0] and res["impl"] == "shared-grad"


def test_cli_summary_tells_same_named_checkpoints_apart(world, tmp_path, capsys):
    for run in ("base", "smix"):
        (tmp_path / run).mkdir()
        shutil.copy(world["a"], tmp_path / run / "backbone.safetensors")
    code = cli_run("robustness", ["fgsm", "--ckpt", str(tmp_path / "base" / "backbone.safetensors"),
                                  "--ckpt", str(tmp_path / "smix" / "backbone.safetensors"),
                                  "--data", str(world["val"]), "--out", str(tmp_path / "o"),
                                  "--eps", "8", "--workers", "0", "--limit", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[0].startswith("base/backbone.safetensors: clean top-1")
    assert lines[1].startswith("smix/backbone.safetensors: clean top-1")


# --- torchrun: 2 gloo processes give the single-process numbers ----------------------------------------

def _numbers(path: Path) -> dict:
    res = json.loads(path.read_text())["results"]
    for m in res["models"]:
        m["checkpoint"].pop("path")
    return res


DIST_COMMANDS = {
    "pgd": ["pgd", "--ckpt", "{a}", "--ckpt", "{b}", "--data", "{val}", "--eps", "2,8",
            "--steps", "2", "--batch-size", "5"],
    "corruption": ["corruption", "--ckpt", "{a}", "--data", "{cifar_c}", "--batch-size", "4"],
}


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DIST_COMMANDS))
def test_two_process_run_equals_single_process(world, tmp_path, name):
    """12 images in batches of 5: rank 0 takes 2 batches, rank 1 one; PGD's random start is
    seeded per global batch, so even it must match exactly."""
    write_cifar_c(tmp_path / "c10c", n=5, k=3)
    where = {"a": world["a"], "b": world["b"], "val": world["val"], "cifar_c": tmp_path / "c10c"}
    argv = [a.format(**where) for a in DIST_COMMANDS[name]] + ["--workers", "0", "--device", "cpu"]
    assert cli_run("robustness", argv + ["--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "robustness", *argv, "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "two" / "log.jsonl").read_text().splitlines()
    assert json.loads(log[0])["world_size"] == 2
    assert _numbers(tmp_path / "two" / "metrics.json") == _numbers(tmp_path / "one" / "metrics.json")


@pytest.mark.dist
@pytest.mark.slow
def test_a_killed_run_resumes_under_torchrun_with_the_same_numbers(world, tmp_path, monkeypatch):
    """Killed on one process after 2 of its 6 batches, resumed by 2 gloo processes: the rest
    is sharded over them batch by batch, and the numbers are the uninterrupted run's."""
    argv = ["pgd", "--ckpt", str(world["a"]), "--data", str(world["val"]), "--eps", "2,8",
            "--steps", "2", "--batch-size", "2", "--workers", "0", "--device", "cpu"]
    assert cli_run("robustness", argv + ["--out", str(tmp_path / "one")]) == 0
    calls = []
    real = adversarial_mod.attack_counts

    def attack_counts(*args):
        calls.append(1)
        if len(calls) == 3:
            raise Killed
        return real(*args)

    monkeypatch.setattr(adversarial_mod, "attack_counts", attack_counts)
    with pytest.raises(Killed):
        cli_run("robustness", argv + ["--out", str(tmp_path / "two")])
    monkeypatch.undo()
    assert json.loads((tmp_path / "two" / PROGRESS_FILE).read_text())["done"]["0"]["batches"] == 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "robustness", *argv, "--out", str(tmp_path / "two"), "--resume"],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads((tmp_path / "two" / "log.jsonl").read_text().splitlines()[-1])
    assert log["world_size"] == 2 and log["resumed_at_batch"] == 2
    assert _numbers(tmp_path / "two" / "metrics.json") == _numbers(tmp_path / "one" / "metrics.json")


def test_an_attack_into_another_stages_run_folder_is_refused(world, tmp_path, capsys):
    """--out at a pretraining run's folder: the attack's fresh start deleted that run's
    metrics.json and emptied its log."""
    from smix.io import RunDir

    run = RunDir(tmp_path / "pre")
    run.write_metrics(stage="pretrain", kind="classification", results={"best": {"top1": 90}})
    run.log({"epoch": 1, "top1": 90})
    before = {p.name: p.read_bytes() for p in run.path.iterdir()}
    code, err = cli(["fgsm", "--ckpt", str(world["a"]), "--data", str(world["val"]), "--out",
                     str(run.path), "--workers", "0"], capsys)
    assert code == 2 and "\n" not in err, err
    assert "holds another run (its metrics.json: stage pretrain, kind classification)" in err
    assert {p.name: p.read_bytes() for p in run.path.iterdir()} == before


def test_an_error_every_rank_raised_is_printed_by_rank_0_only(world, tmp_path, capsys,
                                                               monkeypatch):
    """The refusal above is agreed over the ranks (`smix.dist.agree`): under torchrun each of
    the N processes printed the same line."""
    import smix.cli as cli_mod
    from smix.io import RunDir

    run = RunDir(tmp_path / "pre")
    run.write_metrics(stage="pretrain", kind="classification", results={})
    argv = ["fgsm", "--ckpt", str(world["a"]), "--data", str(world["val"]), "--out",
            str(run.path), "--workers", "0", "--device", "cpu"]
    monkeypatch.setattr(cli_mod, "_QUIET_RANK_EXIT_S", 0.0)
    for rank, lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        code, err = cli(argv, capsys)
        assert code == 2 and len(err.splitlines()) == lines, (rank, err)
    monkeypatch.setenv("RANK", "1")  # an error of this process alone is always printed
    code, err = cli(argv[:-2] + ["--device", "cuda:7"], capsys)
    assert code == 2 and "cuda:7" in err
