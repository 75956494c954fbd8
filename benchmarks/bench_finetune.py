"""SynQ fine-tuning pieces: low-pass filter, per-batch Grad-CAM, and one training step (issue 5).

Rows:
  low-pass  official fft2 path vs an rfft2 filter (the best plain-PyTorch way) vs zsqfast's circulant path;
  Grad-CAM  the official procedure (full backward through the whole network) vs zsqfast (head-only backward)
            vs a plain no-grad forward of the same batch (the floor);
  step      one KD step vs one SynQ step (filter + selective CE + CAM) with zsqfast.
Models: CIFAR ResNet-20 at batch 256 (32x32) and timm resnet18 at batch 16 (224x224), random weights.

Run: python benchmarks/bench_finetune.py [--threads 2] [--quick]
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zsqfast  # noqa: E402
from _timing import bench, cli  # noqa: E402
from zsqfast.finetune.trainer import DEFAULTS, step_losses  # noqa: E402
from zsqfast.finetune.gradcam import reference_gradcam  # noqa: E402
from zsqfast.models import build  # noqa: E402


def rfft_lowpass(x, d0):
    h, w = x.shape[-2:]
    fy = torch.fft.fftfreq(h, d=1.0 / h)[:, None]
    fx = torch.fft.rfftfreq(w, d=1.0 / w)[None, :]
    return torch.fft.irfft2(torch.fft.rfft2(x) * torch.exp(-(fy**2 + fx**2) / (2 * d0 * d0)), s=(h, w))


def run(quick: bool) -> list[dict]:
    rows = []
    configs = [("cifar_resnet20", 256, 32), ("resnet18", 16, 224)]
    if quick:
        configs = [(n, max(2, b // 8), s) for n, b, s in configs]
    for name, batch, size in configs:
        torch.manual_seed(0)
        fp = build(name).eval()
        x = torch.randn(batch, 3, size, size)
        y = torch.randint(0, 10, (batch,))
        case = f"{name} batch {batch} {size}x{size}"
        t = {"official fft2": bench(lambda: zsqfast.gaussian_lowpass(x, 80.0, method="fft")),
             "rfft2": bench(lambda: rfft_lowpass(x, 80.0)),
             "zsqfast circulant": bench(lambda: zsqfast.gaussian_lowpass(x, 80.0))}
        for k, v in t.items():
            rows.append(dict(part="low-pass d0=80", case=case, impl=k, ms=round(v * 1e3, 2),
                             ratio=f"{t['rfft2'] / v:.2f}x vs rfft2, {t['official fft2'] / v:.2f}x vs official"))
        with torch.no_grad():
            t_fwd = bench(lambda: fp(x), reps=5)
        t_off = bench(lambda: reference_gradcam(fp, x), reps=5)
        t_ours = bench(lambda: zsqfast.gradcam(fp, x), reps=5)
        for k, v in (("no-grad forward (floor)", t_fwd), ("official full backward", t_off), ("zsqfast head-only", t_ours)):
            rows.append(dict(part="Grad-CAM", case=case, impl=k, ms=round(v * 1e3, 1),
                             ratio=f"{v / t_fwd:.2f}x forward, {t_off / v:.2f}x faster than official"))
        q = zsqfast.calibrate(zsqfast.quantize_model(fp, 4, 4), [x[: max(2, batch // 4)]], freeze=True)
        opt = torch.optim.SGD(q.parameters(), lr=1e-6, momentum=0.9, nesterov=True)

        opts = dict(DEFAULTS, lambda_ce=5.0, lambda_cam=200.0)

        def train_step(method):
            def step():
                xin = zsqfast.gaussian_lowpass(x, opts["d0"]) if method == "synq" else x
                kd, ce, cam, _ = step_losses(method, fp, q, xin, y, opts)
                loss = kd + opts["lambda_ce"] * ce + opts["lambda_cam"] * cam
                opt.zero_grad()
                loss.backward()
                opt.step()
            return step

        kd_step, synq_step = train_step("kd"), train_step("synq")
        t_kd, t_synq = bench(kd_step, reps=3), bench(synq_step, reps=3)
        rows.append(dict(part="train step", case=case, impl="KD step", ms=round(t_kd * 1e3, 1), ratio="1.00x"))
        rows.append(dict(part="train step", case=case, impl="SynQ step", ms=round(t_synq * 1e3, 1),
                         ratio=f"{t_synq / t_kd:.2f}x the KD step"))
    return rows


def main() -> None:
    cli(__doc__, "bench_finetune", run,
        [("part", "15s"), ("case", "32s"), ("impl", "26s"), ("ms", "9.2f"), ("ratio", "s")])

if __name__ == "__main__":
    main()
