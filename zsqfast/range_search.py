"""MSE range search for activation quantizers: the clipping range that minimizes the quantization error.

A min/max range spends the few levels of a 4- or 3-bit grid on rare outliers (synthetic images make them
common). :func:`mse_search_ranges` runs the calibration batches through the model once, as one batch, and
each non-frozen :class:`~zsqfast.nn.QuantAct`, when the forward first reaches it, picks the shrink factor ``a``
of the range of what reaches it minimizing::

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

A QuantAct module called at several places (torchvision's ResNet blocks reuse one ReLU) is searched at its first
call and then, after the forward, once more on the values of all its calls pooled: one range for all of them,
as its min/max observer has. Quantizers the forward never reaches keep their range; if the forward raises,
every range is restored.

The criterion uses only the calibration data (synthetic images in the zero-shot pipeline): nothing is tuned on
held-out data. At most ``max_values`` values per quantizer (a fixed-seed random subsample) enter the error;
min and max are taken over everything that reached it. Cost: one no-grad forward of all calibration images at
once (its peak activation memory is that of the concatenated batch: the pipeline calibrates on 4 batches) plus
~28 fake-quantizations of at most ``max_values`` values per quantizer, whose samples are held until the end
of the forward (4 MB per quantizer at the default ``max_values``).
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


def _set_range(act: QuantAct, rng) -> None:
    act.running_min.copy_(rng[0].to(act.running_min))
    act.running_max.copy_(rng[1].to(act.running_max))


def _one_batch(xs: list[torch.Tensor]) -> torch.Tensor:
    """The calibration batches as one batch (they must agree in everything but their size)."""
    if len(xs) == 1:
        return xs[0]
    first = xs[0]
    for t in xs[1:]:
        if t.shape[1:] != first.shape[1:] or t.dtype != first.dtype or t.device != first.device:
            raise ValueError("the MSE range search runs the calibration batches as one batch: they must share "
                             f"their shape past the batch size, dtype and device; got {tuple(first.shape)} "
                             f"{first.dtype} {first.device} and {tuple(t.shape)} {t.dtype} {t.device}")
    return torch.cat(xs)


def mse_search_ranges(model: nn.Module, batches: Iterable[torch.Tensor], *,
                      alphas: Iterable[float] = DEFAULT_ALPHAS, max_values: int = 1 << 20,
                      seed: int = 0) -> nn.Module:
    """Set every non-frozen QuantAct of ``model`` to its MSE-optimal clipping range, searched sequentially in
    forward order (see module doc).

    Args:
        model: a fake-quantized model whose QuantActs were already calibrated (e.g. min/max by
            :func:`zsqfast.calibrate`); left in eval mode.
        batches: calibration images, tensors (N, C, H, W) (or ``(images, ...)`` tuples), the same as for
            calibrate; run as one batch, so they must share shape (past N), dtype and device.
        alphas: the coarse grid of shrink factors of the observed range, each in (0, 1]; the best one is
            refined in steps of 0.01 (+-0.04).
        max_values: at most this many captured values per quantizer enter the error (random subsample).
        seed: the subsample's seed.
    Returns:
        ``model``.
    Raises:
        ValueError: an alpha outside (0, 1], or batches that cannot form one batch. A QuantAct reached by the
        forward without a range raises QuantAct's own RuntimeError (calibrate first); the ranges are then
        restored.
    """
    alphas_l = [float(a) for a in alphas]
    if not alphas_l or any(not 0 < a <= 1 for a in alphas_l):
        raise ValueError("alphas must be a non-empty list of factors in (0, 1]")
    xs = [xb[0] if isinstance(xb, (tuple, list)) else xb for xb in batches]
    model.eval()
    acts = {id(m): m for m in model.modules() if isinstance(m, QuantAct) and not m.frozen}
    if not acts or not xs:  # nothing to search: no pass
        return model
    x = _one_batch(xs)
    g = torch.Generator().manual_seed(seed)
    saved = {k: (m.running_min.clone(), m.running_max.clone()) for k, m in acts.items()}
    sites: dict[int, list] = {}  # per searched quantizer: (values, min, max) of each call site

    def subsample(v):  # at most max_values of v, drawn with the search's generator
        return v[torch.randint(0, v.numel(), (max_values,), generator=g)] if v.numel() > max_values else v

    def search(act, inp):  # before each call of a quantizer: at its first, its range from what reaches it now
        calls = sites.get(id(act))
        v = inp[0].detach().reshape(-1).float()
        lo, hi = (t.reshape(1) for t in torch.aminmax(v))
        v = subsample(v)
        if calls is None:
            sites[id(act)] = [(v, lo, hi)]
            _set_range(act, _best_range(v, lo, hi, act, alphas_l))
        else:
            calls.append((v, lo, hi))

    handles = [m.register_forward_pre_hook(search) for m in acts.values()]
    try:
        with torch.no_grad():  # quantizers the forward never reaches keep their range
            model(x)
    except BaseException:  # leave the model as it was: no half-searched ranges
        for k, rng in saved.items():
            _set_range(acts[k], rng)
        raise
    finally:
        for h in handles:
            h.remove()
    for k, calls in sites.items():  # a module called at several places: one range over all of them
        if len(calls) > 1:
            act = acts[k]
            v = subsample(torch.cat([c[0] for c in calls]))
            lo = torch.stack([c[1] for c in calls]).min().reshape(1)
            hi = torch.stack([c[2] for c in calls]).max().reshape(1)
            _set_range(act, _best_range(v, lo, hi, act, alphas_l))
    return model
