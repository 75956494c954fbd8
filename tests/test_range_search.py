"""calibrate(method="mse") / mse_search_ranges: least-error activation clipping ranges."""
import pytest
import torch
import torch.nn as nn

import zsqfast
from zsqfast.nn import QuantAct
from zsqfast.ops.fake_quantize import fake_quantize
from zsqfast.range_search import mse_search_ranges


def _err(act: QuantAct, v: torch.Tensor) -> float:
    scale, zp = act.qparams()
    return float((fake_quantize(v, scale, zp, act.bits) - v).pow(2).mean())


class _Net(nn.Module):
    """conv -> relu (+QuantAct) -> conv -> relu (+QuantAct) -> pool -> fc; modules registered in REVERSE order."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(5, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _model(bits=4):
    torch.manual_seed(0)
    return zsqfast.quantize_model(_Net().eval(), bits, bits)


def _batches(n=3):
    torch.manual_seed(1)
    # heavy-tailed inputs: the min/max range is set by rare outliers
    return [torch.distributions.StudentT(2.0).sample((4, 3, 9, 7)) for _ in range(n)]


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_mse_range_never_worse_than_minmax(bits):
    xs = _batches()
    q_mse = zsqfast.calibrate(_model(bits), xs, method="mse")
    # the inputs each quantizer sees in the MSE model
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: seen.setdefault(n, []).append(inp[0].reshape(-1)))
             for n, m in q_mse.named_modules() if isinstance(m, QuantAct)]
    with torch.no_grad():
        for x in xs:
            q_mse(x)
    for h in hooks:
        h.remove()
    shrunk = 0
    for n, v in seen.items():
        v = torch.cat(v)
        a_mse = dict(q_mse.named_modules())[n]
        assert float(a_mse.running_max) <= float(v.max()) + 1e-6
        full = QuantAct(bits)  # the unclipped range of the same values: one of the candidates
        full.running_min.fill_(float(v.min()))
        full.running_max.fill_(float(v.max()))
        full.calibrated = True
        # sequential search: every quantizer saw these very values (upstream on their final ranges): no loss
        assert _err(a_mse, v) <= _err(full, v) + 1e-12
        shrunk += float(a_mse.running_max) < 0.9 * float(v.max())
    if bits <= 4:
        assert shrunk >= 1


def test_search_is_sequential():
    """relu2's range is the best one for what reaches it with relu1 on its SEARCHED range: re-searching relu2
    alone on the calibrated model changes nothing, while a search on min/max-upstream activations differs."""
    xs = _batches()
    q = zsqfast.calibrate(_model(3), xs, method="mse")
    kept = q.relu2[1].running_max.clone()
    q.relu1[1].freeze()
    mse_search_ranges(q, xs)                     # relu2 alone, on what relu1's searched range lets through
    assert torch.equal(q.relu2[1].running_max, kept)
    ind = zsqfast.calibrate(_model(3), xs)       # min/max everywhere
    ind.relu1[1].freeze()
    mse_search_ranges(ind, xs)                   # relu2 on min/max-upstream activations (the old, independent way)
    assert not torch.equal(ind.relu2[1].running_max, kept)


class _Times4(nn.Module):
    def forward(self, x):
        return 4 * x


class _Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def _searched(v: torch.Tensor, bits: int = 4) -> QuantAct:
    """A fresh QuantAct calibrated and MSE-searched on v alone."""
    act = QuantAct(bits)
    zsqfast.calibrate(nn.Sequential(act), [v], method="mse")
    return act


def test_shared_quantizer_gets_one_range_over_all_its_calls():
    """One module at two call sites: the first call's search quantizes during the forward, then one search over
    both sites' values (the second site sees 4x the first site's quantized output) sets the range."""
    v = torch.distributions.Laplace(0.0, 1.0).sample((20_000,)).abs()
    act = QuantAct(4)
    model = nn.Sequential(act, _Times4(), act)
    zsqfast.calibrate(model, [v], warn=False)
    mse_search_ranges(model, [v])
    first = _searched(v)
    with torch.no_grad():
        pooled = _searched(torch.cat([v, 4 * first(v)]))
    assert torch.equal(act.running_max, pooled.running_max)
    assert float(act.running_max) > 2 * float(first.running_max)     # not the first site's range alone


def test_failed_forward_restores_the_ranges():
    v = torch.distributions.Laplace(0.0, 1.0).sample((20_000,)).abs()
    act = QuantAct(4).train()
    act(v)
    kept = act.running_max.clone()
    with pytest.raises(RuntimeError, match="boom"):
        mse_search_ranges(nn.Sequential(act, _Boom()), [v])
    assert torch.equal(act.running_max, kept)                       # searched before the failure, then restored


def test_batches_that_cannot_form_one_batch():
    q = zsqfast.calibrate(_model(), _batches(1))
    xs = [torch.randn(2, 3, 9, 7), torch.randn(2, 3, 8, 7)]
    with pytest.raises(ValueError, match="one batch"):
        mse_search_ranges(q, xs)
    with pytest.raises(ValueError, match="one batch"):
        mse_search_ranges(q, [xs[0], xs[0].double()])
    mse_search_ranges(q, [(xs[0], torch.zeros(2)), (xs[0][:1], torch.zeros(1))])  # tuples, unequal sizes: fine


def test_uniform_data_keeps_nearly_full_range():
    act = QuantAct(4)
    act.train()
    v = torch.rand(200_000)
    act(v)
    act.eval()
    model = nn.Sequential(act)
    mse_search_ranges(model, [v])
    # uniform values: clipping only adds error beyond the last half step
    assert float(act.running_max) >= 0.9 * float(v.max())


def test_laplace_data_is_clipped():
    act = QuantAct(4)
    act.train()
    v = torch.distributions.Laplace(0.0, 1.0).sample((200_000,)).abs()
    act(v)
    act.eval()
    mse_search_ranges(nn.Sequential(act), [v])
    assert float(act.running_max) < 0.7 * float(v.max())
    assert float(act.running_min) == pytest.approx(float(v.min()))


def test_deterministic_and_frozen_untouched():
    xs = _batches()
    a = zsqfast.calibrate(_model(), xs, method="mse")
    b = zsqfast.calibrate(_model(), xs, method="mse")
    for (n, m1), (_, m2) in zip(a.named_modules(), b.named_modules()):
        if isinstance(m1, QuantAct):
            assert torch.equal(m1.running_max, m2.running_max), n
    # a frozen quantizer is neither observed nor searched
    c = zsqfast.calibrate(_model(), xs[:1], freeze=True)
    held = float(c.relu1[1].running_max)
    c.relu2[1].unfreeze()
    zsqfast.calibrate(c, xs, method="mse")
    assert float(c.relu1[1].running_max) == held


def test_bad_method_and_alphas():
    with pytest.raises(ValueError, match="minmax"):
        zsqfast.calibrate(_model(), _batches(1), method="percentile")
    q = zsqfast.calibrate(_model(), _batches(1))
    with pytest.raises(ValueError, match="alphas"):
        mse_search_ranges(q, _batches(1), alphas=[0.5, 1.5])
