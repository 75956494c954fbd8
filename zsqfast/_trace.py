"""Dataflow of a fake-quant model, recorded by one forward: who feeds each quantized layer and BatchNorm.

:func:`trace_dataflow` runs the model once under a ``TorchFunctionMode`` plus module hooks and follows
tensors BY IDENTITY (references are held for the whole run, so ids are never reused):

* every QuantAct output is tagged ``("act", name)``; a QuantConv2d / QuantLinear output ``("layer", name)``;
* values stay on a quantizer's grid through a few value-preserving functions (max pooling, reshapes and
  views, slicing, ``contiguous`` / ``clone``, eval dropout): their outputs are tagged ``("derived", name)``;
* a call into a quantized layer, a BatchNorm or a QuantAct records the source of its input; the torch calls
  made INSIDE a quantized layer or a QuantAct are not looked at, nor a BatchNorm's own ``batch_norm`` of its
  recorded input (a timm BatchNormAct2d's ``drop`` and ``act`` run after it and ARE traced);
* any other torch call that reads a tagged tensor (an add of a residual, a pooling, an in-place ReLU...) is an
  "other use" of that source, and so is the model's output; an in-place op drops the tags of every tensor
  sharing its storage (its values may no longer lie on the grid).

This works for residual networks (one QuantAct output feeding a conv and a shortcut: the shortcut's add is
an other use) and for any Python control flow, since only the executed forward is looked at (a branch the
example input does not take is invisible: its layers stay weight-only, which is always exact).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .nn import QuantAct, QuantConv2d, QuantLinear

#: torch functions whose output holds values of their first input only (grid values stay grid values)
GRID_PRESERVING = {"max_pool2d", "max_pool1d", "adaptive_max_pool2d", "flatten", "reshape", "view", "contiguous",
                   "clone", "__getitem__", "permute", "transpose", "squeeze", "unsqueeze", "dropout", "detach",
                   "narrow", "t"}
#: calls that return no tensor but read values (everything else returning no tensor is a metadata query)
_VALUE_READS = {"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "equal", "allclose"}
_INPLACE_DUNDER = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
                   "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__setitem__"}


def is_bn(m: nn.Module) -> bool:
    """nn.BatchNorm2d, or timm's BatchNormAct2d (a BatchNorm2d followed by ``drop`` and ``act``)."""
    return type(m) is nn.BatchNorm2d or (isinstance(m, nn.BatchNorm2d) and type(m).__name__ == "BatchNormAct2d"
                                         and hasattr(m, "drop") and hasattr(m, "act"))


def is_act_wrapper(m: nn.Module) -> bool:
    """The ``nn.Sequential(relu, QuantAct)`` that :func:`zsqfast.quantize_model` puts in place of a ReLU."""
    return (type(m) is nn.Sequential and len(m) == 2 and type(m[0]) in (nn.ReLU, nn.ReLU6)
            and type(m[1]) is QuantAct)


@dataclass
class Dataflow:
    """What one forward showed. ``inputs[name]``: the source of the input at each call of a quantized layer
    or BatchNorm (None: an untagged float tensor). ``other_use``: sources read by anything else."""
    inputs: dict = field(default_factory=lambda: defaultdict(list))
    other_use: set = field(default_factory=set)
    calls: dict = field(default_factory=lambda: defaultdict(int))


class _Tracer(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.tags: dict[int, list] = {}
        self.held: list[torch.Tensor] = []  # keeps every tagged tensor alive: ids stay unique
        self.depth = 0
        self.bn_pending = None
        self.flow = Dataflow()

    def tag(self, t, source) -> None:
        if isinstance(t, torch.Tensor):
            self.tags.setdefault(id(t), []).append(source)
            self.held.append(t)

    def sources(self, t) -> list:
        return self.tags.get(id(t), []) if isinstance(t, torch.Tensor) else []

    def use(self, t) -> None:
        self.flow.other_use.update(self.sources(t))

    def untag_storage(self, t) -> None:
        if not isinstance(t, torch.Tensor):
            return
        ptr = t.untyped_storage().data_ptr()
        for h in self.held:
            if id(h) in self.tags and h.untyped_storage().data_ptr() == ptr:
                del self.tags[id(h)]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth:
            return out
        name = getattr(func, "__name__", "")
        ins = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if name == "batch_norm" and ins and ins[0] is self.bn_pending:
            ins, self.bn_pending = ins[1:], None  # the BatchNorm reading its recorded input
        tagged = [a for a in ins if self.sources(a)]
        inplace = ((name.endswith("_") and not name.startswith("__")) or name in _INPLACE_DUNDER
                   or bool(kwargs.get("inplace")))
        if tagged and (name in _VALUE_READS or inplace
                       or any(isinstance(o, torch.Tensor) for o in tree_leaves(out))):
            first = self.sources(ins[0]) if ins else []
            for a in tagged:
                self.use(a)
            if name in GRID_PRESERVING and isinstance(out, torch.Tensor) and not inplace:
                for s in first:
                    if s[0] in ("act", "derived"):
                        self.tag(out, ("derived", s[1]))
        if inplace and ins:
            self.untag_storage(ins[0])
        if "out" in kwargs:
            for o in tree_leaves(kwargs["out"]):
                self.untag_storage(o)
        return out

    # -- module hooks --------------------------------------------------------------------------------------
    def pre(self, name, module, args):
        x = args[0] if args else None
        bn = is_bn(module)
        if self.depth == 0:
            srcs = self.sources(x)
            if isinstance(module, (QuantConv2d, QuantLinear)) or bn:
                self.flow.calls[name] += 1
                self.flow.inputs[name].append(srcs[-1] if srcs else None)
                if bn:  # its F.batch_norm on x is the recorded use; BN inputs from a quantizer are other uses
                    self.bn_pending = x
                    self.flow.other_use.update(s for s in srcs if s[0] != "layer")
                elif module.input_quant is not None:
                    self.use(x)  # the layer quantizes on its own grid: not a consumer of x's grid
            else:  # a QuantAct reading a tagged tensor
                self.use(x)
        if not bn:  # QuantAct / quantized layers are opaque; a BatchNormAct2d's drop and act are traced
            self.depth += 1

    def post(self, name, module, args, out):
        if is_bn(module):
            return
        self.depth -= 1
        if self.depth == 0:
            if isinstance(module, QuantAct):
                self.tag(out, ("act", name))
            elif isinstance(module, (QuantConv2d, QuantLinear)):
                self.tag(out, ("layer", name))

    def wrapper_post(self, name, module, args, out):
        if self.depth == 0 and module[0].inplace and args:  # later reads of the input see relu(input)
            self.tag(args[0], ("pre", name))


def trace_dataflow(model: nn.Module, example_input) -> Dataflow:
    """Run ``model(example_input)`` once (no_grad; the model should be in eval mode) and return its
    :class:`Dataflow`. Hooks are removed afterwards, also on error."""
    tracer = _Tracer()
    handles = []
    try:
        for name, m in model.named_modules():
            if isinstance(m, (QuantAct, QuantConv2d, QuantLinear)) or is_bn(m):
                handles.append(m.register_forward_pre_hook(lambda mod, a, n=name: tracer.pre(n, mod, a)))
                handles.append(m.register_forward_hook(lambda mod, a, o, n=name: tracer.post(n, mod, a, o)))
            elif is_act_wrapper(m):
                handles.append(m.register_forward_hook(lambda mod, a, o, n=name: tracer.wrapper_post(n, mod, a, o)))
        with torch.no_grad(), tracer:
            out = model(example_input)
        for o in tree_leaves(out):
            tracer.use(o)
    finally:
        for h in handles:
            h.remove()
    return tracer.flow
