"""GenQ-style filtering of an image set a user brings (e.g. from a text-to-image model).

Two scores per image, computed batch by batch: the set is cut into ceil(N / batch_size) batches of equal size
(give or take one image), and each forms the "batch" of the definitions. Equal sizes keep the BN sensitivities
comparable across batches (S shrinks like 1/B); a ragged last batch, at worst a lone image with no "batch
without it", would rank its images apart from the rest.

* energy ``E(x) = -T logsumexp(f(x) / T)`` (lower = more in-distribution for the classifier f);
* BN sensitivity ``S(x_i) = D(batch) - D(batch without x_i)``, with the BN-statistics discrepancy
  ``D = sum_l ||mu_l - rm_l||^2 + ||var_l - rv_l||^2`` (biased batch variance, BatchNorm2d inputs). A
  positive S means the image pulls the batch statistics away from the model's. With the model in eval mode
  the other images' activations do not depend on x_i, so leaving x_i out only changes the sums: with per-
  sample channel sums s_i = sum_hw x_i and q_i = sum_hw x_i^2 (K = H*W per sample),
  ``mu_-i = (S - s_i) / (M - K)`` and ``var_-i = (Q - q_i) / (M - K) - mu_-i^2``, so every S(x_i) comes from
  one forward pass instead of B extra ones.

For a vision transformer (no BatchNorm, timm attention blocks) the second score is PSAQ-ViT's
patch-similarity entropy ``H(x) = sum_l H_l(x)`` (patch_entropy.py): real-looking images give diverse patch
features, so the ``entropy_keep`` fraction with the *highest* entropy is kept.

An image is kept when it is among the ``energy_keep`` fraction with the lowest energy and among the
``bn_keep`` fraction with the lowest sensitivity (CNNs) / the ``entropy_keep`` fraction with the highest
patch entropy (ViTs), each ranked over the whole set.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .patch_entropy import PatchEntropy, _attention_modules


@dataclass
class FilterResult:
    keep: torch.Tensor                          # int64 indices of the kept images, ascending
    energy: torch.Tensor                        # float64 (N,)
    bn_sensitivity: torch.Tensor | None = None  # float64 (N,), models with BatchNorm2d
    patch_entropy: torch.Tensor | None = None   # float64 (N,), vision transformers


def _balanced_batches(images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, ...]:
    """``images`` cut into ceil(N / batch_size) batches whose sizes differ by at most one."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return images.tensor_split(max(1, -(-len(images) // batch_size)))


def _discrepancy(mean, var, rm, rv):
    return ((mean - rm) ** 2).sum(-1) + ((var - rv) ** 2).sum(-1)


@torch.no_grad()
def bn_sensitivity_and_energy(model: nn.Module, images: torch.Tensor, temperature: float = 1.0,
                              batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(energy, bn_sensitivity)``, float64 (N,) each, for images (N, C, H, W) in the model's input space and
    on its device (the scores stay there)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        raise ValueError(f"{type(model).__name__} has no BatchNorm2d layer: BN sensitivity needs BatchNorm statistics")
    model.eval()
    sums: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def hook(module, inputs):
        x = inputs[0].double()
        sums[module] = (x.sum(dim=(2, 3)), (x * x).sum(dim=(2, 3)), x.shape[2] * x.shape[3])

    handles = [m.register_forward_pre_hook(hook) for m in bns]
    energies, sens = [], []
    try:
        for xb in _balanced_batches(images, batch_size):
            logits = model(xb).double()
            energies.append(-temperature * torch.logsumexp(logits / temperature, dim=1))
            total = torch.zeros(len(xb), dtype=torch.float64, device=xb.device)
            for m in bns:
                s, q, k = sums[m]                       # (B, C) per-sample channel sums, K elements each
                rm, rv = m.running_mean.double(), m.running_var.double()
                big_m = k * len(xb)
                mean = s.sum(0) / big_m
                d_all = _discrepancy(mean, q.sum(0) / big_m - mean**2, rm, rv)
                if len(xb) == 1:
                    continue  # a one-image set has no "batch without it": its sensitivity is 0
                mean_wo = (s.sum(0) - s) / (big_m - k)
                var_wo = (q.sum(0) - q) / (big_m - k) - mean_wo**2
                total += d_all - _discrepancy(mean_wo, var_wo, rm, rv)
            sens.append(total)
    finally:
        for h in handles:
            h.remove()
    return torch.cat(energies), torch.cat(sens)


@torch.no_grad()
def patch_entropy_and_energy(model: nn.Module, images: torch.Tensor, temperature: float = 1.0,
                             batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(energy, patch_entropy)``, float64 (N,) each: the entropy summed over the attention blocks."""
    model.eval()
    energies, ents = [], []
    with PatchEntropy(model) as pe:
        for xb in _balanced_batches(images, batch_size):
            logits, h = pe(xb)
            energies.append(-temperature * torch.logsumexp(logits.double() / temperature, dim=1))
            ents.append(h.double().sum(0))
    return torch.cat(energies), torch.cat(ents)


def filter_images(model: nn.Module, images: torch.Tensor, *, energy_keep: float = 0.8, bn_keep: float = 0.5,
                  entropy_keep: float = 0.5, temperature: float = 1.0, batch_size: int = 256) -> FilterResult:
    """Indices of the images that pass both filters (see the module docstring), with the scores.

    Args:
        model: a CNN with BatchNorm2d layers (energy + BN sensitivity) or a timm vision transformer
            (energy + patch-similarity entropy).
        images: float (N, C, H, W) in the model's normalised input space.
        energy_keep, bn_keep, entropy_keep: fractions in (0, 1] kept by each filter (GenQ: an energy ratio,
            BN 50 %).
    """
    for name, f in (("energy_keep", energy_keep), ("bn_keep", bn_keep), ("entropy_keep", entropy_keep)):
        if not 0.0 < f <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {f}")
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or Inf")
    n = len(images)

    def ranked(score, frac, highest=False):
        k = max(1, int(round(frac * n)))
        return set(torch.argsort(-score if highest else score, stable=True)[:k].tolist())

    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    if not has_bn and _attention_modules(model):
        energy, ent = patch_entropy_and_energy(model, images, temperature, batch_size)
        keep = sorted(ranked(energy, energy_keep) & ranked(ent, entropy_keep, highest=True))
        return FilterResult(torch.tensor(keep, dtype=torch.int64), energy, patch_entropy=ent)
    if not has_bn:
        raise ValueError(f"{type(model).__name__} has no BatchNorm2d layer and no timm attention block: filtering "
                         "needs BatchNorm statistics (CNNs) or attention outputs (vision transformers)")
    energy, sens = bn_sensitivity_and_energy(model, images, temperature, batch_size)
    keep = sorted(ranked(energy, energy_keep) & ranked(sens, bn_keep))
    return FilterResult(torch.tensor(keep, dtype=torch.int64), energy, bn_sensitivity=sens)
