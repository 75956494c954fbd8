"""MSE range search for activation quantizers: the clipping range that minimizes the quantization error.

A min/max range spends the few levels of a 4- or 3-bit grid on rare outliers (synthetic images make them
common). For each :class:`~zsqfast.nn.QuantAct`, in forward order, :func:`mse_search_ranges` captures the
tensor that reaches it on the calibration batches (earlier quantizers already set, so each one sees the error
of those before it) and picks the shrink factor ``a`` of its observed range minimizing::

    E[(Q_a(x) - x)^2],   Q_a = fake-quantization on the range [a * min, a * max]   (unsigned: [min, a * max])

over ``a`` in a fixed grid (``alphas``, default 0.05, 0.06, ..., 1.0). The criterion uses only the
calibration data (synthetic images in the zero-shot pipeline): nothing is tuned on held-out data. At most
``max_values`` values per quantizer (a fixed-seed random subsample of the batches needed to reach that many)
enter the error, so the cost is a partial forward per quantizer (on as few batches as give ``max_values``
values) plus ``len(alphas)`` fake-quantizations of at most ``max_values`` values.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from .nn import QuantAct
from .ops.fake_quantize import fake_quantize
from .ops.qparams import qparams_from_range

DEFAULT_ALPHAS = tuple(round(0.05 + 0.01 * i, 2) for i in range(96))


class _Captured(Exception):
    """Raised by the capture hook to end a forward once the quantizer of interest has seen its input."""


def _capture(model: nn.Module, act: QuantAct, batches: list[torch.Tensor], enough: int) -> torch.Tensor:
    """The flattened inputs of ``act`` over ``batches`` (the rest of each forward is skipped), stopping after
    the batch that brings the count to ``enough`` values."""
    got: list[torch.Tensor] = []

    def hook(_m, inp):
        got.append(inp[0].detach().reshape(-1).float())
        raise _Captured

    handle = act.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for xb in batches:
                try:
                    model(xb)
                except _Captured:
                    pass
                if sum(t.numel() for t in got) >= enough:
                    break
    finally:
        handle.remove()
    return torch.cat(got) if got else torch.empty(0)


def _forward_order(model: nn.Module, batches: list[torch.Tensor]) -> list[tuple[str, QuantAct]]:
    """``model``'s QuantActs in the order the forward first calls them (never-called ones last)."""
    acts = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantAct)]
    first: dict[int, int] = {}

    def hook(mod, _inp):
        first.setdefault(id(mod), len(first))

    handles = [m.register_forward_pre_hook(hook) for _, m in acts]
    try:
        with torch.no_grad():
            for xb in batches:
                model(xb[:1])
    finally:
        for h in handles:
            h.remove()
    return sorted(acts, key=lambda nm: first.get(id(nm[1]), len(first)))


def _best_range(v: torch.Tensor, act: QuantAct, alphas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` of shape (1,) minimizing the quantization MSE of ``v`` on ``act``'s grid."""
    lo, hi = v.min().reshape(1), v.max().reshape(1)
    best, best_err = (lo, hi), None
    for a in alphas:
        if act.symmetric:
            m = torch.maximum(lo.abs(), hi.abs()) * a
            cand = (-m, m)
        else:  # an unsigned range (post-ReLU) keeps its lower end: only the upper tail is clipped
            cand = (lo * a if bool(lo < 0) else lo, hi * a)
        scale, zp = qparams_from_range(cand[0], cand[1], act.bits, act.symmetric)
        q = fake_quantize(v, scale, None if act.symmetric else zp, act.bits, symmetric=act.symmetric)
        err = float((q - v).pow(2).mean())
        if best_err is None or err < best_err:
            best, best_err = cand, err
    return best


def mse_search_ranges(model: nn.Module, batches: Iterable[torch.Tensor], *,
                      alphas: Iterable[float] = DEFAULT_ALPHAS, max_values: int = 1 << 20,
                      seed: int = 0) -> nn.Module:
    """Set every calibrated, non-frozen QuantAct of ``model`` to its MSE-optimal clipping range (see module doc).

    Args:
        model: a fake-quantized model whose QuantActs were already calibrated (e.g. min/max by
            :func:`zsqfast.calibrate`); left in eval mode.
        batches: calibration images, tensors (N, C, H, W) (or ``(images, ...)`` tuples), the same as for
            calibrate.
        alphas: candidate shrink factors of the observed range, each in (0, 1].
        max_values: at most this many captured values per quantizer enter the error (random subsample).
        seed: the subsample's seed.
    Returns:
        ``model``.
    Raises:
        ValueError: an alpha outside (0, 1], or a QuantAct that was never calibrated.
    """
    alphas_t = torch.tensor(list(alphas), dtype=torch.float32)
    if alphas_t.numel() == 0 or bool((alphas_t <= 0).any() | (alphas_t > 1).any()):
        raise ValueError("alphas must be a non-empty list of factors in (0, 1]")
    xs = [xb[0] if isinstance(xb, (tuple, list)) else xb for xb in batches]
    model.eval()
    g = torch.Generator().manual_seed(seed)
    for name, act in _forward_order(model, xs[:1]):
        if act.frozen:
            continue
        v = _capture(model, act, xs, max_values)
        if v.numel() == 0:  # not reached by the forward: keep its range (calibrate already warned)
            continue
        if not act.calibrated:
            raise ValueError(f"QuantAct {name!r} has no range yet: run zsqfast.calibrate before the MSE search")
        if v.numel() > max_values:
            v = v[torch.randperm(v.numel(), generator=g)[:max_values]]
        lo, hi = _best_range(v, act, alphas_t)
        act.running_min.copy_(lo.to(act.running_min))
        act.running_max.copy_(hi.to(act.running_max))
    return model
