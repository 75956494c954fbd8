"""QuantAct: per-tensor activation fake-quantizer with an exponential-moving-average min/max observer."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ops._common import values_checkable
from ..ops.fake_quantize import fake_quantize
from ..ops.qparams import qparams_from_range
from .quant_layers import resolve_bits

_STATE = ("running_min", "running_max", "num_observed", "is_frozen", "num_bits", "is_symmetric")


class QuantAct(nn.Module):
    """Fake-quantizes its input per tensor on the observed range ``[running_min, running_max]``.

    Observer (training mode and not frozen), with ``(m_t, M_t)`` the min / max of the t-th batch::

        r_min <- m_1,                                    r_max <- M_1            (first observation)
        r_min <- momentum * r_min + (1 - momentum) * m_t  (same for r_max)        (t >= 2)

    This is the ZeroQ-lineage observer (momentum 0.9) WITHOUT its "bias correction" of the stored value
    (which overshoots ~1103x at step 10, see ../shared/reference/zsq-semantics.md): the range is always a
    convex combination of observed batch minima / maxima. The update is branch-free tensor arithmetic
    (no host synchronisation in forward). Eval mode, or :meth:`freeze`, holds the range. A CPU batch with
    NaN / Inf is rejected before it reaches the range (ValueError; a GPU batch is not read, see :meth:`observe`).

    Quantization (asymmetric, the formula of :func:`zsqfast.minmax_qparams` applied to the running range)::

        scale = max(r_max - r_min, 1e-8) / (2^b - 1),   zp = -round(r_min / scale)
        y = scale * (clamp(round(x / scale) + zp, 0, 2^b - 1) - zp)

    ``symmetric=True``: ``scale = max(|r_min|, |r_max|) / (2^(b-1) - 1)``, signed grid, zp = 0.
    Gradient: ``ste="identity"`` (ZeroQ lineage) passes it unchanged; ``"clipped"`` zeroes it outside the grid.

    Uncalibrated use: a QuantAct that never observed anything has no range; calling it in eval mode (or
    frozen in training mode) raises a RuntimeError that says how to calibrate (a few training-mode
    forwards, e.g. :func:`zsqfast.calibrate`). Chosen over a silent pass-through, which would report float
    accuracy as quantized accuracy.

    State, all in buffers (so ``state_dict`` / ``load_state_dict`` / ``torch.load(weights_only=True)`` carry
    it): ``running_min``, ``running_max`` (fp32 (1,)), ``num_observed`` (int64 (), batches observed; > 0
    means calibrated), ``is_frozen`` (bool ()), ``num_bits`` (int64 ()), ``is_symmetric`` (bool ()).
    Python mirrors (``bits``, ``frozen``, ``calibrated``, ``symmetric``) drive control flow without reading
    a device tensor; they are refreshed on ``load_state_dict``. ``momentum`` and ``ste`` are training
    settings, not state. Edit the state through the methods, not by writing the buffers.

    Args:
        bits: 2..8. momentum: EMA weight of the old range, in [0, 1). ste: ``"identity"`` or ``"clipped"``.
        symmetric: signed symmetric grid instead of the asymmetric min/max one.
    Shapes: any input, float32/16/bf16/64; output has the input's shape and dtype.
    """

    def __init__(self, bits: int = 8, momentum: float = 0.9, ste: str = "identity", symmetric: bool = False):
        super().__init__()
        bits = resolve_bits(bits, "bits", allow_float=False)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if ste not in ("identity", "clipped"):
            raise ValueError(f"ste must be 'identity' or 'clipped', got {ste!r}")
        self.momentum, self.ste = float(momentum), ste
        self.register_buffer("running_min", torch.zeros(1))
        self.register_buffer("running_max", torch.zeros(1))
        self.register_buffer("num_observed", torch.zeros((), dtype=torch.int64))
        self.register_buffer("is_frozen", torch.zeros((), dtype=torch.bool))
        self.register_buffer("num_bits", torch.tensor(bits, dtype=torch.int64))
        self.register_buffer("is_symmetric", torch.tensor(bool(symmetric)))
        self.bits, self.symmetric, self.frozen, self.calibrated = bits, bool(symmetric), False, False

    # -- state -------------------------------------------------------------------------------------------
    def freeze(self) -> "QuantAct":
        """Stop observing: the range is held even in training mode. Returns self."""
        self.frozen = True
        self.is_frozen.fill_(True)
        return self

    def unfreeze(self) -> "QuantAct":
        """Observe again in training mode (the EMA continues from the held range). Returns self."""
        self.frozen = False
        self.is_frozen.fill_(False)
        return self

    def reset(self) -> "QuantAct":
        """Forget the range (the next observation initialises it again). Returns self."""
        self.running_min.zero_()
        self.running_max.zero_()
        self.num_observed.zero_()
        self.calibrated = False
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if all(prefix + k in state_dict for k in _STATE):  # refresh the mirrors (one host read, at load time)
            self.bits = resolve_bits(int(self.num_bits), "num_bits", allow_float=False)
            self.symmetric = bool(self.is_symmetric)
            self.frozen = bool(self.is_frozen)
            self.calibrated = int(self.num_observed) > 0

    # -- observer / quantizer ----------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """One EMA step on ``x``'s min / max (the first observation initialises). No host synchronisation on
        a GPU; on the CPU an ``x`` with NaN / Inf is a ValueError and the state is left unchanged (its min /
        max would stay in the running range for good)."""
        mn, mx = torch.aminmax(x.detach().reshape(-1))
        if values_checkable(mn) and not bool(torch.isfinite(mn) & torch.isfinite(mx)):
            raise ValueError("QuantAct input has NaN/Inf: not observed (the running min/max are unchanged)")
        mn, mx = mn.to(self.running_min.dtype), mx.to(self.running_max.dtype)
        first = self.num_observed == 0
        m = self.momentum
        # r <- m * r + (1 - m) * batch_stat, or batch_stat on the first observation (torch.where: no branch)
        self.running_min.copy_(torch.where(first, mn, self.running_min * m + (1.0 - m) * mn))
        self.running_max.copy_(torch.where(first, mx, self.running_max * m + (1.0 - m) * mx))
        self.num_observed.add_(1)
        self.calibrated = True

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` of the current range, fp32 of shape (1,) (zero_point 0 when symmetric)."""
        return qparams_from_range(self.running_min.float(), self.running_max.float(), self.bits, self.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.frozen:
            self.observe(x)
        elif not self.calibrated:
            raise RuntimeError(
                "QuantAct has no activation range yet: calibrate it first with a few forward passes in training "
                "mode (e.g. zsqfast.calibrate(model, batches)), or load a calibrated state_dict")
        scale, zp = self.qparams()
        return fake_quantize(x, scale, None if self.symmetric else zp, self.bits, ste=self.ste,
                             symmetric=self.symmetric)

    def extra_repr(self) -> str:
        grid = "symmetric" if self.symmetric else "asymmetric"
        return (f"bits={self.bits}, {grid}, momentum={self.momentum}, ste={self.ste}, frozen={self.frozen}, "
                f"calibrated={self.calibrated}")
