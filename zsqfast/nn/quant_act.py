"""QuantAct: per-tensor activation fake-quantizer with an exponential-moving-average min/max observer."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ops._common import check_bits
from ..ops.fake_quantize import fake_quantize
from ..ops.qparams import qparams_from_range


class QuantAct(nn.Module):
    """Fake-quantizes its input per tensor on the range ``[running_min, running_max]``.

    Observer (training mode, unless frozen): the first batch sets the range, later batches move it by an
    EMA, ``r <- momentum * r + (1 - momentum) * batch_stat`` for min and max. This is the ZeroQ-lineage
    observer (momentum 0.9) without its "bias correction" of the stored value, which overshoots (~1103x at
    step 10, see ../shared/reference/zsq-semantics.md). Eval mode (or :meth:`freeze`) holds the range.

    A fresh (never observed) QuantAct cannot quantize: in eval mode it raises a RuntimeError saying how to
    calibrate (a few forward passes in training mode). The range lives in buffers and the settings (bits,
    momentum, frozen, calibrated) in the module's extra state, so ``state_dict`` round-trips all of it.

    Args:
        bits: 2..8. momentum: EMA weight of the old range. ste: ``"identity"`` or ``"clipped"``.
        symmetric: signed symmetric grid instead of the asymmetric min/max one.
    Shapes: any input; output has the input's shape, dtype and layout.
    """

    def __init__(self, bits: int = 8, momentum: float = 0.9, ste: str = "identity", symmetric: bool = False):
        super().__init__()
        self.bits = check_bits(bits)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum, self.ste, self.symmetric = float(momentum), ste, bool(symmetric)
        self.frozen = False
        self.calibrated = False
        self.register_buffer("running_min", torch.zeros(1))
        self.register_buffer("running_max", torch.zeros(1))

    def freeze(self) -> "QuantAct":
        """Stop observing (the range is held even in training mode)."""
        self.frozen = True
        return self

    def unfreeze(self) -> "QuantAct":
        self.frozen = False
        return self

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        mn, mx = torch.aminmax(x.detach().float())
        if not self.calibrated:
            self.running_min.copy_(mn.reshape(1))
            self.running_max.copy_(mx.reshape(1))
            self.calibrated = True
        else:
            self.running_min.mul_(self.momentum).add_((1.0 - self.momentum) * mn)
            self.running_max.mul_(self.momentum).add_((1.0 - self.momentum) * mx)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` of the current range (fp32, shape (1,))."""
        return qparams_from_range(self.running_min, self.running_max, self.bits, self.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.frozen:
            self.observe(x)
        if not self.calibrated:
            raise RuntimeError("QuantAct has no activation range yet: calibrate it with a few forward passes in "
                               "training mode (e.g. zsqfast.calibrate(model, batches)) before evaluating")
        scale, zp = self.qparams()
        return fake_quantize(x, scale, None if self.symmetric else zp, self.bits, ste=self.ste,
                             symmetric=self.symmetric)

    def get_extra_state(self) -> dict:
        return {"bits": self.bits, "momentum": self.momentum, "ste": self.ste, "symmetric": self.symmetric,
                "frozen": self.frozen, "calibrated": self.calibrated}

    def set_extra_state(self, state: dict) -> None:
        self.bits = check_bits(state["bits"])
        self.momentum, self.ste, self.symmetric = state["momentum"], state["ste"], state["symmetric"]
        self.frozen, self.calibrated = state["frozen"], state["calibrated"]

    def extra_repr(self) -> str:
        mode = "symmetric" if self.symmetric else "asymmetric"
        return f"bits={self.bits}, {mode}, momentum={self.momentum}, ste={self.ste}, frozen={self.frozen}"
