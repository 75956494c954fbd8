"""synthesize(): noise-optimisation synthesis of a calibration / fine-tuning set from a pretrained model.

Method ``"hast"`` (HAST / SynQ official generation; ../shared/reference/zsq-semantics.md, "Synthesis"):
images start as N(0, 1) noise in the model's normalised input space with uniformly random labels; Adam
(lr 0.5) with ReduceLROnPlateau(patience 50, min_lr 1e-4) stepped every iteration on the loss; 1,000
iterations per batch of 256; loss = BNS ("hast" form) + hard-sample inception loss
``hard_beta * mean((1 - p_y)^hard_gamma * CE_i)`` with (beta, gamma) = (10, 2) for CIFAR-size inputs (<= 64
px) and (0.1, 0.5) for ImageNet-size ones, as the official settings. No augmentation (CIFAR), no priors.

Method ``"deepinversion"``: BNS in DeepInversion's form (unsquared norms, first layer x10) + CE + the image
priors ``tv_l2 * TV_L2 + l2 * ||x||^2`` (1e-4, 1e-5), Adam lr 0.2 betas (0.5, 0.9), random jitter and flip.

Every batch b is seeded from (seed, b) alone, so batches are independent: a run interrupted at any point and
resumed (same ``out``) produces exactly the images of an uninterrupted run; only the batch in progress is
recomputed. The model's parameters get no gradient (``requires_grad`` is switched off during synthesis and
restored), so a step costs one forward and one input-gradient backward.
"""
from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bns_loss import BNSLoss
from .storage import ShardStore

METHODS = {
    "hast": dict(bns_form="hast", lr=0.5, betas=(0.9, 0.999), hard_beta=None, hard_gamma=None, ce=0.0,
                 tv_l2=0.0, l2=0.0, jitter=0, flip=False),
    "deepinversion": dict(bns_form="deepinversion", lr=0.2, betas=(0.5, 0.9), hard_beta=0.0, hard_gamma=0.0,
                          ce=1.0, tv_l2=1e-4, l2=1e-5, jitter=2, flip=True),
}


@dataclass
class SyntheticDataset(torch.utils.data.Dataset):
    """Synthetic images (float32 (N, C, H, W), the model's normalised input space), labels (int64 (N,)) and
    the run's metadata (method, hyperparameters, seed, model fingerprint, per-batch final losses)."""

    images: torch.Tensor
    labels: torch.Tensor
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    @classmethod
    def load(cls, out: str | Path) -> "SyntheticDataset":
        """The (complete) set stored in ``out`` by :func:`synthesize`."""
        store = ShardStore(out)
        index = store.load_index()
        if index is None:
            raise FileNotFoundError(f"{out} holds no synthetic set (no index.json)")
        n_batches = index["meta"]["num_batches"]
        missing = sorted(set(range(n_batches)) - store.done(index))
        if missing:
            raise ValueError(f"{out} is incomplete: batches {missing[:8]} are missing; run synthesize(..., out=...) "
                             "again to resume")
        parts = [store.load_batch(index, b) for b in range(n_batches)]
        meta = dict(index["meta"], final_losses=[index["batches"][str(b)]["final_loss"] for b in range(n_batches)])
        n = meta["num_images"]
        return cls(torch.cat([p[0] for p in parts])[:n], torch.cat([p[1] for p in parts])[:n], meta)


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's parameters and buffers (names, shapes and values)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _input_shape(model: nn.Module, input_shape) -> tuple[int, int, int]:
    if input_shape is not None:
        return tuple(int(s) for s in input_shape)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:
        return tuple(cfg["input_size"])
    return (3, 32, 32)


def _tv_l2(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() + (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean()


def _progress(total: int, enabled: bool, desc: str = "synthesis"):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="it", file=sys.stderr, dynamic_ncols=True)


def _synthesize_batch(bns: BNSLoss, shape, num_classes: int, b: int, batch: int, seed: int, iterations: int,
                      hp: dict, bar) -> tuple[torch.Tensor, torch.Tensor, float]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + b)
    x = torch.randn((batch,) + shape, generator=g).requires_grad_(True)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    opt = torch.optim.Adam([x], lr=hp["lr"], betas=hp["betas"])
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=50, min_lr=1e-4)
    loss_value = float("nan")
    for it in range(iterations):
        inp = x
        if hp["jitter"]:
            dx, dy = torch.randint(-hp["jitter"], hp["jitter"] + 1, (2,), generator=g).tolist()
            inp = torch.roll(inp, shifts=(dx, dy), dims=(2, 3))
        if hp["flip"] and bool(torch.rand((), generator=g) < 0.5):
            inp = torch.flip(inp, dims=(3,))
        opt.zero_grad(set_to_none=True)
        logits, bns_loss = bns(inp)
        ce = F.cross_entropy(logits, y, reduction="none")
        loss = bns_loss
        if hp["hard_beta"]:  # HAST hard-sample weighting: (1 - p_y)^gamma
            p_y = torch.softmax(logits, 1).gather(1, y[:, None]).squeeze(1).detach()
            loss = loss + hp["hard_beta"] * ((1 - p_y).pow(hp["hard_gamma"]) * ce).mean()
        if hp["ce"]:
            loss = loss + hp["ce"] * ce.mean()
        if hp["tv_l2"]:
            loss = loss + hp["tv_l2"] * _tv_l2(x)
        if hp["l2"]:
            loss = loss + hp["l2"] * x.pow(2).mean()
        loss.backward()
        opt.step()
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"synthesis loss became {loss_value} at batch {b}, iteration {it}; lower lr")
        sched.step(loss_value)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(batch=b, loss=f"{loss_value:.4g}", refresh=False)
    return x.detach(), y, loss_value


def synthesize(model: nn.Module, num_images: int, *, method: str = "hast", batch_size: int = 256,
               iterations: int = 1000, seed: int = 0, out: str | Path | None = None, input_shape=None,
               num_classes: int | None = None, progress: bool = True, max_batches: int | None = None,
               **overrides) -> SyntheticDataset:
    """Synthesize ``num_images`` images from ``model`` (its BatchNorm statistics and its classifier).

    Args:
        model: a classifier with BatchNorm2d layers (run in eval mode; left unchanged).
        method: ``"hast"`` or ``"deepinversion"`` (module docstring); ``overrides`` replace any of the
            method's hyperparameters (lr, betas, bns_form, hard_beta, hard_gamma, ce, tv_l2, l2, jitter, flip).
        batch_size, iterations: per batch; the last batch may be smaller.
        seed: batch b is fully determined by (seed, b).
        out: directory for shards + index; an existing run there is resumed (its settings must match).
        input_shape: (C, H, W); default from a timm model's config, else (3, 32, 32).
        num_classes: default: the size of the model's output.
        max_batches: stop after this many new batches (the rest can be resumed later).
    Returns:
        SyntheticDataset of the batches done (all of them unless ``max_batches`` stopped early).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    unknown = set(overrides) - set(METHODS[method])
    if unknown:
        raise ValueError(f"unknown synthesis options {sorted(unknown)}")
    if num_images < 1 or batch_size < 1 or iterations < 1:
        raise ValueError("num_images, batch_size and iterations must be positive")
    hp = dict(METHODS[method], **overrides)
    shape = _input_shape(model, input_shape)
    small = max(shape[1:]) <= 64  # CIFAR-size vs ImageNet-size official hard-sample settings
    if hp["hard_beta"] is None:
        hp["hard_beta"] = 10.0 if small else 0.1
    if hp["hard_gamma"] is None:
        hp["hard_gamma"] = 2.0 if small else 0.5
    was_training = model.training
    model.eval()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with BNSLoss(model, hp["bns_form"]) as bns:
            if num_classes is None:
                with torch.no_grad():
                    num_classes = int(model(torch.zeros((1,) + shape)).shape[1])
            n_batches = (num_images + batch_size - 1) // batch_size
            meta = dict(method=method, num_images=num_images, batch_size=batch_size, iterations=iterations, seed=seed,
                        num_batches=n_batches, input_shape=list(shape), num_classes=num_classes,
                        model=model_fingerprint(model), hyperparameters={k: list(v) if isinstance(v, tuple) else v
                                                                        for k, v in hp.items()})
            store = ShardStore(out) if out is not None else None
            index = store.open(meta) if store else None
            done = store.done(index) if store else set()
            todo = [b for b in range(n_batches) if b not in done][:max_batches]
            bar = _progress(len(todo) * iterations, progress)
            results = {}
            for b in todo:
                batch = min(batch_size, num_images - b * batch_size)
                x, y, final = _synthesize_batch(bns, shape, num_classes, b, batch, seed, iterations, hp, bar)
                if store:
                    store.save_batch(index, b, x, y, final)
                results[b] = (x, y, final)
            if bar is not None:
                bar.close()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    if store:
        for b in sorted(store.done(index) - set(results)):
            x, y = store.load_batch(index, b)
            results[b] = (x, y, index["batches"][str(b)]["final_loss"])
    order = sorted(results)
    meta = dict(meta, final_losses=[results[b][2] for b in order], batches=order)
    return SyntheticDataset(torch.cat([results[b][0] for b in order]), torch.cat([results[b][1] for b in order]), meta)
