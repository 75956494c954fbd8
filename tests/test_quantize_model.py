"""quantize_model on the models the issue names: complete swap, placement, FP model untouched, close to FP
at 8 bits; errors, reports, calibration warnings, torch.compile."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

from zsqfast.models import build
from zsqfast.nn import QuantAct, QuantConv2d, QuantLinear
from zsqfast.quantize_model import calibrate, quantization_report, quantize_model

MODELS = [  # (name, input size, placement expected). 224 only for the ViT (fixed patch grid).
    ("cifar_resnet20", 32, "relu"),
    ("resnet18", 64, "relu"),
    ("mobilenetv2_100", 64, "relu"),  # depthwise convs, ReLU6 inside timm's BatchNormAct2d
    ("torchvision:resnet18", 64, "relu"),
    ("deit_tiny_patch16_224", 224, "linear_input"),
]


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name,size,placement", MODELS, ids=[m[0] for m in MODELS])
def test_quantize_model(name, size, placement):
    torch.manual_seed(0)
    fp = build(name).eval()
    state_before = copy.deepcopy(fp.state_dict())
    types_before = [(n, type(m)) for n, m in fp.named_modules()]
    q = quantize_model(fp, 8, 8)

    # every float conv / linear swapped, counted by the report
    report = quantization_report(q)
    n_conv = sum(type(m) is nn.Conv2d for m in fp.modules())
    n_lin = sum(type(m) is nn.Linear for m in fp.modules())
    assert report["float_conv_linear"] == 0 and report["float_layers"] == []
    assert (report["QuantConv2d"], report["QuantLinear"]) == (n_conv, n_lin) and n_conv > 0 and n_lin > 0
    assert report["w_bits"] == {8: n_conv + n_lin}
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in q.modules())
    # float layers keep their state_dict keys: an FP checkpoint loads, only the QuantAct state is new
    missing, unexpected = q.load_state_dict(fp.state_dict(), strict=False)
    assert unexpected == [] and missing and all(".running_m" in k or ".num_" in k or ".is_" in k for k in missing)

    # placement
    convs = [m for m in q.modules() if isinstance(m, QuantConv2d)]
    assert all(c.input_quant is None for c in convs)  # the image (and every conv input) is not re-quantized
    if placement == "relu":  # one QuantAct right after every ReLU / ReLU6 module, under the ReLU's name
        relus = [n for n, m in fp.named_modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
        assert report["QuantAct"] == len(relus) > 0
        for n in relus:
            wrapped = q.get_submodule(n)
            assert isinstance(wrapped, nn.Sequential) and len(wrapped) == 2
            assert isinstance(wrapped[0], (nn.ReLU, nn.ReLU6)) and isinstance(wrapped[1], QuantAct)
        assert all(m.input_quant is None for m in q.modules() if isinstance(m, QuantLinear))
    else:  # ViT: one input QuantAct before every Linear (attn qkv/proj, mlp fc1/fc2, head), none elsewhere
        lins = [m for m in q.modules() if isinstance(m, QuantLinear)]
        assert all(isinstance(m.input_quant, QuantAct) for m in lins)
        assert report["QuantAct"] == len(lins) == n_lin
        assert isinstance(q.patch_embed.proj, QuantConv2d)

    # the FP model is untouched: same module types, bit-identical parameters and buffers, not shared
    assert [(n, type(m)) for n, m in fp.named_modules()] == types_before
    after = fp.state_dict()
    assert after.keys() == state_before.keys() and all(torch.equal(v, after[k]) for k, v in state_before.items())
    assert all(p.data_ptr() != p2.data_ptr() for p, p2 in zip(fp.parameters(), q.parameters()))

    # close to FP at 8 bits after a zero-shot calibration on two random batches (BatchNorm stays in eval)
    x = torch.randn(2, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's shared ReLUs: tested in test_calibrate_warns_...
        calibrate(q, [torch.randn(2, 3, size, size), torch.randn(2, 3, size, size)])
    with torch.no_grad():
        ref, out = fp(x), q(x)
    assert not torch.equal(out, ref)  # the quantizers are active
    assert _cos(out, ref) > 0.99 and _rel(out, ref) < 0.15, (_cos(out, ref), _rel(out, ref))


def test_error_grows_as_bits_shrink():
    """Non-trivial closeness: the same pipeline at 8 / 4 / 2 bits gives ordered, distinct errors."""
    torch.manual_seed(0)
    fp = build("cifar_resnet20").eval()
    x, cal = torch.randn(4, 3, 32, 32), [torch.randn(8, 3, 32, 32)]
    with torch.no_grad():
        ref = fp(x)
        errs = [_rel(calibrate(quantize_model(fp, b, b), cal)(x), ref) for b in (8, 4, 2)]
    assert errs[0] < 0.02 < errs[1] < errs[2], errs


def test_first_last_bits():
    fp = build("cifar_resnet20")
    q = quantize_model(fp, 4, 4, first_last_bits=8)
    layers = [m for m in q.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert q.conv1 is layers[0] and q.linear is layers[-1]
    assert layers[0].w_bits == 8 and layers[-1].w_bits == 8 and {m.w_bits for m in layers[1:-1]} == {4}
    assert quantization_report(q)["w_bits"] == {8: 2, 4: 18}
    assert {m.bits for m in q.modules() if isinstance(m, QuantAct)} == {4}
    vit = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2))
    qv = quantize_model(vit, 4, 4, first_last_bits=8)  # linear_input: the head's input quantizer too
    assert [(m.w_bits, m.input_quant.bits) for m in qv if isinstance(m, QuantLinear)] == [(8, 4), (4, 4), (8, 8)]
    qv = quantize_model(vit, 4, None, first_last_bits=8)  # float activations stay float, the head's too
    assert quantization_report(qv)["QuantAct"] == 0


def test_symmetric_weights_and_float_options():
    q = quantize_model(build("cifar_resnet20"), 4, None, w_symmetric=True)
    assert quantization_report(q)["QuantAct"] == 0
    assert all(m.w_symmetric for m in q.modules() if isinstance(m, QuantConv2d))
    q = quantize_model(build("cifar_resnet20"), 32, 8)
    assert quantization_report(q)["float_weight"] == 20 and quantization_report(q)["QuantAct"] == 19


@pytest.mark.parametrize("bad", [1, 9, 0, 4.5, "4", True])
def test_bad_bits(bad):
    fp = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    for kw in ("w_bits", "a_bits", "first_last_bits"):
        args = {"w_bits": 4, "a_bits": 4, "first_last_bits": None, kw: bad}
        with pytest.raises(ValueError, match=kw):
            quantize_model(fp, **args)


@pytest.mark.parametrize("layer", [nn.Conv1d(3, 3, 1), nn.Conv3d(3, 3, 1), nn.ConvTranspose2d(3, 3, 1),
                                   nn.LazyLinear(3), nn.MultiheadAttention(4, 2)], ids=lambda m: type(m).__name__)
def test_unknown_layers_raise_unless_skipped(layer):
    model = nn.Sequential(layer, nn.ReLU(), nn.Flatten(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=type(layer).__name__):
        quantize_model(model, 4, 4)
    q = quantize_model(model, 4, 4, skip=["0"])
    assert type(q[0]) is type(layer) and isinstance(q[3], QuantLinear)
    assert quantization_report(q)["QuantLinear"] == 1


def test_other_errors_and_warnings():
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        quantize_model(nn.Sequential(nn.ReLU()), 4, 4)
    q = quantize_model(build("cifar_resnet20"), 4, 4)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(q, 4, 4)
    with pytest.raises(ValueError, match="act_placement"):
        quantize_model(build("cifar_resnet20"), 4, 4, act_placement="everywhere")
    with pytest.raises(ValueError, match="skip names"):
        quantize_model(build("cifar_resnet20"), 4, 4, skip=["nope"])
    with pytest.warns(UserWarning, match="no activation quantizer"):  # GELU CNN: nothing to place
        quantize_model(nn.Sequential(nn.Conv2d(3, 3, 1), nn.GELU()), 4, 4)
    # a subclass of Linear with its own forward (e.g. nn.MultiheadAttention's out_proj) is not silently swapped
    with pytest.raises(ValueError, match="NonDynamicallyQuantizableLinear"):
        quantize_model(nn.Sequential(nn.modules.linear.NonDynamicallyQuantizableLinear(3, 3)), 4, 4)


def test_modes_follow_the_float_model_and_uncalibrated_eval_raises():
    q = quantize_model(build("cifar_resnet20").eval(), 4, 4)
    assert not any(m.training for m in q.modules())
    with pytest.raises(RuntimeError, match="calibrate"):
        q(torch.randn(1, 3, 32, 32))
    q = quantize_model(build("cifar_resnet20").train(), 4, 4)
    assert all(m.training for m in q.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_in_forward_on_cuda():
    """Weight qparams, the EMA observer and fake quantization never synchronise with the host."""
    q = quantize_model(build("cifar_resnet20"), 4, 4).cuda()
    calibrate(q, [torch.randn(4, 3, 32, 32, device="cuda")])
    q.train()  # BatchNorm batch statistics and QuantAct observation included
    x = torch.randn(4, 3, 32, 32, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        q(x).sum().backward()
        q.eval()(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_calibrate_warns_about_shared_relu_modules():
    """torchvision's BasicBlock calls one ``self.relu`` twice: one QuantAct then sees two call sites."""
    q = quantize_model(build("torchvision:resnet18"), 8, 8)
    with pytest.warns(UserWarning, match=r"8 QuantAct\(s\).*layer1\.0\.relu\.1 \(2x\)"):
        calibrate(q, [torch.randn(1, 3, 32, 32)])
    q = quantize_model(build("cifar_resnet20"), 8, 8)  # zsqfast's own models: one ReLU module per site
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate(q, [(torch.randn(2, 3, 32, 32), torch.zeros(2))], freeze=True)  # (images, labels) batches
    assert all(m.frozen and m.num_observed.item() == 1 for m in q.modules() if isinstance(m, QuantAct))


def test_quantized_training_step_updates_weights_not_fp():
    torch.manual_seed(0)
    fp = build("cifar_resnet20")
    w_fp = fp.conv1.weight.detach().clone()
    q = calibrate(quantize_model(fp, 4, 4), [torch.randn(8, 3, 32, 32)], freeze=True)
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    w0 = q.conv1.weight.detach().clone()
    q(torch.randn(4, 3, 32, 32)).logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in q.parameters())  # identity STE: every latent weight gets a gradient
    opt.step()
    assert not torch.equal(w0, q.conv1.weight) and torch.equal(fp.conv1.weight, w_fp)


def _compiled_matches_eager(backend):
    torch.manual_seed(0)
    q = calibrate(quantize_model(build("cifar_resnet20"), 4, 4), [torch.randn(8, 3, 32, 32)])
    x = torch.randn(4, 3, 32, 32)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = q(x)
        compiled = torch.compile(q, backend=backend, fullgraph=True)(x)  # fullgraph: no host sync / break
    return eager, compiled


def test_torch_compile_quantized_model():
    """aot_eager (~4 s here); inductor below."""
    eager, compiled = _compiled_matches_eager("aot_eager")
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


def test_torch_compile_inductor():
    """The default torch.compile backend (a cold compile takes up to ~1 min on 2 cores: worth it in CI)."""
    eager, compiled = _compiled_matches_eager("inductor")
    # inductor fuses conv/BN arithmetic differently: a value on a grid boundary may move one step
    assert _cos(eager, compiled) > 0.999 and torch.equal(eager.argmax(1), compiled.argmax(1))


def test_torch_compile_observes_in_training_mode():
    """The observer is branch-free tensor code: a compiled calibration step equals the eager one."""
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    qa, qb = quantize_model(fp, 4, 4), quantize_model(fp, 4, 4)
    for q in (qa, qb):
        q[2][1].train()
    torch._dynamo.reset()
    compiled = torch.compile(qa, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(2, 3, 8, 8)
            assert torch.equal(compiled(x), qb(x))
    assert torch.equal(qa[2][1].running_max, qb[2][1].running_max) and qa[2][1].num_observed.item() == 3
