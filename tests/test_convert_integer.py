"""convert_to_integer: integer models agree with the fake-quant models they come from (CIFAR ResNet-20 on real
images, timm CNNs and a ViT with random weights), layer by layer and end to end; exact ReLU fusion; save /
load; clear errors. Calibration uses Gaussian noise only (never the evaluation images)."""
import pytest
import torch
import torch.nn as nn

import zsqfast
from zsqfast.nn import IntConv2d, IntLinear, QuantConv2d, QuantLinear


def sqnr(a, b):
    return float(20 * torch.log10(a.norm() / (a - b).norm().clamp_min(1e-30)))


def noise_batches(n, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def fake_quant(model, bits=4, hw=32, batches=2):
    q = zsqfast.quantize_model(model, bits, bits)
    return zsqfast.calibrate(q, noise_batches(batches, (8, 3, hw, hw)), warn=False)


def randomized(model, hw):
    """Random-weight model with non-degenerate BatchNorms: random affine, statistics of Gaussian inputs."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for x in noise_batches(2, (16, 3, hw, hw), seed=2):
            model(x)
    return model.eval()


def layerwise_check(q, im, x):
    """Each integer layer, given the input its fake-quant layer saw, reproduces that layer's output (followed
    by the BatchNorm folded into it) to fp32 rounding."""
    edits = {e["path"]: e for e in im.zsqfast_integer["edits"]}
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: seen.setdefault(n, (a[0], o)) and None)
             for n, m in q.named_modules() if isinstance(m, (QuantConv2d, QuantLinear, nn.BatchNorm2d))]
    with torch.no_grad():
        q(x)
    for h in hooks:
        h.remove()
    checked = 0
    with torch.no_grad():
        for name, m in im.named_modules():
            if not isinstance(m, (IntConv2d, IntLinear)) or name not in seen:
                continue
            inp, want = seen[name]
            bn = edits[name].get("bn")
            if bn is not None:  # followed by the folded BatchNorm (eval; a BatchNormAct2d without its act)
                b = q.get_submodule(bn)
                want = nn.functional.batch_norm(want, b.running_mean, b.running_var, b.weight, b.bias, False, 0.0, b.eps)
            got = m(inp)
            tol = 1e-4 * float(want.abs().max()) + 1e-6
            torch.testing.assert_close(got, want, rtol=1e-4, atol=tol, msg=lambda s: f"{name}: {s}")
            checked += 1
    return checked


@pytest.fixture(scope="module")
def cifar():
    try:
        fp = zsqfast.models.load_cifar_resnet(20)
        from zsqfast.data import load_cifar10_test

        x, _ = load_cifar10_test(1000)
    except FileNotFoundError as e:
        pytest.skip(f"CIFAR data not available: {e}")
    q = zsqfast.quantize_model(fp, 4, 4)
    zsqfast.calibrate(q, noise_batches(4, (64, 3, 32, 32)))
    return q, zsqfast.convert_to_integer(q), x


def test_cifar_resnet20_w4a4_agrees_with_fake_quant(cifar):
    """Acceptance (issue 3): >= 99 % top-1 agreement and >= 25 dB logit SQNR. A fixed subset of 1,000 of the
    5,000 test_dev_5k images (the reference kernels are slow); the 5k figures are in README.md."""
    q, im, x = cifar
    rep = zsqfast.integer_report(im)
    assert rep["integer"] == 18 and rep["weight_only"] == 2 and rep["folded_bn"] == 19 and rep["fused_act"] == 9
    with torch.no_grad():
        a, b = q(x), im(x)
    agree = float((a.argmax(1) == b.argmax(1)).float().mean())
    assert agree >= 0.99, agree
    assert sqnr(a, b) >= 25.0, sqnr(a, b)
    assert layerwise_check(q, im, x[:16]) == 20


def test_cifar_save_load_round_trip(cifar, tmp_path):
    q, im, x = cifar
    path = tmp_path / "r20.safetensors"
    zsqfast.save_integer_model(im, path)
    back = zsqfast.load_integer_model(path, lambda: zsqfast.models.cifar_resnet(20))
    back_q = zsqfast.load_integer_model(path, zsqfast.quantize_model(zsqfast.models.cifar_resnet(20), 4, 4))
    with torch.no_grad():
        ref = im(x[:16])
        assert torch.equal(back(x[:16]), ref) and torch.equal(back_q(x[:16]), ref)
    assert path.stat().st_size < 0.5 * sum(p.numel() * 4 for p in q.parameters())
    with pytest.raises(ValueError, match="architecture mismatch"):
        zsqfast.load_integer_model(path, zsqfast.models.cifar_resnet(32))
    with pytest.raises(ValueError, match="architecture mismatch"):
        zsqfast.load_integer_model(path, zsqfast.models.cifar_resnet(20, num_classes=100))


# (name, kwargs, min SQNR dB, min agreement on 16 images). Random W4A4 CNNs are chaotic (fake-quant vs fp32:
# about -2 dB for mobilenetv2, 2 dB for resnet18), so one code flipped by fp32 rounding spreads: measured
# 12-16 dB / 0.81-1.0 (mobilenetv2) and 20-23 dB / 0.94-1.0 (resnet18) over three batches, while ONE layer's
# activation scale off by 5 % gives 3 dB / 0.19 and 11 dB / 0.56. deit_tiny (LayerNorm / softmax amplify the
# same way): 26-133 dB / 0.94-1.0 measured, 11 dB / 0.63 with one scale off by 5 %.
TIMM = [("mobilenetv2_100", {}, 8.0, 0.6), ("resnet18", {}, 15.0, 0.75),
        ("deit_tiny_patch16_224", {"img_size": 64}, 18.0, 0.8)]


@pytest.mark.parametrize("name,kw,min_db,min_agree", TIMM, ids=[t[0] for t in TIMM])
def test_timm_random_weights(name, kw, min_db, min_agree):
    """Random-weight timm models at 64x64, W4A4. End to end the integer model is MORE exact than the fake-quant
    one (exact integer sums vs fp32 convolutions of grid values), and a code flipped by that rounding grows
    through depth, so the end-to-end thresholds are loose (see TIMM); the per-layer check is tight."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    fp = randomized(timm.create_model(name, pretrained=False, **kw), 64)
    q = fake_quant(fp, hw=64)
    x = noise_batches(1, (16, 3, 64, 64), seed=3)[0]
    im = zsqfast.convert_to_integer(q, x[:1])
    rep = zsqfast.integer_report(im)
    assert rep["integer"] > rep["weight_only"]
    assert layerwise_check(q, im, x[:4]) == rep["integer"] + rep["weight_only"]
    with torch.no_grad():
        a, b = q(x), im(x)
    assert a.argmax(1).unique().numel() > 3  # the random model does tell the inputs apart
    agree = float((a.argmax(1) == b.argmax(1)).float().mean())
    assert agree >= min_agree and sqnr(a, b) >= min_db, (agree, sqnr(a, b))
    if name == "mobilenetv2_100":  # depthwise convs run integer
        assert any(m.groups > 1 and m.a_bits is not None for m in im.modules() if isinstance(m, IntConv2d))
    if rep["fused_act"]:  # fusing ReLU + QuantAct into the next layer's quantization gives the same codes
        unfused = zsqfast.convert_to_integer(q, x[:1], fuse=False)
        with torch.no_grad():
            assert torch.equal(unfused(x[:4]), im(x[:4]))


def test_residual_quantact_feeding_conv_and_shortcut():
    """A QuantAct whose output feeds a conv and an identity shortcut stays (frozen); the conv takes its grid."""
    q = fake_quant(zsqfast.models.cifar_resnet(8))
    im = zsqfast.convert_to_integer(q)
    blk = im.layer1[0]
    assert isinstance(blk.conv1, IntConv2d) and blk.conv1.a_bits == 4  # input: the stem's QuantAct
    assert isinstance(im.relu, nn.Sequential) and im.relu[1].frozen  # also read by the shortcut add
    assert isinstance(blk.relu1, nn.Identity) and isinstance(blk.bn1, nn.Identity)  # fused / folded
    assert im.conv1.a_bits is None and im.linear.a_bits is None  # image / pooled features stay float
    assert torch.equal(blk.conv1.a_scale, q.relu[1].qparams()[0])
    x = torch.randn(4, 3, 32, 32)
    assert layerwise_check(q, im, x) == 8


def test_symmetric_and_w3a3_grids():
    q = zsqfast.quantize_model(zsqfast.models.cifar_resnet(8), 3, 3, w_symmetric=True)
    zsqfast.calibrate(q, noise_batches(2, (8, 3, 32, 32)), warn=False)
    im = zsqfast.convert_to_integer(q)
    assert all(int(m.w_zero[0]) == 4 for m in im.modules() if isinstance(m, IntConv2d))
    assert layerwise_check(q, im, torch.randn(4, 3, 32, 32)) == 8


def test_clear_errors():
    with pytest.raises(ValueError, match="quantize_model"):
        zsqfast.convert_to_integer(zsqfast.models.cifar_resnet(8))
    q = zsqfast.quantize_model(zsqfast.models.cifar_resnet(8), 4, 4)
    with pytest.raises(ValueError, match="uncalibrated"):
        zsqfast.convert_to_integer(q)
    with pytest.raises(ValueError, match="w_bits=None"):
        zsqfast.convert_to_integer(fake_quant_float_weights())

    class MyConv(QuantConv2d):
        pass

    q = fake_quant(zsqfast.models.cifar_resnet(8))
    q.conv1 = MyConv(3, 16, 3, padding=1, bias=False, w_bits=4)
    with pytest.raises(ValueError, match="subclasses"):
        zsqfast.convert_to_integer(q)
    with pytest.raises(ValueError, match="w_bits"):
        IntConv2d(4, 4, 3, w_bits=9)
    with pytest.raises(ValueError, match="a_bits"):
        IntLinear(4, 4, w_bits=4, a_bits=1)
    with pytest.raises(ValueError, match="convert_to_integer"):
        zsqfast.save_integer_model(q, "/nonexistent/x.safetensors")


def fake_quant_float_weights():
    q = zsqfast.quantize_model(zsqfast.models.cifar_resnet(8), None, 4)
    return zsqfast.calibrate(q, noise_batches(1, (4, 3, 32, 32)), warn=False)


def test_load_rejects_foreign_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not an integer model"):
        zsqfast.load_integer_model(path, zsqfast.models.cifar_resnet(8))


def test_torchvision_shared_relu():
    """torchvision blocks call one ReLU module twice: its QuantAct is fused only where every call's output is
    read by integer layers alone (the blocks before a downsampling block), and the result stays exact."""
    pytest.importorskip("torchvision")
    fp = randomized(zsqfast.models.build("torchvision:resnet18"), 32)
    q = fake_quant(fp)
    x = noise_batches(1, (2, 3, 32, 32), seed=3)[0]
    im = zsqfast.convert_to_integer(q, x[:1])
    assert zsqfast.integer_report(im)["fused_act"] == 3
    assert layerwise_check(q, im, x) == 21
    with torch.no_grad():
        assert torch.equal(zsqfast.convert_to_integer(q, x[:1], fuse=False)(x), im(x))


def test_intconv2d_rejects_wrong_input_channels():
    """15 and 16 channels pack to the same padded K: IntConv2d checks its own K (the fallback path)."""
    torch.manual_seed(0)
    lw = zsqfast.LowbitWeight.from_float(torch.randn(8, 16, 3, 3), torch.full((8,), 0.2), torch.full((8,), 8.0), 4)
    m = IntConv2d(16, 8, 3, bias=False, w_bits=4, a_bits=4)
    m.set_weight(lw, None, (torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32)))
    assert m(torch.rand(1, 16, 6, 6)).shape == (1, 8, 4, 4)
    for c in (15, 17):
        with pytest.raises(ValueError, match="the weight has K=144"):
            m(torch.rand(1, c, 6, 6))


class ViewNet(nn.Module):
    """LeNet / VGG style: ``x.view(B, -1)`` on the last feature map (a channels_last map cannot take it)."""

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                               nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(self.f(x).view(x.size(0), -1))


def test_view_on_feature_map_runs_nchw(tmp_path):
    """The integer model of a ``view`` model runs (its IntConv2d return NCHW maps), agrees with the fake-quant
    model, and keeps that layout through save / load; a model that can take channels_last keeps it."""
    torch.manual_seed(0)
    q = fake_quant(ViewNet().eval(), hw=8)
    x = torch.randn(2, 3, 8, 8)
    im = zsqfast.convert_to_integer(q, x[:1])
    with torch.no_grad():
        want, got = q(x), im(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    convs = [m for m in im.modules() if isinstance(m, IntConv2d)]
    assert len(convs) == 2 and not any(m.channels_last for m in convs)
    assert any(m.a_bits is not None for m in convs)
    zsqfast.save_integer_model(im, tmp_path / "v.safetensors")
    back = zsqfast.load_integer_model(tmp_path / "v.safetensors", ViewNet)
    assert not any(m.channels_last for m in back.modules() if isinstance(m, IntConv2d))
    with torch.no_grad():
        assert torch.equal(back(x), got)
    fast = zsqfast.convert_to_integer(fake_quant(zsqfast.models.cifar_resnet(8)))
    assert all(m.channels_last for m in fast.modules() if isinstance(m, IntConv2d))
    with torch.no_grad():
        assert fast.conv1(torch.randn(1, 3, 8, 8)).is_contiguous(memory_format=torch.channels_last)


def test_float_layers_reported_and_warned():
    torch.manual_seed(0)
    q = zsqfast.quantize_model(ViewNet().eval(), 4, 4, skip=["fc"])
    zsqfast.calibrate(q, noise_batches(1, (4, 3, 8, 8)), warn=False)
    with pytest.warns(UserWarning, match=r"not quantized and stay float.*: fc$"):
        im = zsqfast.convert_to_integer(q, torch.randn(1, 3, 8, 8))
    rep = zsqfast.integer_report(im)
    assert rep["float"] == 1 and rep["float_layers"] == ["fc"] and rep["integer"] + rep["weight_only"] == 2
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        im = zsqfast.convert_to_integer(fake_quant(zsqfast.models.cifar_resnet(8)))
    assert zsqfast.integer_report(im)["float"] == 0


class EvenSame(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.bn = nn.Conv2d(3, 4, 2, padding="same"), nn.BatchNorm2d(4)  # even kernel: asymmetric
        self.r, self.c2 = nn.ReLU(), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.c2(self.r(self.bn(self.c(x)))).mean((2, 3))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_unconvertible_layer_is_named():
    """The error names the layer (as for a K too large), in convert_to_integer and in the cheap pre-check
    (no calibration, tracing or packing) that zsqfast.quantize(export=True) runs."""
    q = zsqfast.quantize_model(EvenSame().eval(), 4, 4)
    msg = r"^convert_to_integer cannot convert layer 'c' \(QuantConv2d\): padding='same' .*skip=\['c'\]\)$"
    zsqfast.calibrate(q, noise_batches(1, (4, 3, 8, 8)), warn=False)
    with pytest.raises(ValueError, match=msg):
        zsqfast.convert_to_integer(q, torch.randn(1, 3, 8, 8))
    from zsqfast.convert import check_convertible

    with pytest.raises(ValueError, match=msg):
        check_convertible(zsqfast.quantize_model(EvenSame().eval(), 4, 4))  # uncalibrated: no trace needed
    check_convertible(fake_quant(zsqfast.models.cifar_resnet(8)))  # a convertible model passes
