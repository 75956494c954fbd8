"""Whole-model inference: fp32 eager vs the W4A4 fake-quant model vs the integer model (convert_to_integer).

Models (the issue's): CIFAR ResNet-20 at 32x32, batch 1 and 256 (the pretrained checkpoint of ../shared/data
when present, else random weights; both calibrated on Gaussian noise), timm resnet18 at 224x224 (random
weights), batch 1 and 16. Columns: median latency (ms) of each, also of fp32 eager in channels_last memory
order (``fp32_cl``: the integer model runs channels_last internally, so this is the like-for-like float
anchor), the ratios fp32 / int (> 1: the integer model is faster), fp32_cl / int and fake-quant / int, and the
conv/linear weight bytes, each with its ratio to the fp32 weights (``x``: how many times smaller):

* ``w_fp32_KB``: the float model's conv/linear weights (fp32; biases not counted, as on the other columns).
* ``disk_KB``: the same weights in the file :func:`zsqfast.save_integer_model` writes (format 2): the codes
  bit-dense with no K padding (w_bits bits a weight), an fp32 scale and a zero point (uint8 when it fits in
  0..255, else int32) per output channel. Not stored, recomputed at load: the kernel layout and the column sums.
* ``file_KB``: the whole file as written to a temp dir: the above plus the biases (BatchNorms folded into
  them), the activation grids, the kept QuantAct buffers and the safetensors header (tensor index and the
  JSON of the structural edits: ~23 KB for ResNet-20).
* ``mem_KB``: the weights in memory, as the kernels read them: codes in the half-block nibble layout with K
  padded to a multiple of 128 (3-bit codes in nibbles), fp32 scale, int32 zero point and column sum a channel.

The integer layers run whatever backend the ``zsqfast::lowbit_*`` ops dispatch to (printed): on the pure
PyTorch reference (exact float64 integer math) they are slow; so each call is timed once first and slow
configurations get fewer repetitions.

Run: python benchmarks/bench_int_model.py [--threads 2] [--quick]   (--quick: small batches only)
"""
from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
import warnings

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zsqfast  # noqa: E402
from _timing import bench, cli, keep_freed_memory  # noqa: E402
from zsqfast.integer_io import saved_weight_bytes  # noqa: E402


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
        wb_fp, wb_mem, wb_disk = _weight_bytes(fp), zsqfast.integer_report(im)["weight_bytes"], saved_weight_bytes(im)
        with tempfile.TemporaryDirectory() as d:
            zsqfast.save_integer_model(im, os.path.join(d, "m.safetensors"))
            wb_file = os.path.getsize(os.path.join(d, "m.safetensors"))
        sizes = {"w_fp32_KB": wb_fp / 1024}
        for col, b in (("disk", wb_disk), ("file", wb_file), ("mem", wb_mem)):
            sizes.update({f"{col}_KB": b / 1024, f"{col}_x": wb_fp / b})
        fp_cl = copy.deepcopy(fp).to(memory_format=torch.channels_last)
        for bs in batches:
            x = torch.randn(bs, 3, hw, hw, generator=g)
            xcl = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                t_fp, t_fq, t_int = (_time(lambda m=m: m(x)) for m in (fp, q, im))
                t_cl = _time(lambda: fp_cl(xcl))
            rows.append({"model": name, "batch": bs, "fp32_ms": t_fp * 1e3, "fp32_cl_ms": t_cl * 1e3,
                         "fakeq_ms": t_fq * 1e3, "int_ms": t_int * 1e3, "fp32/int": t_fp / t_int,
                         "fp32_cl/int": t_cl / t_int, "fakeq/int": t_fq / t_int, **sizes})
    return rows


if __name__ == "__main__":
    print(keep_freed_memory())  # same allocator state for every row (see _timing.keep_freed_memory)
    print("lowbit_conv2d backend:", zsqfast.active_backend("cpu", "lowbit_conv2d"),
          "| lowbit_linear backend:", zsqfast.active_backend("cpu", "lowbit_linear"))
    cli(__doc__, "bench_int_model", run,
        [("model", "24s"), ("batch", "5d"), ("fp32_ms", "10.2f"), ("fp32_cl_ms", "10.2f"), ("fakeq_ms", "10.2f"),
         ("int_ms", "10.2f"), ("fp32/int", "8.2f"), ("fp32_cl/int", "11.2f"), ("fakeq/int", "9.2f"),
         ("w_fp32_KB", "9.1f"), ("disk_KB", "8.1f"), ("disk_x", "6.2f"), ("file_KB", "8.1f"), ("file_x", "6.2f"),
         ("mem_KB", "8.1f"), ("mem_x", "5.2f")],
        legend="W4A4 (first/last layer 4-bit too); fp32/int > 1 means the integer model is faster. Timings on a "
               "shared machine are noisy.")
