"""CAM-method registry: plain CAM against the grad-cam package, batching, hooks, errors."""

from __future__ import annotations

import sys

import pytest
import torch

from smix.arch import build_model
from smix.errors import UserError
from cam.methods import (CamMethod, build_cam, get_cam_method, list_cam_methods, postprocess,
                         register_cam)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", 5).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(1))


def test_registry_lists_the_six_methods_and_rejects_unknown_names() -> None:
    assert list_cam_methods()[:6] == ["cam", "gradcam", "gradcam++", "scorecam", "eigencam",
                                      "layercam"]
    with pytest.raises(UserError, match="unknown CAM method 'gradkam'; valid: cam, gradcam"):
        get_cam_method("gradkam")


def test_plain_cam_equals_gradcam_after_relu_and_minmax(model, images) -> None:
    """For GAP+FC, dlogit_k/dA_c = w_kc/(h·w) everywhere, so Grad-CAM = ReLU(CAM)/(h·w):
    equal after Grad-CAM's ReLU; plain CAM itself is min–max scaled raw (no ReLU)."""
    targets = torch.tensor([0, 1, 2, 3])
    method = build_cam("cam", model, "resnet18")
    cam = method(images, targets)
    grad = build_cam("gradcam", model, "resnet18")(images, targets)
    assert cam.maps.shape == grad.maps.shape == (4, 96, 96)
    assert cam.maps.max() > 0.99  # not the trivial all-zero map
    raw = method.raw(images, targets)[0].detach()
    assert float(raw.min()) < 0  # negative evidence, so the two scalings differ
    torch.testing.assert_close(postprocess(raw, (96, 96), relu=True), grad.maps, atol=2e-5,
                               rtol=0)
    assert float((cam.maps - grad.maps).abs().max()) > 0.05
    torch.testing.assert_close(cam.logits, grad.logits)
    assert torch.equal(cam.targets, targets)


def test_plain_cam_is_the_fc_weighted_sum_of_layer4(model, images) -> None:
    """Hand-computed reference: Σ_c w_kc·A_c, bilinear upsampling, min–max (no ReLU)."""
    feats = {}
    h = model.layer4.register_forward_hook(lambda m, i, o: feats.setdefault("a", o))
    with torch.no_grad():
        logits = model(images[:2])
    h.remove()
    pred = logits.argmax(1)
    raw = (model.fc.weight[pred][:, :, None, None] * feats["a"]).sum(1)
    up = torch.nn.functional.interpolate(raw[:, None], size=(96, 96), mode="bilinear")[:, 0]
    lo = up.flatten(1).min(1).values[:, None, None]
    hi = up.flatten(1).max(1).values[:, None, None]
    res = build_cam("cam", model, "resnet18")(images[:2])  # target None: the prediction
    assert torch.equal(res.targets, pred)
    torch.testing.assert_close(res.maps, (up - lo) / (hi - lo), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_batched_equals_per_image(model, images, method) -> None:
    cam = build_cam(method, model, "resnet18")
    targets = torch.tensor([4, 3, 2, 1])
    batched = cam(images, targets)
    single = torch.cat([cam(images[i:i + 1], targets[i:i + 1]).maps for i in range(4)])
    torch.testing.assert_close(batched.maps, single, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["cam", "gradcam", "gradcam++", "eigencam", "layercam"])
def test_every_method_gives_unit_range_maps_and_releases_its_hooks(model, images, method) -> None:
    res = build_cam(method, model, "resnet18")(images[:2], torch.tensor([1, 2]))
    assert res.maps.shape == (2, 96, 96) and res.maps.dtype == torch.float32
    assert float(res.maps.min()) >= 0 and float(res.maps.max()) <= 1 + 1e-6
    assert res.logits.shape == (2, 5)
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method,package_class", [("gradcam++", "GradCAMPlusPlus"),
                                                  ("eigencam", "EigenCAM"),
                                                  ("layercam", "LayerCAM")])
def test_package_methods_equal_the_package_called_directly(model, images, method,
                                                           package_class) -> None:
    """Each registered name runs the grad-cam class it says, and the wrapper (the backward
    cut at the target layer, the frozen parameters, one target per image) leaves its maps as
    the package computes them on its own, through the whole model (layer3: the cut matters)."""
    import copy

    from pytorch_grad_cam import EigenCAM, GradCAMPlusPlus, LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    targets = torch.tensor([3, 0])
    net = copy.deepcopy(model)
    cls = {"GradCAMPlusPlus": GradCAMPlusPlus, "EigenCAM": EigenCAM, "LayerCAM": LayerCAM}
    cam = cls[package_class](model=net, target_layers=[net.layer3])
    try:
        want = torch.from_numpy(cam(input_tensor=images[:2],
                                    targets=[ClassifierOutputTarget(int(t)) for t in targets]))
    finally:
        cam.activations_and_grads.release()
    got = build_cam(method, model, "resnet18", "layer3")(images[:2], targets).maps
    assert float(want.max()) > 0.99  # not the trivial all-zero map
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_scorecam_through_the_package_on_an_overridden_layer(model, images) -> None:
    """Score-CAM costs one forward per channel: layer1 (64 channels) keeps the test fast."""
    import copy

    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    res = build_cam("scorecam", model, "resnet18", layer="layer1")(images[:1], torch.tensor([2]))
    assert res.maps.shape == (1, 96, 96) and float(res.maps.max()) == pytest.approx(1, abs=1e-6)
    assert not model.layer1._forward_hooks
    net = copy.deepcopy(model)  # the reference: the package's own ScoreCAM, called directly
    cam = ScoreCAM(model=net, target_layers=[net.layer1])
    try:
        want = torch.from_numpy(cam(input_tensor=images[:1], targets=[ClassifierOutputTarget(2)]))
    finally:
        cam.activations_and_grads.release()
    torch.testing.assert_close(res.maps, want, atol=1e-5, rtol=0)


def test_target_layer_defaults_to_the_registry_and_can_be_overridden(model) -> None:
    assert build_cam("gradcam", model, "resnet18").layer_name == "layer4"
    assert build_cam("gradcam", model, "resnet18", "layer3.1").layer is model.layer3[1]
    assert build_cam(None, model, "resnet18").name == "cam"


def test_unknown_layer_and_plain_cam_on_another_layer_are_user_errors(model) -> None:
    with pytest.raises(UserError, match="unknown layer 'layer9' for resnet18; top-level"):
        build_cam("gradcam", model, "resnet18", "layer9")
    with pytest.raises(UserError, match="method 'cam' needs the layer that feeds global"):
        build_cam("cam", model, "resnet18", "layer3")


def test_plain_cam_on_preact_resnet_uses_its_final_relu() -> None:
    torch.manual_seed(0)
    net = build_model("preact_resnet18", 3).eval()
    x = torch.randn(2, 3, 32, 32)
    method = build_cam("cam", net, "preact_resnet18")
    raw = method.raw(x, torch.tensor([0, 1]))[0].detach()
    b = build_cam("gradcam", net, "preact_resnet18")(x, torch.tensor([0, 1]))
    torch.testing.assert_close(postprocess(raw, (32, 32), relu=True), b.maps, atol=2e-5, rtol=0)


def test_postprocess_flat_map_is_zero_and_negative_is_clipped_only_with_relu() -> None:
    maps = torch.stack([torch.full((2, 2), 3.0), torch.tensor([[-1.0, 0.0], [0.0, 2.0]])])
    out = postprocess(maps, (2, 2))
    assert torch.equal(out[0], torch.zeros(2, 2))
    assert torch.equal(out[1], torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    raw = postprocess(maps, (2, 2), relu=False)
    assert torch.equal(raw[0], torch.zeros(2, 2))
    assert torch.equal(raw[1], torch.tensor([[0.0, 1 / 3], [1 / 3, 1.0]]))


def test_plain_cam_box_at_a_threshold_follows_zhou_and_choe_not_relu() -> None:
    """7x7 raw CAM: object +1 (3x3), halo +0.1 (the 5x5 ring), background -0.6. Min–max of
    the raw map (Zhou's returnCAM, Choe's normalize_scoremap) puts the halo at
    0.7/1.6 = 0.4375 > 0.2, so the box at 0.2 is the 5x5; after a ReLU the halo is 0.1 < 0.2
    and the box shrinks to the object's 3x3."""
    from cam.localize import largest_region_boxes

    raw = torch.full((1, 7, 7), -0.6)
    raw[0, 1:6, 1:6] = 0.1
    raw[0, 2:5, 2:5] = 1.0
    assert get_cam_method("cam").relu is False and get_cam_method("gradcam").relu is True
    plain = postprocess(raw, (7, 7), relu=get_cam_method("cam").relu)
    assert float(plain[0, 1, 1]) == pytest.approx(0.4375) and float(plain[0, 0, 0]) == 0
    assert largest_region_boxes(plain.numpy() > 0.2).tolist() == [[1, 1, 6, 6]]
    clipped = postprocess(raw, (7, 7), relu=True)
    assert largest_region_boxes(clipped.numpy() > 0.2).tolist() == [[2, 2, 5, 5]]


def test_postprocess_upsampled_flat_map_is_zero_not_rounding_noise() -> None:
    """Upsampling a 1x1 or constant map leaves float32 differences of ~1e-7: those are not a
    signal, so the map is all zero; a small but real span is still stretched to [0, 1]."""
    one = postprocess(torch.full((1, 1, 1), 0.7345), (8, 8))
    const = postprocess(torch.full((1, 3, 3), 1234.5), (13, 13))
    assert torch.equal(one, torch.zeros(1, 8, 8)) and torch.equal(const, torch.zeros(1, 13, 13))
    small = postprocess(torch.tensor([[[1000.0, 1000.1]]]), (1, 2))
    assert torch.equal(small, torch.tensor([[[0.0, 1.0]]]))


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_a_one_pixel_layer_gives_zero_maps_and_warns_once(model, method, capsys) -> None:
    """resnet18's layer4 is 1x1 at 32 px input (the quick demo's size): no localisation."""
    cam = build_cam(method, model, "resnet18")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    maps = torch.cat([cam(x, torch.tensor([0, 1])).maps, cam(x[:1], torch.tensor([2])).maps])
    assert torch.equal(maps, torch.zeros(3, 32, 32))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'layer4' of resnet18 is 1x1 at 32x32 input" in err
    assert not model.layer4._forward_hooks


def test_a_new_method_is_one_registration(model, images) -> None:
    @register_cam("test-uniform")
    class Uniform(CamMethod):
        def raw(self, imgs, targets):
            logits = self.model(imgs)
            t = logits.argmax(1) if targets is None else targets
            return torch.arange(4.0).view(1, 2, 2).expand(len(imgs), 2, 2), logits, t

    try:
        res = build_cam("test-uniform", model, "resnet18")(images[:2])
        assert res.maps.shape == (2, 96, 96)
        assert float(res.maps[0, 0, 0]) == 0 and float(res.maps[0, -1, -1]) == 1
    finally:
        from cam import methods

        methods._METHODS.pop("test-uniform")


def test_gradcam_on_a_middle_layer_matches_full_autograd(model, images) -> None:
    """The backward pass is cut at the target layer; the gradients there must not change.
    Reference: plain autograd through the whole model, then Grad-CAM by hand."""
    feats = {}
    h = model.layer3.register_forward_hook(lambda m, i, o: feats.setdefault("a", o))
    logits = model(images[:2])
    h.remove()
    targets = torch.tensor([3, 0])
    grads, = torch.autograd.grad(logits[[0, 1], targets].sum(), feats["a"])
    raw = (grads.mean((2, 3), keepdim=True) * feats["a"]).sum(1).detach()
    want = postprocess(raw, (96, 96))
    flags = [p.requires_grad for p in model.parameters()]
    got = build_cam("gradcam", model, "resnet18", "layer3")(images[:2], targets).maps
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert [p.requires_grad for p in model.parameters()] == flags  # restored
    assert not model.layer3._forward_hooks


def _warn_on_rank(rank: int, port: int, queue) -> None:
    import io
    import torch.distributed as dist
    from smix.arch import build_model
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        sys.stderr = err = io.StringIO()
        torch.manual_seed(0)
        cam = build_cam("cam", build_model("resnet18", 3).eval(), "resnet18")
        cam(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
        queue.put((rank, err.getvalue()))
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_the_one_pixel_warning_is_said_once_under_torchrun() -> None:
    """Each of 2 processes printed it: every rank sees the same layer, rank 0 says it."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_warn_on_rank, args=(r, 29575, queue)) for r in range(2)]
    for p in procs:
        p.start()
    said = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert said[0].count("is 1x1 at 32x32 input") == 1 and said[1] == ""
