"""Per-sample Grad-CAM for a whole batch, and SynQ's CAM-alignment loss.

SynQ semantics (``mode="synq"``, ../shared/reference/zsq-semantics.md): the target layer is the LAST Conv2d in
``named_modules`` order (its raw output A, before BN / residual / ReLU); each sample's score is the logit of
the model's own prediction; weights alpha_k = mean_hw(dScore/dA_k) after adding 1e-10 to the gradient while
it has exact zeros, clamped at 1e-10 (negatives clamped: not textbook Grad-CAM); map = ReLU(sum_k alpha_k A_k),
bilinearly upsampled to the input size (align_corners=False) and min-max normalised per sample
((m - min) / (max - min + 1e-10)).

``mode="standard"`` is textbook Grad-CAM as the ``grad-cam`` package (pytorch-grad-cam) computes it: default
target the feature map that enters the global pool (e.g. ``layer4`` of a ResNet), alpha = mean_hw(gradient),
map = ReLU(sum_k alpha_k A_k) min-max normalised at the layer's resolution (eps 1e-7), bilinearly resized to
the input size, and min-max normalised again.

Vision transformers (timm): the default target is the token grid of the LAST block, read at its ``norm1``
(the normalised tokens entering the block's attention; pytorch-grad-cam's documented ViT / Swin target). Not
the block's output: DeiT / ViT classify from the class token alone, so the output's patch tokens get an
exactly zero gradient and every map would be 0 (all ones after SynQ's 1e-10 clamp). ViT / DeiT
(``model.blocks``): tokens (B, N, D), the prefix tokens (class / distillation, ``model.num_prefix_tokens``)
dropped and the rest reshaped to the grid (B, D, s, s), s = sqrt(N - prefix). Swin (``model.layers[-1].blocks``,
channels-last ``output_fmt == "NHWC"``): a 4-D (B, H, W, C) target is read as (B, C, H, W) (a permuted view
taken inside the forward hook, so gradients and the CAM loss flow through it).

Cost: the official code back-propagates each score through the WHOLE network (parameter gradients included)
per model per batch. Here the front of the network runs without building a graph and the gradient goes from
the scores down to A only (``torch.autograd.grad`` w.r.t. A), so a map costs a forward plus a backward
through the head. When the target feeds global-average-pool then a linear layer (detected by
:mod:`zsqfast.finetune.head`) Grad-CAM equals CAM, alpha_k = W[y, k] / (H W), and no backward runs at all.
With ``differentiable=True`` the map keeps A's graph (the weights alpha are constants, as in SynQ), so a loss
on it trains the model that produced it.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cam_loss import cam_mse
from .head import grab_head_weight, linear_head
from .layout import _unwrap, call_channels_last

MODES = ("synq", "standard")
_STANDARD_LAYER: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def last_block(model: nn.Module) -> nn.Module | None:
    """The last transformer block of a timm ViT / DeiT (``blocks[-1]``) or Swin (``layers[-1].blocks[-1]``);
    None for other models."""
    model = _unwrap(model)
    if not hasattr(model, "patch_embed"):
        return None
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        layers = getattr(model, "layers", None)
        blocks = getattr(layers[-1], "blocks", None) if isinstance(layers, (nn.Sequential, nn.ModuleList)) \
            and len(layers) else None
    return blocks[-1] if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) else None


def _nhwc(model: nn.Module) -> bool:
    """timm models whose blocks run channels-last (B, H, W, C), e.g. Swin."""
    return getattr(_unwrap(model), "output_fmt", None) == "NHWC"


def default_layer(model: nn.Module, mode: str = "synq", x: torch.Tensor | None = None) -> nn.Module:
    """The mode's default target: the last block's ``norm1`` of a ViT / Swin (module docstring); else for
    ``synq`` the last ``nn.Conv2d``
    (including quantized subclasses) in ``named_modules`` order, for ``standard`` the last module to finish
    with a (B, C, H, W) output of H*W > 1 (the map entering the global pool; found with one probe forward of
    ``x[:1]``, cached per model)."""
    block = last_block(model)
    if block is not None:
        return getattr(block, "norm1", block)
    if mode == "synq":
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise ValueError(f"{type(model).__name__} has no Conv2d layer; pass layer= explicitly")
        return convs[-1]
    if model not in _STANDARD_LAYER:
        if x is None:
            raise ValueError("the standard-mode default layer is found with a probe forward: pass x")
        last = []
        names = {m: n for n, m in model.named_modules()}
        hooks = [m.register_forward_hook(
            lambda mod, i, o: last.append(names[mod]) if isinstance(o, torch.Tensor) and o.dim() == 4 and
            o.shape[-1] * o.shape[-2] > 1 else None) for m in model.modules() if m is not model]
        try:
            with torch.no_grad():
                model(x[:1])
        finally:
            for h in hooks:
                h.remove()
        if not last:
            raise ValueError(f"{type(model).__name__} produced no 4-D feature map; pass layer= explicitly")
        _STANDARD_LAYER[model] = last[-1]
    return model.get_submodule(_STANDARD_LAYER[model])


def _resolve(model: nn.Module, layer, mode: str = "synq", x=None) -> nn.Module:
    if layer is None:
        return default_layer(model, mode, x)
    if isinstance(layer, str):
        return model.get_submodule(layer)
    return layer


def prefix_tokens(model: nn.Module) -> int | None:
    """Tokens before the patch grid of a ViT (class, distillation), None for other models."""
    return getattr(_unwrap(model), "num_prefix_tokens", None)


def as_grid(a: torch.Tensor, prefix: int | None = None) -> torch.Tensor:
    """A target activation as a (B, C, H, W) map: 4-D as is; ViT tokens (B, N, D) without the ``prefix``
    tokens (default: N minus the largest square below N) reshaped to (B, D, s, s)."""
    if a.dim() == 4:
        return a
    if a.dim() != 3:
        raise ValueError(f"Grad-CAM needs a (B, C, H, W) map or (B, N, D) tokens, got shape {tuple(a.shape)}")
    b, n, d = a.shape
    prefix = n - math.isqrt(n) ** 2 if prefix is None else prefix
    s = math.isqrt(n - prefix)
    if s * s != n - prefix:
        raise ValueError(f"{n} tokens minus {prefix} prefix tokens do not form a square grid")
    return a[:, prefix:].transpose(1, 2).reshape(b, d, s, s)


def _capture(model: nn.Module, layer: nn.Module, x: torch.Tensor, differentiable: bool, head_graph: bool = True):
    """Run the model; return (logits, A). Without ``differentiable`` the front runs graph-free and A is a leaf
    (``head_graph``: the head after A records a graph, for the backward of the general path). A channels-last
    4-D output of a Swin-like model is returned as the (B, C, H, W) view A and passed on as A's inverse view."""
    store = {}
    nhwc = _nhwc(model)

    def hook(module, inputs, output):
        a = output.permute(0, 3, 1, 2) if nhwc and output.dim() == 4 else output
        if not differentiable and head_graph:
            torch.set_grad_enabled(True)  # the head (after A) needs a graph; the front did not
            a = a.detach().requires_grad_(True)
        store["a"] = a
        return a.permute(0, 2, 3, 1) if nhwc and a.dim() == 4 else a

    handle = layer.register_forward_hook(hook)
    try:
        ctx = contextlib.nullcontext() if differentiable else torch.no_grad()
        with ctx:
            logits = model(x)
    finally:
        handle.remove()
    if "a" not in store:
        raise RuntimeError("the Grad-CAM target layer did not run in the forward pass")
    return logits, store["a"]


def capture(model: nn.Module, x: torch.Tensor, layer=None, differentiable: bool = False, mode: str = "synq"):
    """Run ``model`` on x and return ``(logits, A)``, A the target layer's output (default: the mode's).

    Without ``differentiable`` the front (up to A) runs without a graph and only the head keeps one, which is
    all :func:`cam_from_activation` needs; use ``logits.detach()`` for anything else."""
    return _capture(model, _resolve(model, layer, mode, x), x, differentiable)


def _classes(logits: torch.Tensor, target) -> torch.Tensor:
    """int64 (B,) classes of ``target``: ``"pred"``, one class for every sample (an int or a 0-dim integer
    tensor) or an integer (B,) tensor; anything else (another length, a float tensor) is a ValueError."""
    b = logits.size(0)
    if isinstance(target, str) and target == "pred":
        return logits.detach().argmax(1)
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        return torch.full((b,), int(target), dtype=torch.int64, device=logits.device)
    if (isinstance(target, torch.Tensor) and not target.is_floating_point() and not target.is_complex()
            and target.dtype != torch.bool and target.shape in ((), (b,))):
        return target.to(device=logits.device, dtype=torch.int64).expand(b)
    got = (f"a {target.dtype} tensor of shape {tuple(target.shape)}" if isinstance(target, torch.Tensor)
           else repr(target))
    raise ValueError(f"target must be 'pred', an int class or an integer tensor of shape () or ({b},), got {got}")


def _alpha(grad_mean_source: torch.Tensor, mode: str) -> torch.Tensor:
    """alpha (B, C, 1, 1) from the gradient (B, C, H, W) or per-channel gradient (B, C, 1, 1)."""
    grad = grad_mean_source
    if mode == "synq":
        for _ in range(8):  # SynQ: add 1e-10 while exact zeros remain
            if not bool((grad == 0).any()):
                break
            grad = grad + 1e-10
        return grad.mean(dim=(2, 3), keepdim=True).clamp(min=1e-10)
    return grad.mean(dim=(2, 3), keepdim=True)


def _minmax(m: torch.Tensor, eps: float) -> torch.Tensor:
    flat = m.flatten(1)
    shape = (-1,) + (1,) * (m.dim() - 1)
    lo, hi = flat.min(1)[0].view(shape), flat.max(1)[0].view(shape)
    return (m - lo) / (hi - lo + eps)


def finish_map(weighted_sum: torch.Tensor, size, mode: str) -> torch.Tensor:
    """(B, 1, h, w) ``sum_k alpha_k A_k`` -> the mode's normalised (B, H, W) map at ``size``."""
    cam = F.relu(weighted_sum)
    if mode == "synq":
        cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)
        return _minmax(cam, 1e-10)
    cam = _minmax(cam, 1e-7)  # pytorch-grad-cam: normalise, resize, normalise again
    cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)
    return _minmax(cam, 1e-7)


def weights_from_activation(logits: torch.Tensor, a: torch.Tensor, *, target="pred", mode: str = "synq",
                            retain_graph: bool = False, prefix: int | None = None):
    """``(A as a (B, C, h, w) map, alpha (B, C, 1, 1) detached)``: the gradient of each sample's score goes
    from the logits down to A only (one ``autograd.grad``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'synq' or 'standard', got {mode!r}")
    score = logits.gather(1, _classes(logits, target).reshape(-1, 1)).sum()
    (grad,) = torch.autograd.grad(score, a, retain_graph=retain_graph)
    return as_grid(a, prefix), _alpha(as_grid(grad, prefix), mode).detach()


def cam_from_activation(logits: torch.Tensor, a: torch.Tensor, size, *, target="pred", mode: str = "synq",
                        differentiable: bool = False, prefix: int | None = None) -> torch.Tensor:
    """Grad-CAM maps (B, *size) from the logits and the target activation of one forward pass (see
    :func:`capture`)."""
    a4, alpha = weights_from_activation(logits, a, target=target, mode=mode, retain_graph=differentiable,
                                        prefix=prefix)
    return finish_map((alpha * a4).sum(dim=1, keepdim=True), size, mode)


def cam_loss_from_activation(logits: torch.Tensor, a: torch.Tensor, target_map: torch.Tensor, *,
                             mode: str = "synq", prefix: int | None = None) -> torch.Tensor:
    """The CAM-alignment loss of a student forward (logits, A with its graph) against a detached teacher map
    (B, H, W); SynQ mode runs the fused single-node loss (:func:`zsqfast.finetune.cam_loss.cam_mse`)."""
    a4, alpha = weights_from_activation(logits, a, mode=mode, retain_graph=True, prefix=prefix)
    return _loss_from_weights(a4, alpha, target_map.detach(), mode)


def _loss_from_weights(a4, alpha, target_map, mode):
    if mode == "synq":
        return cam_mse(a4, alpha.flatten(1), target_map)
    return F.mse_loss(finish_map((alpha * a4).sum(dim=1, keepdim=True), target_map.shape[-2:], mode), target_map)


def _maps_inputs(model, x, layer, target, mode, differentiable, closed_form, channels_last=None):
    """``(A as a map, alpha (B, C, 1, 1))`` of one forward: CAM's closed form when the target feeds
    GAP -> linear (and ``closed_form`` allows it), else the head-only gradient."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'synq' or 'standard', got {mode!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    return call_channels_last(lambda xx: _maps_of(model, xx, layer, target, mode, differentiable, closed_form),
                              x, (model,), channels_last)


def _maps_of(model, x, layer, target, mode, differentiable, closed_form):
    lay = _resolve(model, layer, mode, x)
    prefix = prefix_tokens(model)
    head = linear_head(model, lay, x) if closed_form else None
    if closed_form is True and head is None:
        raise ValueError("closed_form=True but the target layer does not feed global-average-pool -> linear")
    if head is None:
        logits, a = _capture(model, lay, x, differentiable)
        return weights_from_activation(logits, a, target=target, mode=mode, retain_graph=differentiable,
                                       prefix=prefix)
    store, hooks = grab_head_weight(head)
    try:
        logits, a = _capture(model, lay, x, differentiable, head_graph=False)
    finally:
        for h in hooks:
            h.remove()
    a4 = as_grid(a, prefix)
    w = store["w"].detach()
    g = (w[_classes(logits, target)] / (a4.shape[-2] * a4.shape[-1]))[:, :, None, None].to(a4.dtype)
    return a4, _alpha(g, mode)


def gradcam(model: nn.Module, x: torch.Tensor, *, layer=None, target="pred", mode: str = "synq",
            differentiable: bool = False, closed_form: str | bool = "auto",
            channels_last: bool | None = None) -> torch.Tensor:
    """Grad-CAM maps of a batch: float (B, H, W) at the input resolution, each in [0, 1].

    Args:
        model: a CNN or ViT classifier (its train/eval mode is used as is).
        x: (B, C, H, W) input batch.
        layer: the target module, its qualified name, or None (the mode's default, see :func:`default_layer`).
        target: ``"pred"`` (each sample's own predicted class), one class for every sample (an int or a
            0-dim integer tensor) or an integer (B,) tensor of classes; anything else is a ValueError.
        mode: ``"synq"`` or ``"standard"`` (module docstring).
        differentiable: keep the graph through A (for a training loss on the maps).
        closed_form: ``"auto"``: use CAM's closed form (no backward) when the GAP -> linear structure is
            detected; ``False``: always the general head-only backward; ``True``: require the closed form.
        channels_last: run the forward on a channels-last copy of x (None: on the CPU, where oneDNN's
            channels-last convolutions are faster, falling back to NCHW for models that ``view`` a feature
            map; the model itself is left as it is; see :mod:`zsqfast.finetune.layout`).
    """
    a4, alpha = _maps_inputs(model, x, layer, target, mode, differentiable, closed_form, channels_last)
    return finish_map((alpha * a4).sum(dim=1, keepdim=True), x.shape[-2:], mode)


def reference_gradcam(model: nn.Module, x: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
    """SynQ's official procedure (its gradcam.py), the semantics ``mode="synq"`` reproduces: hooks on the last
    conv, each sample's predicted-class score back-propagated through the WHOLE network (parameter gradients
    included), then the same weights / ReLU / upsample / min-max. ``differentiable``: the map keeps A's graph
    (the official student mask). Slow by design; for tests and benchmarks."""
    layer = default_layer(model)
    store = {}
    h1 = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    h2 = layer.register_full_backward_hook(lambda m, gi, go: store.__setitem__("g", go[0]))
    try:
        model.zero_grad()
        logits = model(x)
        score = logits.gather(1, logits.argmax(1, keepdim=True))
        score.backward(torch.ones_like(score), retain_graph=differentiable)
    finally:
        h1.remove()
        h2.remove()
    a, g = store["a"] if differentiable else store["a"].detach(), store["g"].detach()
    while (g == 0).any():
        g = g + 1e-10
    alpha = g.mean(dim=(2, 3), keepdim=True).clamp(min=1e-10)
    cam = F.interpolate(F.relu((alpha * a).sum(1, keepdim=True)), size=x.shape[-2:], mode="bilinear",
                        align_corners=False).squeeze(1)
    mn, mx = cam.flatten(1).min(1)[0].view(-1, 1, 1), cam.flatten(1).max(1)[0].view(-1, 1, 1)
    return (cam - mn) / (mx - mn + 1e-10)


def cam_alignment_loss(teacher: nn.Module, student: nn.Module, x: torch.Tensor, *, teacher_layer=None,
                       student_layer=None, mode: str = "synq") -> torch.Tensor:
    """SynQ's CAM loss: ``MSE(map_teacher, map_student)`` over B*H*W, the teacher's map detached, the
    student's differentiable through its activations (both on the same images, each model's own prediction).
    SynQ mode computes map + upsample + normalise + MSE as one autograd node (:mod:`.cam_loss`)."""
    t = gradcam(teacher, x, layer=teacher_layer, mode=mode).detach()
    a4, alpha = _maps_inputs(student, x, student_layer, "pred", mode, True, "auto")
    return _loss_from_weights(a4, alpha, t, mode)
