"""quantize_model: a deep copy of a float model with its layers swapped for fake-quantized ones.

Placement (``act_placement``):

* ``"relu"`` (CNNs; the ZeroQ lineage of GDFQ / Qimera / IntraQ / HAST / SynQ): every ``nn.Conv2d`` and
  ``nn.Linear`` gets a per-channel quantized weight, including the first and the last layer; a QuantAct
  follows every ``nn.ReLU`` / ``nn.ReLU6`` module (the module becomes ``Sequential(relu, QuantAct)``); the
  input image and the logits stay float; BatchNorm is kept, not folded. A ReLU module that a model calls
  at several places shares one QuantAct (its range covers all of them); ReLUs applied functionally
  (``F.relu``) are invisible to this pass: build models with ReLU modules (``zsqfast.models`` does).
* ``"linear_input"`` (ViTs, as PSAQ-ViT): every Linear's weight and its input activation (a QuantAct in
  ``QuantLinear.input_quant``); convolutions (the patch embedding) get quantized weights, the image stays float.
* ``"auto"``: ``"relu"`` when the model has ReLU/ReLU6 modules, else ``"linear_input"``.

Calibrate the activation ranges with :func:`calibrate` (QuantActs observe, BatchNorm stays in eval).
"""
from __future__ import annotations

import copy
from collections import Counter
from typing import Iterable

import torch
import torch.nn as nn

from .nn import QuantAct, QuantConv2d, QuantLinear
from .ops._common import check_bits

_ACTS = (nn.ReLU, nn.ReLU6)
_UNSUPPORTED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                nn.MultiheadAttention, nn.Bilinear, nn.LazyConv2d, nn.LazyLinear)


def _bits(value, name: str) -> int | None:
    if value is None or value == 32:
        return None
    try:
        return check_bits(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer in 2..8 (or None / 32 for float), got {value!r}") from None


def _swap(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def quantize_model(model: nn.Module, w_bits: int | None, a_bits: int | None, *, first_last_bits: int | None = None,
                   act_placement: str = "auto", w_symmetric: bool = False, act_momentum: float = 0.9,
                   ste: str = "identity", skip: Iterable[str] = ()) -> nn.Module:
    """Return a fake-quantized deep copy of ``model`` (``model`` itself is not modified).

    Args:
        w_bits, a_bits: weight / activation bits, 2..8 (None or 32: leave float).
        first_last_bits: weight bits of the first and the last conv/linear layer (e.g. 8), else ``w_bits``.
            In ``"linear_input"`` placement it also sets the bits of the last layer's input activation.
        act_placement: ``"auto"``, ``"relu"`` or ``"linear_input"`` (see the module docstring).
        w_symmetric: signed symmetric weight grids instead of asymmetric min/max.
        act_momentum, ste: passed to every QuantAct.
        skip: qualified names of modules to leave float (including ones this pass cannot quantize).
    Raises:
        ValueError: bad bits or placement; a layer type it cannot quantize (Conv1d/3d, transposed convs,
            nn.MultiheadAttention, subclasses of Conv2d/Linear with their own forward) not listed in ``skip``.
    """
    wb, ab, flb = _bits(w_bits, "w_bits"), _bits(a_bits, "a_bits"), _bits(first_last_bits, "first_last_bits")
    if first_last_bits is None:
        flb = wb
    if act_placement not in ("auto", "relu", "linear_input"):
        raise ValueError(f"act_placement must be 'auto', 'relu' or 'linear_input', got {act_placement!r}")
    skip = set(skip)
    q = copy.deepcopy(model)
    mods = [(n, m) for n, m in q.named_modules() if n not in skip and not any(n.startswith(s + ".") for s in skip)]
    bad = [f"{n} ({type(m).__name__})" for n, m in mods
           if isinstance(m, _UNSUPPORTED) or (isinstance(m, (nn.Conv2d, nn.Linear)) and type(m) not in (nn.Conv2d, nn.Linear))]
    if bad:
        raise ValueError("quantize_model cannot quantize these layers: " + ", ".join(bad) +
                         "; pass skip=[...names...] to keep them float")
    layers = [(n, m) for n, m in mods if type(m) in (nn.Conv2d, nn.Linear)]
    if not layers:
        raise ValueError("the model has no nn.Conv2d or nn.Linear layer to quantize")
    if act_placement == "auto":
        act_placement = "relu" if any(isinstance(m, _ACTS) for _, m in mods) else "linear_input"
    act_kw = dict(momentum=act_momentum, ste=ste)
    first, last = layers[0][0], layers[-1][0]
    for name, m in layers:
        bits = flb if name in (first, last) else wb
        if isinstance(m, nn.Conv2d):
            _swap(q, name, QuantConv2d.from_float(m, bits, w_symmetric=w_symmetric))
        else:
            in_bits = (flb if name == last else ab) if first_last_bits is not None else ab
            inq = QuantAct(in_bits, **act_kw) if act_placement == "linear_input" and in_bits is not None else None
            _swap(q, name, QuantLinear.from_float(m, bits, w_symmetric=w_symmetric, input_quant=inq))
    if act_placement == "relu" and ab is not None:
        for name, m in mods:
            if isinstance(m, _ACTS):
                _swap(q, name, nn.Sequential(m, QuantAct(ab, **act_kw)))
    return q


def quantization_report(model: nn.Module) -> dict[str, int]:
    """Counts of quantized layers, activation quantizers and float conv/linear layers left in ``model``."""
    counts = Counter(type(m).__name__ for m in model.modules()
                     if isinstance(m, (QuantAct, QuantConv2d, QuantLinear, nn.Conv2d, nn.Linear)))
    counts["float_conv_linear"] = sum(1 for m in model.modules()
                                      if isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, (QuantConv2d, QuantLinear)))
    return dict(counts)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], *, freeze: bool = False) -> nn.Module:
    """Observe activation ranges: QuantActs in training mode, everything else (BatchNorm) in eval mode.

    Returns ``model`` in eval mode. ``freeze=True`` freezes every QuantAct afterwards.
    """
    model.eval()
    acts = [m for m in model.modules() if isinstance(m, QuantAct)]
    for m in acts:
        m.train()
    for xb in batches:
        model(xb)
    model.eval()
    if freeze:
        for m in acts:
            m.freeze()
    return model
