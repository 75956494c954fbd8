"""BNSLoss: the batch-norm-statistics loss of data-free synthesis, over every BatchNorm2d input of a model
(every BatchNorm2d its forward runs: one it never calls has no batch statistics and is left out).

For BatchNorm layer l with input statistics (mu_l, var_l: per-channel batch mean and biased variance) and
running statistics (rm_l, rv_l), the forms are (L = number of BatchNorm2d layers, w_l = layer weights):

* ``"hast"`` (HAST / SynQ / IntraQ lineage): ``sum_l w_l [MSE(mu_l, rm_l) + MSE(var_l, rv_l)] / L``
* ``"deepinversion"`` (DeepInversion): ``sum_l w_l (||mu_l - rm_l||_2 + ||var_l - rv_l||_2)`` with unsquared
  norms, no division by L, and w_1 = ``first_bn_multiplier`` (10) unless weights are given
* ``"genie"`` (Genie): ``sum_l w_l [MSE(mu_l, rm_l) + MSE(std_l, sqrt(rv_l + 1e-6))]``, std_l the
  *unbiased* batch standard deviation (torch.std_mean's default, as Genie's code)

Fused path (default): a forward pre-hook on every BatchNorm2d takes the input statistics with the
``zsqfast::bn_stats`` op in one read pass (C++ / Triton; fp64 accumulation) and passes the input on through a
tap whose backward adds the statistics' gradient (a per-channel affine map of x) to BatchNorm's own input
gradient in one pass. No host synchronisation, no permute copy. ``fused=False`` is the hook reference with
the official codes' arithmetic (``x.mean`` and a permuted ``var``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.bn_stats import batch_stats, check_batch

FORMS = ("hast", "deepinversion", "genie")
_NOT_RUN = ("a BatchNorm2d layer that the first forward pass ran did not run in the last one (or no forward ran "
            "yet: call bns(x) first); the BN-statistics loss needs the same layers on every forward")


class BNSLoss:
    """``logits, loss = bns(x)`` runs ``model`` on x (N, 3, H, W) and returns its BN-statistics loss.

    Args:
        model: a module with BatchNorm2d layers (used as is; put it in eval mode for synthesis). SyncBatchNorm
            layers are a ValueError (not supported: synthesis and filtering recognise BatchNorm2d only).
            ``x`` must be a non-empty batch (ValueError otherwise: an empty batch has no statistics).
        form: ``"hast"``, ``"deepinversion"`` or ``"genie"`` (see the module docstring).
        layer_weights: one weight per BatchNorm2d layer in ``named_modules`` order (the layered /
            calibration-center variant), or None.
        first_bn_multiplier: DeepInversion's weight of the first layer when ``layer_weights`` is None.
        fused: the fused op path (default) or the hook reference.
    Hooks stay registered until :meth:`remove` (or the end of a ``with BNSLoss(...) as bns:`` block).
    """

    def __init__(self, model: nn.Module, form: str = "hast", layer_weights: Sequence[float] | None = None, *,
                 first_bn_multiplier: float = 10.0, fused: bool = True):
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        self.model, self.form, self.fused = model, form, fused
        if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
            raise ValueError(f"{type(model).__name__} has SyncBatchNorm layers: SyncBatchNorm is not supported by "
                             "the BN-statistics loss (use the model with its BatchNorm2d layers, before "
                             "nn.SyncBatchNorm.convert_sync_batchnorm)")
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no BatchNorm2d layer: a BN-statistics loss needs the running "
                             "statistics of BatchNorm layers (use a synthesis method without BNS for this model)")
        if any(not m.track_running_stats or m.running_mean is None for m in self.layers):
            raise ValueError("every BatchNorm2d must track running statistics for a BN-statistics loss")
        n = len(self.layers)
        if layer_weights is None:
            weights = [1.0] * n
            if form == "deepinversion":
                weights[0] = first_bn_multiplier
        else:
            weights = [float(w) for w in layer_weights]
            if len(weights) != n:
                raise ValueError(f"layer_weights has {len(weights)} entries but the model has {n} BatchNorm2d layers")
        self.weights = weights
        self._settled = False  # self.layers / self.weights narrowed to the layers the first forward ran
        self._stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._handles = [m.register_forward_pre_hook(self._hook) for m in self.layers]

    def _hook(self, module: nn.Module, inputs):
        x = inputs[0]
        check_batch(x)  # an empty batch has no statistics: ValueError on either path
        m = x.numel() // x.size(1)
        if self.fused:
            x_tap, mean, var = batch_stats(x, tap=True)
            self._stats[module] = (mean, var, m)
            return (x_tap,) + tuple(inputs[1:])
        # the official hooks: mean over (0, 2, 3) and a biased variance of a permuted copy
        c = x.size(1)
        mean = x.mean(dim=[0, 2, 3])
        var = x.permute(1, 0, 2, 3).contiguous().view(c, -1).var(1, unbiased=False)
        self._stats[module] = (mean, var, m)
        return None

    def _settle(self) -> None:
        """After the first forward pass: keep only the BatchNorm2d layers it ran, with their weights. A layer the
        model's forward never calls (torchvision inception_v3's AuxLogits in eval mode, an unused head) has no
        batch statistics to match; every later forward must run the same layers."""
        if self._settled or not self._stats:
            return
        keep = [i for i, m in enumerate(self.layers) if m in self._stats]
        self.layers = [self.layers[i] for i in keep]
        self.weights = [self.weights[i] for i in keep]
        self._settled = True

    def batch_statistics(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer ``(mean, biased var)`` (fp32 (C,), differentiable) of the last forward pass, layer order."""
        self._settle()
        if any(layer not in self._stats for layer in self.layers):
            raise RuntimeError(_NOT_RUN)
        return [self._stats[layer][:2] for layer in self.layers]

    def layer_losses(self) -> list[torch.Tensor]:
        """Unweighted per-layer terms of the last forward pass (in layer order)."""
        self._settle()
        out = []
        for layer in self.layers:
            if layer not in self._stats:
                raise RuntimeError(_NOT_RUN)
            mean, var, m = self._stats[layer]
            rm, rv = layer.running_mean.to(mean.dtype), layer.running_var.to(mean.dtype)
            if self.form == "hast":
                out.append(F.mse_loss(mean, rm) + F.mse_loss(var, rv))
            elif self.form == "deepinversion":
                out.append(torch.linalg.vector_norm(rm - mean) + torch.linalg.vector_norm(rv - var))
            else:
                std = torch.sqrt(var * (m / max(m - 1, 1)))
                out.append(F.mse_loss(mean, rm) + F.mse_loss(std, torch.sqrt(rv + 1e-6)))
        return out

    def loss(self) -> torch.Tensor:
        """The weighted loss of the last forward pass (a 0-dim tensor, differentiable w.r.t. the input)."""
        terms = self.layer_losses()
        total = sum(w * t for w, t in zip(self.weights, terms))
        return total / len(terms) if self.form == "hast" else total

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._stats = {}
        logits = self.model(x)
        return logits, self.loss()

    def remove(self) -> None:
        """Remove the hooks from the model (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._stats = {}

    def __enter__(self) -> "BNSLoss":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
