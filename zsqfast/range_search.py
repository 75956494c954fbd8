"""MSE range search for activation quantizers: the clipping range that minimizes the quantization error.

A min/max range spends the few levels of a 4- or 3-bit grid on rare outliers (synthetic images make them
common). :func:`mse_search_ranges` runs the calibration batches through the model once, capturing what
reaches each :class:`~zsqfast.nn.QuantAct` (upstream quantizers on their calibrated min/max ranges), and picks
per quantizer the shrink factor ``a`` of its observed range minimizing::

    E[(Q_a(x) - x)^2],   Q_a = fake-quantization on the range [a * min, a * max]   (unsigned: [min, a * max])

over a coarse grid (``alphas``, default 0.05, 0.10, ..., 1.0; ``a = 1`` is the unclipped range, so the
result is never worse on the captured values), refined in 0.01 steps around the best. The criterion uses
only the calibration data (synthetic images in the zero-shot pipeline): nothing is tuned on held-out data.
At most ``max_values`` values per quantizer (a fixed-seed random subsample, spread over the batches) enter
the error; min and max are taken over everything. Cost: one no-grad forward of the batches plus ~28
fake-quantizations of at most ``max_values`` values per quantizer.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from .nn import QuantAct
from .ops.fake_quantize import fake_quantize
from .ops.qparams import qparams_from_range

DEFAULT_ALPHAS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # coarse grid; refined by 0.01 steps


def _capture_all(model: nn.Module, acts: dict[str, QuantAct], batches: list[torch.Tensor], max_values: int,
                 g: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One no-grad pass over ``batches``: per QuantAct ``(values, min, max)``, ``values`` a random subsample
    (at most ``max_values / len(batches)`` per batch) of what reached it, min / max over everything that did."""
    per_batch = max(1, -(-max_values // max(1, len(batches))))
    got: dict[str, list] = {n: [] for n in acts}

    def hook(mod, inp, name):
        v = inp[0].detach().reshape(-1).float()
        lo, hi = torch.aminmax(v)
        if v.numel() > per_batch:
            v = v[torch.randint(0, v.numel(), (per_batch,), generator=g)]
        got[name].append((v, lo, hi))

    handles = [m.register_forward_pre_hook(lambda mod, inp, n=n: hook(mod, inp, n)) for n, m in acts.items()]
    try:
        with torch.no_grad():
            for xb in batches:
                model(xb)
    finally:
        for h in handles:
            h.remove()
    return {n: (torch.cat([v for v, _, _ in c]), torch.stack([lo for _, lo, _ in c]).min().reshape(1),
                torch.stack([hi for _, _, hi in c]).max().reshape(1)) for n, c in got.items() if c}


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
    acts = {n: m for n, m in model.named_modules() if isinstance(m, QuantAct) and not m.frozen}
    if not acts:  # nothing to search: no capture pass
        return model
    captured = _capture_all(model, acts, xs, max_values, torch.Generator().manual_seed(seed))
    for name, (v, lo, hi) in captured.items():  # quantizers the forward never reached keep their range
        act = acts[name]
        new_lo, new_hi = _best_range(v, lo, hi, act, alphas_l)
        act.running_min.copy_(new_lo.to(act.running_min))
        act.running_max.copy_(new_hi.to(act.running_max))
    return model
