"""quantize_model on the models the issue names: complete swap, FP model untouched, close to FP at 8 bits."""
import copy

import pytest
import torch
import torch.nn as nn

import zsqfast
from zsqfast.models import build
from zsqfast.nn import QuantAct, QuantConv2d, QuantLinear

MODELS = [  # (name, input size, placement expected)
    ("cifar_resnet20", 32, "relu"),
    ("resnet18", 64, "relu"),
    ("mobilenetv2_100", 64, "relu"),
    ("torchvision:resnet18", 64, "relu"),
    ("deit_tiny_patch16_224", 224, "linear_input"),
]


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


@pytest.mark.parametrize("name,size,placement", MODELS, ids=[m[0] for m in MODELS])
def test_quantize_model(name, size, placement):
    torch.manual_seed(0)
    fp = build(name).eval()
    before = copy.deepcopy(fp.state_dict())
    types_before = [type(m) for m in fp.modules()]
    q = zsqfast.quantize_model(fp, 8, 8)
    report = zsqfast.quantization_report(q)
    assert report["float_conv_linear"] == 0
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in fp.modules())
    assert report.get("QuantConv2d", 0) + report.get("QuantLinear", 0) == n_layers
    # the FP model is untouched
    assert [type(m) for m in fp.modules()] == types_before
    assert all(torch.equal(v, fp.state_dict()[k]) for k, v in before.items())
    if placement == "relu":  # one QuantAct after every ReLU module
        n_relu = sum(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in fp.modules())
        assert report["QuantAct"] == n_relu > 0
        for m in q.modules():
            if isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[0], (nn.ReLU, nn.ReLU6)):
                assert isinstance(m[1], QuantAct)
    else:  # one input QuantAct per Linear
        lins = [m for m in q.modules() if isinstance(m, QuantLinear)]
        assert len(lins) > 0 and all(isinstance(m.input_quant, QuantAct) for m in lins)
        assert report["QuantAct"] == len(lins)
    x = torch.randn(2, 3, size, size)
    zsqfast.calibrate(q, [torch.randn(4, 3, size, size), x])
    with torch.no_grad():
        ref, out = fp(x), q(x)
    assert _cos(ref, out) > 0.99, _cos(ref, out)


def test_first_last_bits_and_errors():
    fp = build("cifar_resnet20")
    q = zsqfast.quantize_model(fp, 4, 4, first_last_bits=8)
    layers = [m for m in q.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert layers[0].w_bits == 8 and layers[-1].w_bits == 8 and {m.w_bits for m in layers[1:-1]} == {4}
    for bad in (1, 9, 4.5, "4"):
        with pytest.raises(ValueError, match="w_bits"):
            zsqfast.quantize_model(fp, bad, 4)
    with pytest.raises(ValueError, match="a_bits"):
        zsqfast.quantize_model(fp, 4, 0)
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="Conv1d"):
        zsqfast.quantize_model(model, 4, 4)
    q = zsqfast.quantize_model(model, 4, 4, skip=["0"])
    assert type(q[0]) is nn.Conv1d and isinstance(q[3], QuantLinear)
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        zsqfast.quantize_model(nn.Sequential(nn.ReLU()), 4, 4)


def test_float_activations_option():
    q = zsqfast.quantize_model(build("cifar_resnet20"), 4, None)
    assert zsqfast.quantization_report(q).get("QuantAct", 0) == 0


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_quantized_model(backend):
    torch.manual_seed(0)
    q = zsqfast.calibrate(zsqfast.quantize_model(build("cifar_resnet20"), 4, 4), [torch.randn(8, 3, 32, 32)])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        eager = q(x)
        compiled = torch.compile(q, backend=backend)(x)
    if backend == "aot_eager":  # same kernels, same order: identical up to float noise
        assert torch.allclose(eager, compiled, atol=1e-5)
    else:  # inductor fuses conv/BN arithmetic differently; a value on a grid boundary may move one step
        assert _cos(eager, compiled) > 0.999 and torch.equal(eager.argmax(1), compiled.argmax(1))


def test_quantized_training_step_updates_weights():
    torch.manual_seed(0)
    q = zsqfast.calibrate(zsqfast.quantize_model(build("cifar_resnet20"), 4, 4), [torch.randn(8, 3, 32, 32)])
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    w0 = q.conv1.weight.detach().clone()
    loss = q(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    opt.step()
    assert not torch.equal(w0, q.conv1.weight)
