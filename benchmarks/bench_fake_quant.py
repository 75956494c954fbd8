"""Fake-quantization forward+backward: zsqfast vs the unfused research chain vs PyTorch's fused ops.

Shapes (the issue's): per-channel weights 512x512x3x3, per-tensor activations 256x64x32x32, ViT
activations 16x197x768. Rows per shape, each a forward+backward (upstream gradient given):
  floor          y = x * 1.0 (memory-bandwidth floor: read x, write y; read g, write dx)
  chain          the GDFQ/HAST/SynQ eager chain (round/clamp ops + a Python autograd.Function STE)
  torch-fused    torch.fake_quantize_per_{channel,tensor}_affine (1-byte mask, clipped STE)
  zsq-reference  zsqfast's pure-PyTorch reference kernel (what runs without the extension)
  zsq-identity   zsqfast, identity STE (the ZeroQ-lineage gradient; no backward kernel at all)
  zsq-clipped    zsqfast, clipped STE (1-bit mask, fused backward)
and LSQ: zsqfast.lsq_fake_quantize vs torch's _LearnableFakeQuantize (both learn the step).

Run: python benchmarks/bench_fake_quant.py [--threads 2] [--quick]
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zsqfast  # noqa: E402
from _timing import bench, cli  # noqa: E402


class ChainSTE(torch.autograd.Function):
    """The ZeroQ-lineage AsymmetricQuantFunction: eager ops, identity STE."""

    @staticmethod
    def forward(ctx, x, s, zp, lo, hi):
        q = torch.clamp(torch.round(s * x - zp), lo, hi)
        return (q + zp) / s

    @staticmethod
    def backward(ctx, g):
        return g, None, None, None, None


def fwd_bwd(fn, x, g):
    def step():
        x.grad = None
        fn(x).backward(g)

    return step


def cases(quick: bool):
    scale_w = 1 if not quick else 4
    return [
        ("weights 512x512x3x3 per-channel", (512 // scale_w, 512, 3, 3), 0),
        ("acts 256x64x32x32 per-tensor", (256 // scale_w, 64, 32, 32), None),
        ("ViT acts 16x197x768 per-tensor", (16 // scale_w, 197, 768), None),
    ]


def run(quick: bool) -> list[dict]:
    rows = []
    bits = 4
    for label, shape, axis in cases(quick):
        x = torch.randn(shape).requires_grad_(True)
        g = torch.randn(shape)
        scale, zp = zsqfast.minmax_qparams(x, bits, axis=axis)
        bshape = [-1] + [1] * (len(shape) - 1) if axis == 0 else [1] * len(shape)
        s_inv = (1.0 / scale).reshape(bshape)  # the chain's s = n / range
        zp_chain = (-zp - 2 ** (bits - 1)).reshape(bshape)  # their zp' = round(s min) + 2^(b-1)
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        zp_fused = zp.clamp(0, 2**bits - 1)
        if axis == 0:
            fused = lambda t: torch.fake_quantize_per_channel_affine(t, scale, zp_fused.int(), 0, 0, 15)  # noqa: E731
        else:
            fused = lambda t: torch.fake_quantize_per_tensor_affine(t, scale, zp_fused.int(), 0, 15)  # noqa: E731
        contenders = {
            "floor": lambda t: t * 1.0,
            "chain": lambda t: ChainSTE.apply(t, s_inv, zp_chain, lo, hi),
            "torch-fused": fused,
        }
        times = {k: bench(fwd_bwd(f, x, g)) for k, f in contenders.items()}
        with zsqfast.use_backend("reference"):
            times["zsq-reference"] = bench(fwd_bwd(lambda t: zsqfast.fake_quantize(t, scale, zp, bits, axis), x, g))
        fast = zsqfast.active_backend()
        for ste in ("identity", "clipped"):
            times[f"zsq-{ste}"] = bench(fwd_bwd(lambda t: zsqfast.fake_quantize(t, scale, zp, bits, axis, ste=ste), x, g))
        best_torch = min(times["chain"], times["torch-fused"])
        for k, t in times.items():
            rows.append(dict(case=label, impl=k, backend=fast if k.startswith("zsq-") and k != "zsq-reference" else "",
                             ms=round(t * 1e3, 3), vs_best_pytorch=round(best_torch / t, 2),
                             vs_floor=round(t / times["floor"], 2)))
    rows += run_lsq(quick)
    return rows


def run_lsq(quick: bool) -> list[dict]:
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize
    from torch.ao.quantization.observer import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver

    rows = []
    for label, shape, axis in cases(quick):
        x = torch.randn(shape).requires_grad_(True)
        g = torch.randn(shape)
        if axis is None:
            tq = _LearnableFakeQuantize(MovingAverageMinMaxObserver, quant_min=-8, quant_max=7, scale=0.1,
                                        zero_point=0.0, use_grad_scaling=True, dtype=torch.qint8,
                                        qscheme=torch.per_tensor_symmetric)
            step = torch.full((1,), 0.1, requires_grad=True)
        else:
            tq = _LearnableFakeQuantize(MovingAveragePerChannelMinMaxObserver, quant_min=-8, quant_max=7,
                                        scale=0.1, zero_point=0.0, use_grad_scaling=True, channel_len=shape[0],
                                        ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
            step = torch.full((shape[0],), 0.1, requires_grad=True)
        tq.toggle_qparam_learning(enabled=True).toggle_fake_quant(enabled=True).toggle_observer_update(enabled=False)
        t_torch = bench(fwd_bwd(tq, x, g))
        t_ours = bench(fwd_bwd(lambda t: zsqfast.lsq_fake_quantize(t, step, 4, signed=True, axis=axis), x, g))
        with zsqfast.use_backend("reference"):
            t_ref = bench(fwd_bwd(lambda t: zsqfast.lsq_fake_quantize(t, step, 4, signed=True, axis=axis), x, g))
        for k, t in (("torch-learnable", t_torch), ("zsq-lsq-reference", t_ref), ("zsq-lsq", t_ours)):
            rows.append(dict(case="LSQ " + label, impl=k, backend="", ms=round(t * 1e3, 3),
                             vs_best_pytorch=round(t_torch / t, 2), vs_floor=""))
    return rows


def main() -> None:
    cli(__doc__, "bench_fake_quant", run,
        [("case", "36s"), ("impl", "18s"), ("ms", "9.3f"), ("vs_best_pytorch", ">15"), ("vs_floor", ">8")],
        "vs_best_pytorch: speed-up over the faster of torch-fused and chain (LSQ rows: over torch-learnable); "
        "vs_floor: time / floor time (1.0 = bandwidth floor)")

if __name__ == "__main__":
    main()
