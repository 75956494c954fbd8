"""convert_to_integer: a fake-quant model (from :func:`zsqfast.quantize_model`) -> an integer inference model.

What it does, on a deep copy put in eval mode (the given model is not modified):

1. Dataflow (:func:`zsqfast._trace.trace_dataflow`, one forward of ``example_input``): which activation
   quantizer feeds each QuantConv2d / QuantLinear, by tensor identity (through max pooling, reshapes and
   slices, which keep values on the grid).
2. Every QuantConv2d / QuantLinear becomes an :class:`~zsqfast.nn.IntConv2d` / :class:`~zsqfast.nn.IntLinear`
   holding its packed per-channel codes (the exact codes of its fake-quantized weight):
     - integer mode when every call's input came from the same QuantAct (its grid is copied), or the layer
       had its own ``input_quant`` (the ViT placement; that QuantAct is absorbed);
     - weight-only mode otherwise (the image, an average-pooled feature, a residual sum: inputs the fake-quant
       model leaves float), which keeps the fake-quant model's arithmetic.
3. BatchNorm folding: a BatchNorm2d (or timm's BatchNormAct2d) in eval whose only input is the output of one
   QuantConv2d, that output having no other reader, is folded into the conv's epilogue,
   ``y * a + c`` with ``a = gamma / sqrt(var + eps)``, ``c = beta - mean * a``: ``w_scale <- w_scale * a``,
   ``bias <- bias * a + c``. The weights were quantized BEFORE the BatchNorm, so the integer codes do not
   change; only the float rounding of the epilogue differs from conv-then-BN.
4. ReLU + requantization fusion: a ``Sequential(ReLU or ReLU6, QuantAct)`` whose output is read only by
   integer layers quantizing on its grid is removed (replaced by nn.Identity): the consumers quantize the
   pre-activation tensor themselves, and the codes are identical because the grid already clamps what the
   activation clamps (checked: ``code(0) == 0``, and ``code(6) == 2^b - 1`` for ReLU6). Where the output also
   feeds something else (a residual add, a pooling), ReLU and QuantAct stay (frozen) and the consumers
   requantize its grid values, which gives back exactly the same codes.
   Not fused: the ReLU into the producing layer's epilogue (the integer ops have no activation argument).
5. Everything else (skipped float layers, pooling, LayerNorm, attention matmuls, GELU) is kept as it is; the
   conv / linear layers quantize_model left float (``skip=``) are named in a warning and in
   :func:`integer_report`.
6. Output layout: the integer model is run once on ``example_input``. IntConv2d returns channels_last maps
   (the fast path); when that forward fails with the ``view`` layout error (a ``x.view(B, -1)`` on a feature
   map, which the fake-quant model, NCHW throughout, does not raise), every IntConv2d is set to return
   contiguous NCHW maps instead (``channels_last=False``, kept in its config, so a reloaded model keeps it).

The result records its structural edits (``model.zsqfast_integer``) so that
:func:`zsqfast.save_integer_model` / :func:`zsqfast.load_integer_model` can rebuild it from the float
architecture without pickled code.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from ._trace import Dataflow, is_act_wrapper, is_bn, trace_dataflow
from .finetune.layout import _LAYOUT_ERROR
from .nn import QuantAct, QuantConv2d, QuantLinear
from .nn.int_layers import IntConv2d, IntLinear, activation_grid
from .ops.lowbit_gemm import check_k, quantize_codes
from .quantize_model import _swap

# 3: the checksum also covers the metadata and tensor names / dtypes / shapes, IntConv2d configs name their
# output layout; 2: dense weights on disk (zsqfast.integer_io); 1 and 2 still load
FORMAT_VERSION = 3


class FoldedNormAct(nn.Module):
    """What is left of a timm ``BatchNormAct2d`` once its BatchNorm is folded into the conv before it:
    ``act(drop(x))`` (children keep their names, so their state_dict keys do not move)."""

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop, self.act = drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _default_input(model: nn.Module) -> torch.Tensor:
    """A Gaussian example input: a timm model's input size (:func:`zsqfast.models.loading.timm_input_size`:
    its pretrained config, or its patch embedding's ``img_size``) when it has one, else (1, C, 32, 32) with C
    the first conv's input channels."""
    from .models.loading import timm_input_size

    size = timm_input_size(model)
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if size is not None:
        shape = (1, *size)
    elif conv is not None:
        shape = (1, conv.in_channels, 32, 32)
    else:
        raise ValueError("convert_to_integer cannot guess an input for a model without convolutions: pass "
                         "example_input")
    device = next(model.parameters()).device
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device)


def _check(model: nn.Module) -> None:
    """Clear errors before any work: not a fake-quant model, foreign quant layers, float weights, bad state."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    if not layers:
        raise ValueError("convert_to_integer needs a fake-quant model from zsqfast.quantize_model (no QuantConv2d "
                         "or QuantLinear found)")
    bad = [f"{n} ({type(m).__name__})" for n, m in layers if type(m) not in (QuantConv2d, QuantLinear)]
    if bad:
        raise ValueError("convert_to_integer does not support subclasses of the quantized layers (their forward "
                         "may differ): " + ", ".join(bad))
    floatw = [n for n, m in layers if m.w_bits is None]
    if floatw:
        raise ValueError("convert_to_integer needs integer weights (w_bits in 2..8); these layers have float "
                         "weights (w_bits=None): " + ", ".join(floatw))
    dtypes = {p.dtype for p in model.parameters()} - {torch.float32}
    if dtypes:
        raise ValueError(f"convert_to_integer takes an fp32 model, found parameters of {sorted(map(str, dtypes))}")
    uncal = [n for n, m in model.named_modules() if isinstance(m, QuantAct) and not m.calibrated]
    if uncal:
        raise ValueError("uncalibrated QuantAct(s) (run zsqfast.calibrate first): " + ", ".join(uncal))


def _act_grid(act: QuantAct):
    scale, zp = act.qparams()
    return activation_grid(scale, zp, act.bits, act.symmetric), act.bits


def _relu_fusable(relu: nn.Module, grid, bits: int) -> bool:
    """True when quantizing ``x`` and ``relu(x)`` on ``grid`` always gives the same codes."""
    ends = torch.tensor([0.0, 6.0], device=grid[0].device)
    codes = quantize_codes(ends, grid[0], grid[1].float(), bits)
    return int(codes[0]) == 0 and (type(relu) is nn.ReLU or int(codes[1]) == (1 << bits) - 1)


def _bn_fold(bn: nn.BatchNorm2d):
    """(a, c) with ``bn(y) == y * a + c`` in eval mode (computed in float64, rounded once to fp32)."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    a = gamma / torch.sqrt(var + bn.eps)
    return a, beta - mean * a


def _plan(model: nn.Module, flow: Dataflow):
    """Decide each layer's mode, the BatchNorms to fold and the activation wrappers to fuse."""
    mods = dict(model.named_modules())
    grids, uncalled = {}, []
    for name, m in mods.items():
        if not isinstance(m, (QuantConv2d, QuantLinear)):
            continue
        srcs = flow.inputs.get(name, [])
        if m.input_quant is not None:
            grids[name] = _act_grid(m.input_quant)
        elif srcs and srcs[0] is not None and srcs[0][0] in ("act", "derived") and \
                all(s is not None and s[1] == srcs[0][1] for s in srcs):
            grids[name] = _act_grid(mods[srcs[0][1]])
        if not srcs:
            uncalled.append(name)
    if uncalled:
        warnings.warn("convert_to_integer: the traced forward did not call " + ", ".join(uncalled) +
                      "; they are kept weight-only (exact, float activations)", stacklevel=3)
    folds = {}  # bn name -> conv name
    for name, m in mods.items():
        srcs = flow.inputs.get(name, [])
        if is_bn(m) and len(srcs) == 1 and srcs[0] is not None and srcs[0][0] == "layer":
            conv = srcs[0][1]
            if (isinstance(mods[conv], QuantConv2d) and flow.calls[conv] == 1 and srcs[0] not in flow.other_use
                    and m.running_mean is not None and m.num_features == mods[conv].out_channels):
                folds[name] = conv
    fused = []
    for name, m in mods.items():
        if not is_act_wrapper(m) or ("pre", name) in flow.other_use:
            continue
        act = name + ".1"
        consumers = [n for n, srcs in flow.inputs.items() if ("act", act) in srcs]
        direct_only = all(flow.inputs[n] and all(s == ("act", act) for s in flow.inputs[n]) for n in consumers)
        if consumers and direct_only and ("act", act) not in flow.other_use and \
                all(n in grids and not is_bn(mods[n]) for n in consumers) and _relu_fusable(m[0], *_act_grid(m[1])):
            fused.append(name)
    return grids, folds, fused


def _int_layer(name: str, m: nn.Module, a_bits: int | None, bias: bool | None = None):
    """The empty IntConv2d / IntLinear (``empty_for``) that the QuantConv2d / QuantLinear ``m`` at ``name``
    becomes, ``a_bits`` None for weight-only, its K checked against the int32 accumulator in integer mode:
    the per-layer check of :func:`convert_to_integer` and :func:`check_convertible`. Its ValueError names the
    layer and the way out."""
    cls = IntConv2d if isinstance(m, QuantConv2d) else IntLinear
    try:
        new = cls.empty_for(m, a_bits, bias)
        if a_bits is not None:
            check_k(new.K, a_bits, new.w_bits)
    except ValueError as exc:  # say which layer cannot become an integer layer
        raise ValueError(f"convert_to_integer cannot convert layer {name!r} ({type(m).__name__}): {exc}; "
                         f"keep it float with quantize_model(..., skip=[{name!r}])") from None
    return new


def check_convertible(qmodel: nn.Module) -> None:
    """Raise the ValueError :func:`convert_to_integer` would for a layer it cannot convert, without tracing,
    packing or running (cheap: :func:`zsqfast.quantize` calls it before ``out/`` is written). Each layer is
    checked in the mode known without a trace: integer when it has its own ``input_quant``, else weight-only
    (so a K too large for the accumulator is found here only for the former; the conversion itself checks
    the layers a traced QuantAct feeds)."""
    for name, m in qmodel.named_modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            _int_layer(name, m, None if m.input_quant is None else m.input_quant.bits)


def float_layers(model: nn.Module) -> list[str]:
    """Qualified names of the conv / linear layers of ``model`` that are plain float modules (not quantized:
    ``quantize_model(..., skip=...)``, or a type it does not swap)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
            and not isinstance(m, (QuantConv2d, QuantLinear))]


def _fails_channels_last(model: nn.Module, x: torch.Tensor) -> bool:
    """True when the forward of ``x`` raises the ``view`` layout error (a channels_last map given to
    ``Tensor.view``); any other error propagates."""
    try:
        with torch.no_grad():
            model(x)
    except RuntimeError as e:
        if _LAYOUT_ERROR not in str(e):
            raise
        return True
    return False


def convert_to_integer(qmodel: nn.Module, example_input: torch.Tensor | None = None, *, fold_bn: bool = True,
                       fuse: bool = True) -> nn.Module:
    """An integer inference copy of the fake-quant ``qmodel`` (module docstring for what changes).

    Args:
        qmodel: a model from :func:`zsqfast.quantize_model`, calibrated (every QuantAct has a range); fp32.
        example_input: an input the model accepts (used for the traced forward and the integer model's
            layout check, step 6; its values do not matter); default: a Gaussian of timm's ``input_size``,
            else (1, C, 32, 32).
        fold_bn: fold BatchNorms into the integer epilogue (step 3). fuse: fuse ReLU + QuantAct (step 4).
    Returns:
        A new model in eval mode: IntConv2d / IntLinear layers, BatchNorms folded, kept QuantActs frozen.
        ``result.zsqfast_integer`` holds the edits that :func:`zsqfast.save_integer_model` stores.
    Raises:
        ValueError: no quantized layer, a subclass of one, float weights (``w_bits=None``), non-fp32
            parameters, an uncalibrated QuantAct, or a layer it cannot convert (asymmetric ``padding='same'``,
            a K that could overflow the int32 accumulator): the message names the layer and how to skip it.
    Warns:
        UserWarning naming the conv / linear layers left float (:func:`float_layers`).
    """
    _check(qmodel)
    model = copy.deepcopy(qmodel).eval()
    x = _default_input(model) if example_input is None else example_input
    flow = trace_dataflow(model, x)
    grids, folds, fused = _plan(model, flow)
    if not fold_bn:
        folds = {}
    if not fuse:
        fused = []
    mods = dict(model.named_modules())
    bn_of = {conv: bn for bn, conv in folds.items()}
    edits = []
    for name, m in list(mods.items()):
        if not isinstance(m, (QuantConv2d, QuantLinear)):
            continue
        grid, a_bits = grids.get(name, (None, None))
        scale_mul = bias = None
        if name in bn_of:
            a, c = _bn_fold(mods[bn_of[name]])
            scale_mul = a.float()
            bias = (c if m.bias is None else m.bias.detach().double() * a + c).float()
        new = _int_layer(name, m, a_bits, m.bias is not None or bias is not None)
        new.fill(m, grid, scale_mul=scale_mul, bias_override=bias)
        _swap(model, name, new)
        edit = {"path": name, "op": type(new).__name__, "config": new.config()}
        if name in bn_of:
            edit["bn"] = bn_of[name]  # informative: the BatchNorm folded into this layer
        edits.append(edit)
    for bn_name in folds:
        bn = mods[bn_name]
        plain = type(bn) is nn.BatchNorm2d
        _swap(model, bn_name, nn.Identity() if plain else FoldedNormAct(bn.drop, bn.act))
        edits.append({"path": bn_name, "op": "Identity" if plain else "FoldedNormAct", "was": type(bn).__name__})
    for name, m in mods.items():
        if is_act_wrapper(m):
            if name in fused:
                _swap(model, name, nn.Identity())
                edits.append({"path": name, "op": "Identity", "was": type(m[0]).__name__})
            else:
                m[1].freeze()
                edits.append({"path": name, "op": "QuantAct", "was": type(m[0]).__name__,
                              "config": {"bits": m[1].bits, "symmetric": m[1].symmetric}})
    for m in model.modules():
        if isinstance(m, QuantAct):
            m.freeze()
    convs = {e["path"]: e for e in edits if e["op"] == "IntConv2d"}
    if convs and _fails_channels_last(model, x):  # step 6: NCHW outputs, as the fake-quant model's
        for path, e in convs.items():
            model.get_submodule(path).channels_last = e["config"]["channels_last"] = False
        with torch.no_grad():
            model(x)  # now runs (any other error is raised here)
    left = float_layers(model)
    if left:
        warnings.warn("convert_to_integer: these layers were not quantized and stay float (fp32 weights and "
                      "arithmetic): " + ", ".join(left), stacklevel=2)
    edits.sort(key=lambda e: e["path"].count("."))  # parents before children when rebuilt
    model.zsqfast_integer = {"format": FORMAT_VERSION, "edits": edits}
    return model.eval()


def integer_report(model: nn.Module) -> dict:
    """Counts of an integer model: ``integer`` / ``weight_only`` layers, ``float`` conv / linear layers never
    quantized (their names in ``float_layers``), ``folded_bn``, ``fused_act``, ``kept_act`` (from
    ``model.zsqfast_integer``) and ``weight_bytes`` (of the integer layers, in memory: kernel-layout packed
    codes, K padded to 128, + per-channel scale, zero point, column sum; the file is smaller, see
    zsqfast.integer_io)."""
    info = getattr(model, "zsqfast_integer", None)
    if info is None:
        raise ValueError("not an integer model from zsqfast.convert_to_integer")
    layers = [m for m in model.modules() if isinstance(m, (IntConv2d, IntLinear))]
    ed, left = info["edits"], float_layers(model)
    return {"integer": sum(m.a_bits is not None for m in layers),
            "weight_only": sum(m.a_bits is None for m in layers),
            "float": len(left), "float_layers": left,
            "folded_bn": sum(e["op"] in ("Identity", "FoldedNormAct") and "BatchNorm" in e["was"] for e in ed),
            "fused_act": sum(e["op"] == "Identity" and e["was"] in ("ReLU", "ReLU6") for e in ed),
            "kept_act": sum(e["op"] == "QuantAct" for e in ed),
            "weight_bytes": sum(b.numel() * b.element_size() for m in layers
                                for b in (m.packed, m.w_scale, m.w_zero, m.w_colsum))}
