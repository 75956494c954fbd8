"""QuantAct observer semantics and state; QuantConv2d / QuantLinear against the reference math."""
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zsqfast
import zsqfast.nn
from zsqfast.nn import QuantAct, QuantConv2d, QuantLinear
from zsqfast.quantize_model import calibrate


def _batch(lo, hi, n=37):
    """A batch whose min is exactly ``lo`` and max exactly ``hi``."""
    x = torch.rand(n) * (hi - lo) + lo
    x[3], x[11] = lo, hi
    return x.clamp_(lo, hi)


# ---------------------------------------------------------------------------------------------- QuantAct
def test_quantact_ema_exact_against_hand_computation():
    # momentum 0.75 and dyadic batch extremes: every fp32 step is exact, so the hand computation in Python
    # floats must match bit for bit. r_1 = batch 1; r_t = 0.75 r_{t-1} + 0.25 b_t.
    qa = QuantAct(4, momentum=0.75).train()
    lows, highs = [-4.0, -8.0, 0.0, 2.0], [1.0, 5.0, 3.0, 9.0]
    rmin, rmax = lows[0], highs[0]
    for t, (lo, hi) in enumerate(zip(lows, highs)):
        qa(_batch(lo, hi))
        if t > 0:
            rmin, rmax = 0.75 * rmin + 0.25 * lo, 0.75 * rmax + 0.25 * hi
        assert qa.running_min.item() == rmin and qa.running_max.item() == rmax
        assert qa.num_observed.item() == t + 1
    assert (rmin, rmax) == (-2.3125, 3.9375)


def test_quantact_default_momentum_no_bias_correction_overshoot():
    # momentum 0.9 (default): r_t = 0.9 r + 0.1 b; with the ZeroQ-lineage "bias correction" bug the stored
    # max of a constant-range stream would overshoot ~1103x by step 10; here it stays at the true value.
    qa = QuantAct(8).train()
    assert qa.momentum == 0.9
    expected = None
    for t in range(10):
        hi = 1.0 + 0.5 * t
        qa(_batch(0.0, hi))
        expected = hi if expected is None else 0.9 * expected + 0.1 * hi
    assert qa.running_max.item() == pytest.approx(expected, rel=1e-6)
    assert 1.0 <= qa.running_max.item() <= 5.5  # a convex combination of the observed maxima
    const = QuantAct(8).train()
    for _ in range(10):
        const(_batch(-1.0, 2.0))
    assert (const.running_min.item(), const.running_max.item()) == (-1.0, 2.0)


def test_quantact_observes_in_train_holds_in_eval_and_freezes():
    qa = QuantAct(8).train()
    qa(torch.tensor([0.0, 1.0]))
    assert qa.calibrated and qa.running_max.item() == 1.0
    qa.eval()
    y = qa(torch.tensor([-5.0, 0.5, 9.0]))
    assert qa.running_max.item() == 1.0 and qa.num_observed.item() == 1
    assert y.min().item() == 0.0 and y.max().item() == pytest.approx(1.0)  # saturates at the held range
    qa.train().freeze()
    qa(torch.tensor([0.0, 100.0]))
    assert qa.running_max.item() == 1.0 and qa.is_frozen.item()
    qa.unfreeze()(torch.tensor([0.0, 11.0]))
    assert qa.running_max.item() == pytest.approx(2.0) and not qa.is_frozen.item()
    qa.reset()
    assert not qa.calibrated
    qa(torch.tensor([3.0, 4.0]))  # re-initialised by the next observation
    assert (qa.running_min.item(), qa.running_max.item()) == (3.0, 4.0)


def test_quantact_uncalibrated_raises():
    with pytest.raises(RuntimeError, match="calibrate"):
        QuantAct(4).eval()(torch.randn(3))
    with pytest.raises(RuntimeError, match="calibrate"):  # frozen before any observation
        QuantAct(4).train().freeze()(torch.randn(3))


def test_quantact_state_dict_round_trip():
    qa = QuantAct(3, momentum=0.8, symmetric=True).train()
    qa(torch.randn(100))
    qa(torch.randn(100) * 2)
    qa.freeze()
    sd = qa.state_dict()
    assert set(sd) == {"running_min", "running_max", "num_observed", "is_frozen", "num_bits", "is_symmetric"}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = QuantAct(8)  # other bits, asymmetric, unfrozen, uncalibrated: all restored from the state
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert (fresh.bits, fresh.symmetric, fresh.frozen, fresh.calibrated) == (3, True, True, True)
    assert fresh.num_observed.item() == 2
    x = torch.randn(50) * 3
    assert torch.equal(fresh.eval()(x), qa.eval()(x))
    fresh.train()(x * 10)  # frozen survives the round trip: no observation
    assert torch.equal(fresh.running_max, qa.running_max)


def test_quantact_output_is_fake_quantized_on_running_range():
    qa = QuantAct(4).train()
    qa(_batch(-1.0, 3.0))
    qa(_batch(-0.5, 2.0))  # range (-0.95, 2.9)
    x = torch.randn(1000) * 2
    y = qa.eval()(x)
    ends = torch.cat([qa.running_min, qa.running_max])  # same formula as minmax_qparams on the range ends
    s, z = zsqfast.minmax_qparams(ends, 4)
    assert torch.equal(y, zsqfast.fake_quantize(x, s, z, 4))
    assert len(torch.unique(y)) <= 16
    # the grid's ends are round(r / scale) * scale: within half a step of the running range
    half = s.item() / 2 + 1e-6
    assert abs(y.min().item() + 0.95) <= half and abs(y.max().item() - 2.9) <= half


@pytest.mark.parametrize("ste", ["identity", "clipped"])
def test_quantact_ste(ste):
    qa = QuantAct(4, ste=ste).train()
    qa(torch.tensor([0.0, 1.0]))
    x = torch.tensor([-3.0, 0.5, 0.7, 4.0], requires_grad=True)
    qa.eval()(x).sum().backward()
    expected = [1.0, 1.0, 1.0, 1.0] if ste == "identity" else [0.0, 1.0, 1.0, 0.0]
    assert x.grad.tolist() == expected


def test_quantact_half_input():
    qa = QuantAct(8).train()
    y = qa(torch.linspace(-1, 1, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and qa.running_min.dtype == torch.float32
    assert qa.running_min.item() == -1.0 and qa.running_max.item() == 1.0


def test_calibrate_fresh_model_with_a_few_batches():
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.ReLU()).eval()
    q = zsqfast.quantize_model(fp, 8, 8)
    bn_mean = q[1].running_mean.clone()
    batches = [torch.randn(4, 3, 12, 12) for _ in range(3)]
    calibrate(q, batches)
    assert not q.training and q[2][1].num_observed.item() == 3 and q[4][1].num_observed.item() == 3
    assert torch.equal(q[1].running_mean, bn_mean)  # BatchNorm stayed in eval: statistics untouched
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref, out = fp(x), q(x)
    assert (out - ref).norm() / ref.norm() < 0.02


# ---------------------------------------------------------------------------------- QuantConv2d / QuantLinear
def _ref_wq(w, bits, symmetric=False):
    s, z = zsqfast.minmax_qparams(w, bits, axis=0, symmetric=symmetric)
    return zsqfast.fake_quantize(w, s, None if symmetric else z, bits, axis=0, symmetric=symmetric)


@pytest.mark.parametrize("bits,groups,symmetric", [(2, 1, False), (4, 2, False), (8, 6, False), (4, 1, True)])
def test_quantconv2d_equals_conv_with_reference_quantized_weight(bits, groups, symmetric):
    conv = nn.Conv2d(6, 12, 3, stride=2, padding=1, groups=groups)  # groups=6: depthwise (multiplier 2)
    q = QuantConv2d.from_float(conv, bits, w_symmetric=symmetric)
    assert isinstance(q, nn.Conv2d) and set(q.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 6, 9, 11)
    wq = _ref_wq(conv.weight, bits, symmetric)
    assert not torch.equal(wq, conv.weight)
    assert torch.equal(q.quantized_weight(), wq)
    torch.testing.assert_close(q(x), F.conv2d(x, wq, conv.bias, 2, 1, 1, groups), rtol=0, atol=1e-6)
    per_channel_levels = max(len(torch.unique(c)) for c in q.quantized_weight())
    assert per_channel_levels <= 2 ** bits
    assert f"w_bits={bits}" in repr(q)


def test_quantlinear_equals_linear_with_reference_quantized_weight():
    lin = nn.Linear(13, 5)
    q = QuantLinear.from_float(lin, 3)
    x = torch.randn(2, 4, 13)
    torch.testing.assert_close(q(x), F.linear(x, _ref_wq(lin.weight, 3), lin.bias), rtol=0, atol=1e-6)
    assert isinstance(q, nn.Linear) and "w_bits=3" in repr(q)


@pytest.mark.parametrize("float_bits", [None, 32])
def test_float_weight_option(float_bits):
    conv = nn.Conv2d(3, 4, 3)
    q = QuantConv2d.from_float(conv, float_bits)
    x = torch.randn(1, 3, 8, 8)
    assert q.w_bits is None and torch.equal(q(x), conv(x))


def test_quant_layers_pass_gradient_to_latent_weight():
    # identity STE: dL/dw equals dL/dw_hat of a float layer whose weight IS the quantized weight
    lin = QuantLinear.from_float(nn.Linear(7, 5), 4)
    x = torch.randn(3, 7, requires_grad=True)
    g_out = torch.randn(3, 5)
    lin(x).backward(g_out)
    wq = _ref_wq(lin.weight.detach(), 4).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    F.linear(x2, wq, lin.bias.detach()).backward(g_out)
    torch.testing.assert_close(lin.weight.grad, wq.grad)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(lin.bias.grad, g_out.sum(0))
    conv = QuantConv2d.from_float(nn.Conv2d(3, 4, 3, bias=False), 2)
    conv(torch.randn(2, 3, 6, 6)).square().sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_from_float_shares_parameters_and_input_quant():
    lin = nn.Linear(4, 3)
    q = QuantLinear.from_float(lin, 8, input_quant=QuantAct(8))
    assert q.weight is lin.weight and q.bias is lin.bias
    assert set(q.state_dict()) >= {"weight", "bias", "input_quant.running_min"}
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_float(nn.Conv2d(1, 1, 1), 8)


@pytest.mark.parametrize("bad", [1, 9, 0, 4.5, "4", True])
def test_bad_bits(bad):
    with pytest.raises(ValueError, match="w_bits"):
        QuantLinear(3, 4, w_bits=bad)
    with pytest.raises(ValueError, match="w_bits"):
        QuantConv2d.from_float(nn.Conv2d(1, 1, 1), bad)
    with pytest.raises(ValueError, match="bits"):
        QuantAct(bad)
    with pytest.raises(ValueError, match="bits"):
        QuantAct(None)  # an activation quantizer always has bits: leave the activation float instead


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantact_rejects_non_finite_batch_state_unchanged(bad):
    """A NaN / Inf batch would stay in the EMA range for good: rejected before the update."""
    qa, clean = QuantAct(4).train(), QuantAct(4).train()
    good = [_batch(-1.0, 2.0), _batch(-0.5, 3.0)]
    qa(good[0]), clean(good[0])
    state = {k: v.clone() for k, v in qa.state_dict().items()}
    with pytest.raises(ValueError, match="NaN/Inf"):
        qa(torch.tensor([0.0, bad, 1.0]))
    assert all(torch.equal(v, state[k]) for k, v in qa.state_dict().items())
    assert torch.equal(qa(good[1]), clean(good[1]))
    assert torch.equal(qa.running_min, clean.running_min) and torch.equal(qa.running_max, clean.running_max)
