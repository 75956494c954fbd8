"""finetune(): quantization-aware fine-tuning of a fake-quantized student on (synthetic) images.

``method="kd"`` (the plain distillation baseline): ``L = KD(s, t) + lambda_ce * CE(s, y)`` on augmented
images. ``method="synq"``: images are augmented (per-sample random resized crop, scale 0.5-1, and flip, in the
normalised space), low-pass filtered (:func:`zsqfast.gaussian_lowpass`, d0), then
``L = KD + lambda_ce * selective_CE + lambda_cam * CAM`` with the selective CE of
:func:`zsqfast.finetune.losses.selective_ce` and the CAM-alignment loss on the filtered images.

Optional, both off by default (``lambda_fa=0``, ``promote_eps=0``), both on in the official SynQ/HAST code:
HAST feature alignment ``FA = lambda_fa * sum_l mean((c_s - c_t)^2)``, c = F.normalize(mean_hw(x^2)) per
sample, on the outputs of the residual units (``fa_layers``; official: the units' bodies, lambda_fa 1000;
hooks registered once per run), added to L; and one-step difficulty promotion
``x' = x + promote_eps * sign(dL/dx)`` (official 0.01) with ``L' = KD' + lambda_ce * CE'`` on x', so that
``total = L + L' + lambda_cam * CAM`` (:func:`step_losses`).

Official settings (SynQ code defaults): T = alpha = 20, tau 0.5, d0 80, lambda_ce 5, lambda_cam 200;
SGD momentum 0.9 nesterov, weight decay 1e-4; 100 epochs of 5,120 images. The learning rate here defaults
to 1e-5 with cosine decay: the x8000 KL scaling makes 1e-4 diverge on the CIFAR ResNets (measured; see
zsq-semantics.md). A non-finite loss stops training with a message instead of producing a broken model.

Before training, the student's activation ranges are calibrated on ``calib_batches`` batches of the data and
frozen (the official code instead keeps updating them during epochs 0-3); ``calib_method="mse"`` (default)
clips each range to its least quantization error on those batches, ``"minmax"`` keeps the official min/max
EMA (see :func:`zsqfast.calibrate`). While training, the activation quantizers' gradient is the clipped STE
(``act_ste="clipped"``: zero where a value fell outside the frozen range; each QuantAct's own ``ste`` is
restored afterwards). The official codes pass the gradient unchanged (``act_ste="identity"``), which tells the
student that raising a saturated activation still raises its output: at W3A3 on the CIFAR ResNet-20 with
2,000 steps the first layer's BatchNorm scale then grew ~6e5-fold, 38 % of its outputs ended above their
range (values ~1e11) and accuracy fell to 26.9 % (RTN 54.7 %); the loss fell for 17 epochs and rose after.
BatchNorm stays in eval mode. ``channels_last`` (None: auto) runs the
steps on channels-last batches on the CPU, faster there, NCHW for models that cannot take them
(:mod:`zsqfast.finetune.layout`).
Checkpoints (atomic) after every epoch in ``out`` allow an interrupted run to resume exactly (a checkpoint of
another run, i.e. other settings, data or number of processes, is refused, naming what differs); ``out/log.jsonl``
holds one JSON line per epoch; evaluation on a held-out set runs every epoch and the final epoch's accuracy is
reported (no selection of the best epoch on test data).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import numbers
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from ..nn import QuantAct
from ..ops.lowpass import gaussian_lowpass
from ..quantize_model import calibrate
from ..synthesis.engine import _progress, tensor_hash
from .._fileio import atomic_write_bytes
from .gradcam import cam_from_activation, cam_loss_from_activation, capture
from .layout import call_channels_last
from .losses import FeatureTap, feature_alignment, feature_layers, kd_loss, selective_ce

DEFAULTS = dict(lr=1e-5, momentum=0.9, weight_decay=1e-4, temperature=20.0, alpha=20.0, lambda_ce=5.0,
                lambda_cam=200.0, tau=0.5, d0=80.0, calib_batches=4, calib_method="mse", augment=True, lambda_fa=0.0, fa_layers=None,
                promote_eps=0.0, channels_last=None, act_ste="clipped")


def resolve_options(options: dict) -> dict:
    """:data:`DEFAULTS` overridden by ``options``, each value checked: ValueError naming the bad one."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown fine-tuning options {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    opt = dict(DEFAULTS, **options)
    for k, allowed in (("act_ste", ("clipped", "identity")), ("calib_method", ("mse", "minmax"))):
        if opt[k] not in allowed:
            raise ValueError(f"{k} must be one of {allowed}, got {opt[k]!r}")
    cb = opt["calib_batches"]
    if isinstance(cb, bool) or not isinstance(cb, numbers.Integral) or cb < 1:
        raise ValueError(f"calib_batches must be an integer >= 1 (synthetic batches that set the ranges), got {cb!r}")
    for k, positive in (("lr", True), ("temperature", True), ("momentum", False), ("weight_decay", False)):
        v = opt[k]
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 \
                or (positive and v == 0):
            raise ValueError(f"{k} must be a finite number {'> 0' if positive else '>= 0'}, got {v!r}")
    return opt


def random_resized_crop_flip(x: torch.Tensor, g: torch.Generator, scale=(0.5, 1.0)) -> torch.Tensor:
    """Per-sample RandomResizedCrop (area fraction in ``scale``, aspect 3/4..4/3) and horizontal flip."""
    b, _, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(b):
        area = h * w * float(torch.empty(()).uniform_(*scale, generator=g))
        ratio = math.exp(float(torch.empty(()).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)))
        ch = max(1, min(h, round(math.sqrt(area / ratio))))
        cw = max(1, min(w, round(math.sqrt(area * ratio))))
        top = int(torch.randint(0, h - ch + 1, (), generator=g))
        left = int(torch.randint(0, w - cw + 1, (), generator=g))
        crop = F.interpolate(x[i:i + 1, :, top:top + ch, left:left + cw], size=(h, w), mode="bilinear",
                             align_corners=False)
        out[i] = crop[0].flip(-1) if bool(torch.rand((), generator=g) < 0.5) else crop[0]
    return out


def _logit_losses(method, s, t, y, opt):
    """``(kd, ce, n_selected)``: KD, and the plain CE (kd) or SynQ's selective CE (synq)."""
    kd = kd_loss(s, t, opt["temperature"], opt["alpha"])
    if method == "kd":
        return kd, F.cross_entropy(s, y), len(y)
    ce, sel = selective_ce(s, t, y, opt["tau"])
    return kd, ce, int(sel.sum())


def step_losses(method: str, fp_model: nn.Module, q_model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                opt: dict, taps=None) -> dict:
    """The loss terms of one batch x (already augmented / filtered) and their total ``"loss"``:

    ``L = KD + lambda_ce * CE (+ FA)``; with ``promote_eps`` (HAST difficulty promotion, official 0.01) also
    ``L' = KD' + lambda_ce * CE'`` on ``x' = x + eps * sign(dL/dx)`` (one step, dL/dx through the student,
    teacher detached); ``total = L + L' + lambda_cam * CAM``. ``taps``: (student, teacher) :class:`FeatureTap`
    when ``lambda_fa`` > 0 (FA = lambda_fa * sum_l mean((c_s - c_t)^2), official 1000).
    For SynQ the CAM maps come from the same two forward passes as the logits (teacher: graph-free front;
    each a head-only backward)."""
    use_cam = method == "synq" and bool(opt["lambda_cam"])
    promote = bool(opt["promote_eps"])
    if taps is not None:  # drop what other forwards (evaluation) left behind
        taps[0].take(), taps[1].take()
    if promote:
        x = x.detach().requires_grad_(True)
    if use_cam:
        t_graph, a_t = capture(fp_model, x)
        cam_t = cam_from_activation(t_graph, a_t, x.shape[-2:]).detach()
        t = t_graph.detach()
        s, a_s = capture(q_model, x, differentiable=True)
    else:
        with torch.no_grad():
            t = fp_model(x)
        s = q_model(x)
    kd, ce, n_sel = _logit_losses(method, s, t, y, opt)
    loss = kd + opt["lambda_ce"] * ce
    zero = torch.zeros((), device=x.device)
    fa = zero
    if taps is not None:
        fa = feature_alignment(taps[0].take(), taps[1].take(), opt["lambda_fa"])
        loss = loss + fa
    promoted = zero
    if promote:
        (gx,) = torch.autograd.grad(loss, x, retain_graph=True)
        x2 = (x + opt["promote_eps"] * gx.sign()).detach()
        with torch.no_grad():
            t2 = fp_model(x2)
        s2 = q_model(x2)
        if taps is not None:
            taps[0].take(), taps[1].take()
        kd2, ce2, _ = _logit_losses(method, s2, t2, y, opt)
        promoted = kd2 + opt["lambda_ce"] * ce2
        loss = loss + promoted
    cam = cam_loss_from_activation(s, a_s, cam_t) if use_cam else zero
    return dict(loss=loss + opt["lambda_cam"] * cam if use_cam else loss, kd=kd, ce=ce, cam=cam, fa=fa,
                promoted=promoted, selected=n_sel)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent (model in eval mode)."""
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(images.split(batch_size),
                                                                               labels.split(batch_size)))
    return 100.0 * correct / max(len(labels), 1)


def finetune(fp_model: nn.Module, q_model: nn.Module, dataset, *, method: str = "synq", epochs: int = 100,
             batch_size: int = 256, seed: int = 0, eval_data=None, out=None, progress: bool = True,
             stop_after: int | None = None, **options) -> dict:
    """Fine-tune ``q_model`` (from :func:`zsqfast.quantize_model`) against the float ``fp_model``.

    Args:
        dataset: a SyntheticDataset or ``(images, labels)``: float (N, C, H, W) and int64 (N,).
        method: ``"kd"`` or ``"synq"``; ``options`` override :data:`DEFAULTS`.
        eval_data: optional held-out ``(images, labels)`` evaluated after every epoch.
        out: directory for ``checkpoint.pt`` and ``log.jsonl``; an existing checkpoint is resumed (ValueError
            when it belongs to another run: :func:`_run_identity`).
        stop_after: run at most this many epochs in this call (the rest resumes from ``out`` later).
    Returns:
        ``{"epochs": [per-epoch dicts], "final_accuracy": float or None}``; ``q_model`` is trained in place.
    """
    if method not in ("kd", "synq"):
        raise ValueError(f"method must be 'kd' or 'synq', got {method!r}")
    opt = resolve_options(options)
    images, labels = (dataset.images, dataset.labels) if hasattr(dataset, "images") else dataset
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError("dataset must hold as many labels as images, at least one")
    fp_model.eval()
    # no weight gradients for the teacher; the student's activation STE for the run; both restored afterwards
    with teacher_frozen(fp_model), activation_ste(q_model, opt["act_ste"]):
        return _finetune(fp_model, q_model, images, labels, method, epochs, batch_size, seed, eval_data, out,
                         progress, stop_after, opt)


@contextlib.contextmanager
def teacher_frozen(model: nn.Module):
    """Switch ``requires_grad`` off on ``model``'s parameters for the block; restore each flag on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def activation_ste(model: nn.Module, ste: str):
    """Set every QuantAct of ``model`` to gradient ``ste`` for the block; restore each one's own on exit."""
    acts = [(m, m.ste) for m in model.modules() if isinstance(m, QuantAct)]
    try:
        for m, _ in acts:
            m.ste = ste
        yield model
    finally:
        for m, own in acts:
            m.ste = own


PREVIOUS = "checkpoint_prev.pt"  # under DDP: each rank's checkpoint of the epoch before its last
OLD_RUN_KEYS = {"act_ste": "identity"}  # what checkpoints from before a key existed were trained with
#: the resolved options that change the training, part of the run identity a checkpoint must match
RUN_OPTIONS = ("lr", "momentum", "weight_decay", "temperature", "alpha", "lambda_ce", "lambda_cam", "tau", "d0",
               "augment", "lambda_fa", "fa_layers", "promote_eps")


def _run_identity(method, epochs, seed, batch_size, world_size, images, labels, opt) -> dict:
    """What a checkpoint must match to be resumed: the run's settings, this process's data (count and hash)
    and :data:`RUN_OPTIONS` (as plain floats / lists: the checkpoint is loaded with ``weights_only``)."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return list(v)
        return float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else v
    return dict(method=method, epochs=epochs, seed=seed, act_ste=opt["act_ste"], world_size=world_size,
                batch_size=batch_size, num_images=len(images), data=tensor_hash(images, labels),
                **{k: plain(opt[k]) for k in RUN_OPTIONS})


def _differences(state: dict, run: dict) -> list[str]:
    """The identity keys on which checkpoint ``state`` and ``run`` differ, as "key: stored there, now". A key that
    checkpoints of earlier versions lack is checked only when it is known what they were trained with:
    :data:`OLD_RUN_KEYS`, and world_size 1 for weights without DDP's "module." prefix (one process)."""
    old = dict(OLD_RUN_KEYS)
    if not any(k.startswith("module.") for k in state["model"]):
        old["world_size"] = 1
    stored = {k: state[k] if k in state else old[k] for k in run if k in state or k in old}
    return [f"{k}: {stored[k]!r} there, {v!r} now" for k, v in run.items() if k in stored and stored[k] != v]


def _load_weights(model: nn.Module, weights: dict) -> None:
    """Load a checkpoint's weights into the (unwrapped) student; those saved from a DDP wrapper (before
    checkpoints held the unwrapped model) lose their "module." prefix."""
    if set(weights) != set(model.state_dict()):
        consume_prefix_in_state_dict_if_present(weights, "module.")
    model.load_state_dict(weights)


def _resume_state(ckpt: Path, ddp: bool, run: dict) -> dict | None:
    """The checkpoint to resume from (None: start afresh), checked to belong to ``run`` (:func:`_run_identity`)
    or ValueError naming the keys that differ. One process: ``ckpt`` if it exists. Under DDP every rank must
    resume at the same epoch, but a run killed between the ranks' epoch-end writes leaves some ranks one epoch
    ahead: all ranks take the smallest of their newest epochs, each from ``ckpt`` or the previous one it kept
    (:data:`PREVIOUS`); when one rank has no checkpoint of that epoch, or any checkpoint of another run (e.g.
    one written by another number of processes), every rank raises (none is left waiting at a collective)."""
    states = {}
    for path in (ckpt, ckpt.with_name(PREVIOUS)) if ddp else (ckpt,):
        if path.exists():
            state = torch.load(path, map_location="cpu", weights_only=True)
            states[state["epoch"]] = state
    epoch = max(states, default=0)
    if ddp:
        agreed = torch.tensor([epoch])
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        epoch = int(agreed)
    state = states.get(epoch)
    differ = list(dict.fromkeys(d for s in states.values() for d in _differences(s, run)))  # ckpt and PREVIOUS
    flags = torch.tensor([int(epoch != 0 and state is None),  # no checkpoint of the agreed epoch
                          int(bool(differ))])
    if ddp:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags[1]:
        what = f"{ckpt} belongs to a different run ({'; '.join(differ)})" if differ else \
            "another rank's checkpoint belongs to a different run (that rank's error says what differs)"
        raise ValueError(f"{what}: resume with the settings, data and number of processes it was written with, "
                         "or use another out directory")
    if flags[0]:
        raise ValueError(f"the ranks' fine-tuning checkpoints ({ckpt.parent}, ...) hold no common epoch (this rank: "
                         f"epochs {sorted(states)}, agreed {epoch}); use another out directory")
    return state


def augmentation_generator(g: torch.Generator, seed: int, epoch: int, rank: int) -> torch.Generator:
    """The generator of rank ``rank``'s crops and flips in ``epoch``: the epoch's own ``g`` (which drew the
    permutation) on rank 0 and in one process; a stream of its own on every other rank, so that the ranks'
    shards do not all get the same crop boxes at the same step (the global batch would repeat them)."""
    return g if rank == 0 else torch.Generator().manual_seed((seed * 7919 + epoch) * 1_000_003 + rank)


def _finetune(fp_model, q_model, images, labels, method, epochs, batch_size, seed, eval_data, out, progress,
              stop_after, opt) -> dict:
    params = [p for p in q_model.parameters() if p.requires_grad]
    sgd = torch.optim.SGD(params, lr=opt["lr"], momentum=opt["momentum"], nesterov=True,
                          weight_decay=opt["weight_decay"])
    steps_per_epoch = math.ceil(len(images) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=max(1, epochs * steps_per_epoch))
    out = Path(out) if out is not None else None
    ckpt = out / "checkpoint.pt" if out is not None else None
    ddp = isinstance(q_model, nn.parallel.DistributedDataParallel)
    student = q_model.module if ddp else q_model  # checkpoints hold its weights, without DDP's "module." prefix
    history, start, state = [], 0, None
    if ckpt is not None:
        run = _run_identity(method, epochs, seed, batch_size, dist.get_world_size() if ddp else 1, images, labels,
                            opt)
        state = _resume_state(ckpt, ddp, run)
    if state is not None:
        _load_weights(student, state["model"])
        sgd.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, start = state["history"], state["epoch"]
    else:
        calibrate(q_model, images[: opt["calib_batches"] * batch_size].split(batch_size), freeze=True,
                  method=opt["calib_method"])
    for m in q_model.modules():
        if isinstance(m, QuantAct):
            m.freeze()
    last = epochs if stop_after is None else min(epochs, start + stop_after)
    taps = None
    if opt["lambda_fa"]:
        names = opt["fa_layers"] or feature_layers(fp_model)
        taps = (FeatureTap(q_model, names), FeatureTap(fp_model, names))  # hooks once per run, not per step
    bar = _progress((last - start) * steps_per_epoch, progress and last > start, desc=f"finetune {method}")
    try:
        for epoch in range(start, last):
            g = torch.Generator().manual_seed(seed * 7919 + epoch)
            q_model.eval()  # BatchNorm in eval; QuantActs frozen
            perm = torch.randperm(len(images), generator=g)
            totals = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "cam": 0.0, "fa": 0.0, "promoted": 0.0, "selected": 0.0}
            crops = augmentation_generator(g, seed, epoch, dist.get_rank() if ddp else 0)
            for step, idx in enumerate(perm.split(batch_size)):
                x, y = images[idx], labels[idx]
                if opt["augment"]:
                    x = random_resized_crop_flip(x, crops)
                if method == "synq":
                    x = torch.nan_to_num(gaussian_lowpass(x, opt["d0"]))
                # channels-last forwards on the CPU (None: auto, NCHW for models that view a feature map)
                # (step_losses empties the feature taps first: nothing of a failed attempt is kept)
                terms = call_channels_last(functools.partial(step_losses, method, fp_model, q_model, y=y, opt=opt,
                                                             taps=taps), x, (fp_model, q_model), opt["channels_last"])
                loss = terms["loss"]
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"fine-tuning loss became {float(loss)} at epoch {epoch}, step {step}; "
                                             f"lower lr (now {sched.get_last_lr()[0]:g})")
                sgd.zero_grad(set_to_none=True)
                loss.backward()
                sgd.step()
                if not bool(torch.isfinite(torch.stack([p.detach().abs().sum() for p in params]).sum())):
                    raise FloatingPointError(f"fine-tuning diverged at epoch {epoch}, step {step}: weights are no longer "
                                             f"finite; lower lr (now {sched.get_last_lr()[0]:g})")
                sched.step()
                for k in ("loss", "kd", "ce", "cam", "fa", "promoted"):
                    totals[k] += float(terms[k].detach()) / steps_per_epoch
                totals["selected"] += terms["selected"] / len(images)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.4g}", refresh=False)
            record = dict(epoch=epoch + 1, lr=sched.get_last_lr()[0], **{k: round(v, 6) for k, v in totals.items()})
            if eval_data is not None:
                record["accuracy"] = evaluate(q_model, *eval_data)
            history.append(record)
            if progress:
                print(json.dumps(record), file=sys.stderr)
            if out is not None:
                if ddp and ckpt.exists():  # keep the last one: another rank may not get to write this epoch's
                    ckpt.replace(ckpt.with_name(PREVIOUS))
                state = dict(model=student.state_dict(), optimizer=sgd.state_dict(), scheduler=sched.state_dict(),
                             epoch=epoch + 1, history=history, **run)
                atomic_write_bytes(ckpt, lambda f: torch.save(state, f))
                atomic_write_bytes(out / "log.jsonl", lambda f: f.write("".join(json.dumps(r) + "\n" for r in history).encode()))
    finally:
        for tap in taps or ():
            tap.close()
        if bar is not None:
            bar.close()
    return {"epochs": history, "final_accuracy": history[-1].get("accuracy") if history else None}
