"""Data-parallel fine-tuning across processes (``torchrun``), on gloo (CPU) or NCCL (one GPU per process).

Launch any zsqfast entry point under torchrun, e.g.::

    torchrun --nproc_per_node 2 -m zsqfast.cli quantize --model cifar_resnet20 ...     # 2 CPU processes (gloo)
    torchrun --nproc_per_node 8 -m zsqfast.cli quantize ...                           # 8 GPUs (NCCL)

:func:`init_from_env` joins the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``/``PORT``). :func:`finetune_ddp` then runs :func:`zsqfast.finetune` on every rank with

* the student wrapped in ``DistributedDataParallel`` (gradients all-reduced = averaged over ranks every step;
  ``broadcast_buffers=False``: BatchNorm stays in eval and the activation ranges are frozen, so buffers never
  change during training and every rank holds the same ones);
* rank r training on the r-th of ``world_size`` equal interleaved shards of the synthetic set
  (``images[r::world]``, the remainder dropped so every rank takes the same number of steps), with batch
  ``batch_size // world_size`` per rank: the global batch stays ``batch_size``; each rank draws its own crops
  and flips (``finetune.trainer.augmentation_generator``);
* the activation ranges calibrated once, before wrapping, on the same first batches on every rank (so they
  are identical everywhere);
* per-epoch evaluation and the log on rank 0 (``out``), the other ranks checkpointing in ``out_rank<r>``
  so that every rank can resume an interrupted run; each rank also keeps its previous epoch's checkpoint,
  and on resume all ranks agree on the newest epoch they all have (a run killed between the ranks' writes
  would otherwise resume them at different epochs and hang).

With CUDA, each process uses ``cuda:LOCAL_RANK`` and the data moves there (not run on a GPU here).
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def barrier() -> None:
    if is_active() and world_size() > 1:
        dist.barrier()


def init_from_env() -> bool:
    """Join the process group when launched by torchrun with WORLD_SIZE > 1 (gloo on CPU, NCCL with CUDA).
    Returns whether this process is now part of a group of several."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not is_active():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return world_size() > 1


def device() -> torch.device:
    if torch.cuda.is_available() and is_active() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def shard(images: torch.Tensor, labels: torch.Tensor, r: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank r's interleaved shard ``[r::world]`` of the first ``world * (N // world)`` samples."""
    n = (len(labels) // world) * world
    if n == 0:
        raise ValueError(f"{len(labels)} images cannot be split across {world} processes")
    return images[:n][r::world], labels[:n][r::world]


def finetune_ddp(fp_model: nn.Module, q_model: nn.Module, dataset, *, batch_size: int = 256, out=None,
                 eval_data=None, **kwargs) -> dict:
    """:func:`zsqfast.finetune` data-parallel over the current process group (module docstring).

    Same arguments as ``finetune``; ``q_model`` is trained in place (its parameters end identical on every
    rank). Returns rank 0's history on rank 0 and the local one elsewhere."""
    from .finetune import finetune
    from .finetune.trainer import DEFAULTS
    from .quantize_model import calibrate

    if not is_active():
        raise RuntimeError("finetune_ddp needs a process group: launch with torchrun (see zsqfast.distributed)")
    r, w = rank(), world_size()
    if batch_size % w:
        raise ValueError(f"batch_size {batch_size} must be divisible by the {w} processes")
    images, labels = (dataset.images, dataset.labels) if hasattr(dataset, "images") else dataset
    dev = device()
    fp_model.to(dev)
    q_model.to(dev)
    calib = kwargs.get("calib_batches", DEFAULTS["calib_batches"])
    # the same ranges on every rank: calibrate on the same (first) batches, then freeze
    calibrate(q_model, images[: calib * batch_size].to(dev).split(batch_size), freeze=True,
              method=kwargs.get("calib_method", DEFAULTS["calib_method"]))
    x, y = shard(images, labels, r, w)
    ddp_cls = nn.parallel.DistributedDataParallel
    new_name = "forward_sync_buffers" in inspect.signature(ddp_cls).parameters  # torch >= 2.14 renamed it
    no_sync = "forward_sync_buffers" if new_name else "broadcast_buffers"
    ddp = ddp_cls(q_model, **{no_sync: False})
    rank_out = out if out is None or r == 0 else Path(str(out) + f"_rank{r}")
    eval_local = tuple(t.to(dev) for t in eval_data) if (eval_data is not None and r == 0) else None
    progress = kwargs.pop("progress", True) and r == 0
    res = finetune(fp_model, ddp, (x.to(dev), y.to(dev)), batch_size=batch_size // w, out=rank_out,
                   eval_data=eval_local, progress=progress, **kwargs)
    q_model.to("cpu")
    fp_model.to("cpu")
    return res
