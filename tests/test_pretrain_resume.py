"""Production paths of pretraining: resume for every method, one commit point per epoch,
the papers' defaults that follow the preset, flags `--resume` accepts or refuses, DDP-safe
skipping, the loss in float32, evenly spaced limits, best-epoch ties, and the numbers
metrics.json reports (best/last epoch, top-1/top-5, the LR schedule) against hand values."""

from __future__ import annotations

import json
import os
import shutil
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smix import cpus as cpus_mod
from smix import io as smix_io
from smix.checkpoint import read_meta
from smix.cli import main as smix
from smix.dist import DistInfo
from smix.errors import UserError
from pretrain import engine
from pretrain.config import build_config
from pretrain.data import build_datasets
from pretrain.mixers import MixOutput, list_mixers
from tests.conftest import write_cifar10

TINY = ["workers=0", "progress=false", "batch_size=8", "input_size=32", "resize=32", "crop=32"]


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("cifar"), n_train=20, n_test=10)


def _epochs_logged(run: Path) -> list[int]:
    return [json.loads(l)["epoch"] for l in (run / "log.jsonl").read_text().splitlines()]


# 1. resume works for every registered method, with the preset's typed method defaults ------

@pytest.mark.parametrize("family", ["cifar", "imagenet"])
@pytest.mark.parametrize("method", list_mixers())
def test_resume_every_method(family, method, cifar_root, shapes_root, tmp_path):
    run = tmp_path / "run"
    if family == "cifar":
        first = ["--preset", "cifar10-resnet18", "--data", str(cifar_root)]
    else:  # the ImageNet preset's recipe and method defaults, on a small arch and images
        first = ["--preset", "imagenet-resnet50", "--data", str(shapes_root), "arch=resnet18"]
    argv = ["pretrain", *first, "--method", method, "--out", str(run), "--epochs", "1", *TINY]
    assert smix(argv) == 0
    assert smix(["pretrain", "--resume", str(run), "--epochs", "2"]) == 0
    assert _epochs_logged(run) == [1, 2]
    meta = read_meta(run / "backbone.safetensors")
    assert meta.epochs == 2 and meta.method["name"] == method
    saved = json.loads((run / "config.json").read_text())
    assert saved["epochs"] == 2 and saved["method"] == method
    params = saved["method_params"]  # typed, not the strings of a command line
    assert isinstance(params.get("prob", 0.0), float) and isinstance(params.get("size", 0), int)


def test_method_params_are_typed_at_build_time():
    c = build_config("cifar10-resnet18", Path("d"), Path("o"), "cutmix",
                     {"method.prob": "0.25", "method.alpha": "2"})
    assert c.method_params == {"prob": 0.25, "alpha": 2.0}
    assert all(isinstance(v, float) for v in c.method_params.values())
    with pytest.raises(UserError, match="cutmix: bad value for prob"):
        build_config("cifar10-resnet18", Path("d"), Path("o"), "cutmix", {"method.prob": "x"})


# 2. one commit point per epoch ------------------------------------------------------------

def _short(shapes_root: Path, out: Path, epochs: int = 2):
    return build_config("shapes-resnet18", shapes_root, out, "mixup",
                        {"workers": "0", "batch_size": "8", "input_size": "32", "resize": "32",
                         "crop": "32", "progress": "false", "epochs": str(epochs)})


class Crash(Exception):
    pass


def _rising_top1(monkeypatch):
    """Validation top-1 rises with the epoch, so the last epoch is the best (best.safetensors
    is then written in every epoch)."""
    real = engine.evaluate

    def evaluate(rt, epoch):
        return {**real(rt, epoch), "top1": 10.0 * (epoch + 1)}
    monkeypatch.setattr(engine, "evaluate", evaluate)


@pytest.fixture(scope="module")
def reference(shapes_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    with pytest.MonkeyPatch.context() as mp:
        _rising_top1(mp)
        engine.train(_short(shapes_root, out))
    return out


def _crash_at(monkeypatch, point: str, epoch: int) -> None:
    """Raise right after the commit of `epoch`, before `point` is written."""
    if point == "log":
        real_log = smix_io.RunDir.log

        def log(self, record):
            if record["epoch"] == epoch:
                raise Crash
            return real_log(self, record)
        monkeypatch.setattr(smix_io.RunDir, "log", log)
    elif point in ("backbone.safetensors", "best.safetensors"):
        real_save = engine.save_checkpoint

        def save(path, model, meta):
            if Path(path).name == point and meta.epochs == epoch:
                raise Crash
            return real_save(path, model, meta)
        monkeypatch.setattr(engine, "save_checkpoint", save)
    else:
        real_metrics = smix_io.RunDir.write_metrics

        def write_metrics(self, **kw):
            if kw["results"]["epochs_done"] == epoch:
                raise Crash
            return real_metrics(self, **kw)
        monkeypatch.setattr(smix_io.RunDir, "write_metrics", write_metrics)


@pytest.mark.parametrize("point,epoch", [
    ("log", 1), ("log", 2), ("backbone.safetensors", 2), ("best.safetensors", 2),
    ("metrics.json", 2)])
def test_kill_after_commit_is_repaired_by_resume(point, epoch, reference, shapes_root, tmp_path,
                                                 monkeypatch):
    _rising_top1(monkeypatch)
    run = tmp_path / "run"
    with monkeypatch.context() as mp:
        _crash_at(mp, point, epoch)
        with pytest.raises(Crash):
            engine.train(_short(shapes_root, run))
    if epoch == 2:  # a line no commit backs (an older layout's kill): dropped on resume
        with open(run / "log.jsonl", "a") as f:
            f.write(json.dumps({"epoch": 3, "top1": 0.0}) + "\n")
    engine.train(_short(shapes_root, run), resume=True)  # epoch 2: nothing left to train
    assert _epochs_logged(run) == [1, 2]
    ref = load_file(str(reference / "backbone.safetensors"))
    for name in ("backbone.safetensors", "best.safetensors"):
        got = load_file(str(run / name))
        assert all(torch.equal(ref[k], got[k]) for k in ref), name
        assert read_meta(run / name).epochs == 2
    metrics = json.loads((run / "metrics.json").read_text())["results"]
    assert metrics["epochs_done"] == 2 and metrics["best"]["epoch"] == 2


def test_a_stale_run_is_repaired_by_the_cli_with_no_epoch_left(shapes_root, tmp_path,
                                                               monkeypatch):
    """The demo's case: killed after the last commit; `--resume` must finish it, once."""
    run = tmp_path / "run"
    with monkeypatch.context() as mp:
        _crash_at(mp, "metrics.json", 1)
        with pytest.raises(Crash):
            engine.train(_short(shapes_root, run, epochs=1))
    assert not (run / "metrics.json").exists()
    assert smix(["pretrain", "--resume", str(run)]) == 0
    results = json.loads((run / "metrics.json").read_text())["results"]
    assert results["epochs_done"] == results["epochs"] == 1


# 11. best-epoch ties ----------------------------------------------------------------------

def test_best_epoch_tie_summary_and_file_agree(shapes_root, tmp_path, monkeypatch):
    real = engine.evaluate
    monkeypatch.setattr(engine, "evaluate", lambda rt, e: {**real(rt, e), "top1": 50.0})
    run = tmp_path / "run"
    summary = engine.train(_short(shapes_root, run))
    # the latest of equals, as the official code that reports top-5 keeps it (CutMix-PyTorch
    # and SaliencyMix-ImageNet train.py: `is_best = err1 <= best_err1`; `best_err5 = err5`)
    assert summary["best"]["epoch"] == 2
    assert read_meta(run / "best.safetensors").epochs == 2
    assert read_meta(run / "backbone.safetensors").epochs == 2


def test_resume_of_a_run_that_kept_the_earliest_tie_keeps_file_and_metrics_agreeing(
        shapes_root, tmp_path, monkeypatch):
    """A run written when the earliest of equals was the best: epochs 1 and 2 tie, its
    best.safetensors holds epoch 1. Resumed, metrics.json named epoch 2 (with epoch 2's top-5)
    while best.safetensors, which only the last epoch's model could still rewrite, held epoch 1."""
    real = engine.evaluate
    top1 = {0: 50.0, 1: 50.0, 2: 40.0, 3: 40.0}
    monkeypatch.setattr(engine, "evaluate", lambda rt, e: {**real(rt, e), "top1": top1[e]})
    run = tmp_path / "run"

    def earliest(history, held=None):  # the rule of the earlier version
        first = max(history, key=lambda h: (h["top1"], -h["epoch"]))
        pick = lambda h: {"epoch": h["epoch"], "top1": h["top1"], "top5": h["top5"],
                          "top1_err": 100 - h["top1"], "top5_err": 100 - h["top5"]}
        return {"best": pick(first), "last": pick(history[-1])}
    with monkeypatch.context() as mp:
        mp.setattr(engine, "summarise", earliest)
        engine.train(_short(shapes_root, run, epochs=3))
    assert read_meta(run / "best.safetensors").epochs == 1
    assert smix(["pretrain", "--resume", str(run), "--epochs", "4"]) == 0
    logged = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    best = json.loads((run / "metrics.json").read_text())["results"]["best"]
    assert read_meta(run / "best.safetensors").epochs == best["epoch"] == 1
    assert best["top5"] == logged[0]["top5"]


def test_best_epoch_tie_reports_the_later_epochs_top5():
    # CutMix-PyTorch train.py (and SaliencyMix-ImageNet's copy of it): `is_best = err1 <=
    # best_err1; best_err1 = min(err1, best_err1); if is_best: best_err5 = err5`: on a top-1
    # tie the later epoch's top-5 error is the one reported
    history = [{"epoch": 1, "top1": 70.0, "top5": 88.0}, {"epoch": 2, "top1": 76.0, "top5": 92.0},
               {"epoch": 3, "top1": 76.0, "top5": 93.0}, {"epoch": 4, "top1": 75.0, "top5": 94.0}]
    s = engine.summarise(history)
    assert s["best"]["epoch"] == 3
    assert s["best"]["top1_err"] == pytest.approx(24.0)
    assert s["best"]["top5_err"] == pytest.approx(7.0)
    assert s["last"]["epoch"] == 4 and s["last"]["top5_err"] == pytest.approx(6.0)


# 4, 5. defaults that follow the preset ----------------------------------------------------

@pytest.mark.parametrize("preset,extra,size", [
    ("cifar10-resnet18", {}, 16), ("cifar100-resnet18", {}, 8), ("imagenet-resnet50", {}, 112),
    ("tinyimagenet-resnet50", {}, 32), ("shapes-resnet18", {}, 32),
    ("shapes-resnet18", {"input_size": "32"}, 16), ("imagenet-resnet50", {"method.size": "8"}, 8)])
def test_cutout_hole_is_the_papers(preset, extra, size):
    c = build_config(preset, Path("d"), Path("o"), "cutout", extra)
    assert c.method_params["size"] == size and isinstance(c.method_params["size"], int)


def test_epochs_rescale_milestones_and_batch_scales_lr():
    c = build_config("imagenet-resnet50", Path("d"), Path("o"), overrides={"epochs": "90"})
    assert c.milestones == (23, 45, 68)  # 75, 150, 225 at 90/300, rounded half up
    assert c.lr == 0.1 and "75,150,225 -> 23,45,68" in c.notes[0]
    c = build_config("cifar10-resnet18", Path("d"), Path("o"),
                     overrides={"epochs": "100", "milestones": "10", "batch_size": "128"})
    assert c.milestones == (10,)  # the user's milestones stand
    assert c.lr == pytest.approx(0.05) and "0.1 x 128/256 = 0.05" in c.notes[0]
    c = build_config("cifar10-resnet18", Path("d"), Path("o"),
                     overrides={"batch_size": "128", "lr": "0.1"})  # the official code's
    assert c.lr == 0.1 and c.notes == ()
    c = build_config("cifar10-resnet18", Path("d"), Path("o"),
                     overrides={"batch_size": "512", "lr": "0.05"})
    assert c.lr == 0.05 and c.notes == ()
    same = build_config("cifar10-resnet18", Path("d"), Path("o"), overrides={"epochs": "200"})
    assert same.milestones == (60, 120, 160) and same.notes == ()


def test_notes_are_printed_and_recorded(shapes_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert smix(["pretrain", "--preset", "shapes-resnet18", "--data", str(shapes_root),
                 "--out", str(run), "--epochs", "1", *TINY]) == 0
    err = capsys.readouterr().err
    # the shapes preset: 3 epochs, milestone 2, lr 0.02 at batch 32 (TINY trains at batch 8)
    assert "pretrain: LR milestones rescaled to 1 epochs: 2 -> 1" in err
    assert "pretrain: lr scaled linearly with the batch: 0.02 x 8/32 = 0.005" in err
    assert len(json.loads((run / "config.json").read_text())["notes"]) == 2
    # resumed for 3 epochs: the set-up notes (about 1 epoch) are not news, and are not repeated
    assert smix(["pretrain", "--resume", str(run), "--epochs", "3"]) == 0
    err = capsys.readouterr().err
    assert f"pretrain: resuming {run} at epoch 2 of 3, with the recipe it was set up" in err
    assert "rescaled" not in err and "scaled linearly" not in err
    assert len(json.loads((run / "config.json").read_text())["notes"]) == 2


# 6. what --resume accepts ------------------------------------------------------------------

def test_resume_accepts_data_location_and_io_settings_refuses_the_rest(shapes_root, tmp_path,
                                                                      capsys, monkeypatch):
    run = tmp_path / "run"
    assert smix(["pretrain", "--preset", "shapes-resnet18", "--data", str(shapes_root),
                 "--out", str(run), "--epochs", "1", *TINY]) == 0
    capsys.readouterr()
    for argv, named in [(["--seed", "3"], "--seed"), (["lr=0.2", "amp=off"], "lr, amp"),
                        (["--method", "mixup"], "--method"), (["--preset", "cifar10-resnet18"],
                                                              "--preset")]:
        assert smix(["pretrain", "--resume", str(run), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"cannot change {named} " in err
    moved = tmp_path / "moved"
    shutil.copytree(shapes_root, moved)
    assert smix(["pretrain", "--resume", str(run), "--epochs", "2", "--data", str(moved),
                 "workers=0", "progress=false", "device=cpu", "cudnn_benchmark=false"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["data"] == str(moved) and saved["epochs"] == 2 and saved["device"] == "cpu"
    assert saved["cudnn_benchmark"] is False and saved["workers"] == 0
    assert _epochs_logged(run) == [1, 2]
    # on another machine: `workers=auto` is this one's count (2 CPUs: one worker), said in the
    # notes in place of what the first machine said
    saved = json.loads((run / "config.json").read_text())
    saved["notes"] = [*saved["notes"], "workers=auto: 15 on this machine"]
    saved["workers"] = 15  # (a count above 0 may change on resume; from 0 it may not)
    (run / "config.json").write_text(json.dumps(saved))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(cpus_mod, "CGROUP", tmp_path / "no-cgroup")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    capsys.readouterr()
    assert smix(["pretrain", "--resume", str(run), "--epochs", "3", "workers=auto"]) == 0
    assert "pretrain: workers=auto: 1 on this machine" in capsys.readouterr().err  # news
    saved = json.loads((run / "config.json").read_text())
    assert saved["workers"] == 1
    assert [n for n in saved["notes"] if "workers" in n] == [
        "workers=auto: 1 on this machine"]
    assert _epochs_logged(run) == [1, 2, 3]


def test_resume_refuses_data_with_other_classes(shapes_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert smix(["pretrain", "--preset", "shapes-resnet18", "--data", str(shapes_root),
                 "--out", str(run), "--epochs", "1", *TINY]) == 0
    first = sorted(p.name for p in (shapes_root / "train").iterdir())[0]
    renamed, fewer = tmp_path / "renamed", tmp_path / "fewer"
    for copy in (renamed, fewer):
        shutil.copytree(shapes_root, copy)
    for split in ("train", "val"):  # same count, one name changed: labels would shift
        (renamed / split / first).rename(renamed / split / "zebra")
        shutil.rmtree(fewer / split / first)
    capsys.readouterr()
    assert smix(["pretrain", "--resume", str(run), "--epochs", "2", "--data", str(renamed)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot resume on data with other classes" in err
    assert smix(["pretrain", "--resume", str(run), "--epochs", "2", "--data", str(fewer)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "other classes" in err
    # a resume state of an earlier version, without the class list: the model's shape decides
    state = torch.load(run / engine.RESUME_FILE, weights_only=True)
    del state["classes"]
    torch.save(state, run / engine.RESUME_FILE)
    assert smix(["pretrain", "--resume", str(run), "--epochs", "2", "--data", str(fewer)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "does not fit resnet18 with 2 classes" in err
    assert _epochs_logged(run) == [1]


def test_resume_refuses_switching_between_no_workers_and_workers(shapes_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert smix(["pretrain", "--preset", "shapes-resnet18", "--data", str(shapes_root),
                 "--out", str(run), "--epochs", "1", *TINY]) == 0  # workers=0
    capsys.readouterr()
    assert smix(["pretrain", "--resume", str(run), "--epochs", "2", "workers=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot switch workers=0 to workers=2" in err


def test_resume_cannot_shrink_epochs_below_those_trained(shapes_root, tmp_path, capsys):
    """`--epochs` fewer than the epochs done rewrote config.json and metrics.json to say 1 epoch
    of a run that trained 2 ("all 1 epochs done"): refused before anything is written."""
    run = tmp_path / "run"
    assert smix(["pretrain", "--preset", "shapes-resnet18", "--data", str(shapes_root),
                 "--out", str(run), "--epochs", "2", *TINY]) == 0
    before = {n: (run / n).read_bytes() for n in ("config.json", "metrics.json", "log.jsonl")}
    capsys.readouterr()
    assert smix(["pretrain", "--resume", str(run), "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "2 epochs are trained" in err and "--epochs 1" in err
    assert {n: (run / n).read_bytes() for n in before} == before
    assert smix(["pretrain", "--resume", str(run), "--epochs", "2"]) == 0  # done: repaired only


@pytest.mark.parametrize("saved", [
    {"ckpt": "r50.safetensors", "voc_root": "voc", "preset": "paper", "arch": "c4"},  # transfer's
    [1, 2]])
def test_resume_of_a_folder_that_is_not_a_pretraining_run_is_one_line(tmp_path, capsys, saved):
    """Another stage's run folder (its config.json has no method) ended in a KeyError."""
    run = tmp_path / "voc-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(saved))
    assert smix(["pretrain", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{run}: not a pretraining run" in err


def test_resume_removes_temporaries_of_killed_writes_and_logs_each_epochs_lr(shapes_root,
                                                                            tmp_path):
    run = tmp_path / "run"
    assert smix(["pretrain", "--preset", "shapes-resnet18", "--data", str(shapes_root),
                 "--out", str(run), "--epochs", "1", "milestones=1", "lr=0.05", *TINY]) == 0
    stale = run / ".resume.pt.k1ll3d.tmp"  # the name smix.io.atomic_path gives
    stale.write_bytes(b"half a resume state")
    keep = run / "notes.tmp"  # not one of ours
    keep.write_text("mine")
    assert smix(["pretrain", "--resume", str(run), "--epochs", "2"]) == 0
    assert not stale.exists() and keep.exists()
    lrs = [json.loads(l)["lr"] for l in (run / "log.jsonl").read_text().splitlines()]
    gamma = json.loads((run / "config.json").read_text())["gamma"]
    assert lrs == pytest.approx([0.05, 0.05 * gamma])  # the rate each epoch trained at


# 8. DDP: ranks skip a batch together -------------------------------------------------------

def test_a_short_batch_on_another_rank_skips_this_one_too(monkeypatch):
    asked = []

    def any_rank(flag, device):  # stand-in for the all-reduce: the other rank has 1 image
        asked.append(flag)
        return True
    monkeypatch.setattr(engine, "any_rank", any_rank)
    rt = types.SimpleNamespace(dist=DistInfo(0, 2, 0, torch.device("cpu")),
                               cfg=types.SimpleNamespace(skip_bad_images=True))
    assert engine._skip_batch(rt, 8) is True and asked == [False]
    rt.cfg.skip_bad_images = False  # batches are equal on every rank: no collective needed
    assert engine._skip_batch(rt, 8) is False and engine._skip_batch(rt, 1) is True
    assert asked == [False]


# 9. the mixed loss in float32 --------------------------------------------------------------

def test_mixed_loss_keeps_lambda_in_float32():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]], dtype=torch.bfloat16)
    lam = torch.tensor([0.123456, 0.987654])  # neither is a bfloat16 number
    out = MixOutput(torch.zeros(2), torch.tensor([0, 1]), torch.tensor([2, 0]), lam)
    loss = engine.mixed_loss(logits, out)
    lp = torch.log_softmax(logits.double(), dim=1)
    ce_a, ce_b = -lp[[0, 1], [0, 1]], -lp[[0, 1], [2, 0]]
    ref = (lam.double() * ce_a + (1 - lam.double()) * ce_b).mean()
    assert loss.dtype == torch.float32
    assert abs(float(loss) - float(ref)) <= 1e-6 * float(ref)


# 10. limits take evenly spaced samples -------------------------------------------------------

def test_limits_are_evenly_spaced(shapes_root, tmp_path):
    c = build_config("shapes-resnet18", shapes_root, tmp_path / "o", "none",
                     {"limit_train": "6", "limit_val": "3", "input_size": "32"})
    data = build_datasets(c)
    assert list(data.train.indices) == [0, 4, 8, 12, 16, 20]  # 24 images, 8 per class
    assert list(data.val.indices) == [0, 4, 8]  # 12 images, 4 per class: one of each
    labels = {data.val.dataset[i][1] for i in data.val.indices}
    assert labels == {0, 1, 2}


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("loader,port", [("torch", 29541), ("nvjpeg", 29543)])
def test_torchrun_ranks_skip_short_batches_together(shapes_root, tmp_path, loader, port):
    """Unreadable images leave some ranks with a batch of one at some steps: every rank must
    skip those steps, or the others wait in DDP's all-reduce until the 30-minute timeout.
    Both loaders that can skip files (nvjpeg: its feeder thread under torchrun, same shards)."""
    import os
    import subprocess
    import sys
    data = tmp_path / "data"
    shutil.copytree(shapes_root / "train", data / "train")
    shutil.copytree(shapes_root / "val", data / "val")
    # With seed 0 the sampler puts it in rank 1's second batch of 2 and rank 0 has no short
    # batch: without a shared decision rank 0 makes one more step than rank 1 and hangs.
    (data / "train" / "circle" / "zz_broken.jpg").write_bytes(b"\x00garbage")
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(port), "-m", "pretrain", "--preset", "shapes-resnet18",
           "--data", str(data), "--out", str(run), "--epochs", "1", "--skip-bad-images",
           *TINY, "batch_size=4", "device=cpu", f"loader={loader}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert log["skipped_images"] == 1 and log["train_images"] == 20  # 6 steps of 4, one skipped


# 10. cuDNN's algorithm search --------------------------------------------------------------

def test_cudnn_benchmark_is_set_for_cuda_runs_only(monkeypatch, tmp_path):
    """On CUDA the run sets cuDNN's benchmark mode from `cudnn_benchmark` (default on, as
    torchvision's references); other devices leave the process-wide flag alone."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored afterwards
    cfg = build_config("shapes-resnet18", tmp_path, tmp_path / "run", "none", {})
    assert cfg.cudnn_benchmark is True
    engine.cudnn_settings(cfg, torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    engine.cudnn_settings(cfg, torch.device("cuda", 0))  # sets a flag; needs no GPU
    assert torch.backends.cudnn.benchmark is True
    off = build_config("shapes-resnet18", tmp_path, tmp_path / "run", "none",
                       {"cudnn_benchmark": "false"})
    engine.cudnn_settings(off, torch.device("cuda", 0))
    assert torch.backends.cudnn.benchmark is False


def test_every_run_applies_the_cudnn_setting(monkeypatch, shapes_root, tmp_path):
    """`build_runtime` (training, resuming, benchmarks) applies it for the run's device."""
    seen = []
    monkeypatch.setattr(engine, "cudnn_settings", lambda cfg, device: seen.append(
        (cfg.cudnn_benchmark, device.type)))
    cfg = build_config("shapes-resnet18", shapes_root, tmp_path / "run", "none",
                       {"device": "cpu", "cudnn_benchmark": "false", "workers": "0"})
    engine.build_runtime(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    assert seen == [(False, "cpu")]


# 12. what metrics.json reports: best epoch, its top-5, the last epoch, top-k, the LR schedule --

def test_summary_reports_the_best_top1_epoch_with_its_own_top5_and_the_last_epoch():
    """Hand-made history: the best top-1 (epoch 2) is not the best top-5 (epoch 3) nor the
    best top-1 + top-5 (epoch 3); the papers report epoch 2's top-1 with epoch 2's top-5."""
    history = [{"epoch": 1, "top1": 60.0, "top5": 85.0},
               {"epoch": 2, "top1": 72.5, "top5": 88.0},
               {"epoch": 3, "top1": 72.0, "top5": 95.0},
               {"epoch": 4, "top1": 70.0, "top5": 90.5}]
    s = engine.summarise(history)
    assert s["best"] == {"epoch": 2, "top1": 72.5, "top5": 88.0, "top1_err": 27.5,
                         "top5_err": 12.0}
    assert s["last"] == {"epoch": 4, "top1": 70.0, "top5": 90.5, "top1_err": 30.0,
                         "top5_err": 9.5}


def test_evaluate_counts_top1_and_top5_by_hand(monkeypatch):
    """Seven classes, logits given by hand: top-1 hits 1 of 4, top-5 hits 3 of 4 (a label
    ranked 6th is not a top-5 hit; a top-2 or top-3 rule would count 1 or 2)."""
    logits = torch.tensor([[7.0, 6, 5, 4, 3, 2, 1],    # label 0: rank 1
                           [7.0, 6, 5, 4, 3, 2, 1],    # label 4: rank 5
                           [7.0, 6, 5, 4, 3, 2, 1],    # label 5: rank 6
                           [1.0, 2, 3, 4, 5, 6, 7]])   # label 3: rank 4
    labels = torch.tensor([0, 4, 5, 3])

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return logits[x.long().view(-1)]

    rt = types.SimpleNamespace(model=Fixed(), dist=DistInfo(0, 1, 0, torch.device("cpu")),
                               amp_dtype=None, channels_last=False)
    batches = [(torch.tensor([0.0, 1.0]), labels[:2], 0), (torch.tensor([2.0, 3.0]), labels[2:], 0)]
    monkeypatch.setattr(engine, "make_loader", lambda rt, train, epoch: batches)
    out = engine.evaluate(rt, 1)
    assert (out["top1"], out["top5"], out["val_images"]) == (25.0, 75.0, 4)


def test_lr_schedule_by_hand_with_warmup_and_milestones():
    """lr factor per epoch index e (0-based): linear warm-up (e+1)/w for e < w, then
    gamma ** (number of milestones <= e): CIFAR's 0.2 at 60/120/160 after 2 warm-up epochs."""
    c = build_config("cifar10-resnet18", Path("d"), Path("o"), "none", {"warmup_epochs": "2"})
    factor = engine._lr_lambda(c)
    expected = {0: 0.5, 1: 1.0, 2: 1.0, 59: 1.0, 60: 0.2, 119: 0.2, 120: 0.04, 159: 0.04,
                160: 0.008, 199: 0.008}
    for epoch, want in expected.items():
        assert factor(epoch) == pytest.approx(want, rel=1e-12), epoch


def test_resume_of_a_run_killed_in_its_first_epoch_says_to_start_again(shapes_root, tmp_path,
                                                                      capsys):
    """A kill before the first commit leaves config.json and no resume.pt: the one line says
    what to run, and that command (the first one again) works."""
    run = tmp_path / "run"
    first = ["pretrain", "--preset", "shapes-resnet18", "--data", str(shapes_root),
             "--out", str(run), "--epochs", "1", *TINY]
    assert smix(first) == 0
    (run / engine.RESUME_FILE).unlink()  # as a kill in epoch 1 leaves the folder
    capsys.readouterr()
    assert smix(["pretrain", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no epoch was finished" in err and "without --resume" in err
    assert smix(first) == 0
