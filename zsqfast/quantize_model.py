"""quantize_model: a deep copy of a float model with its layers swapped for fake-quantized ones.

Placement rules (``act_placement``):

* ``"relu"`` (CNNs; the ZeroQ lineage of GDFQ / Qimera / IntraQ / HAST / SynQ): every ``nn.Conv2d`` and
  ``nn.Linear`` gets a per-output-channel quantized weight, the first and the last layer included
  (``first_last_bits`` overrides their weight bits); a QuantAct follows every ``nn.ReLU`` / ``nn.ReLU6``
  MODULE (it becomes ``nn.Sequential(relu, QuantAct)``, so the ReLU keeps its name and the float layers
  keep their state_dict keys); the input image and the logits stay float; BatchNorm is kept, not folded.
  Two limits of a module swap, by design of the models rather than of this pass:
    - a ReLU applied functionally (``F.relu`` / ``torch.relu`` / ``x.relu()`` in a custom ``forward``) is
      invisible here and gets no quantizer. Build models with ReLU modules (``zsqfast.models`` does);
    - one ReLU module called at several places (torchvision's ResNet blocks call ``self.relu`` twice or
      three times) gets ONE QuantAct whose range is an EMA over all those places.
      :func:`calibrate` detects both cases it can (a QuantAct called k != 1 times per batch) and warns.
* ``"linear_input"`` (ViTs, as PSAQ-ViT): every Linear's weight and its INPUT activation are quantized (a
  QuantAct in ``QuantLinear.input_quant``, keys ``<linear>.input_quant.*``); convolutions (the patch
  embedding) get quantized weights while the image stays float. Matmuls inside attention (q @ k^T,
  attn @ v) and LayerNorm / GELU / softmax stay float.
* ``"auto"`` (default): ``"relu"`` when the model has a ReLU/ReLU6 module, else ``"linear_input"``.

Unknown layer types: layers this pass cannot quantize faithfully (Conv1d/3d, transposed and lazy convs,
nn.MultiheadAttention, subclasses of Conv2d/Linear with their own forward such as timm's Conv2dSame, or
an already-quantized layer) raise a ValueError listing them; pass ``skip=[names]`` to keep them float.
Everything else (norms, pooling, other activations) is copied as is.

Calibrate the activation ranges with :func:`calibrate` (QuantActs observe, BatchNorm stays in eval) and
count what was swapped with :func:`quantization_report`.
"""
from __future__ import annotations

import copy
import warnings
from collections import Counter
from typing import Iterable

import torch
import torch.nn as nn

from .nn import QuantAct, QuantConv2d, QuantLinear
from .nn.quant_layers import resolve_bits
from .range_search import mse_search_ranges

_ACTS = (nn.ReLU, nn.ReLU6)
_QUANT_LAYERS = (QuantConv2d, QuantLinear)
_UNSUPPORTED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                nn.MultiheadAttention, nn.Bilinear)
_LAZY = (nn.LazyLinear, nn.LazyConv1d, nn.LazyConv2d, nn.LazyConv3d, nn.LazyConvTranspose1d,
         nn.LazyConvTranspose2d, nn.LazyConvTranspose3d)


def _swap(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def _why_not(m: nn.Module) -> str | None:
    """Why ``m`` cannot be quantized by this pass (None when it can, or when it holds no conv/linear)."""
    if isinstance(m, (QuantAct,) + _QUANT_LAYERS):
        return "already quantized"
    if isinstance(m, _LAZY):
        return "lazy layer not yet initialised: run one forward first"
    if isinstance(m, _UNSUPPORTED):
        return "unsupported layer type"
    if isinstance(m, (nn.Conv2d, nn.Linear)) and type(m) not in (nn.Conv2d, nn.Linear):
        return "subclass with its own forward"
    return None


def quantize_model(model: nn.Module, w_bits: int | None, a_bits: int | None, *, first_last_bits: int | None = None,
                   act_placement: str = "auto", w_symmetric: bool = False, act_momentum: float = 0.9,
                   ste: str = "identity", skip: Iterable[str] = ()) -> nn.Module:
    """Return a fake-quantized deep copy of ``model``; ``model`` itself is not modified.

    Args:
        model: a float model (any mode; the copy keeps each module's mode).
        w_bits, a_bits: weight / activation bits, 2..8; None or 32 leaves them float (the layers are still
            swapped, so the structure does not depend on the bits).
        first_last_bits: weight bits of the first and the last ``nn.Conv2d``/``nn.Linear`` in
            ``named_modules()`` (registration) order, e.g. 8; default ``w_bits``. With ``"linear_input"``
            placement and ``a_bits`` set it also sets the bits of the last Linear's input quantizer.
        act_placement: ``"auto"``, ``"relu"`` or ``"linear_input"`` (module docstring).
        w_symmetric: signed symmetric weight grids instead of asymmetric min/max.
        act_momentum, ste: passed to every QuantAct (``ste`` only to activations: weights always use the
            identity STE of the ZeroQ lineage). :func:`zsqfast.finetune` sets every QuantAct to its own
            ``act_ste`` (default ``"clipped"``) while it trains and restores this setting afterwards.
        skip: qualified module names (and everything under them) to leave float, e.g. layers this pass
            cannot handle.
    Returns:
        The quantized copy. Every new module takes the train/eval mode of the module it replaces, so the
        copy of an eval model is in eval mode everywhere and its (uncalibrated) QuantActs raise until
        :func:`calibrate` (or a few training-mode forwards) gives them a range.
    Raises:
        ValueError: bits outside 2..8 (None / 32 allowed), an unknown placement or skip name, no layer to
            quantize, or layers it cannot quantize that are not in ``skip`` (listed by name and type).
    """
    wb = resolve_bits(w_bits, "w_bits")
    ab = resolve_bits(a_bits, "a_bits")
    flb = wb if first_last_bits is None else resolve_bits(first_last_bits, "first_last_bits")
    if act_placement not in ("auto", "relu", "linear_input"):
        raise ValueError(f"act_placement must be 'auto', 'relu' or 'linear_input', got {act_placement!r}")
    skip = set(skip)
    names = {n for n, _ in model.named_modules()}
    if skip - names:
        raise ValueError(f"skip names not found in the model: {sorted(skip - names)}")

    q = copy.deepcopy(model)
    mods = [(n, m) for n, m in q.named_modules()
            if n not in skip and not any(n.startswith(s + ".") for s in skip)]
    bad = [f"{n or '<root>'} ({type(m).__name__}: {_why_not(m)})" for n, m in mods if _why_not(m)]
    if bad:
        raise ValueError("quantize_model cannot quantize these layers: " + ", ".join(bad) +
                         "; pass skip=[...names...] to keep them float")
    layers = [(n, m) for n, m in mods if type(m) in (nn.Conv2d, nn.Linear)]
    if not layers:
        raise ValueError("the model has no nn.Conv2d or nn.Linear layer to quantize")
    if act_placement == "auto":
        act_placement = "relu" if any(isinstance(m, _ACTS) for _, m in mods) else "linear_input"

    def new_act(bits: int) -> QuantAct:
        return QuantAct(bits, momentum=act_momentum, ste=ste)

    first, last = layers[0][0], layers[-1][0]
    for name, m in layers:
        bits = flb if name in (first, last) else wb
        if isinstance(m, nn.Conv2d):  # the image (first conv's input) is never quantized
            _swap(q, name, QuantConv2d.from_float(m, bits, w_symmetric=w_symmetric))
        else:
            in_bits = flb if (name == last and first_last_bits is not None and ab is not None) else ab
            inq = new_act(in_bits) if act_placement == "linear_input" and in_bits is not None else None
            _swap(q, name, QuantLinear.from_float(m, bits, w_symmetric=w_symmetric, input_quant=inq))
    if act_placement == "relu" and ab is not None:
        for name, m in mods:
            if isinstance(m, _ACTS):  # the wrapper and its QuantAct take the ReLU's train/eval mode
                _swap(q, name, nn.Sequential(m, new_act(ab)).train(m.training))
    if ab is not None and not any(isinstance(m, QuantAct) for m in q.modules()):
        warnings.warn(f"quantize_model: a_bits={a_bits} but no activation quantizer was placed "
                      f"({act_placement!r} placement found no ReLU module / Linear layer)", stacklevel=2)
    return q


def quantization_report(model: nn.Module) -> dict:
    """What :func:`quantize_model` did to ``model``.

    Returns a dict with int counts ``QuantConv2d``, ``QuantLinear``, ``QuantAct``, ``float_conv_linear``
    (nn.Conv2d / nn.Linear left float: skipped layers), ``float_weight`` (quantized layers with
    ``w_bits=None``), ``w_bits`` (a ``{bits: number of layers}`` dict) and ``float_layers`` (the names of
    the float conv/linear layers left).
    """
    counts = Counter({"QuantConv2d": 0, "QuantLinear": 0, "QuantAct": 0})
    w_bits: Counter = Counter()
    float_layers = []
    for name, m in model.named_modules():
        for cls in (QuantConv2d, QuantLinear, QuantAct):
            counts[cls.__name__] += isinstance(m, cls)
        if isinstance(m, _QUANT_LAYERS):
            w_bits[m.w_bits] += 1
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            float_layers.append(name)
    return {**counts, "float_conv_linear": len(float_layers), "float_weight": w_bits.get(None, 0),
            "w_bits": dict(w_bits), "float_layers": float_layers}


def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], *, freeze: bool = False,
              warn: bool = True, method: str = "minmax") -> nn.Module:
    """Observe activation ranges: QuantActs in training mode, every other module in eval mode.

    Each batch (a tensor, or an ``(images, labels, ...)`` tuple/list: its first item) is run through
    ``model`` under no_grad; BatchNorm keeps its running statistics (eval) while every QuantAct takes one
    EMA step per call. Returns ``model`` in eval mode (``freeze=True`` also freezes every QuantAct).

    ``method``: ``"minmax"`` (the EMA of batch min / max above: the official ZeroQ-lineage observer) or
    ``"mse"``: the min/max pass, then each observing QuantAct's range shrunk to the clipping range of least
    quantization MSE on what reaches it from the same batches, searched in forward order with every upstream
    quantizer already on its searched range (:func:`zsqfast.range_search.mse_search_ranges`).

    ``warn``: after calibration, QuantActs called a number of times other than once per batch are named
    in a warning: never (a module the forward does not use) or several times (a ReLU module reused at
    several places, whose one range then mixes them).
    """
    if method not in ("minmax", "mse"):
        raise ValueError(f"calibration method must be 'minmax' or 'mse', got {method!r}")
    if method == "mse":
        batches = list(batches)  # iterated twice
    model.eval()
    acts = {n: m for n, m in model.named_modules() if isinstance(m, QuantAct)}
    before = {n: int(m.num_observed) for n, m in acts.items()}
    held = {n for n, m in acts.items() if m.frozen}  # frozen beforehand: they do not observe
    for m in acts.values():
        m.train()
    n_batches = 0
    if not (acts and len(held) == len(acts)):  # every quantizer held (e.g. calibrated before): nothing to observe
        with torch.no_grad():
            for xb in batches:
                model(xb[0] if isinstance(xb, (tuple, list)) else xb)
                n_batches += 1
    model.eval()
    if method == "mse" and n_batches:
        mse_search_ranges(model, batches)
    if freeze:
        for m in acts.values():
            m.freeze()
    if warn and n_batches and acts:
        calls = {n: int(m.num_observed) - before[n] for n, m in acts.items() if n not in held}
        odd = {n: c / n_batches for n, c in calls.items() if c != n_batches}
        if odd:
            listed = ", ".join(f"{n} ({k:g}x)" for n, k in sorted(odd.items()))
            warnings.warn(f"calibrate: {len(odd)} QuantAct(s) observed other than once per batch: {listed}. "
                          "0x: not used by forward; >1x: one module called at several places shares one "
                          "range (give each call site its own ReLU module)", stacklevel=2)
    return model
