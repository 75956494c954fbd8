"""synthesize(): noise-optimisation synthesis of a calibration / fine-tuning set from a pretrained model.

Method ``"hast"`` (HAST / SynQ official generation; ../shared/reference/zsq-semantics.md, "Synthesis"):
images start as N(0, 1) noise in the model's normalised input space with uniformly random labels; Adam
(lr 0.5) with ReduceLROnPlateau(patience 50, min_lr 1e-4) stepped every iteration on the loss; 1,000
iterations per batch of 256; loss = BNS ("hast" form) + hard-sample inception loss
``hard_beta * mean((1 - p_y)^hard_gamma * CE_i)`` with (10, 2) for CIFAR-size inputs and (0.1, 0.5) for
ImageNet-size ones; ImageNet-size inputs get a random resized crop (0.4-1) + flip with p 0.5 per iteration,
CIFAR none; no priors. ``calibration_centers=True`` adds SynQ's calibration centers + layered BNS
(centers.py).

Method ``"deepinversion"``: BNS in DeepInversion's form (unsquared norms, first layer x10) + CE + the priors
``1e-4 TV_L2 + 1e-5 ||x||_2``, Adam lr 0.2 betas (0.5, 0.9) with DeepInversion's cosine schedule (100
warm-up iterations), jitter 2 px and flip.

Method ``"psaq-vit"`` (vision transformers, no BatchNorm): ``-sum_l mean_b H_l + CE + 0.05 |TV_L2 - U(2500,
3000)|`` with H_l the patch-similarity entropy (patch_entropy.py), Adam lr 0.2 (0.25 for Swin), batch 32,
constant learning rate. Every hyperparameter is listed in recipes.py and can be overridden by keyword.

Speed (same results as the official loop's arithmetic, less work): the fused BN-statistics op (one read per
BN input, affine backward), the model's parameters frozen (the official loop also computes every weight
gradient and never uses them), hooks registered once, no per-layer host copies, channels-last activations
(``channels_last=True``), batched augmentation, one host synchronisation per iteration (the loss value the
plateau scheduler needs; the official loop has 2 + 4 per BN layer), and an opt-in bf16 autocast mode
(``precision="bf16"``; images, Adam and every loss stay fp32).

Every batch b is seeded from (seed, b) alone, so batches are independent: a run interrupted at any point and
resumed (same ``out``) produces exactly the images of an uninterrupted run. Inside a batch its whole state
(images, Adam, scheduler, augmentation RNG; the labels follow from the seed) is checkpointed every
:data:`CHECKPOINT_SECONDS` to ``out/partial_<b>.pt`` (removed once the batch's shard is written), so an
interruption loses at most that much work and the resumed batch continues exactly where it stopped. Under ``torchrun`` each rank
takes the batches b with b % world_size == rank, writes their shards, and rank 0 merges one index: the result
equals a single-process run with the same seed (same thread count and precision). Calibration centers are
deterministic in the seed: every rank that needs them makes them itself (or loads the stored ones; rank 0
stores them), none waits for another's.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from . import recipes
from .bns_loss import BNSLoss
from .centers import center_loss, center_statistics, make_centers
from .patch_entropy import PatchEntropy, _attention_modules
from .._fileio import atomic_write_bytes
from .storage import ShardStore


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
        entries = store.entries(index)
        parts = [store.load_batch(index, b) for b in range(n_batches)]
        meta = dict(index["meta"], final_losses=[entries[str(b)]["final_loss"] for b in range(n_batches)])
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


def tensor_hash(*tensors: torch.Tensor) -> str:
    """A short hash of the tensors' shapes and values (e.g. a data set's images and labels)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _input_shape(model: nn.Module, input_shape) -> tuple[int, int, int]:
    if input_shape is not None:
        return tuple(int(s) for s in input_shape)
    from ..models.loading import input_config

    return tuple(input_config(model)["input_size"])


def resolve_method(model: nn.Module, method: str) -> str:
    """``method`` checked against ``model``; ``"auto"``: ``"hast"`` for a model with BatchNorm2d layers,
    ``"psaq-vit"`` for a vision transformer without them (timm attention blocks).

    Raises ValueError before any work: an unknown method, a BN-statistics method (hast, deepinversion) for a
    model without BatchNorm2d (e.g. a ViT: no running statistics to match), psaq-vit for a model without
    timm attention blocks, or ``"auto"`` for a model with neither."""
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    has_attn = bool(_attention_modules(model))
    name = type(model).__name__
    if not has_bn and any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        raise ValueError(f"{name} has SyncBatchNorm layers: synthesis matches BatchNorm2d running statistics; pass "
                         "the model with its BatchNorm2d layers (before nn.SyncBatchNorm.convert_sync_batchnorm)")
    if method == "auto":
        if not (has_bn or has_attn):
            raise ValueError(f"{name} has no BatchNorm2d layer and no timm attention block: no synthesis method "
                             f"applies (BN statistics need BatchNorm2d, psaq-vit a vision transformer); pass "
                             "data= / --data with your own calibration images")
        return "hast" if has_bn else "psaq-vit"
    if method not in recipes.METHODS:
        raise ValueError(f"synthesis method must be 'auto' or one of {sorted(recipes.METHODS)}, got {method!r}")
    if recipes.METHODS[method]["bns_form"] and not has_bn:
        hint = "use 'psaq-vit' (or 'auto', which picks it) for this vision transformer" if has_attn else \
            "pass your own calibration images instead (data= / --data)"
        raise ValueError(f"{name} has no BatchNorm2d layer: synthesis method {method!r} matches BatchNorm running "
                         f"statistics (BNS), which this model does not have; {hint}")
    if recipes.METHODS[method]["entropy"] and not has_attn:
        raise ValueError(f"{name} has no timm attention block (Attention / WindowAttention): synthesis method "
                         f"{method!r} needs a vision transformer; use 'hast' (or 'auto') for a BatchNorm CNN")
    return method


def _progress(total: int, enabled: bool, desc: str = "synthesis", initial: int = 0):
    """A tqdm bar of ``total`` iterations, ``initial`` of them already done by an earlier (resumed) run: they
    count towards the position but not towards the rate and the ETA. None when disabled or without tqdm."""
    if not enabled or total == 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="it", file=sys.stderr, dynamic_ncols=True)


def _dist_context(distributed):
    """``(rank, world_size, barrier, agree)``: torch.distributed's when it is initialised (or asked for), else
    one process. ``agree(error_or_None, exc=ValueError)`` (a collective: every rank calls it) raises the same
    ``exc`` on every rank when any rank has an error message (so that no rank waits forever at a barrier
    another rank will never reach)."""
    import torch.distributed as dist

    use = dist.is_available() and dist.is_initialized() if distributed is None else bool(distributed)
    if use and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True needs torch.distributed initialised (e.g. run under torchrun and call "
                           "torch.distributed.init_process_group first)")

    def agree_local(err, exc=ValueError):
        if err:
            raise exc(err)

    if not use or dist.get_world_size() == 1:
        return 0, 1, lambda: None, agree_local

    def agree(err, exc=ValueError):
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, err)
        agree_local(next((f"rank {r}: {e}" for r, e in enumerate(errors) if e), None), exc)

    return dist.get_rank(), dist.get_world_size(), dist.barrier, agree


class _Objective:
    """The model run + loss of one recipe: hooks registered once for the whole run, removed by ``close``."""

    def __init__(self, model: nn.Module, hp: dict, precision: str, device_type: str):
        self.hp, self.targets = hp, None
        self.bns = BNSLoss(model, hp["bns_form"]) if hp["bns_form"] else None
        self.pe = PatchEntropy(model, hp["kde_bandwidth"], hp["kde_points"], hp["kde_grid"]) if hp["entropy"] \
            else None
        self.model = model
        self.autocast = (torch.autocast(device_type, dtype=torch.bfloat16) if precision == "bf16"
                         else contextlib.nullcontext())

    def forward(self, x):
        """``(logits, auxiliary)``: the BNS loss (BNS methods) or the (L, B) entropies (psaq-vit)."""
        with self.autocast:
            if self.bns is not None:
                return self.bns(x)
            if self.pe is not None:
                return self.pe(x)
            return self.model(x), None

    def loss(self, inp, y, tv_target: float = 0.0) -> torch.Tensor:
        """The recipe's loss on the (augmented) images ``inp`` the model sees, labels ``y``."""
        hp = self.hp
        logits, aux = self.forward(inp)
        loss = recipes.class_loss(logits, y, hp) + recipes.prior_loss(inp, hp, tv_target)
        if self.bns is not None:
            scale = hp["lbns_bns_scale"] if self.targets is not None else 1.0
            loss = loss + scale * aux
            if self.targets is not None:
                loss = loss + hp["lbns_center_weight"] * center_loss(self.bns, self.targets, len(y))
        if self.pe is not None:
            loss = loss - hp["entropy"] * aux.mean(1).sum()
        return loss

    def close(self):
        for h in (self.bns, self.pe):
            if h is not None:
                h.remove()


class _Batch:
    """One batch's optimisation state: images x (optimised), labels y, Adam and the plateau scheduler."""

    def __init__(self, obj: _Objective, shape, num_classes: int, b: int, batch: int, seed: int, channels_last: bool,
                 device, iterations: int = 1000):
        hp = self.hp = obj.hp
        self.obj, self.b = obj, b
        self.g = torch.Generator().manual_seed(seed * 1_000_003 + b)
        dtype = next(obj.model.parameters()).dtype  # the noise is drawn in fp32 on the CPU (deterministic)
        x = torch.randn((batch,) + tuple(shape), generator=self.g).to(device=device, dtype=dtype)
        self.y = torch.randint(0, num_classes, (batch,), generator=self.g).to(device)
        self.tv_target = recipes.tv_target(hp, self.g)  # once per batch (PSAQ-ViT's var_pred)
        self.bounds = recipes.clip_bounds(hp, shape[0], device, dtype) if len(shape) == 3 else None
        self.iterations = iterations
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.x = x.requires_grad_(True)
        self.opt = torch.optim.Adam([self.x], lr=hp["lr"], betas=hp["betas"])
        self.sched = None
        if hp["scheduler"] == "plateau":
            self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(self.opt, patience=hp["patience"],
                                                                    min_lr=hp["min_lr"])
        elif hp["scheduler"] == "cosine":  # lr_cosine_policy per stage: linear warm-up, then cosine to 0
            w, stages = hp["warmup"], hp["stages"]

            def factor(e):
                _, i, n = recipes.stage_of(e, iterations, stages)
                return (i + 1) / w if i < w else 0.5 * (1 + math.cos(math.pi * (i - w) / max(1, n - w)))
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)

    def step(self, it: int = 0) -> float:
        """One iteration: augment, forward, loss, input-gradient backward, Adam step, scheduler step."""
        self.opt.zero_grad(set_to_none=True)
        stage = recipes.stage_of(it, self.iterations, self.hp["stages"])[0]
        loss = self.obj.loss(recipes.augment(self.x, self.hp, self.g, stage), self.y, self.tv_target)
        loss.backward()
        self.opt.step()
        if self.bounds is not None:  # back into the valid pixel range (DeepInversion / PSAQ-ViT ``clip``)
            with torch.no_grad():
                self.x.clamp_(*self.bounds)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"synthesis loss became {value} at batch {self.b}, iteration {it}; lower lr")
        if isinstance(self.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.sched.step(value)
        elif self.sched is not None:
            self.sched.step()
        return value


#: seconds between mid-batch checkpoints of a batch's whole optimisation state (``partial_<b>.pt`` in ``out``):
#: an interrupted run resumes inside its batch, exactly, losing at most this much work
CHECKPOINT_SECONDS = 60.0


def _partial_name(b: int) -> str:
    return f"partial_{b:05d}.pt"


def _save_partial(store, state: "_Batch", it: int, loss_value: float) -> None:
    payload = dict(it=it, loss=loss_value, x=state.x.detach().cpu(), g=state.g.get_state(),
                   opt=state.opt.state_dict(), sched=state.sched.state_dict() if state.sched is not None else None)
    atomic_write_bytes(store.root / _partial_name(state.b), lambda f: torch.save(payload, f))


def _partial_iterations(store, b: int) -> int:
    """Iterations batch ``b``'s checkpoint holds (0 when none, or unreadable: loading it then reports that), read
    memory-mapped: its tensors are not loaded."""
    p = store.root / _partial_name(b)
    if not p.exists():
        return 0
    try:
        return int(torch.load(p, map_location="cpu", weights_only=True, mmap=True)["it"])
    except Exception:
        return 0


def _load_partial(store, state: "_Batch") -> tuple[int, float]:
    """Restore a batch from its checkpoint; returns (iterations done, last loss) ((0, nan) when none)."""
    p = store.root / _partial_name(state.b)
    if not p.exists():
        return 0, float("nan")
    payload = torch.load(p, map_location="cpu", weights_only=True)
    with torch.no_grad():
        state.x.copy_(payload["x"])
    state.g.set_state(payload["g"])
    state.opt.load_state_dict(payload["opt"])
    if state.sched is not None:
        state.sched.load_state_dict(payload["sched"])
    return int(payload["it"]), float(payload["loss"])


def _synthesize_batch(obj: _Objective, shape, num_classes: int, b: int, batch: int, seed: int, iterations: int,
                      channels_last: bool, device, bar, store=None) -> tuple[torch.Tensor, torch.Tensor, float]:
    state = _Batch(obj, shape, num_classes, b, batch, seed, channels_last, device, iterations)
    # the bar already counts the iterations the checkpoint holds (synthesize() creates it with initial=)
    start, loss_value = _load_partial(store, state) if store is not None else (0, float("nan"))
    last = time.monotonic()
    for it in range(start, iterations):
        loss_value = state.step(it)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(batch=b, loss=f"{loss_value:.4g}", refresh=False)
        if store is not None and it + 1 < iterations and time.monotonic() - last >= CHECKPOINT_SECONDS:
            _save_partial(store, state, it + 1, loss_value)
            last = time.monotonic()
    return state.x.detach().contiguous(), state.y.cpu(), loss_value


@contextlib.contextmanager
def iteration_runner(model: nn.Module, batch: int, *, method: str = "hast", input_shape=None, num_classes: int = 10,
                     precision: str = "fp32", channels_last: bool = True, seed: int = 0, **overrides):
    """``with iteration_runner(model, 256) as step: step()`` runs single synthesis iterations of batch 0 exactly
    as :func:`synthesize` does (for benchmarks); the model is restored on exit."""
    shape = _input_shape(model, input_shape)
    hp = recipes.resolve(method, overrides, shape, model)
    with _synthesis_mode(model, channels_last):
        obj = _Objective(model, hp, precision, next(model.parameters()).device.type)
        try:
            yield _Batch(obj, shape, num_classes, 0, batch, seed, channels_last,
                         next(model.parameters()).device).step
        finally:
            obj.close()


@contextlib.contextmanager
def _synthesis_mode(model: nn.Module, channels_last: bool):
    """Eval mode, frozen parameters and (optionally) channels-last weights; everything restored on exit."""
    was_training = model.training
    tensors = list(model.parameters()) + list(model.buffers())
    flags = [(p, p.requires_grad) for p in model.parameters()]
    contiguous = [(t, t.is_contiguous()) for t in tensors]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for t, was in contiguous:
            if was and not t.is_contiguous():
                t.data = t.data.contiguous()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def synthesize(model: nn.Module, num_images: int, *, method: str = "hast", batch_size: int | None = None,
               iterations: int = 1000, seed: int = 0, out: str | Path | None = None, input_shape=None,
               num_classes: int | None = None, calibration_centers: bool = False, precision: str = "fp32",
               channels_last: bool = True, progress: bool = True, max_batches: int | None = None,
               distributed: bool | None = None, **overrides) -> SyntheticDataset:
    """Synthesize ``num_images`` images from ``model`` (its BatchNorm statistics / attention and its classifier).

    Args:
        model: a classifier (run in eval mode with frozen parameters; left unchanged). BNS methods need
            BatchNorm2d layers, ``"psaq-vit"`` timm attention blocks.
        method: ``"hast"`` (default), ``"deepinversion"``, ``"psaq-vit"`` (module docstring) or ``"auto"``
            (:func:`resolve_method`: hast with BatchNorm, psaq-vit for a ViT without it); ``overrides``
            replace any hyperparameter of the method (recipes.py lists and explains them all).
        batch_size: images per batch (256; 32 for psaq-vit); the last batch may be smaller.
        iterations: optimisation steps per batch (1000).
        seed: batch b is fully determined by (seed, b).
        out: directory for shards + index; an existing run there is resumed (its settings must match).
        input_shape: (C, H, W); default :func:`zsqfast.models.loading.input_config` (a timm model's size,
            its patch embedding's ``img_size`` included; 224 for torchvision; else (3, 32, 32); a ValueError
            for a model whose first convolution does not take 3 channels).
        num_classes: default: the size of the model's output (ValueError when larger than it).
        calibration_centers: SynQ's calibration centers + layered BNS (BNS methods; centers.py).
        precision: ``"fp32"`` or ``"bf16"`` (autocast of the model's forward and backward; opt-in).
        channels_last: run convolutions on channels-last images and weights (faster on CPU and GPU).
        progress: a progress bar (tqdm) with batch, iteration count and loss (rank 0 only).
        max_batches: stop after this many new batches (per process; the rest can be resumed later); 0 makes
            none (returns what ``out`` already holds).
        distributed: split the batches over the ranks of torch.distributed (None: when it is initialised);
            needs ``out`` (the shared directory the ranks write to). Every rank returns the whole set.
    Returns:
        SyntheticDataset of the batches done (all of them unless ``max_batches`` stopped early; no image,
        shape (0, C, H, W), when none is done).
    Raises:
        FloatingPointError when a batch's loss stops being finite; under several ranks on every rank (the
        others first finish and store their batches), so that none is left waiting at a barrier.
    """
    if calibration_centers and not recipes.METHODS.get(method, {"bns_form": "auto"})["bns_form"]:
        raise ValueError(f"calibration_centers needs a BN-statistics method, not {method!r}")
    method = resolve_method(model, method)
    shape = _input_shape(model, input_shape)
    hp = recipes.resolve(method, overrides, shape, model)
    batch_size = recipes.DEFAULT_BATCH[method] if batch_size is None else batch_size
    if num_images < 1 or batch_size < 1 or iterations < 1:
        raise ValueError("num_images, batch_size and iterations must be positive")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if calibration_centers and not hp["bns_form"]:  # "auto" resolved to psaq-vit
        raise ValueError(f"calibration_centers needs a BN-statistics method, not {method!r}")
    if max_batches is not None and max_batches < 0:
        raise ValueError(f"max_batches must be >= 0 (None: all), got {max_batches}")
    rank, world, barrier, agree = _dist_context(distributed)
    diverged = None  # this rank's non-finite loss (several ranks: every rank raises it after its batches)
    if world > 1 and out is None:
        raise ValueError("a multi-process synthesis needs out= (a directory every rank can write)")
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    channels_last = channels_last and len(shape) == 3
    with _synthesis_mode(model, channels_last):
        obj = _Objective(model, hp, precision, device.type)
        try:
            with torch.no_grad():  # one probe: the model's class count, and the BN layers its forward runs
                outputs = int(obj.forward(torch.zeros((1,) + shape, device=device, dtype=dtype))[0].shape[1])
            if num_classes is None:
                num_classes = outputs
            elif num_classes > outputs:
                raise ValueError(f"num_classes={num_classes} but the model has {outputs} outputs: the labels would "
                                 f"index past its logits; pass num_classes <= {outputs} (or leave it out)")
            n_batches = (num_images + batch_size - 1) // batch_size
            meta = dict(method=method, num_images=num_images, batch_size=batch_size, iterations=iterations, seed=seed,
                        num_batches=n_batches, input_shape=list(shape), num_classes=num_classes,
                        calibration_centers=calibration_centers, precision=precision, channels_last=channels_last,
                        model=model_fingerprint(model), hyperparameters={k: list(v) if isinstance(v, tuple) else v
                                                                        for k, v in hp.items()})
            store = ShardStore(out) if out is not None else None
            index = None
            if store is not None:  # rank 0 creates (or checks) the index first, then the others check it
                for turn in (rank == 0, rank != 0):
                    err = None
                    if turn:
                        try:
                            index = store.open(meta, {"hyperparameters": recipes.LEGACY})
                        except ValueError as e:
                            err = str(e)
                    agree(err)
            done = store.done(index) if store else set()
            todo = [b for b in range(n_batches) if b not in done and b % world == rank][:max_batches]
            need_centers = calibration_centers and (todo or store is None)
            centers = store.load_tensor("centers.pt") if (store and need_centers) else None
            n_center_its = hp["center_iterations"] * -(-num_classes // batch_size)
            show = progress and rank == 0
            resumed_its = sum(_partial_iterations(store, b) for b in todo) if show and store is not None else 0
            bar = _progress(len(todo) * iterations + (n_center_its if need_centers and centers is None else 0),
                            show, initial=resumed_its)
            if need_centers and centers is None:  # deterministic in seed: every rank makes the same ones
                centers = make_centers(obj.bns, shape, num_classes, hp, seed, batch_size, obj.forward, bar)
                if store and rank == 0:  # one writer
                    store.save_tensor("centers.pt", centers)
            if centers is not None:
                obj.targets = center_statistics(obj.bns, centers.to(device), batch_size, obj.forward)
            results = {}
            try:
                for b in todo:
                    batch = min(batch_size, num_images - b * batch_size)
                    x, y, final = _synthesize_batch(obj, shape, num_classes, b, batch, seed, iterations,
                                                    channels_last, device, bar, store)
                    if store:
                        store.save_batch(index, b, x, y, final, sidecar=world > 1)
                        (store.root / _partial_name(b)).unlink(missing_ok=True)  # the shard supersedes it
                    results[b] = (x.cpu(), y, final)
            except FloatingPointError as e:  # raised on every rank below, where the others would wait for it
                if world == 1:
                    raise
                diverged = str(e)
            if bar is not None:
                bar.close()
        finally:
            obj.close()
    if store:
        agree(diverged, FloatingPointError)  # the ranks meet here (a barrier), and raise together
        if world > 1:
            if rank == 0:
                store.merge(index)
            barrier()
            index = store.load_index()
        entries = store.entries(index)
        for b in sorted(set(int(k) for k in entries) - set(results)):
            x, y = store.load_batch(index, b)
            results[b] = (x, y, entries[str(b)]["final_loss"])
    order = sorted(results)
    meta = dict(meta, final_losses=[results[b][2] for b in order], batches=order, computed=todo)
    if not order:  # max_batches=0 and nothing stored yet
        return SyntheticDataset(torch.empty((0,) + shape), torch.empty(0, dtype=torch.int64), meta)
    return SyntheticDataset(torch.cat([results[b][0] for b in order]), torch.cat([results[b][1] for b in order]), meta)
