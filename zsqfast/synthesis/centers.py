"""Calibration centers and the layered BNS loss (SynQ's ``--lbns`` variant, TexQ-like).

1. Centers: one image per class (labels 0..K-1, in chunks of ``batch_size``), optimised from N(0, 1) noise
   for ``center_iterations`` (1500) Adam steps (lr ``center_lr`` 0.5, ReduceLROnPlateau(patience 50,
   min_lr ``center_min_lr`` 0.05)), images clamped to [-``center_clamp``, ``center_clamp``] (3) after every
   step, on ``center_ce * CE + sum_l w_l [MSE(mu_l, rm_l) + MSE(var_l, rv_l)] / L`` with the *layered*
   weights w_l = ``center_shallow_weight`` (0.2) for the shallow layers and ``center_deep_weight`` (1.1) for
   the deep ones. Layer l (0-based, BatchNorm2d order) is deep when ``l >= (L + 2) // 2 - 2`` (SynQ's split).
2. Center statistics: per layer, the mean and (total) variance of the BN inputs over all centers, pooled
   exactly over the chunks: mu_c = sum_j n_j mu_j / N, var_c = sum_j n_j (var_j + mu_j^2) / N - mu_c^2.
3. Generation: the usual loss with the BNS term scaled by ``lbns_bns_scale`` (0.4) plus
   ``lbns_center_weight`` (0.02) * ``sum_{l deep} [MSE(mu_l, mu_c,l) + MSE(var_l, var_c,l)] / (L * B)``.

Differences from SynQ's code, on purpose: its last center chunk is padded to ``batch_size`` images with label
0 (so with CIFAR-10 and batch 256, 247 of 256 "centers" are class 0); here every class has exactly one center.
Its pooled variance forgets the sample-count weight of the first chunk (var_1 instead of n_1 var_1); here the
pooling is exact. All hyperparameters are SynQ's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .bns_loss import BNSLoss


def deep_mask(num_layers: int) -> list[bool]:
    """SynQ's split of the BatchNorm layers: layer l is deep when l >= (L + 2) // 2 - 2."""
    first = (num_layers + 2) // 2 - 2
    return [i >= first for i in range(num_layers)]


def _optimizer(x, lr, min_lr, patience):
    opt = torch.optim.Adam([x], lr=lr)
    return opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=patience, min_lr=min_lr)


def make_centers(bns: BNSLoss, shape, num_classes: int, hp: dict, seed: int, batch_size: int,
                 forward=None, bar=None) -> torch.Tensor:
    """The calibration centers, float32 (num_classes, C, H, W) on the model's device, image k of class k
    (deterministic in seed: the noise is drawn on the CPU, as for the batches, then moved there)."""
    weights = [hp["center_deep_weight"] if d else hp["center_shallow_weight"] for d in deep_mask(len(bns.layers))]
    forward = forward or bns
    device = bns.layers[0].running_mean.device  # the model's
    out = []
    for chunk, start in enumerate(range(0, num_classes, batch_size)):
        y = torch.arange(start, min(start + batch_size, num_classes), device=device)
        g = torch.Generator().manual_seed(seed * 1_000_003 + 500_009 + chunk)  # a stream no batch uses
        dtype = bns.layers[0].running_mean.dtype  # the model's (noise drawn in fp32 on the CPU)
        x = torch.randn((len(y),) + tuple(shape), generator=g).to(device=device, dtype=dtype).requires_grad_(True)
        opt, sched = _optimizer(x, hp["center_lr"], hp["center_min_lr"], hp["patience"])
        for _ in range(hp["center_iterations"]):
            opt.zero_grad(set_to_none=True)
            logits, _ = forward(x)
            layered = sum(w * t for w, t in zip(weights, bns.layer_losses())) / len(weights)
            loss = hp["center_ce"] * F.cross_entropy(logits.float(), y) + layered
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(-hp["center_clamp"], hp["center_clamp"])
            sched.step(float(loss.detach()))
            if bar is not None:
                bar.update(1)
        out.append(x.detach())
    return torch.cat(out)


@torch.no_grad()
def center_statistics(bns: BNSLoss, centers: torch.Tensor, batch_size: int, forward=None):
    """Per layer ``(mean, var)`` of the BN inputs over all centers (exact pooling over chunks), fp32 (C,)."""
    forward = forward or bns
    sums, total = None, 0
    for xb in centers.split(batch_size):
        forward(xb)
        n = len(xb)
        stats = [(m.double() * n, (v.double() + m.double() ** 2) * n) for m, v in bns.batch_statistics()]
        sums = stats if sums is None else [(a + c, b + d) for (a, b), (c, d) in zip(sums, stats)]
        total += n
    out = []
    for s1, s2 in sums:
        mean = s1 / total
        out.append((mean.float(), (s2 / total - mean ** 2).float()))
    return out


def center_loss(bns: BNSLoss, targets, batch: int) -> torch.Tensor:
    """``sum_{l deep} [MSE(mu_l, mu_c,l) + MSE(var_l, var_c,l)] / (L * B)`` for the last forward pass."""
    stats = bns.batch_statistics()
    mask = deep_mask(len(stats))
    terms = [F.mse_loss(m, tm) + F.mse_loss(v, tv) for (m, v), (tm, tv), deep in zip(stats, targets, mask) if deep]
    return sum(terms) / (len(stats) * batch)
