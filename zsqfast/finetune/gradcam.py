"""Per-sample Grad-CAM for a whole batch, and SynQ's CAM-alignment loss.

SynQ semantics (``mode="synq"``, ../shared/reference/zsq-semantics.md): the target layer is the LAST Conv2d in
``named_modules`` order (its raw output A, before BN / residual / ReLU); each sample's score is the logit of
the model's own prediction; weights alpha_k = mean_hw(dScore/dA_k) after adding 1e-10 to the gradient while
it has exact zeros, clamped at 1e-10 (negatives clamped: not textbook Grad-CAM); map = ReLU(sum_k alpha_k A_k),
bilinearly upsampled to the input size (align_corners=False) and min-max normalised per sample
((m - min) / (max - min + 1e-10)). ``mode="standard"`` is textbook Grad-CAM (no clamp, no 1e-10 shift).

Cost: the official code back-propagates each score through the WHOLE network (parameter gradients included)
per model per batch. Here the front of the network runs without building a graph and the gradient goes from
the scores down to A only (``torch.autograd.grad`` w.r.t. A), so a map costs a forward plus a backward
through the head. With ``differentiable=True`` the map keeps A's graph (the weights alpha are constants, as
in SynQ), so a loss on it trains the model that produced it.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F


def default_layer(model: nn.Module) -> nn.Module:
    """The last ``nn.Conv2d`` (including quantized subclasses) in ``named_modules`` order."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer; pass layer= explicitly")
    return convs[-1]


def _resolve(model: nn.Module, layer) -> nn.Module:
    if layer is None:
        return default_layer(model)
    if isinstance(layer, str):
        return model.get_submodule(layer)
    return layer


def _capture(model: nn.Module, layer: nn.Module, x: torch.Tensor, differentiable: bool):
    """Run the model; return (logits, A). Without ``differentiable`` the front runs graph-free and A is a leaf."""
    store = {}

    def hook(module, inputs, output):
        if not differentiable:
            torch.set_grad_enabled(True)  # the head (after A) needs a graph; the front did not
            output = output.detach().requires_grad_(True)
        store["a"] = output
        return output

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


def capture(model: nn.Module, x: torch.Tensor, layer=None, differentiable: bool = False):
    """Run ``model`` on x and return ``(logits, A)``, A the target layer's output (default: last Conv2d).

    Without ``differentiable`` the front (up to A) runs without a graph and only the head keeps one, which is
    all :func:`cam_from_activation` needs; use ``logits.detach()`` for anything else."""
    return _capture(model, _resolve(model, layer), x, differentiable)


def cam_from_activation(logits: torch.Tensor, a: torch.Tensor, size, *, target="pred", mode: str = "synq",
                        differentiable: bool = False) -> torch.Tensor:
    """Grad-CAM maps (B, *size) from the logits and the target activation of one forward pass (see
    :func:`capture`): the gradient of each sample's score goes from the logits down to A only."""
    if mode not in ("synq", "standard"):
        raise ValueError(f"mode must be 'synq' or 'standard', got {mode!r}")
    cls = logits.argmax(1) if isinstance(target, str) and target == "pred" else torch.as_tensor(target)
    score = logits.gather(1, cls.view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(score, a, retain_graph=differentiable)
    if mode == "synq":
        for _ in range(8):  # SynQ: add 1e-10 while exact zeros remain
            if not bool((grad == 0).any()):
                break
            grad = grad + 1e-10
        alpha = grad.mean(dim=(2, 3), keepdim=True).clamp(min=1e-10)
    else:
        alpha = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((alpha.detach() * a).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)
    flat = cam.flatten(1)
    lo, hi = flat.min(1)[0].view(-1, 1, 1), flat.max(1)[0].view(-1, 1, 1)
    return (cam - lo) / (hi - lo + 1e-10)


def gradcam(model: nn.Module, x: torch.Tensor, *, layer=None, target="pred", mode: str = "synq",
            differentiable: bool = False) -> torch.Tensor:
    """Grad-CAM maps of a batch: float (B, H, W) at the input resolution, each in [0, 1].

    Args:
        model: a CNN classifier (its train/eval mode is used as is).
        x: (B, C, H, W) input batch.
        layer: the target module, its qualified name, or None (the mode's default: the last Conv2d).
        target: ``"pred"`` (each sample's own predicted class) or an int64 (B,) tensor of classes.
        mode: ``"synq"`` or ``"standard"`` (module docstring).
        differentiable: keep the graph through A (for a training loss on the maps).
    """
    if mode not in ("synq", "standard"):
        raise ValueError(f"mode must be 'synq' or 'standard', got {mode!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    logits, a = capture(model, x, layer, differentiable)
    return cam_from_activation(logits, a, x.shape[-2:], target=target, mode=mode, differentiable=differentiable)


def reference_gradcam(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SynQ's official procedure (its gradcam.py), the semantics ``mode="synq"`` reproduces: hooks on the last
    conv, each sample's predicted-class score back-propagated through the WHOLE network (parameter gradients
    included), then the same weights / ReLU / upsample / min-max. Slow by design; for tests and benchmarks."""
    layer = default_layer(model)
    store = {}
    h1 = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    h2 = layer.register_full_backward_hook(lambda m, gi, go: store.__setitem__("g", go[0]))
    try:
        model.zero_grad()
        logits = model(x)
        score = logits.gather(1, logits.argmax(1, keepdim=True))
        score.backward(torch.ones_like(score))
    finally:
        h1.remove()
        h2.remove()
    a, g = store["a"].detach(), store["g"].detach()
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
    student's differentiable through its activations (both on the same images, each model's own prediction)."""
    t = gradcam(teacher, x, layer=teacher_layer, mode=mode).detach()
    s = gradcam(student, x, layer=student_layer, mode=mode, differentiable=True)
    return F.mse_loss(s, t)
