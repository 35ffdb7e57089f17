"""The shared foundation: architectures, the checkpoint format, import, data readers."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file, save_file

from smix.arch import arch_spec, build_model, list_archs
from smix.checkpoint import (BackboneMeta, export_state, load_backbone, read_checkpoint,
                              save_checkpoint)
from smix.ckpt_import import import_checkpoint
from smix.cli import main as smix
from smix.data import CIFAR, ClassFolder, read_cifar
from pretrain.config import build_config
from pretrain.data import build_datasets
from smix.errors import UserError
from smix.shapes import ShapesConfig, generate_shapes
from smix.voc import find_year_dir, load_voc
from tests.conftest import write_cifar10, write_cifar100


def meta_for(arch: str, k: int = 3, **kw) -> BackboneMeta:
    return BackboneMeta(arch=arch, num_classes=k, class_names=tuple(f"c{i}" for i in range(k)), **kw)


@pytest.mark.parametrize("arch", list_archs())
def test_registry_forward_backward(arch):
    torch.manual_seed(0)
    model = build_model(arch, 5)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 5)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    spec = arch_spec(arch)
    assert dict(model.named_modules())[spec.cam_layer] is not None
    assert model.fc.in_features == spec.feature_dim


def test_unknown_arch_lists_valid():
    with pytest.raises(UserError, match="resnet50") as e:
        build_model("resnet51", 10)
    assert "unknown architecture 'resnet51'" in str(e.value)


@pytest.mark.parametrize("arch,tv", [("resnet18", torchvision.models.resnet18),
                                     ("resnet50", torchvision.models.resnet50)])
def test_checkpoint_round_trip_and_torchvision_strict(tmp_path, arch, tv):
    torch.manual_seed(0)
    model = build_model(arch, 3)
    path = save_checkpoint(tmp_path / "b.safetensors", model, meta_for(arch, dataset="x"))
    loaded, meta = load_backbone(path)
    assert meta.arch == arch and meta.class_names == ("c0", "c1", "c2")
    assert meta.provenance["torch_version"] == torch.__version__
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    ref = tv(num_classes=3)
    ref.load_state_dict(load_file(str(path)), strict=True)  # torchvision names, unchanged
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    assert torch.equal(ref.eval()(x), model(x))
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def test_checkpoint_strips_wrapper_prefixes(tmp_path):
    model = build_model("resnet18", 3)
    compiled_like = torch.nn.Module()
    compiled_like._orig_mod = model  # what torch.compile wraps
    save_checkpoint(tmp_path / "b.safetensors", compiled_like, meta_for("resnet18"))
    assert all(not k.startswith(("module.", "_orig_mod.")) for k in load_file(str(tmp_path / "b.safetensors")))


def test_checkpoint_validation_errors(tmp_path):
    model = build_model("resnet18", 3)
    good = save_checkpoint(tmp_path / "good.safetensors", model, meta_for("resnet18"))
    # wrong arch in metadata: shapes do not match resnet34's
    state = load_file(str(good))
    header = meta_for("resnet34").to_header()
    save_file(state, str(tmp_path / "arch.safetensors"), metadata=header)
    with pytest.raises(UserError, match=r"arch.safetensors: tensor 'layer1.2.conv1.weight' missing"):
        read_checkpoint(tmp_path / "arch.safetensors")
    # wrong shape
    bad = dict(state)
    bad["fc.weight"] = torch.zeros(4, 512)
    save_file(bad, str(tmp_path / "shape.safetensors"), metadata=meta_for("resnet18").to_header())
    with pytest.raises(UserError, match=r"'fc.weight' has shape \(4, 512\)"):
        read_checkpoint(tmp_path / "shape.safetensors")
    # NaN weights
    nan = dict(state)
    nan["layer2.0.conv1.weight"] = nan["layer2.0.conv1.weight"].clone()
    nan["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    save_file(nan, str(tmp_path / "nan.safetensors"), metadata=meta_for("resnet18").to_header())
    with pytest.raises(UserError, match="'layer2.0.conv1.weight' contains NaN"):
        read_checkpoint(tmp_path / "nan.safetensors")
    # truncated file
    raw = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="trunc.safetensors: unreadable safetensors"):
        read_checkpoint(tmp_path / "trunc.safetensors")
    # inconsistent metadata: class names against the count, arch_kwargs the arch does not take
    header = meta_for("resnet18").to_header()
    save_file(state, str(tmp_path / "names.safetensors"),
              metadata={**header, "num_classes": "10"})
    with pytest.raises(UserError, match="names.safetensors: class_names has 3 names but "
                                        "num_classes is 10"):
        read_checkpoint(tmp_path / "names.safetensors")
    save_file(state, str(tmp_path / "kwargs.safetensors"),
              metadata={**header, "arch_kwargs": '{"bogus": 1}'})
    with pytest.raises(UserError, match="kwargs.safetensors: .*bogus"):
        read_checkpoint(tmp_path / "kwargs.safetensors")
    # not ours: no format field
    save_file(state, str(tmp_path / "plain.safetensors"))
    with pytest.raises(UserError, match="not a toolkit checkpoint"):
        read_checkpoint(tmp_path / "plain.safetensors")
    # saving NaN weights is refused too, and the good file stays intact
    before = good.read_bytes()
    with torch.no_grad():
        model.fc.weight[0, 0] = float("inf")
    with pytest.raises(UserError, match="contains NaN or Inf"):
        save_checkpoint(good, model, meta_for("resnet18"))
    assert good.read_bytes() == before


@pytest.mark.parametrize("field,value,message", [
    ("mean", "[0.5, 0.5]", "'mean' must be 3 numbers"),
    ("mean", "0.5", "'mean' must be a list"),
    ("std", "[0, 0, 0]", "'std' must be 3 positive numbers"),
    ("class_names", '"abc"', "'class_names' must be a list"),
    ("class_names", "[1, 2, 3]", "'class_names' must be a list of strings"),
    ("arch_kwargs", "[1]", "'arch_kwargs' must be a JSON object"),
    ("input_size", "0", "'input_size' must be a positive integer"),
    ("crop", '"big"', "'crop' must be a positive integer"),
    ("num_classes", '"3"', "'num_classes' must be a positive integer")])
def test_metadata_types_and_ranges_are_checked(tmp_path, field, value, message):
    state = export_state(build_model("resnet18", 3))
    path = tmp_path / "m.safetensors"
    save_file(state, str(path), metadata={**meta_for("resnet18").to_header(), field: value})
    with pytest.raises(UserError, match=f"m.safetensors: metadata field {message}"):
        read_checkpoint(path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_tensors_other_than_float32_are_refused(tmp_path, dtype):
    state = {k: v.to(dtype) if v.is_floating_point() else v
             for k, v in export_state(build_model("resnet18", 3)).items()}
    save_file(state, str(tmp_path / "h.safetensors"), metadata=meta_for("resnet18").to_header())
    with pytest.raises(UserError, match=f"h.safetensors: tensor .* is {str(dtype)[6:]}, .*float32"):
        read_checkpoint(tmp_path / "h.safetensors")


def test_import_refuses_a_non_positive_input_size(tmp_path, capsys):
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "r.pth")
    for size in ("0", "-5"):
        assert smix(["ckpt", "import", str(tmp_path / "r.pth"), str(tmp_path / "o.safetensors"),
                     "--input-size", size]) == 2
        assert "--input-size must be a positive" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()
    with pytest.raises(UserError, match="'input_size' must be a positive integer, got 0"):
        import_checkpoint(tmp_path / "r.pth", tmp_path / "o.safetensors", input_size=0)


def test_import_reads_a_class_list_saved_with_a_byte_order_mark(tmp_path, capsys):
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "r.pth")
    (tmp_path / "names.txt").write_bytes(b"\xef\xbb\xbfcat\r\ndog\r\nfox\r\n")  # Notepad
    assert smix(["ckpt", "import", str(tmp_path / "r.pth"), str(tmp_path / "o.safetensors"),
                 "--classes", str(tmp_path / "names.txt")]) == 0
    assert read_checkpoint(tmp_path / "o.safetensors")[1].class_names == ("cat", "dog", "fox")


def test_inspect_tells_a_torch_file_and_a_newer_format_apart(tmp_path, capsys):
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "x.pth.tar")
    assert smix(["ckpt", "inspect", str(tmp_path / "x.pth.tar")]) == 2
    err = capsys.readouterr().err
    assert "not a safetensors file" in err and "smix ckpt import" in err
    state = export_state(build_model("resnet18", 3))
    save_file(state, str(tmp_path / "v2.safetensors"),
              metadata={**meta_for("resnet18").to_header(), "format": "smix.backbone/2"})
    with pytest.raises(UserError, match="newer") as e:
        read_checkpoint(tmp_path / "v2.safetensors")
    assert "import" not in str(e.value)


def test_interrupted_save_keeps_previous(tmp_path, monkeypatch):
    import smix.checkpoint as ck

    model = build_model("resnet18", 3)
    path = save_checkpoint(tmp_path / "b.safetensors", model, meta_for("resnet18"))
    before = path.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_file", disk_full)
    with torch.no_grad():
        model.fc.weight.add_(1)
    with pytest.raises(UserError, match="No space left on device"):
        save_checkpoint(path, model, meta_for("resnet18"))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["b.safetensors"]


def test_atomic_writes_get_the_mode_open_would_give(tmp_path):
    """Not mkstemp's 0600: a new file is 0666 less the umask, a rewrite keeps the old mode."""
    import os
    from smix.io import atomic_write, write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "metrics.json", {"a": 1})
        save_checkpoint(tmp_path / "b.safetensors", build_model("resnet18", 3), meta_for("resnet18"))
        os.umask(0o077)
        atomic_write(tmp_path / "private.txt", "x")
    finally:
        os.umask(old)
    mode = lambda name: (tmp_path / name).stat().st_mode & 0o777
    assert mode("metrics.json") == 0o644 and mode("b.safetensors") == 0o644
    assert mode("private.txt") == 0o600
    (tmp_path / "metrics.json").chmod(0o640)
    write_json(tmp_path / "metrics.json", {"a": 2})
    assert mode("metrics.json") == 0o640


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_umask_without_proc_is_read_from_a_probe_file(tmp_path, monkeypatch, umask):
    import os
    from smix import io as smix_io

    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(
        OSError("no /proc")) if str(self).startswith("/proc") else real(self, *a, **k))
    old = os.umask(umask)
    try:
        got = smix_io._umask(tmp_path)
        smix_io.atomic_write(tmp_path / "new.txt", "x")
    finally:
        os.umask(old)
    assert got == umask & 0o666  # (its read/write bits: all a new file can lose)
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["new.txt"]  # no probe left behind


def _official_checkpoint(path: Path) -> torch.nn.Module:
    """A `model_best.pth.tar` as the official SaliencyMix / CutMix `train.py` saves it: a
    torchvision ResNet-50 wrapped in `DataParallel` (hence `module.` keys), its SGD state after
    a step, `save_checkpoint({'epoch', 'arch', 'state_dict', 'best_err1', 'best_err5',
    'optimizer'})`. Returns the torchvision model (the reference for the imported weights)."""
    torch.manual_seed(0)
    net = torchvision.models.resnet50(num_classes=7)
    model = torch.nn.DataParallel(net)  # on CPU a plain wrapper: same `module.` keys as on GPU
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=1e-4,
                                nesterov=True)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    # `'epoch': epoch` inside `for epoch in range(args.epochs)`: 299 after the 300th epoch
    torch.save({"epoch": 299, "arch": "resnet", "state_dict": model.state_dict(),
                "best_err1": 21.26, "best_err5": 5.8, "optimizer": optimizer.state_dict()}, path)
    return net


def test_import_official_pth_tar(tmp_path):
    net = _official_checkpoint(tmp_path / "model_best.pth.tar")
    meta = import_checkpoint(tmp_path / "model_best.pth.tar", tmp_path / "b.safetensors")
    assert meta.arch == "resnet50" and meta.num_classes == 7 and meta.epochs == 300
    assert meta.metrics["best_err1"] == pytest.approx(21.26, abs=1e-4)
    state, _ = read_checkpoint(tmp_path / "b.safetensors")
    reference = net.state_dict()
    assert state.keys() == reference.keys()
    for k, v in reference.items():
        assert torch.equal(state[k], v), k


@pytest.mark.parametrize("name,writer", [
    ("r18.st", "safetensors"), ("r18.safetensors.bak", "safetensors"),
    ("r18.safetensors", "torch-zip"), ("r18.weights", "torch-legacy")])
def test_import_reads_by_content_not_name(tmp_path, name, writer):
    torch.manual_seed(0)
    sd = torchvision.models.resnet18(num_classes=3).state_dict()
    src = tmp_path / name
    if writer == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(src))
    else:
        torch.save(sd, src, _use_new_zipfile_serialization=writer == "torch-zip")
    meta = import_checkpoint(src, tmp_path / "out.safetensors")
    state, _ = read_checkpoint(tmp_path / "out.safetensors")
    assert meta.arch == "resnet18" and all(torch.equal(state[k], sd[k]) for k in sd)


def test_import_names_a_file_that_is_no_checkpoint(tmp_path, capsys):
    (tmp_path / "notes.pth").write_text("hello, not weights")
    assert smix(["ckpt", "import", str(tmp_path / "notes.pth"), str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "notes.pth: not a checkpoint" in err


def test_import_cifar_stem_and_torchvision_plain(tmp_path):
    model = build_model("cifar_resnet18", 10)
    torch.save(model.state_dict(), tmp_path / "sd.pth")
    meta = import_checkpoint(tmp_path / "sd.pth", tmp_path / "c.safetensors")
    assert meta.arch == "cifar_resnet18" and meta.crop == 32 and meta.resize == 32


class CutoutBlock(torch.nn.Module):
    """A block with the key layout of Cutout's `model/resnet.py` BasicBlock (uoguelph-mlrg/Cutout,
    used by the official SaliencyMix CIFAR code), written here for the test: a `shortcut`
    Sequential(conv1x1, BN) when the shape changes, an empty one otherwise."""

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CutoutResNet18(torch.nn.Module):
    """Cutout's ResNet18: 3x3 stem, no max-pool, avg_pool2d(4) at 32px, a `linear` classifier."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(64)
        cin, layers = 64, []
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(torch.nn.Sequential(CutoutBlock(cin, planes, stride),
                                              CutoutBlock(planes, planes, 1)))
            cin = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = torch.nn.Linear(512, num_classes)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.nn.functional.avg_pool2d(out, 4).flatten(1))


def test_import_official_saliencymix_cifar_pt(tmp_path):
    """SaliencyMix_CIFAR/saliencymix.py ends with `torch.save(cnn.state_dict(), …'.pt')` of
    `nn.DataParallel(ResNet18(num_classes))`: bare `module.` keys, `shortcut`, `linear`."""
    torch.manual_seed(0)
    net = CutoutResNet18(100)
    net.train()
    net(torch.randn(8, 3, 32, 32))  # running statistics off their initial values
    net.eval()
    torch.save(torch.nn.DataParallel(net).state_dict(), tmp_path / "cifar100_resnet18.pt")
    meta = import_checkpoint(tmp_path / "cifar100_resnet18.pt", tmp_path / "b.safetensors")
    assert meta.arch == "cifar_resnet18" and meta.num_classes == 100
    model, _ = load_backbone(tmp_path / "b.safetensors")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=1e-5, atol=1e-5)


def test_import_suggests_arch_only_when_one_could_fit(tmp_path):
    wide = build_model("wide_resnet28_10", 3)  # no layout to infer, but --arch would load it
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(UserError, match=r"pass --arch \(wide_resnet28_10\)"):
        import_checkpoint(tmp_path / "wide.pth", tmp_path / "w.safetensors")
    r152 = torchvision.models.resnet152(num_classes=3)  # a ResNet depth nobody registered
    torch.save(r152.state_dict(), tmp_path / "r152.pth")
    with pytest.raises(UserError, match="no registered architecture has") as e:
        import_checkpoint(tmp_path / "r152.pth", tmp_path / "r.safetensors")
    assert "--arch" not in str(e.value)


def test_import_suggests_arch_by_shapes_too(tmp_path):
    cifar34 = torchvision.models.resnet34(num_classes=10)  # CIFAR stem: resnet34's names only
    cifar34.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    torch.save(cifar34.state_dict(), tmp_path / "c34.pth")
    with pytest.raises(UserError, match="no registered architecture has") as e:
        import_checkpoint(tmp_path / "c34.pth", tmp_path / "c.safetensors")
    assert "--arch" not in str(e.value)


def test_import_epochs_of_pytorch_examples_files_are_as_saved(tmp_path):
    """pytorch/examples' imagenet main.py saves `'epoch': epoch + 1` with `best_acc1`."""
    sd = torchvision.models.resnet18(num_classes=3).state_dict()
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": sd,
                "best_acc1": torch.tensor(69.7)}, tmp_path / "ex.pth.tar")
    meta = import_checkpoint(tmp_path / "ex.pth.tar", tmp_path / "ex.safetensors")
    assert meta.epochs == 90 and meta.metrics["best_acc1"] == pytest.approx(69.7, abs=1e-4)


def test_a_one_value_mean_of_earlier_versions_reads_as_rgb(tmp_path):
    """Earlier versions accepted `mean=0.5 std=0.5` (Normalize broadcasts one value)."""
    path = tmp_path / "old.safetensors"
    save_checkpoint(path, build_model("resnet18", 2), BackboneMeta(
        arch="resnet18", num_classes=2, class_names=("a", "b"), mean=(0.5,) * 3, std=(0.5,) * 3))
    tensors = load_file(path)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        header = dict(f.metadata())
    header.update(mean="[0.5]", std="[0.25]")
    save_file(tensors, str(path), metadata=header)
    _, meta = read_checkpoint(path)
    assert meta.mean == (0.5, 0.5, 0.5) and meta.std == (0.25, 0.25, 0.25)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_import_refuses_full_unpickling(tmp_path):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": {"x": Evil()}}, f)
    with pytest.raises(UserError, match="refused, it needs full unpickling"):
        import_checkpoint(tmp_path / "evil.pth", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("zip_format", [True, False])
def test_import_reads_numpy_scalars_and_arrays_but_not_what_they_hide(tmp_path, zip_format):
    """pytorch/examples-style extras saved as numpy values (np.float64 best_acc1, np.int64
    epoch) and a state dict of numpy arrays import; an object array holding a callable is still
    refused, and the refusal names only that callable."""
    sd = torchvision.models.resnet18(num_classes=3).state_dict()
    kw = dict(_use_new_zipfile_serialization=zip_format)
    torch.save({"state_dict": sd, "best_acc1": np.float64(76.25), "epoch": np.int64(90),
                "curve": np.array([1.0, 2.0])}, tmp_path / "s.pth.tar", **kw)
    meta = import_checkpoint(tmp_path / "s.pth.tar", tmp_path / "s.safetensors")
    assert meta.epochs == 90 and meta.metrics == {"best_acc1": 76.25}
    if not zip_format:  # as numpy 1 pickled it (official files): numpy.core, not numpy._core
        raw = (tmp_path / "s.pth.tar").read_bytes()
        if b"numpy._core.multiarray" in raw:  # (written under numpy 2 here)
            old = tmp_path / "np1.pth.tar"
            old.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
            meta = import_checkpoint(old, tmp_path / "np1.safetensors")
            assert meta.epochs == 90 and meta.metrics == {"best_acc1": 76.25}
    torch.save({k: v.numpy() for k, v in sd.items()}, tmp_path / "a.pth", **kw)
    import_checkpoint(tmp_path / "a.pth", tmp_path / "a.safetensors")
    state, _ = read_checkpoint(tmp_path / "a.safetensors")
    assert set(state) == set(sd) and all(torch.equal(state[k], sd[k]) for k in sd)
    torch.save({"state_dict": sd, "x": np.array([Evil()], dtype=object)}, tmp_path / "e.pth", **kw)
    with pytest.raises(UserError, match=r"refused, .* \(it holds (builtins\.)?print\);"):
        import_checkpoint(tmp_path / "e.pth", tmp_path / "e.safetensors")
    assert not (tmp_path / "e.safetensors").exists()


@pytest.mark.parametrize("zip_format", [True, False])
def test_refusal_names_the_class_and_has_no_terminal_codes(tmp_path, capsys, zip_format):
    """A timm-style file (training args as an argparse.Namespace) is refused, and the one line
    says which class blocked it rather than torch's first line with its ANSI bold codes."""
    import argparse
    sd = torchvision.models.resnet18(num_classes=3).state_dict()
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=0.1), "epoch": 3},
               tmp_path / "t.pth.tar", _use_new_zipfile_serialization=zip_format)
    assert smix(["ckpt", "import", str(tmp_path / "t.pth.tar"), str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "\x1b" not in err
    assert "refused" in err and "argparse.Namespace" in err


def test_provenance_records_version_command_and_time(tmp_path):
    """A checkpoint made by `python -m smix ckpt import` says so (not `__main__.py …`), with
    the toolkit's version and commit and the time it was made."""
    import datetime as dt
    import subprocess
    import sys
    from smix import __version__

    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "r.pth")
    repo = Path(__file__).resolve().parent.parent
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    argv = ["ckpt", "import", str(tmp_path / "r.pth"), str(tmp_path / "r.safetensors")]
    proc = subprocess.run([sys.executable, "-m", "smix", *argv], cwd=tmp_path, text=True,
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stderr
    p = read_checkpoint(tmp_path / "r.safetensors")[1].provenance
    assert p["command"] == " ".join(["python -m smix", *argv])
    made = dt.datetime.strptime(p["created_utc"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=dt.timezone.utc)
    assert before <= made <= dt.datetime.now(dt.timezone.utc)
    assert p["code_version"].startswith(__version__) and p["torch_version"] == torch.__version__
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], text=True,
                          capture_output=True)
    if head.returncode == 0:  # from a checkout: the commit too
        assert f"+g{head.stdout.strip()}" in p["code_version"]


def test_ckpt_cli_inspect_and_errors(tmp_path, capsys):
    save_checkpoint(tmp_path / "b.safetensors", build_model("resnet18", 3), meta_for("resnet18"))
    assert smix(["ckpt", "inspect", str(tmp_path / "b.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "smix.backbone/1" and info["cam_layer"] == "layer4"
    assert smix(["ckpt", "inspect", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such checkpoint file" in err


def test_class_folder_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ClassFolder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class folders"):
        ClassFolder(tmp_path / "empty")
    (tmp_path / "d" / "a").mkdir(parents=True)
    (tmp_path / "d" / "b").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "a" / "x.jpg")
    with pytest.raises(UserError, match=r"d/b: class folder has no images"):
        ClassFolder(tmp_path / "d")
    (tmp_path / "d" / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    ds = ClassFolder(tmp_path / "d")
    with pytest.raises(UserError, match="broken.jpg: cannot read image"):
        ds[1]
    assert ClassFolder(tmp_path / "d", skip_bad_images=True)[1] is None


def test_hidden_files_and_folders_in_a_class_folder_are_not_images(tmp_path):
    """What copies leave beside the pictures: macOS's AppleDouble companions (`._x.JPEG`, not a
    picture) and a NAS's hidden thumbnail folder (`.@__thumb/`, small copies of the pictures).
    Hidden like the `.hidden` class folders already left out, they are not samples."""
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / c / "x.JPEG")
    (tmp_path / "a" / "._x.JPEG").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    (tmp_path / "b" / ".@__thumb").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "b" / ".@__thumb" / "s100x.JPEG")
    (tmp_path / "b" / "sub").mkdir()  # a visible subfolder (Tiny-ImageNet's images/) is read
    Image.new("RGB", (8, 8)).save(tmp_path / "b" / "sub" / "y.JPEG")
    ds = ClassFolder(tmp_path)
    assert [(Path(p).relative_to(tmp_path).as_posix(), t) for p, t in ds.samples] == [
        ("a/x.JPEG", 0), ("b/sub/y.JPEG", 1), ("b/x.JPEG", 1)]
    assert [ds[i][0].size for i in range(len(ds))] == [(8, 8)] * 3
    from cam.images import list_images
    assert [p.relative_to(tmp_path).as_posix() for p in list_images([tmp_path])] == [
        "a/x.JPEG", "b/sub/y.JPEG", "b/x.JPEG"]


def test_cifar_reader(tmp_path):
    write_cifar10(tmp_path)
    images, labels, names = read_cifar(tmp_path, train=True)
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (20,) and names[3] == "c3"
    ds = CIFAR(tmp_path, train=False)
    img, label = ds[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8
    with pytest.raises(UserError, match="no CIFAR python pickles"):
        read_cifar(tmp_path / "cifar-10-batches-py" / "missing", train=True)



def test_a_root_with_both_cifars_gives_the_one_asked_for(tmp_path):
    """`--data /data/cifar` for both CIFAR presets: each reads its own pickles; a preset whose
    pickles are not there says so instead of training on the other set."""
    write_cifar10(tmp_path)
    with pytest.raises(UserError, match="cifar100 asked, but only cifar10 pickles are here"):
        read_cifar(tmp_path, train=True, kind="cifar100")
    write_cifar100(tmp_path)
    images, labels, names = read_cifar(tmp_path, train=True, kind="cifar100")
    assert images.shape == (20, 32, 32, 3) and names[:2] == ["f0", "f1"] and len(names) == 100
    with open(tmp_path / "cifar-100-python" / "train", "rb") as f:
        assert labels.tolist() == pickle.load(f)["fine_labels"]
    assert read_cifar(tmp_path, train=False, kind="cifar10")[2][3] == "c3"
    assert read_cifar(tmp_path, train=False)[2][3] == "c3"  # no kind: CIFAR-10 first
    with pytest.raises(UserError, match="unknown CIFAR set 'cifar10-subset'; valid: cifar10, "):
        read_cifar(tmp_path, train=False, kind="cifar10-subset")
    for preset, classes in (("cifar10-resnet18", 10), ("cifar100-resnet18", 100)):
        data = build_datasets(build_config(preset, tmp_path, tmp_path / "run", "none"))
        assert len(data.classes) == classes and len(data.train) == 20 and len(data.val) == 10


def test_shapes_generator_formats(shapes_root):
    train = ClassFolder(shapes_root / "train")
    assert train.classes == ["circle", "square", "triangle"] and len(train) == 24
    year = find_year_dir(shapes_root, "2007")
    records = load_voc(year, "trainval")
    assert len(records) == 24
    rec = records[0]
    img = np.asarray(Image.open(rec.image_path)).astype(float)
    x0, y0, x1, y1 = (int(v) for v in rec.objects[0].box0)
    assert 0 <= x0 < x1 <= rec.width and 0 <= y0 < y1 <= rec.height
    assert img.shape == (rec.height, rec.width, 3)
    assert (shapes_root / "train" / "circle").is_dir()


def test_shapes_true_box_is_the_drawn_objects_pixel_box():
    """The box make_image returns (VOC, 1-based inclusive) is the tight box of the object's
    pixels, read back from the picture itself: the object is one exact colour (PIL draws it
    without antialiasing) while the noisy background never repeats a colour as often, so the
    commonest colour's pixels are the object. Every shape kind, ten draws each."""
    from smix.shapes import SHAPES, make_image

    rng = np.random.default_rng(0)
    for kind in SHAPES:
        for _ in range(10):
            img, box = make_image(rng, kind, 64)
            pixels = np.asarray(img)
            colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
            ys, xs = np.nonzero((pixels == colours[counts.argmax()]).all(-1))
            assert box == (xs.min() + 1, ys.min() + 1, xs.max() + 1, ys.max() + 1), kind


def test_checkpoint_written_before_the_rename_still_loads(tmp_path):
    """A file as the `backbone/` layout wrote it: the same header fields, written by hand with
    safetensors alone (no toolkit code), provenance naming the old package."""
    model = torchvision.models.resnet18(num_classes=3)
    state = {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
             for k, v in model.state_dict().items()}
    header = {
        "format": "smix.backbone/1", "arch": "resnet18", "num_classes": "3",
        "class_names": json.dumps(["a", "b", "c"]), "arch_kwargs": "{}", "input_size": "224",
        "mean": "[0.485, 0.456, 0.406]", "std": "[0.229, 0.224, 0.225]", "resize": "256",
        "crop": "224", "dataset": "shapes", "method": json.dumps({"name": "saliencymix",
                                                                   "prob": 1.0}),
        "epochs": "8", "metrics": json.dumps({"top1": 0.5}),
        "provenance": json.dumps({"code_version": "0.1.0+d0c5121", "torch_version": "2.9.1",
                                   "command": "python -m backbone demo",
                                   "created_utc": "2026-11-27T00:00:00Z"}),
    }
    path = tmp_path / "old.safetensors"
    save_file(state, str(path), metadata=header)
    loaded, meta = load_backbone(path)
    assert meta.arch == "resnet18" and meta.class_names == ("a", "b", "c")
    assert meta.method == {"name": "saliencymix", "prob": 1.0} and meta.epochs == 8
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_distinct_names_are_the_shortest_telling_suffixes():
    from smix.io import distinct_names
    assert distinct_names(["runs/base/backbone.safetensors", "runs/smix/backbone.safetensors"]) \
        == ["base/backbone.safetensors", "smix/backbone.safetensors"]
    # one depth for all (the lines stay comparable); a shorter path is shown whole
    assert distinct_names(["a/x/b.st", "c/x/b.st", "d.st"]) == ["a/x/b.st", "c/x/b.st", "d.st"]
    assert distinct_names(["p/a.st", "q/b.st"]) == ["a.st", "b.st"]


def test_evaluation_commands_start_this_process_share_of_loader_workers(monkeypatch, capsys):
    """`smix robustness` and `smix cam` take `--workers auto` by default, the count pretraining's
    `workers=auto` takes (robustness started a fixed 4: torch warned of oversubscription on a
    2-CPU machine, and 4 starve a 16-CPU GPU machine); a count is kept, a bad value is one line."""
    from smix import cpus
    from cam.cli import _parser as cam_parser
    from robustness.cli import build_parser as robustness_parser
    monkeypatch.setattr(cpus, "auto_workers", lambda: 7)
    fgsm = ["fgsm", "--ckpt", "a", "--data", "d", "--out", "o"]
    corruption = ["corruption", "--ckpt", "a", "--data", "d", "--out", "o"]
    localize = ["localize", "--ckpt", "a", "--voc-root", "v", "--out", "o"]
    export = ["export", "--ckpt", "a", "--images", "i", "--out", "o"]
    for parser, argv in ((robustness_parser, fgsm), (robustness_parser, corruption),
                         (cam_parser, localize), (cam_parser, export)):
        assert parser().parse_args(argv).workers == 7
        assert parser().parse_args(argv + ["--workers", "AUTO"]).workers == 7
        assert parser().parse_args(argv + ["--workers", "0"]).workers == 0
    for bad in ("-1", "many"):
        assert smix(["robustness", *fgsm, "--workers", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"smix robustness fgsm: error: argument --workers: wants a count >= 0 "
                       f"or 'auto', got '{bad}'")


@pytest.mark.parametrize("argv", [
    ["data", "shapes", "{out}", "--per-class", "1", "--size", "16"],
    ["demo", "--quick", "--out", "{out}"],
    ["report", "{runs}", "--out", "{out}"],
])
def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, capsys, argv):
    """A file where the output folder should go (a read-only or missing mount reads the same):
    one line naming the path and exit 2, not an OSError traceback."""
    from smix.io import RunDir

    (tmp_path / "file").write_text("x")
    RunDir(tmp_path / "runs" / "r").write_metrics(stage="audit", kind="audit", results={})
    out = str(tmp_path / "file" / "out")
    assert smix([a.format(out=out, runs=tmp_path / "runs") for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "file/out" in err[0] and "Not a directory" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "runs"]


@pytest.mark.parametrize("batch", [{"labels": [1, 2]}, [1, 2],
                                   {"data": np.zeros((2, 100), np.uint8), "labels": [1, 2]},
                                   {"data": np.zeros((3, 3072), np.uint8), "labels": [1, 2]}],
                         ids=["no-data", "a-list", "not-32x32", "labels-short"])
def test_a_cifar_pickle_of_something_else_is_one_line(tmp_path, batch):
    """A pickle that loads but is no CIFAR batch (another dataset's, a damaged conversion) is a
    UserError naming the file, not a KeyError or a reshape's ValueError."""
    write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump(batch, f)
    with pytest.raises(UserError, match="data_batch_3: not a CIFAR python pickle"):
        read_cifar(tmp_path, train=True)
    with open(tmp_path / "cifar-10-batches-py" / "batches.meta", "wb") as f:
        pickle.dump({"fine_label_names": ["a"]}, f)
    with pytest.raises(UserError, match=r"batches.meta: not a CIFAR python pickle \(no 'label_names'"):
        read_cifar(tmp_path, train=False)


def test_an_annotation_path_that_is_a_folder_is_one_line(tmp_path):
    """VOC: a folder where an image's XML should be (a botched copy) is a UserError naming it,
    not an IsADirectoryError traceback."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (tmp_path / "VOC2007" / sub).mkdir(parents=True)
    (tmp_path / "VOC2007" / "ImageSets" / "Main" / "test.txt").write_text("000001\n")
    (tmp_path / "VOC2007" / "Annotations" / "000001.xml").mkdir()
    with pytest.raises(UserError, match=r"000001.xml: cannot read annotation \(Is a directory\)"):
        load_voc(tmp_path / "VOC2007", "test")


def test_import_errors_name_the_source_file(tmp_path):
    """A wrong --arch or class list is a fault of SRC (or the list), not of DST, which is never
    written: the one line names SRC and the first bad key, as a load names the file."""
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "r18.pth")
    (tmp_path / "classes.txt").write_text("a\nb\n")
    dst = tmp_path / "out.safetensors"
    with pytest.raises(UserError, match=r"r18.pth: tensor 'layer1.0.conv1.weight' has shape"):
        import_checkpoint(tmp_path / "r18.pth", dst, arch="resnet50")
    with pytest.raises(UserError, match=r"r18.pth: its fc.weight has 3 classes, the class list 2"):
        import_checkpoint(tmp_path / "r18.pth", dst, class_names=("a", "b"))
    assert not dst.exists()


@pytest.mark.parametrize("texture", ["nan", "inf"])
def test_shapes_refuses_a_texture_that_is_no_amplitude(tmp_path, capsys, texture):
    """`--texture nan` passed the `< 0` check and wrote every background as NaN cast to uint8."""
    assert smix(["data", "shapes", str(tmp_path / "s"), "--texture", texture]) == 2
    assert "--texture >= 0" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_shapes_into_a_folder_of_another_configuration_is_refused(tmp_path, capsys):
    """Regenerating with fewer classes or images left the old ones in the class folders (4 class
    folders under a shapes.json of 2: training read all 4); the same configuration may rerun."""
    out = tmp_path / "s"
    args = ["data", "shapes", str(out), "--per-class", "1", "--size", "16"]
    assert smix(args + ["--classes", "3"]) == 0
    assert smix(args + ["--classes", "3"]) == 0  # (a killed or repeated run: same files)
    capsys.readouterr()
    assert smix(args + ["--classes", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "another configuration (classes differs)" in err
    assert ClassFolder(out / "train").classes == ["circle", "square", "triangle"]


def test_shapes_images_are_written_atomically(tmp_path, monkeypatch):
    """A JPEG write that fails midway (a kill, a full disk) during a rerun leaves the previous
    image whole: the generator's images go through the atomic helper, as every other file."""
    out = tmp_path / "s"
    cfg = ShapesConfig(out, classes=2, per_class=2, size=16, seed=0)
    generate_shapes(cfg, progress=False)
    calls = {"n": 0}

    def torn_save(self, fp, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # some images replaced, then one torn
            Path(fp).write_bytes(b"\xff\xd8partial")
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    real_save = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", torn_save)
    with pytest.raises((OSError, UserError)):
        generate_shapes(cfg, progress=False)
    monkeypatch.undo()
    images = sorted(out.rglob("*.jpg"))
    assert len(images) == 2 * (2 + 4) * 2  # class folders and the VOC copy
    for path in images:
        with Image.open(path) as im:
            im.load()  # a torn file raises here


def test_tiny_imagenet_annotations_are_read_as_user_text(tmp_path):
    """val_annotations.txt saved with a byte-order mark (Notepad, Excel) gave its first image
    the path '\\ufeffval_0.JPEG', unreadable later; a non-UTF-8 one was a traceback."""
    (tmp_path / "images").mkdir()
    for name in ("val_0.JPEG", "val_1.JPEG"):
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / name)
    notes = tmp_path / "val_annotations.txt"
    notes.write_bytes("\ufeffval_0.JPEG\tn01\t0\t0\t8\t8\nval_1.JPEG\tn02\t0\t0\t8\t8\n".encode())
    ds = ClassFolder(tmp_path, classes=["n01", "n02"])
    assert [(Path(p).name, t) for p, t in ds.samples] == [("val_0.JPEG", 0), ("val_1.JPEG", 1)]
    assert ds[0][0].size == (8, 8)
    notes.write_bytes(b"val_0.JPEG\tn01\xe9\t0\t0\t8\t8\n")
    with pytest.raises(UserError, match="val_annotations.txt: annotation list is not UTF-8"):
        ClassFolder(tmp_path, classes=["n01", "n02"])


def test_a_run_folder_is_claimed_by_its_stage_and_kind(tmp_path) -> None:
    """A stage replaces or resumes its own runs in --out; another stage's (or kind's) record
    there is refused, since the stage would overwrite or delete it; a metrics.json this toolkit
    did not write is no run of its."""
    from smix.io import RunDir

    run = RunDir(tmp_path / "r")
    assert RunDir(tmp_path / "none", create=False).claim("cam", "export")  # nothing there yet
    run.write_metrics(stage="pretrain", kind="classification", results={})
    assert run.claim("pretrain", "classification") is run
    for stage, kind in (("robustness", "fgsm"), ("pretrain", "audit")):
        with pytest.raises(UserError, match=r"r holds another run \(its metrics.json: stage "
                                            r"pretrain, kind classification\): choose another --out"):
            run.claim(stage, kind)
    run.file("metrics.json").write_text('{"stage": "pretrain", "kind": "x"}')  # not smix's
    assert run.claim("robustness", "fgsm") is run
