"""Low-bit integer GEMM on the CPU: zsqfast W4A4 / W3A3 vs PyTorch's fp32, bf16 and int8 matmuls.

For every M in {1, 16, 256, 1024} and (K, N) in {(512, 512), (768, 3072), (4096, 4096)}, y (M, N) = x (M, K) W^T:
  fp32           torch.matmul, fp32 weights (the baseline: "x fp32")
  bf16           torch.matmul in bf16
  int_mm         torch._int_mm, int8 x int8 -> int32, operands already quantized (the int8 anchor; on CPU it
                 takes any M, K, N; its CUDA kernel needs M > 16 and K, N multiples of 8)
  qlinear_dyn    torch.ops.quantized.linear_dynamic (fbgemm/onednn: quantizes x on the fly, int8 weights)
  zsq-W4A4       zsqfast.lowbit_linear end to end: quantize x on the fly, int32 GEMM on 4-bit packed weights,
                 zero-point correction and dequantize + bias fused (what an IntLinear layer runs)
  zsq-W3A3       the same at 3 bits
  zsq-gemm-W4A4  the raw zsqfast lowbit_gemm (codes in, int32 out: the analogue of int_mm)
  zsq-reference  the pure-PyTorch reference of lowbit_linear (float64 GEMM), where M*N*K <= 2^28
GOPS counts 2 M N K operations. Weight bytes: fp32 4NK, int8 NK, W4/W3 NK/2 (+ 12 N of scales/zeros/sums).

Run: python benchmarks/bench_lowbit_gemm.py [--threads 2] [--quick]
"""
from __future__ import annotations

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zsqfast  # noqa: E402
from _timing import bench, cli  # noqa: E402
from zsqfast.ops import lowbit_gemm as G  # noqa: E402
from zsqfast.ops.lowbit_pack import LowbitWeight  # noqa: E402


def shapes(quick: bool):
    ms = (1, 16, 256) if quick else (1, 16, 256, 1024)
    kns = ((512, 512), (768, 3072)) if quick else ((512, 512), (768, 3072), (4096, 4096))
    return [(m, k, n) for k, n in kns for m in ms]


def contenders(M: int, K: int, N: int) -> dict:
    g = torch.Generator().manual_seed(M * 7 + K)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) * 0.05, torch.randn(N, generator=g)
    wt = w.T.contiguous()
    xb, wtb = x.bfloat16(), wt.bfloat16()
    a8 = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    w8 = torch.randint(-128, 128, (K, N), dtype=torch.int8, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw = torch.quantize_per_channel(w, w.abs().amax(1) / 127, torch.zeros(N, dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qw, b)
    fns = {
        "fp32": lambda: torch.matmul(x, wt),
        "bf16": lambda: torch.matmul(xb, wtb),
        "int_mm": lambda: torch._int_mm(a8, w8),
        "qlinear_dyn": lambda: torch.ops.quantized.linear_dynamic(x, packed),
    }
    for bits in (4, 3):
        s, z = zsqfast.minmax_qparams(w, bits, axis=0)
        lw = LowbitWeight.from_float(w, s, z, bits)
        sa, za = zsqfast.minmax_qparams(x, bits)
        args = (lw.packed, lw.scale, lw.zero_point, lw.colsum, sa, za, bits, bits, K, b)
        fns[f"zsq-W{bits}A{bits}"] = lambda args=args: zsqfast.lowbit_linear(x, *args)
        if bits == 4:
            codes = G.quantize_codes(x, sa, za, bits)
            fns["zsq-gemm-W4A4"] = lambda lw=lw, codes=codes: G.lowbit_gemm(codes, lw.packed, 4, K)
            if M * N * K <= 1 << 28:
                def ref(args=args):
                    with zsqfast.use_backend("reference"):
                        return zsqfast.lowbit_linear(x, *args)

                fns["zsq-reference"] = ref
    return fns


def run(quick: bool) -> list[dict]:
    rows = []
    for M, K, N in shapes(quick):
        fns = contenders(M, K, N)
        t = {k: bench(f, warmup=1, reps=3 if M * N * K > 1 << 30 else 5, min_time=0.2) for k, f in fns.items()}
        for k, sec in t.items():
            rows.append(dict(M=M, K=K, N=N, impl=k, ms=sec * 1e3, GOPS=2 * M * N * K / sec / 1e9,
                             vs_fp32=t["fp32"] / sec, vs_int_mm=t["int_mm"] / sec))
    return rows


def main() -> None:
    cli(__doc__, "bench_lowbit_gemm", run,
        [("M", "5d"), ("K", "5d"), ("N", "5d"), ("impl", "14s"), ("ms", "10.3f"), ("GOPS", "8.1f"),
         ("vs_fp32", "8.2f"), ("vs_int_mm", "9.2f")],
        f"vs_fp32 / vs_int_mm: speed-up over torch fp32 matmul / torch._int_mm (>1 = zsqfast faster); "
        f"zsqfast backend: {zsqfast.active_backend('cpu', 'lowbit_linear')}")


if __name__ == "__main__":
    main()
