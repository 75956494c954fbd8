"""MSE range search for activation quantizers: the clipping range that minimizes the quantization error.

A min/max range spends the few levels of a 4- or 3-bit grid on rare outliers (synthetic images make them
common). :func:`mse_search_ranges` runs the calibration batches through the model once, as one batch, and
each :class:`~zsqfast.nn.QuantAct`, when the forward first reaches it, picks the shrink factor ``a`` of the
range of what reaches it minimizing::

    E[(Q_a(x) - x)^2],   Q_a = fake-quantization on the range [a * min, a * max]   (unsigned: [min, a * max])

over a coarse grid (``alphas``, default 0.05, 0.10, ..., 1.0; ``a = 1`` is the unclipped range, so the
result is never worse on those values), refined in 0.01 steps around the best, and then quantizes with it.

The search is *sequential*: every quantizer upstream already holds its searched range, so each range is
optimal for the activations the calibrated model really produces (the rule of sequential post-training
quantization, as in AdaRound / GPTQ). Searching every quantizer on activations captured with the upstream
ones on their min/max ranges instead calibrates each for a network that never runs. Measured once, when the
choice was made (W3A3, synthetic calibration, the first 1,000 test_dev images; after calibration / after 40 KD
epochs): CIFAR ResNet-56 36 % / 40 % independent, 50 % / 67 % sequential; ResNet-20 62 % / 72.5 %
independent, 55 % / 71 % sequential (a small loss on the shallow net, a large gain on the deep one).

The criterion uses only the calibration data (synthetic images in the zero-shot pipeline): nothing is tuned on
held-out data. At most ``max_values`` values per quantizer (a fixed-seed random subsample) enter the error;
min and max are taken over everything. Cost: one no-grad forward of the concatenated batches (memory: one
batch of all calibration images) plus ~28 fake-quantizations of at most ``max_values`` values per quantizer.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from .nn import QuantAct
from .ops.fake_quantize import fake_quantize
from .ops.qparams import qparams_from_range

DEFAULT_ALPHAS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # coarse grid; refined by 0.01 steps


def _range_error(v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, a: float, act: QuantAct):
    """``(candidate (min, max), quantization MSE of v on it)`` for shrink factor ``a``."""
    if act.symmetric:
        m = torch.maximum(lo.abs(), hi.abs()) * a
        cand = (-m, m)
    else:  # an unsigned range (post-ReLU) keeps its lower end: only the upper tail is clipped
        cand = (lo * a if bool(lo < 0) else lo, hi * a)
    scale, zp = qparams_from_range(cand[0], cand[1], act.bits, act.symmetric)
    q = fake_quantize(v, scale, None if act.symmetric else zp, act.bits, symmetric=act.symmetric)
    return cand, float((q - v).pow(2).mean())


def _best_range(v, lo, hi, act: QuantAct, alphas: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(min, max)`` of least error over ``alphas``, then over 0.01 steps around the best of them."""
    tried = {a: _range_error(v, lo, hi, a, act) for a in alphas}
    best = min(tried, key=lambda a: tried[a][1])
    for k in range(-4, 5):
        a = round(best + 0.01 * k, 2)
        if 0 < a <= 1 and a not in tried:
            tried[a] = _range_error(v, lo, hi, a, act)
    return min(tried.values(), key=lambda ce: ce[1])[0]


def mse_search_ranges(model: nn.Module, batches: Iterable[torch.Tensor], *,
                      alphas: Iterable[float] = DEFAULT_ALPHAS, max_values: int = 1 << 20,
                      seed: int = 0) -> nn.Module:
    """Set every calibrated, non-frozen QuantAct of ``model`` to its MSE-optimal clipping range (see module doc).

    Args:
        model: a fake-quantized model whose QuantActs were already calibrated (e.g. min/max by
            :func:`zsqfast.calibrate`); left in eval mode.
        batches: calibration images, tensors (N, C, H, W) (or ``(images, ...)`` tuples), the same as for
            calibrate.
        alphas: the coarse grid of shrink factors of the observed range, each in (0, 1]; the best one is
            refined in steps of 0.01 (+-0.04).
        max_values: at most this many captured values per quantizer enter the error (random subsample).
        seed: the subsample's seed.
    Returns:
        ``model``.
    Raises:
        ValueError: an alpha outside (0, 1]. A QuantAct reached by the forward without a range raises
        QuantAct's own RuntimeError (calibrate first).
    """
    alphas_l = [float(a) for a in alphas]
    if not alphas_l or any(not 0 < a <= 1 for a in alphas_l):
        raise ValueError("alphas must be a non-empty list of factors in (0, 1]")
    xs = [xb[0] if isinstance(xb, (tuple, list)) else xb for xb in batches]
    model.eval()
    pending = {id(m): m for m in model.modules() if isinstance(m, QuantAct) and not m.frozen}
    if not pending or not xs:  # nothing to search: no pass
        return model
    g = torch.Generator().manual_seed(seed)

    def search(act, inp):  # before the quantizer's first call: its range from what reaches it now
        if pending.pop(id(act), None) is None:  # frozen, or searched at an earlier call of a shared module
            return
        v = inp[0].detach().reshape(-1).float()
        lo, hi = torch.aminmax(v)
        if v.numel() > max_values:
            v = v[torch.randint(0, v.numel(), (max_values,), generator=g)]
        new_lo, new_hi = _best_range(v, lo.reshape(1), hi.reshape(1), act, alphas_l)
        act.running_min.copy_(new_lo.to(act.running_min))
        act.running_max.copy_(new_hi.to(act.running_max))

    handles = [m.register_forward_pre_hook(search) for m in pending.values()]
    try:
        with torch.no_grad():  # quantizers the forward never reaches keep their range
            model(torch.cat(xs) if len(xs) > 1 else xs[0])
    finally:
        for h in handles:
            h.remove()
    return model
