"""QuantAct observer semantics and state; QuantConv2d / QuantLinear against the reference math."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zsqfast
from zsqfast.nn import QuantAct, QuantConv2d, QuantLinear


def test_quantact_ema_matches_hand_computation():
    qa = QuantAct(4, momentum=0.9).train()
    batches = [torch.randn(8, 5) * (i + 1) + i for i in range(4)]
    mn, mx = batches[0].min(), batches[0].max()
    for i, b in enumerate(batches):
        qa(b)
        if i > 0:
            mn, mx = 0.9 * mn + 0.1 * b.min(), 0.9 * mx + 0.1 * b.max()
    assert torch.allclose(qa.running_min, mn.reshape(1)) and torch.allclose(qa.running_max, mx.reshape(1))


def test_quantact_observes_in_train_holds_in_eval_and_freezes():
    qa = QuantAct(8).train()
    qa(torch.tensor([0.0, 1.0]))
    qa.eval()
    y = qa(torch.tensor([-5.0, 0.5, 9.0]))
    assert qa.running_max.item() == 1.0 and y.max().item() == pytest.approx(1.0)  # saturates at the held range
    qa.train().freeze()
    qa(torch.tensor([0.0, 100.0]))
    assert qa.running_max.item() == 1.0
    qa.unfreeze()(torch.tensor([0.0, 11.0]))
    assert qa.running_max.item() == pytest.approx(2.0)


def test_quantact_uncalibrated_eval_raises():
    with pytest.raises(RuntimeError, match="calibrate"):
        QuantAct(4).eval()(torch.randn(3))


def test_quantact_state_dict_round_trip():
    qa = QuantAct(3, momentum=0.8, ste="clipped").train()
    qa(torch.randn(100))
    qa.freeze()
    fresh = QuantAct(8)
    fresh.load_state_dict(qa.state_dict())
    assert fresh.bits == 3 and fresh.momentum == 0.8 and fresh.ste == "clipped" and fresh.frozen and fresh.calibrated
    x = torch.randn(50)
    assert torch.equal(fresh.eval()(x), qa.eval()(x))


def test_quantact_output_is_fake_quantized_on_its_range():
    qa = QuantAct(4).train()
    x = torch.rand(1000) * 3
    y = qa(x)
    s, z = zsqfast.minmax_qparams(x, 4)
    assert torch.equal(y, zsqfast.fake_quantize(x, s, z, 4))
    assert len(torch.unique(y)) <= 16


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantconv2d_equals_conv_with_quantized_weight(bits):
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1, groups=2)
    q = QuantConv2d.from_float(conv, bits)
    x = torch.randn(2, 6, 9, 11)
    s, z = zsqfast.minmax_qparams(conv.weight, bits, axis=0)
    wq = zsqfast.fake_quantize(conv.weight, s, z, bits, axis=0)
    assert torch.allclose(q(x), F.conv2d(x, wq, conv.bias, 2, 1, 1, 2), atol=1e-6)
    assert len(torch.unique(q.quantized_weight()[3])) <= 2**bits


def test_quant_layers_pass_gradient_to_latent_weight():
    lin = QuantLinear.from_float(nn.Linear(7, 5), 4)
    x = torch.randn(3, 7)
    lin(x).sum().backward()
    # identity STE: the weight gradient equals that of a float linear with the same (quantized) forward
    assert torch.allclose(lin.weight.grad, torch.ones(3, 5).t() @ x)


def test_bad_bits_in_layers():
    with pytest.raises(ValueError, match="bits"):
        QuantLinear(3, 4, w_bits=9)
    with pytest.raises(ValueError, match="bits"):
        QuantAct(1)
