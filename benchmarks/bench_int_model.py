"""Whole-model inference: fp32 eager vs the W4A4 fake-quant model vs the integer model (convert_to_integer).

Models (the issue's): CIFAR ResNet-20 at 32x32, batch 1 and 256 (the pretrained checkpoint of ../shared/data
when present, else random weights; both calibrated on Gaussian noise), timm resnet18 at 224x224 (random
weights), batch 1 and 16. Columns: median latency (ms) of each, also of fp32 eager in channels_last memory
order (``fp32_cl``: the integer model runs channels_last internally, so this is the like-for-like float
anchor), the ratios fp32 / int (> 1: the integer model is faster), fp32_cl / int and fake-quant / int, and
the conv/linear weight bytes: fp32 vs the integer model's
packed codes plus per-channel scale, zero point and column sum (``size_x``: how many times smaller).

The integer layers run whatever backend the ``zsqfast::lowbit_*`` ops dispatch to (printed): on the pure
PyTorch reference (exact float64 integer math) they are slow; so each call is timed once first and slow
configurations get fewer repetitions.

Run: python benchmarks/bench_int_model.py [--threads 2] [--quick]   (--quick: small batches only)
"""
from __future__ import annotations

import copy
import os
import sys
import time
import warnings

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zsqfast  # noqa: E402
from _timing import bench, cli  # noqa: E402


def _time(fn) -> float:
    """Median seconds per call; one untimed warm-up call decides the repetitions (1 call if it took > 2 s)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > 2.0:
        return bench(fn, warmup=0, reps=1, min_time=0.0)
    return bench(fn, warmup=1, reps=5 if first > 0.2 else 11, min_time=0.3)


def _weight_bytes(model: nn.Module) -> int:
    return sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def _models(quick: bool):
    try:
        r20, tag = zsqfast.models.load_cifar_resnet(20), "pretrained"
    except FileNotFoundError:
        r20, tag = zsqfast.models.cifar_resnet(20).eval(), "random"
    yield f"cifar_resnet20 ({tag})", r20, 32, (1, 32) if quick else (1, 256)
    try:
        r18 = zsqfast.models.build("resnet18").eval()
    except ImportError:
        return
    yield "resnet18 (random)", r18, 224, (1,) if quick else (1, 16)


def run(quick: bool) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for name, fp, hw, batches in _models(quick):
        q = zsqfast.quantize_model(fp, 4, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision-style shared ReLUs are not in these models
            zsqfast.calibrate(q, [torch.randn(16, 3, hw, hw, generator=g) for _ in range(2)])
        im = zsqfast.convert_to_integer(q, torch.randn(1, 3, hw, hw, generator=g))
        wb_fp, wb_int = _weight_bytes(fp), zsqfast.integer_report(im)["weight_bytes"]
        fp_cl = copy.deepcopy(fp).to(memory_format=torch.channels_last)
        for bs in batches:
            x = torch.randn(bs, 3, hw, hw, generator=g)
            xcl = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                t_fp, t_fq, t_int = (_time(lambda m=m: m(x)) for m in (fp, q, im))
                t_cl = _time(lambda: fp_cl(xcl))
            rows.append({"model": name, "batch": bs, "fp32_ms": t_fp * 1e3, "fp32_cl_ms": t_cl * 1e3,
                         "fakeq_ms": t_fq * 1e3, "int_ms": t_int * 1e3, "fp32/int": t_fp / t_int,
                         "fp32_cl/int": t_cl / t_int, "fakeq/int": t_fq / t_int,
                         "w_fp32_KB": wb_fp / 1024, "w_int_KB": wb_int / 1024, "size_x": wb_fp / wb_int})
    return rows


if __name__ == "__main__":
    print("lowbit_conv2d backend:", zsqfast.active_backend("cpu", "lowbit_conv2d"),
          "| lowbit_linear backend:", zsqfast.active_backend("cpu", "lowbit_linear"))
    cli(__doc__, "bench_int_model", run,
        [("model", "24s"), ("batch", "5d"), ("fp32_ms", "10.2f"), ("fp32_cl_ms", "10.2f"), ("fakeq_ms", "10.2f"),
         ("int_ms", "10.2f"), ("fp32/int", "8.2f"), ("fp32_cl/int", "11.2f"), ("fakeq/int", "9.2f"), ("w_fp32_KB", "9.1f"), ("w_int_KB", "8.1f"),
         ("size_x", "6.2f")],
        legend="W4A4 (first/last layer 4-bit too); fp32/int > 1 means the integer model is faster. Timings on a "
               "shared machine are noisy.")
