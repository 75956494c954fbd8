"""Grad-CAM: the head-only fast path against the official SynQ procedure (full backward); standard mode
against an independent textbook implementation (always) and the grad-cam package (when installed); the
GAP -> linear closed form against the general path and its detection; ViT token grids; the CAM loss."""
import functools

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import zsqfast
from zsqfast.finetune.gradcam import MODES, cam_alignment_loss, default_layer, reference_gradcam
from zsqfast.finetune.head import linear_head
from zsqfast.models import build

CNNS = [("cifar_resnet20", 32), ("resnet18", 64), ("mobilenetv2_100", 64)]


VIT_SIZE = 64  # deit_tiny at 64x64: a 4x4 token grid (keeps the test fast; the code path is the same)


@functools.lru_cache(maxsize=None)
def _cached(name):
    torch.manual_seed(0)
    return build(name).eval()


def _model(name):
    """One randomly initialised model per name for the whole module (tests never modify it)."""
    return _cached(name)


def _vit():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=VIT_SIZE).eval()


def _grid(t):  # tokens (B, 1 + s*s, D) -> (B, D, s, s), what the package's reshape_transform must do
    s = int((t.shape[1] - 1) ** 0.5)
    return t[:, 1:].transpose(1, 2).reshape(t.shape[0], t.shape[2], s, s)


def textbook_gradcam(model, layer, x, reshape=None):
    """Textbook Grad-CAM, written independently: one backward of the summed predicted-class scores through
    the whole network, gradients from a tensor hook, per-sample numpy normalisation as pytorch-grad-cam."""
    store = {}

    def fwd(module, inputs, output):
        store["a"] = output
        output.register_hook(lambda g: store.__setitem__("g", g))

    handle = layer.register_forward_hook(fwd)
    try:
        out = model(x)
    finally:
        handle.remove()
    model.zero_grad()
    out[torch.arange(len(x)), out.argmax(1)].sum().backward()
    a, g = store["a"].detach(), store["g"].detach()
    if reshape is not None:
        a, g = reshape(a), reshape(g)
    maps = []
    for i in range(len(x)):
        w = g[i].mean(dim=(1, 2)).numpy()
        c = np.maximum((w[:, None, None] * a[i].numpy()).sum(0), 0)
        c = (c - c.min()) / (c.max() - c.min() + 1e-7)
        c = F.interpolate(torch.from_numpy(c)[None, None], size=tuple(x.shape[-2:]), mode="bilinear",
                          align_corners=False)[0, 0].numpy()
        maps.append((c - c.min()) / (c.max() - c.min() + 1e-7))
    return torch.from_numpy(np.stack(maps))


@pytest.mark.parametrize("name,size", CNNS)
def test_synq_mode_matches_official_procedure(name, size):
    torch.manual_seed(0)
    model = _model(name)
    x = torch.randn(6, 3, size, size)
    want = reference_gradcam(model, x)
    got = zsqfast.gradcam(model, x)
    assert got.shape == (6, size, size)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("name,size", CNNS)
def test_channels_last_forward_same_maps(name, size):
    # on the CPU gradcam runs its forward on a channels-last copy of x by default; the layout changes only
    # the fp32 rounding of the convolutions
    torch.manual_seed(2)
    model = _model(name)
    x = torch.randn(4, 3, size, size)
    before = x.clone()
    for mode in MODES:
        nchw = zsqfast.gradcam(model, x, mode=mode, channels_last=False)
        assert torch.allclose(zsqfast.gradcam(model, x, mode=mode), nchw, atol=1e-5)
    assert torch.equal(x, before) and x.is_contiguous()                       # x is copied, never converted
    assert all(p.is_contiguous() for p in model.parameters())                 # the model is not converted


class _ViewNet(nn.Module):
    """LeNet-style: flattens a 4x4 feature map with .view, which a channels-last map cannot take."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        f = self.features(x)
        return self.fc(f.view(f.size(0), -1))


def test_channels_last_falls_back_for_view_models():
    from zsqfast.finetune import layout

    torch.manual_seed(3)
    model = _ViewNet().eval()
    x = torch.randn(4, 3, 16, 16)
    with pytest.raises(RuntimeError, match="view size"):
        model(x.contiguous(memory_format=torch.channels_last))       # what the fallback is for
    with pytest.raises(RuntimeError, match="view size"):
        zsqfast.gradcam(model, x, layer="features.4", channels_last=True)  # explicit: the error comes through
    want = zsqfast.gradcam(model, x, layer="features.4", channels_last=False)
    assert not layout._known_nchw(model)
    got = zsqfast.gradcam(model, x, layer="features.4")               # auto: retried NCHW, then remembered
    assert torch.equal(got, want) and layout._known_nchw(model)
    assert not layout.wants_channels_last(x, (model,)) and layout.wants_channels_last(x, (_model("resnet18"),))
    # a model in training mode is never tried channels-last in auto mode (a failed attempt would already have
    # moved its BatchNorm statistics)
    fresh = _ViewNet().train()
    nbt = int(fresh.features[1].num_batches_tracked)
    zsqfast.gradcam(fresh, x, layer="features.4")
    assert int(fresh.features[1].num_batches_tracked) - nbt == 2 and not layout._known_nchw(fresh)  # probe + run


@pytest.mark.parametrize("name,size", CNNS)
def test_standard_mode_matches_textbook(name, size):
    torch.manual_seed(1)
    model = _model(name)
    x = torch.randn(4, 3, size, size)
    layer = default_layer(model, "standard", x)
    want = textbook_gradcam(model, layer, x)
    for closed in ("auto", False):
        assert torch.allclose(zsqfast.gradcam(model, x, mode="standard", closed_form=closed), want, atol=1e-5)


def test_vit_token_grid():
    model = _vit()
    x = torch.randn(2, 3, VIT_SIZE, VIT_SIZE)
    target = model.blocks[-1].norm1  # the last block's output patch tokens never reach the class token
    assert default_layer(model, "synq") is target is default_layer(model, "standard")
    assert default_layer(nn.DataParallel(model)) is target  # the student under torchrun is wrapped
    want = textbook_gradcam(model, target, x, reshape=_grid)
    got = zsqfast.gradcam(model, x, mode="standard")
    assert got.shape == (2, VIT_SIZE, VIT_SIZE) and torch.allclose(got, want, atol=1e-5)
    assert got.flatten(1).amax(1).min() > 0.99  # a real map per image, not the all-zero one of blocks[-1]
    assert linear_head(model, target, x) is None  # attention + LayerNorm + class token: no closed form
    s = zsqfast.gradcam(model, x)  # synq mode on the same grid
    assert s.shape == (2, VIT_SIZE, VIT_SIZE) and s.min() >= 0 and s.max() <= 1 + 1e-6
    assert s.flatten(1).std(1).min() > 0.05


def test_swin_channels_last_token_grid():
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=2,
                              window_size=4, depths=(1, 1), num_heads=(1, 2), embed_dim=16).eval()
    x = torch.randn(2, 3, 32, 32)
    target = model.layers[-1].blocks[-1].norm1
    assert default_layer(model, "synq") is target
    want = textbook_gradcam(model, target, x, reshape=lambda t: t.permute(0, 3, 1, 2))  # (B, H, W, C) tokens
    got = zsqfast.gradcam(model, x, mode="standard")
    assert got.shape == (2, 32, 32) and torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(zsqfast.gradcam(nn.DataParallel(model), x, mode="standard"), want, atol=1e-5)
    q = zsqfast.quantize_model(model, 4, 8)
    zsqfast.calibrate(q, [x])
    loss = cam_alignment_loss(model, q, x)
    loss.backward()  # the CAM loss trains the student through the permuted view
    assert loss > 0 and q.layers[0].blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_standard_mode_matches_grad_cam_package():
    pgc = pytest.importorskip("pytorch_grad_cam")
    torch.manual_seed(2)
    model = _model("resnet18")
    x = torch.randn(3, 3, 64, 64)
    with pgc.GradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
        want = torch.from_numpy(cam(input_tensor=x, targets=None))
    assert torch.allclose(zsqfast.gradcam(model, x, mode="standard", layer=model.layer4[-1]), want, atol=1e-4)
    vit = _vit()
    xv = torch.randn(2, 3, VIT_SIZE, VIT_SIZE)
    with pgc.GradCAM(model=vit, target_layers=[vit.blocks[-1].norm1], reshape_transform=_grid) as cam:
        want = torch.from_numpy(cam(input_tensor=xv, targets=None))
    assert torch.allclose(zsqfast.gradcam(vit, xv, mode="standard"), want, atol=1e-4)


@pytest.mark.parametrize("name,size", CNNS)
def test_closed_form_detected_and_equal_to_general_path(name, size, monkeypatch):
    torch.manual_seed(3)
    model = _model(name)
    x = torch.randn(2, 3, size, size)
    q = zsqfast.calibrate(zsqfast.quantize_model(model, 4, 4), [x])
    for m in (model, q):
        layer = default_layer(m, "standard", x)
        assert isinstance(linear_head(m, layer, x), nn.Linear)            # the GAP -> linear head found
        assert linear_head(m, default_layer(m, "synq"), x) is None        # raw conv output: BN/ReLU follow
        general = {mode: zsqfast.gradcam(m, x, mode=mode, layer=layer, closed_form=False) for mode in MODES}
        with monkeypatch.context() as mp:  # the closed form must not call autograd at all
            mp.setattr(torch.autograd, "grad", lambda *a, **k: (_ for _ in ()).throw(AssertionError("backward")))
            for mode in MODES:
                closed = zsqfast.gradcam(m, x, mode=mode, layer=layer, closed_form=True)
                assert torch.allclose(closed, general[mode], atol=1e-5)


def test_detection_rejects_nonlinear_heads():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).eval()
    x = torch.randn(2, 3, 9, 9)
    assert linear_head(net, net[0], x) is None          # ReLU between the layer and the pool
    assert linear_head(net, net[1], x) is net[4]
    with pytest.raises(ValueError, match="closed_form=True"):
        zsqfast.gradcam(net, x, layer=net[0], closed_form=True)

    class TwoUses(nn.Module):  # the map also feeds a second branch
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)

        def forward(self, t):
            a = self.conv(t)
            return self.fc(a.mean((2, 3))) + a.amax((1, 2, 3))[:, None]

    two = TwoUses().eval()
    assert linear_head(two, two.conv, x) is None
    got = zsqfast.gradcam(two, x, mode="standard", layer=two.conv)
    assert torch.allclose(got, textbook_gradcam(two, two.conv, x), atol=1e-5)


def test_fast_path_builds_no_parameter_gradients():
    model = _model("cifar_resnet20")
    model.zero_grad(set_to_none=True)
    zsqfast.gradcam(model, torch.randn(2, 3, 32, 32))
    assert all(p.grad is None for p in model.parameters())


def test_cam_alignment_loss_trains_the_student():
    torch.manual_seed(0)
    teacher = _model("cifar_resnet20")
    student = zsqfast.calibrate(zsqfast.quantize_model(teacher, 4, 4), [torch.randn(8, 3, 32, 32)])
    x = torch.randn(4, 3, 32, 32)
    loss = zsqfast.cam_alignment_loss(teacher, student, x)
    loss.backward()
    assert loss.item() >= 0
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in teacher.parameters())
    # identical models: zero loss
    assert zsqfast.cam_alignment_loss(teacher, teacher, x).item() < 1e-10


def test_layer_selection_and_errors():
    torch.manual_seed(1)
    model = _model("cifar_resnet20")
    x = torch.randn(3, 3, 32, 32)
    by_name = zsqfast.gradcam(model, x, layer="layer3.2.conv2", mode="standard")
    by_module = zsqfast.gradcam(model, x, layer=model.layer3[2].conv2, mode="standard")
    assert torch.equal(by_name, by_module)
    assert by_name.min() >= 0 and by_name.max() <= 1 + 1e-6
    with pytest.raises(ValueError, match="mode"):
        zsqfast.gradcam(model, x, mode="cam++")
    with pytest.raises(ValueError, match="B, C, H, W"):
        zsqfast.gradcam(model, x[0])


def test_fused_cam_loss_matches_composite_and_gradcheck():
    from zsqfast.finetune.cam_loss import cam_mse
    from zsqfast.finetune.gradcam import finish_map

    torch.manual_seed(5)
    a = torch.randn(3, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    alpha = torch.rand(3, 5, dtype=torch.float64) - 0.3        # some negative: ReLU zeros part of the map
    t = torch.rand(3, 9, 11, dtype=torch.float64)
    composite = F.mse_loss(finish_map((alpha[:, :, None, None] * a).sum(1, keepdim=True), (9, 11), "synq"), t)
    fused = cam_mse(a, alpha, t)
    assert torch.allclose(fused, composite, rtol=1e-12, atol=0)
    (g_c,) = torch.autograd.grad(composite, a)
    (g_f,) = torch.autograd.grad(fused, a)
    assert torch.allclose(g_f, g_c, atol=1e-14)
    assert torch.autograd.gradcheck(lambda v: cam_mse(v, alpha, t), (a,))
    with pytest.raises(ValueError, match="cam_mse"):
        cam_mse(a, alpha[:, :2], t)


def test_target_forms_and_wrong_lengths():
    """One class for every sample (int, NumPy int, 0-dim tensor) or an integer (B,) tensor, on both paths;
    a tensor of another length (gather would read only its first rows) or a float one is a ValueError."""
    torch.manual_seed(6)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    x = torch.randn(4, 3, 8, 8)
    for cf in (False, True):
        full = zsqfast.gradcam(net, x, target=torch.tensor([2, 2, 2, 2]), closed_form=cf)
        for t in (2, np.int64(2), torch.tensor(2), torch.tensor([2, 2, 2, 2], dtype=torch.int32)):
            assert torch.equal(zsqfast.gradcam(net, x, target=t, closed_form=cf), full)
        for bad in (torch.tensor([2]), torch.tensor([2, 2]), torch.tensor([2] * 6), torch.tensor([2.0] * 4),
                    torch.ones(4, 1, dtype=torch.int64), [2, 2, 2, 2], 2.0, True, "best"):
            with pytest.raises(ValueError, match="target must be"):
                zsqfast.gradcam(net, x, target=bad, closed_form=cf)
    assert torch.allclose(zsqfast.gradcam(net, x, target=3, closed_form=True),
                          zsqfast.gradcam(net, x, target=3, closed_form=False), atol=1e-5)
