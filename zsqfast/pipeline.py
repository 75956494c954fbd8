"""zsqfast.quantize(): the whole zero-shot pipeline in one call, every stage resumable from ``out/``.

Stages, in order (each one's artifact under ``out/``)::

    synthesize   synthetic/          shards + index of :func:`zsqfast.synthesize` (resumes per batch); with
                                     ``data=`` tensors instead, synthetic.pt (a copy of them)
    quantize     rtn.pt              quantize_model + calibrate on the first ``calib_batches`` synthetic
                                     batches, ranges frozen: the zero-shot round-to-nearest model
    finetune     finetune/           :func:`zsqfast.finetune` checkpoint + log.jsonl (resumes per epoch)
                 model.pt            the fine-tuned model: {"state_dict", "config"}
    export       integer_model.safetensors   :func:`zsqfast.convert_to_integer` of model.pt (only with
                                     export=True), written by :func:`zsqfast.save_integer_model`

``out/manifest.json`` (written atomically: temp file + rename) holds the run's configuration, the model's
fingerprint and, per finished stage, its wall time and metrics. A stage counts as done only once its artifact
and the manifest entry naming it are both on disk, so an interrupted run, called again with the same
arguments, skips the finished stages and resumes the one in progress (at the last synthetic batch / epoch
written); a stage whose artifact was deleted runs again. Another configuration in the same ``out/`` raises
ValueError saying what differs (an option given at its default value is the same run as one left out). The
accuracies are stored with a hash of the evaluation data: a resumed run given other ``eval_data`` (or none
before) measures them again instead of reporting the stored ones. Every argument is checked before ``out/`` is
written, so a bad one never claims the directory.

Determinism: synthetic batch b depends on (seed, b) only, fine-tuning epoch e on (seed, e) only, so a run
resumed at any point gives the same model as an uninterrupted one (same machine and thread count).

Under ``torchrun`` (``WORLD_SIZE`` > 1) synthesis splits its batches over the ranks (each writes its shards,
rank 0 merges the index, every rank gets the whole set; it runs on the model's device: the command line
loads models on the CPU) and fine-tuning runs data-parallel (:mod:`zsqfast.distributed`); calibration,
evaluation and export give the same result on every rank and rank 0 writes them.
"""
from __future__ import annotations

import copy
import json
import numbers
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from . import distributed as zdist
from ._fileio import atomic_write_bytes
from .convert import check_convertible, convert_to_integer
from .finetune import finetune
from .finetune.trainer import DEFAULTS as FINETUNE_DEFAULTS
from .finetune.trainer import evaluate, resolve_options
from .integer_io import load_integer_model, save_integer_model
from .nn.quant_layers import resolve_bits
from .quantize_model import calibrate, quantize_model
from .synthesis import SyntheticDataset, synthesize
from .synthesis.engine import model_fingerprint, resolve_method, tensor_hash
from .synthesis.recipes import DEFAULT_BATCH

STAGES = ("synthesize", "quantize", "finetune", "export")
MANIFEST = "manifest.json"


@dataclass
class QuantizeResult:
    """What :func:`quantize` returns: the fake-quantized fine-tuned model, the zero-shot round-to-nearest
    model, the integer model (``export=True``), metrics (accuracies when ``eval_data`` was given, wall times),
    the fine-tuning history (per-epoch dicts), the output directory and ``reused``: the stages this call took
    from ``out/`` as an earlier call left them instead of running them (their ``<stage>_time_s`` metrics are
    that earlier call's wall times, not this one's). ``finetune_time_s`` is the fine-tuning itself (per-epoch
    curve evaluation included), without the final evaluation and the save of model.pt."""

    model: nn.Module
    rtn_model: nn.Module
    integer_model: nn.Module | None = None
    metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    out: Path | None = None
    reused: tuple = ()


_SYNTH_KEYS = ("model", "seed", "num_images", "synth_iterations", "synth_method", "synth_batch_size", "synth_options")


def _canonical(config: dict) -> dict:
    """``config`` with the defaults spelled out, flat, so that an option given at its default value compares equal
    to one left out: ``finetune_options`` resolved against DEFAULTS, one ``finetune_options.<name>`` entry each
    (the STE from the config's resolved ``act_ste``: its default changed once), ``first_last_bits`` None ->
    ``w_bits``."""
    c = dict(config)
    ft = c.pop("finetune_options", None)
    if isinstance(ft, dict):
        ft = dict(FINETUNE_DEFAULTS, **ft)
        ft["act_ste"] = c.pop("act_ste", ft["act_ste"])
        c.update({f"finetune_options.{k}": v for k, v in ft.items()})
    if c.get("first_last_bits") is None and "w_bits" in c:
        c["first_last_bits"] = c["w_bits"]
    return c


class Manifest:
    """``out/manifest.json``: {"config": {...}, "stages": {name: {"time_s", "metrics", "artifact", ...}}}, atomic
    writes."""

    def __init__(self, out: Path | None, config: dict):
        self.out, self.path = out, (out / MANIFEST if out is not None else None)
        self.data = {"config": config, "stages": {}}
        if self.path is not None and self.path.exists():
            with open(self.path) as f:
                stored = json.load(f)
            old, new = _canonical(stored["config"]), _canonical(config)
            diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
            if diff:
                details = "; ".join(f"{k}: stored {a!r}, requested {b!r}" for k, (a, b) in sorted(diff.items()))
                hint = ""
                if "synthesize" in stored["stages"] and not set(diff) & set(_SYNTH_KEYS):
                    hint = (f"; its synthetic set can be reused: pass data={out / 'synthetic'} "
                            "(--data on the command line) with another output directory")
                raise ValueError(f"{out} holds a different quantization run ({details}); use another output "
                                 f"directory, or delete this one to start over{hint}")
            self.data = stored
        elif self.path is not None:
            self._write()  # claim the directory for this configuration before any stage runs

    def done(self, stage: str) -> bool:
        """The stage's entry is in the manifest and (with ``out``) its artifact is on disk."""
        entry = self.data["stages"].get(stage)
        if entry is None:
            return False
        artifact = entry.get("artifact")
        return self.out is None or artifact is None or (self.out / artifact).exists()

    def measured(self, stage: str, eval_key: str | None) -> bool:
        """The stage's stored accuracies were measured on the evaluation data of hash ``eval_key``."""
        return self.data["stages"].get(stage, {}).get("eval_data") == eval_key

    def set_metrics(self, stage: str, metrics: dict, eval_key: str | None) -> None:
        """Replace the stage's accuracies (measured again on other evaluation data)."""
        self.data["stages"][stage].update(metrics=metrics, eval_data=eval_key)
        self._write()

    def metrics(self, stage: str) -> dict:
        return self.data["stages"].get(stage, {}).get("metrics", {})

    def finish(self, stage: str, seconds: float, metrics: dict | None = None, **extra) -> None:
        self.data["stages"][stage] = dict(time_s=round(seconds, 3), metrics=metrics or {}, **extra)
        self._write()

    def _write(self) -> None:
        if self.path is not None and zdist.rank() == 0:
            text = json.dumps(self.data, indent=1).encode()  # stages in the order they finished
            atomic_write_bytes(self.path, lambda f: f.write(text))


def save_model(path: Path, model: nn.Module, config: dict) -> None:
    """``{"state_dict", "config"}`` written atomically (loadable with ``torch.load(weights_only=True)``)."""
    payload = {"state_dict": model.state_dict(), "config": config}
    atomic_write_bytes(path, lambda f: torch.save(payload, f))


def build_quantized(fp_model: nn.Module, config: dict) -> nn.Module:
    """The (uncalibrated) fake-quantized structure of ``config`` around ``fp_model``, every parameter trainable
    whatever ``fp_model``'s ``requires_grad`` flags (a frozen float model still gives a trainable student)."""
    q = quantize_model(fp_model, config["w_bits"], config["a_bits"], first_last_bits=config.get("first_last_bits"))
    for p in q.parameters():
        p.requires_grad_(True)
    return q


def read_payload(path: str | Path):
    """``torch.load(path, weights_only=True)``; ValueError when the file is not a readable PyTorch file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # pickle errors, truncated or foreign files
        raise ValueError(f"{path} is not a readable model file ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); pass the model.pt or rtn.pt "
                         "of a 'zsqfast quantize' output directory") from None


def load_quantized(path: str | Path, fp_model: nn.Module, *, payload=None) -> tuple[nn.Module, dict]:
    """A model saved by :func:`quantize` (``rtn.pt`` / ``model.pt``) rebuilt around ``fp_model``.

    ``payload``: ``read_payload(path)`` when the caller has already read the file (it is then not read again).
    Raises ValueError when the file is not such a model or does not fit ``fp_model``."""
    if payload is None:
        payload = read_payload(path)
    if not isinstance(payload, dict) or "state_dict" not in payload or "config" not in payload:
        raise ValueError(f"{path} is not a model saved by zsqfast quantize (expected keys 'state_dict' and "
                         "'config'); pass the model.pt of a quantize output directory")
    q = build_quantized(fp_model, payload["config"])
    try:
        q.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path} does not fit this model (was it quantized from another architecture?): "
                         f"{str(exc).splitlines()[0]}") from None
    return q.eval(), payload["config"]


def _log(msg: str, progress: bool) -> None:
    if progress and zdist.rank() == 0:
        print(f"[zsqfast.quantize] {msg}", file=sys.stderr, flush=True)




def _resolve_data(data):
    """``data`` (None, a synthesize() directory, a SyntheticDataset or (images, labels)) -> dataset or None."""
    if data is None:
        return None
    if isinstance(data, (str, Path)):
        return SyntheticDataset.load(data)
    if hasattr(data, "images"):
        return data
    images, labels = data
    return SyntheticDataset(images, labels, {"method": "external"})


def quantize(model: nn.Module, w_bits: int, a_bits: int, *, method: str = "synq", num_images: int = 5120,
             synth_iterations: int = 1000, epochs: int = 100, out=None, export: bool = False, seed: int = 0,
             synth_method: str = "auto", synth_batch_size: int | None = None, batch_size: int = 256,
             first_last_bits: int | None = None, data=None, eval_data=None, curve_data="eval_data",
             progress: bool = True,
             synth_options: dict | None = None, finetune_options: dict | None = None,
             extra_config: dict | None = None) -> QuantizeResult:
    """Zero-shot quantization of ``model`` end to end: synthesize -> quantize_model -> calibrate -> finetune
    (-> convert_to_integer). See the module docstring for the stages and ``out/``.

    Args:
        model: the pretrained float classifier, not modified: a BatchNorm CNN, or a timm ViT / DeiT / Swin.
        w_bits, a_bits: 2..8.
        method: fine-tuning: ``"synq"`` or ``"kd"``; ``epochs=0`` stops after round-to-nearest.
        num_images, synth_iterations, synth_batch_size, synth_method, synth_options: :func:`zsqfast.synthesize`;
            ``synth_method="auto"``: ``"hast"`` (BNS) for a model with BatchNorm2d, ``"psaq-vit"`` for a ViT
            without it; a BNS method forced on a model without BatchNorm2d raises ValueError before any
            file is written. ``synth_batch_size`` None: the method's (256; 32 for psaq-vit).
        epochs, batch_size, finetune_options: :func:`zsqfast.finetune` (its DEFAULTS, e.g. ``lr``,
            ``calib_batches``, also set the calibration of the round-to-nearest model).
        out: directory for every artifact and the manifest; None keeps everything in memory.
        export: also build the integer model (:func:`zsqfast.convert_to_integer`) and save it; every layer
            is first checked convertible (:func:`zsqfast.convert.check_convertible`), before ``out`` is written.
        seed: every random choice derives from it.
        first_last_bits: weight bits of the first and last layer (default ``w_bits``).
        data: use this synthetic set instead of synthesizing (a synthesize() directory, a SyntheticDataset
            or ``(images, labels)``), e.g. to compare KD and SynQ on the same images.
        eval_data: held-out real ``(images, labels)``: FP32, round-to-nearest and final accuracy are
            measured on it (never used to choose anything).
        curve_data: held-out ``(images, labels)`` evaluated after every epoch (the log's accuracy curve);
            default ``eval_data``; None skips the per-epoch evaluation.
        extra_config: JSON-able entries stored in the config (e.g. how to rebuild the model).
    Returns:
        :class:`QuantizeResult`.
    Raises:
        ValueError: bad bits / method / budget / fine-tuning option, a synthesis method the model cannot use, a
            layer quantize_model cannot quantize (or, with ``export``, convert_to_integer cannot convert), an
            ``out`` holding another run; all before ``out`` is written.
    """
    wb, ab = resolve_bits(w_bits, "w_bits", allow_float=False), resolve_bits(a_bits, "a_bits", allow_float=False)
    if method not in ("synq", "kd"):
        raise ValueError(f"method must be 'synq' or 'kd', got {method!r}")
    for name, value, least in (("epochs", epochs, 0), ("num_images", num_images, 1),
                               ("synth_iterations", synth_iterations, 1), ("batch_size", batch_size, 1),
                               ("synth_batch_size", 1 if synth_batch_size is None else synth_batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    ft_opts = dict(finetune_options or {})
    opt = resolve_options(ft_opts)  # the resolved fine-tuning options (ValueError naming a bad one)
    out = Path(out) if out is not None else None
    if out is None and zdist.world_size() > 1:
        raise ValueError("under torchrun quantize() needs out=: the ranks share rank 0's artifacts through it")
    dataset = _resolve_data(data)
    fp = model.eval()
    config = dict(w_bits=wb, a_bits=ab, first_last_bits=first_last_bits, method=method, seed=seed,
                  epochs=epochs, batch_size=batch_size, finetune_options=ft_opts, model=model_fingerprint(fp),
                  # the resolved STE (its default changed once): a run of another one is not resumed with it
                  act_ste=opt["act_ste"],
                  **(extra_config or {}))
    if dataset is None:
        synth_method = resolve_method(fp, synth_method)
        if synth_batch_size is None:
            synth_batch_size = DEFAULT_BATCH[synth_method]
        config.update(num_images=num_images, synth_iterations=synth_iterations, synth_method=synth_method,
                      synth_batch_size=synth_batch_size, synth_options=dict(synth_options or {}))
    else:
        config.update(data=tensor_hash(dataset.images, dataset.labels), num_images=len(dataset.labels))
    student = build_quantized(fp, config)  # an unsupported model fails here, before out/ is written
    if export:
        check_convertible(student)  # and one with a layer the export could not convert
    eval_key = tensor_hash(*eval_data) if eval_data is not None else None
    man = Manifest(out, config)
    if dataset is not None and out is not None and not isinstance(data, (str, Path)) and zdist.rank() == 0 \
            and not (out / "synthetic.pt").exists():  # keep a copy of the given set with the run
        payload = {"images": dataset.images.detach().cpu(), "labels": dataset.labels.detach().cpu()}
        atomic_write_bytes(out / "synthetic.pt", lambda f: torch.save(payload, f))
    if isinstance(curve_data, str) and curve_data == "eval_data":
        curve_data = eval_data
    metrics: dict = {}
    reused = [stage for stage in STAGES if man.done(stage)]  # finished by an earlier call: not run again

    # 1. synthesize (resumable per batch inside synthesize(); under torchrun every rank takes its share of
    #    the batches and gets the whole set back)
    if dataset is None:
        synth_dir = out / "synthetic" if out is not None else None
        if not man.done("synthesize"):
            t0 = time.perf_counter()
            _log(f"synthesize: {num_images} images x {synth_iterations} iterations ({synth_method})", progress)
            dataset = synthesize(fp, num_images, method=synth_method, batch_size=synth_batch_size,
                                 iterations=synth_iterations, seed=seed, out=synth_dir, progress=progress,
                                 **(synth_options or {}))
            zdist.barrier()
            man.finish("synthesize", time.perf_counter() - t0, artifact="synthetic")
        if dataset is None:
            dataset = SyntheticDataset.load(synth_dir) if synth_dir is not None else None
    def rtn_metrics():
        return {"fp32_accuracy": evaluate(fp, *eval_data), "rtn_accuracy": evaluate(rtn, *eval_data)} \
            if eval_data is not None else {}

    # 2. quantize_model + calibrate -> the zero-shot round-to-nearest model
    if man.done("quantize") and out is not None:
        rtn, _ = load_quantized(out / "rtn.pt", fp)
        if not man.measured("quantize", eval_key):
            man.set_metrics("quantize", rtn_metrics(), eval_key)
    else:
        t0 = time.perf_counter()
        rtn = student
        calibrate(rtn, dataset.images[: opt["calib_batches"] * batch_size].split(batch_size), freeze=True,
                  method=opt["calib_method"])
        m = rtn_metrics()
        if out is not None and zdist.rank() == 0:
            save_model(out / "rtn.pt", rtn, config)
        zdist.barrier()
        man.finish("quantize", time.perf_counter() - t0, m, artifact="rtn.pt", eval_data=eval_key)
        _log(f"quantize: W{wb}A{ab} round-to-nearest" + (f", accuracy {m['rtn_accuracy']:.2f} %" if m else ""),
             progress)
    metrics.update(man.metrics("quantize"))
    # 3. finetune (resumable per epoch inside finetune(); data-parallel under torchrun)
    history: list = []
    if epochs == 0:
        qmodel = rtn
    elif man.done("finetune") and out is not None:
        qmodel, _ = load_quantized(out / "model.pt", fp)
        history = _read_log(out / "finetune" / "log.jsonl")
        if not man.measured("finetune", eval_key):
            man.set_metrics("finetune", {"final_accuracy": evaluate(qmodel, *eval_data)}
                            if eval_data is not None else {}, eval_key)
    else:
        t0 = time.perf_counter()
        qmodel = copy.deepcopy(rtn)
        ft_out = out / "finetune" if out is not None else None
        kw = dict(method=method, epochs=epochs, batch_size=batch_size, seed=seed, progress=progress, **ft_opts)
        if zdist.world_size() > 1:
            res = zdist.finetune_ddp(fp, qmodel, dataset, out=ft_out, eval_data=curve_data, **kw)
        else:
            res = finetune(fp, qmodel, dataset, out=ft_out, eval_data=curve_data, **kw)
        history = res["epochs"]
        seconds = time.perf_counter() - t0  # the fine-tuning only: not the final evaluation and the save below
        m = {"final_accuracy": evaluate(qmodel, *eval_data)} if eval_data is not None else {}
        if out is not None and zdist.rank() == 0:
            save_model(out / "model.pt", qmodel, config)
        zdist.barrier()
        man.finish("finetune", seconds, m, artifact="model.pt", eval_data=eval_key)
    metrics.update(man.metrics("finetune"))
    # 4. export
    integer_model = None
    if export and man.done("export") and out is not None:
        integer_model = load_integer_model(out / "integer_model.safetensors", copy.deepcopy(fp))
    elif export:
        t0 = time.perf_counter()
        integer_model = convert_to_integer(copy.deepcopy(qmodel).eval(), dataset.images[:1])
        if out is not None and zdist.rank() == 0:
            save_integer_model(integer_model, out / "integer_model.safetensors")
        zdist.barrier()
        man.finish("export", time.perf_counter() - t0, artifact="integer_model.safetensors")
    for stage in STAGES:
        if man.done(stage):
            metrics[f"{stage}_time_s"] = man.data["stages"][stage]["time_s"]
    reused = tuple(stage for stage in reused if stage != "export" or export)
    return QuantizeResult(qmodel.eval(), rtn.eval(), integer_model, metrics, history, out, reused)


def _read_log(path: Path) -> list:
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]
