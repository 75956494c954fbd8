"""Detect when a Grad-CAM target layer feeds global-average-pool then a linear layer, so that Grad-CAM
equals CAM (Grad-CAM paper, sec. 3.1) and needs no backward at all.

If the logits are ``z = W mean_hw(A) + b`` with only linear, parameter-free reshaping in between, then
``dz_y / dA_k(h, w) = W[y, k] / (H W)`` for every position, so the Grad-CAM weights are
``alpha_k = W[y, k] / (H W)`` in closed form. The structure is *detected*, never assumed: one forward of
one sample runs under a ``TorchFunctionMode`` that follows every tensor derived from A and accepts only

    A --(views, contiguous, eval dropout)--> global mean / adaptive_avg_pool2d(1) / full-window avg_pool2d
      --(views, flatten)--> linear(., W, b), W not derived from A --(views)--> the model's output,

with A used nowhere else. Anything else on the way (BatchNorm, ReLU, a residual add, an input quantizer,
LayerNorm of a ViT, ...) means the closed form does not hold and the general head-only backward is used.
SynQ's default target, the last conv's *raw* output, goes through BatchNorm, a residual add and a ReLU,
so it never qualifies; the feature map that enters the global pool (standard Grad-CAM's usual target)
does. The effective weight W (fake-quantized for a QuantLinear) is read on every call from inside the
head module's own forward.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_VIEWS = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.flatten, torch.Tensor.flatten,
          torch.Tensor.squeeze, torch.squeeze, torch.Tensor.contiguous, torch.Tensor.clone, torch.clone,
          torch.Tensor.view_as, torch.Tensor.reshape_as, torch.Tensor.unsqueeze, torch.unsqueeze}
_IGNORED = {torch.Tensor.size, torch.Tensor.dim, torch.Tensor.__len__, torch.Tensor.numel,
            torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,
            torch.Tensor.is_contiguous, torch.Tensor.stride, torch.Tensor.requires_grad.__get__}


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _is_global_pool(func, args, kwargs, a_shape) -> bool:
    if func in (F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d):
        size = args[1] if len(args) > 1 else kwargs.get("output_size")
        return size in (1, (1, 1), [1, 1])
    if func in (torch.Tensor.mean, torch.mean):
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        return {d % 4 for d in dims} == {2, 3}
    if func in (F.avg_pool2d, torch._C._nn.avg_pool2d):
        k = args[1] if len(args) > 1 else kwargs.get("kernel_size")
        k = (k, k) if isinstance(k, int) else tuple(k)
        pad = args[3] if len(args) > 3 else kwargs.get("padding", 0)
        return k == tuple(a_shape[-2:]) and pad in (0, (0, 0))
    return False


class _Tracer(TorchFunctionMode):
    """Follows tensors derived from A through the allowed chain; ``ok`` ends False on anything else."""

    def __init__(self, training: bool):
        super().__init__()
        self.state: dict[int, str] = {}   # id(tensor) -> "A" | "pooled" | "logits"
        self.keep: list[torch.Tensor] = []  # keep traced tensors alive so ids stay unique
        self.ok, self.linears, self.training = True, 0, training

    def mark(self, t: torch.Tensor, state: str) -> None:
        self.state[id(t)] = state
        self.keep.append(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _IGNORED or not self.ok:
            return out
        tainted = [self.state[id(t)] for t in _tensors((args, kwargs)) if id(t) in self.state]
        if not tainted or not isinstance(out, torch.Tensor):  # shape queries and the like carry no data
            return out
        if len(tainted) != 1:
            self.ok = False
            return out
        src, x = tainted[0], args[0] if args else None
        if func in _VIEWS or (func is F.dropout and not self.training):
            self.mark(out, src)
        elif src == "A" and isinstance(x, torch.Tensor) and x.dim() == 4 and _is_global_pool(func, args, kwargs, x.shape):
            self.mark(out, "pooled")
        elif src == "pooled" and func is F.linear and id(args[0]) in self.state and \
                not any(id(t) in self.state for t in _tensors(args[1:])):
            self.linears += 1
            self.mark(out, "logits")
        else:
            self.ok = False
        return out


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def linear_head(model: nn.Module, layer: nn.Module, x: torch.Tensor):
    """The module whose ``F.linear`` produces the logits from GAP(layer output), or None when the closed
    form does not hold (cached per (model, layer, train/eval); one traced forward of ``x[:1]``)."""
    per_model = _CACHE.setdefault(model, {})
    key = (id(layer), model.training)
    if key in per_model:
        return per_model[key]
    tracer = _Tracer(model.training)

    def on_layer(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            tracer.mark(output, "A")

    owners: list = []  # modules mapping a pooled tensor to logits, innermost first (checked while alive)

    def on_any(module, inputs, output):
        if isinstance(output, torch.Tensor) and tracer.state.get(id(output)) == "logits" and \
                any(tracer.state.get(id(t)) == "pooled" for t in _tensors(inputs)):
            owners.append(module)

    handles = [layer.register_forward_hook(on_layer)]
    handles += [m.register_forward_hook(on_any) for m in model.modules() if m is not layer]
    try:
        with torch.no_grad(), tracer:
            out = model(x[:1])
    finally:
        for h in handles:
            h.remove()
    ok = tracer.ok and tracer.linears == 1 and isinstance(out, torch.Tensor) and tracer.state.get(id(out)) == "logits"
    head = owners[0] if ok and owners else None  # the innermost one owns the F.linear call
    per_model[key] = head
    return head


class _WeightGrab(TorchFunctionMode):
    """Records the weight of the ``F.linear`` call made inside the head module's forward."""

    def __init__(self):
        super().__init__()
        self.weight = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            self.weight = args[1] if len(args) > 1 else kwargs["weight"]
        return func(*args, **kwargs)


def grab_head_weight(head: nn.Module):
    """Context: hooks ``head`` so that its effective linear weight (K, C) lands in the returned dict."""
    store: dict = {}
    grab = _WeightGrab()

    def pre(module, inputs):
        grab.__enter__()

    def post(module, inputs, output):
        grab.__exit__(None, None, None)
        store["w"] = grab.weight

    return store, (head.register_forward_pre_hook(pre), head.register_forward_hook(post))
