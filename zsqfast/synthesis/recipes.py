"""The synthesis recipes: hyperparameter tables, the per-iteration augmentation and the image priors.

Every hyperparameter of :func:`zsqfast.synthesize` lives in :data:`METHODS` (one dict per method) and can be
overridden by keyword; ``None`` entries are resolved from the input size by :func:`resolve`. Meanings:

=================  ================================================================================
bns_form           BNSLoss form ("hast", "deepinversion"), None = no BN-statistics loss (psaq-vit)
lr, betas          Adam's learning rate and betas
scheduler          "plateau": ReduceLROnPlateau(patience ``patience``, min_lr ``min_lr``) stepped on the
                   loss every iteration (HAST / SynQ); "cosine": DeepInversion's lr_cosine_policy (linear
                   warm-up over ``warmup`` iterations, then cosine decay to 0), restarted in every stage;
                   None: constant
stages             the iterations split into this many near-equal stages (PSAQ-ViT: 2), each with its own
                   cosine schedule and jitter limit
hard_beta/gamma    HAST hard-sample inception loss ``beta * mean((1 - p_y)^gamma * CE_i)``; None =
                   (10, 2) for inputs <= 64 px (CIFAR), (0.1, 0.5) for larger ones (ImageNet), as HAST
ce                 plain cross-entropy weight (DeepInversion, PSAQ-ViT)
tv_l2, l2          DeepInversion priors: ``tv_l2 * TV_L2(x) + l2 * mean_i ||x_i||_2`` with DeepInversion's
                   TV_L2 = sum of the L2 norms of the 4 neighbour differences (axis and diagonal)
tv_band, tv_weight PSAQ-ViT prior ``tv_weight * |TV_L2(x) - t|``, t ~ U(tv_band) drawn once per batch
                   (0.05, U(2500, 3000); the official band is for batch 32 at 224 px: TV_L2 grows with the
                   batch and the image size)
entropy            PSAQ-ViT: weight of ``-sum_l mean_b H_l`` (patch-similarity entropy), 0 = off
kde_bandwidth/...  PSAQ-ViT's KDE bandwidth (0.01), grid points (10) and ``kde_grid``: the grid over the whole
                   batch's similarities ("batch", PSAQ-ViT) or each image's ("image")
aug_p, crop_scale  with probability ``aug_p`` per iteration, per-image random resized crop (torchvision's
                   sampling: area fraction U(crop_scale), aspect ratio in [3/4, 4/3]; bilinear) + flip
                   p 0.5; None = 0.5 / (0.4, 1) for ImageNet-size inputs and off for CIFAR, as HAST/SynQ
jitter, flip       random roll by up to ``jitter`` px (an int, or one per stage; None = DeepInversion's 2 px
                   for CIFAR-size inputs and 30 for larger ones, PSAQ-ViT's 15 then 30 px scaled by size / 224),
                   one offset per axis or, ``jitter_shared``, one for both (PSAQ-ViT); a whole-batch flip p 0.5
clip, mean, std    after every step, clamp the images to the normalised pixel range [(0 - mean) / std,
                   (1 - mean) / std] per channel (DeepInversion, PSAQ-ViT); mean / std None = the model's input
                   normalisation (zsqfast.models.loading.input_config)
lbns_*             calibration centers + layered BNS (``calibration_centers=True``): see centers.py
=================  ================================================================================
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .patch_entropy import check_grid

_COMMON = dict(bns_form="hast", lr=0.5, betas=(0.9, 0.999), scheduler="plateau", patience=50, min_lr=1e-4,
               warmup=100, stages=1,
               hard_beta=None, hard_gamma=None, ce=0.0, tv_l2=0.0, l2=0.0, tv_band=(2500.0, 3000.0),
               tv_weight=0.0, entropy=0.0, kde_bandwidth=0.01, kde_points=10, kde_grid="image", aug_p=None,
               crop_scale=(0.4, 1.0), jitter=0, jitter_shared=False, flip=False, clip=False, mean=None, std=None,
               # calibration centers + layered BNS (SynQ --lbns); used only with calibration_centers=True
               center_iterations=1500, center_lr=0.5, center_min_lr=0.05, center_ce=5.0, center_clamp=3.0,
               center_shallow_weight=0.2, center_deep_weight=1.1, lbns_bns_scale=0.4, lbns_center_weight=0.02)

METHODS = {
    "hast": dict(_COMMON),
    "deepinversion": dict(_COMMON, bns_form="deepinversion", lr=0.2, betas=(0.5, 0.9), scheduler="cosine",
                          hard_beta=0.0, hard_gamma=0.0, ce=1.0, tv_l2=1e-4, l2=1e-5, aug_p=0.0, jitter=None,
                          flip=True, clip=True),
    # zkkli/PSAQ-ViT generate_data.py: two stages of 500 iterations, each with its own warm-up + cosine and
    # its own jitter limit (15, then 30 px at 224), one offset for both axes, a flip p 0.5, images clipped to
    # the valid pixel range after every step, the TV target drawn once, the KDE grid over the batch
    "psaq-vit": dict(_COMMON, bns_form=None, lr=None, betas=(0.5, 0.9), scheduler="cosine", stages=2,
                     hard_beta=0.0, hard_gamma=0.0, ce=1.0, tv_weight=0.05, entropy=1.0, kde_grid="batch", aug_p=0.0,
                     jitter=None, jitter_shared=True, flip=True, clip=True),
}
#: hyperparameters added after runs were first stored, with the values that reproduce those runs: a stored run
#: lacking one resumes when it is requested at this value (ShardStore.open)
LEGACY = dict(stages=1, kde_grid="image", jitter_shared=False, clip=False, mean=None, std=None)
DEFAULT_BATCH = {"hast": 256, "deepinversion": 256, "psaq-vit": 32}


def resolve(method: str, overrides: dict, shape, model) -> dict:
    """The method's hyperparameters with ``overrides`` applied and the size-dependent ``None`` defaults set."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    unknown = set(overrides) - set(METHODS[method])
    if unknown:
        raise ValueError(f"unknown synthesis options {sorted(unknown)}; known: {sorted(METHODS[method])}")
    hp = dict(METHODS[method], **overrides)  # None for hard_beta / hard_gamma / aug_p / lr: the automatic value
    if hp["scheduler"] not in ("plateau", "cosine", None):
        raise ValueError(f"scheduler must be 'plateau', 'cosine' or None, got {hp['scheduler']!r}")
    small = max(shape[1:]) <= 64  # CIFAR-size vs ImageNet-size official settings
    if hp["hard_beta"] is None:
        hp["hard_beta"] = 10.0 if small else 0.1
    if hp["hard_gamma"] is None:
        hp["hard_gamma"] = 2.0 if small else 0.5
    if hp["aug_p"] is None:
        hp["aug_p"] = 0.0 if small else 0.5
    if hp["lr"] is None:  # PSAQ-ViT: 0.25 for Swin, 0.2 otherwise
        hp["lr"] = 0.25 if "swin" in type(model).__name__.lower() else 0.2
    if not (isinstance(hp["stages"], int) and hp["stages"] >= 1):
        raise ValueError(f"stages must be a positive int, got {hp['stages']!r}")
    if hp["jitter"] is None:  # the official limits at 224 px (DeepInversion 30; PSAQ-ViT 15, 30), scaled
        if hp["stages"] > 1:  # PSAQ-ViT: the limit doubles in its second stage
            base = 15 * max(shape[1:]) / 224
            hp["jitter"] = tuple(max(1, round(base * (k + 1))) for k in range(hp["stages"]))
        else:
            hp["jitter"] = 2 if small else 30  # DeepInversion's CIFAR / ImageNet scripts
    jitter_of(hp, 0)  # checked here, before any work
    check_grid(hp["kde_grid"], "kde_grid")
    if hp["clip"] and (hp["mean"] is None or hp["std"] is None):  # the model's input normalisation
        from ..models.loading import input_config

        cfg = input_config(model)
        hp["mean"] = tuple(float(v) for v in (hp["mean"] or cfg["mean"]))
        hp["std"] = tuple(float(v) for v in (hp["std"] or cfg["std"]))
    return hp


def jitter_of(hp: dict, stage: int) -> int:
    """The jitter limit (px) of ``stage``: ``hp["jitter"]``, an int for every stage or a tuple of one per stage."""
    jit = hp["jitter"] if isinstance(hp["jitter"], (tuple, list)) else (hp["jitter"],) * hp["stages"]
    if len(jit) != hp["stages"] or any(isinstance(j, bool) or not isinstance(j, int) or j < 0 for j in jit):
        raise ValueError(f"jitter must be an int >= 0 or one per stage ({hp['stages']}), got {hp['jitter']!r}")
    return jit[stage]


def stage_of(it: int, iterations: int, stages: int) -> tuple[int, int, int]:
    """``(stage, iteration inside it, its length)`` of iteration ``it`` of ``iterations`` split into ``stages``
    near-equal stages (the first ones one longer when they do not divide)."""
    base, extra = divmod(iterations, stages)
    lengths = [base + (k < extra) for k in range(stages)]
    start = 0
    for k, n in enumerate(lengths):
        if it < start + n or k == stages - 1:
            return k, it - start, max(n, 1)
        start += n
    raise AssertionError("unreachable")


def clip_bounds(hp: dict, channels: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(lo, hi)`` (1, C, 1, 1): the normalised values of pixels 0 and 1 per channel, ``(0 - mean) / std`` and
    ``(1 - mean) / std`` (DeepInversion's and PSAQ-ViT's ``clip``), or None when clipping is off."""
    if not hp["clip"]:
        return None
    mean, std = list(hp["mean"]), list(hp["std"])
    if len(mean) == 1:
        mean, std = mean * channels, std * channels
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"clip needs one mean / std per input channel ({channels}), got {len(mean)} / {len(std)}")
    m = torch.tensor(mean, dtype=torch.float64).reshape(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).reshape(1, -1, 1, 1)
    return (-m / s).to(device, dtype), ((1 - m) / s).to(device, dtype)


def crop_sides(n: int, height: int, width: int, g: torch.Generator, scale=(0.4, 1.0), attempts: int = 10):
    """``(w, h)``, float32 (n,) each: RandomResizedCrop's crop sides as fractions of the image's W and H: area
    ``a * H * W`` pixels with a ~ U(scale), pixel aspect ``w_px / h_px = r`` with log r ~ U(log 3/4, log 4/3);
    the first of ``attempts`` draws that fits in the image, else the whole image."""
    area = torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=g)
    ratio = torch.exp(torch.empty(n, attempts).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g))
    hw = height / width  # w = w_px / W = sqrt(a r H / W), h = h_px / H = sqrt(a W / (r H))
    w, h = torch.sqrt(area * ratio * hw), torch.sqrt(area / ratio / hw)
    fits = (w <= 1) & (h <= 1)
    first = fits.float().argmax(1, keepdim=True)
    found = fits.any(1)
    return (torch.where(found, w.gather(1, first).squeeze(1), 1.0),
            torch.where(found, h.gather(1, first).squeeze(1), 1.0))


def random_resized_crop_flip(x: torch.Tensor, g: torch.Generator, scale=(0.4, 1.0), attempts: int = 10) -> torch.Tensor:
    """Per image, torchvision's RandomResizedCrop sampling (area fraction U(scale), aspect ratio log-uniform in
    [3/4, 4/3]; the first of ``attempts`` draws that fits, else the whole image), the crop resized back to
    H x W (bilinear, one batched grid_sample over the batch), then a horizontal flip with p 0.5."""
    n = x.shape[0]
    w, h = crop_sides(n, x.shape[-2], x.shape[-1], g, scale, attempts)
    cx = (torch.rand(n, generator=g) * 2 - 1) * (1 - w)            # centre in [-1, 1] units, inside the image
    cy = (torch.rand(n, generator=g) * 2 - 1) * (1 - h)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)  # -1 = flipped
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def tv_l2_deepinversion(x: torch.Tensor) -> torch.Tensor:
    """DeepInversion's TV_L2: sum of the L2 norms (over the whole batch) of the 4 neighbour differences."""
    d1 = x[:, :, :, :-1] - x[:, :, :, 1:]
    d2 = x[:, :, :-1, :] - x[:, :, 1:, :]
    d3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    d4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    return sum(torch.linalg.vector_norm(d) for d in (d1, d2, d3, d4))


def augment(x: torch.Tensor, hp: dict, g: torch.Generator, stage: int = 0) -> torch.Tensor:
    """The per-iteration input transform of the recipe in ``stage`` (identity when every augmentation is off)."""
    if hp["aug_p"] and bool(torch.rand((), generator=g) < hp["aug_p"]):
        x = random_resized_crop_flip(x, g, hp["crop_scale"])
    lim = jitter_of(hp, stage)
    if lim:  # a roll by up to lim px: one offset for both axes (PSAQ-ViT) or one each (DeepInversion)
        dx, dy = torch.randint(-lim, lim + 1, (1 if hp["jitter_shared"] else 2,), generator=g).tolist() * \
            (2 if hp["jitter_shared"] else 1)
        x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
    if hp["flip"] and bool(torch.rand((), generator=g) < 0.5):
        x = torch.flip(x, dims=(3,))
    return x


def class_loss(logits: torch.Tensor, y: torch.Tensor, hp: dict) -> torch.Tensor:
    """HAST hard-sample inception loss + plain CE, in fp32 (0-dim)."""
    logits = logits.float()
    ce = F.cross_entropy(logits, y, reduction="none")
    loss = logits.new_zeros(())
    if hp["hard_beta"]:  # (1 - p_y)^gamma weights; p_y is not detached (HAST / SynQ code)
        p_y = torch.softmax(logits, 1).gather(1, y[:, None]).squeeze(1)
        loss = loss + hp["hard_beta"] * ((1 - p_y).pow(hp["hard_gamma"]) * ce).mean()
    if hp["ce"]:
        loss = loss + hp["ce"] * ce.mean()
    return loss


def tv_target(hp: dict, g: torch.Generator) -> float:
    """PSAQ-ViT's TV target U(tv_band), drawn once per batch (0.0 when its prior is off: nothing drawn)."""
    if not hp["tv_weight"]:
        return 0.0
    lo, hi = hp["tv_band"]
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def prior_loss(x: torch.Tensor, hp: dict, target: float = 0.0) -> torch.Tensor:
    """DeepInversion and PSAQ-ViT image priors (0-dim) on the images x the model sees (after the jitter and
    flip, as both official codes), ``target`` the batch's TV target (:func:`tv_target`)."""
    loss = x.new_zeros(())
    if hp["tv_l2"] or hp["tv_weight"]:
        tv = tv_l2_deepinversion(x)
        if hp["tv_l2"]:
            loss = loss + hp["tv_l2"] * tv
        if hp["tv_weight"]:
            loss = loss + hp["tv_weight"] * (tv - target).abs()
    if hp["l2"]:
        loss = loss + hp["l2"] * torch.linalg.vector_norm(x.flatten(1), dim=1).mean()
    return loss
