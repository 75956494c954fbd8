"""SynQ fine-tuning pieces: low-pass filter, per-batch Grad-CAM, and one training step (issue 5).

Rows:
  low-pass  official fft2 path vs an rfft2 filter (the best plain-PyTorch way) vs zsqfast (auto: banded
            separable circular convolution when the kernel is narrow, else the BLAS circulant products for
            small images and a cached-mask rfft2 for large ones),
            at d0 = 80 (SynQ's default) and d0 = 20 (paper grid), 256x3x32x32 and 32x3x224x224;
  Grad-CAM  a plain no-grad forward of the same batch (the floor) vs the official procedure (full backward
            through the whole network) vs pytorch-grad-cam (when installed) vs zsqfast SynQ mode
            (head-only backward) and standard mode (the GAP -> linear closed form: no backward);
  step      one KD step vs one SynQ step (filter + selective CE + CAM) with zsqfast vs an official-style
            SynQ step (fft2 filter, separate CAM forwards with full backwards per model).
Models: CIFAR ResNet-20 at batch 256 (32x32) and timm resnet18 at batch 16 (224x224), random weights.

Run: python benchmarks/bench_finetune.py [--threads 2] [--quick]
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zsqfast  # noqa: E402
from _timing import bench, cli  # noqa: E402
from zsqfast.finetune.gradcam import default_layer, reference_gradcam  # noqa: E402
from zsqfast.finetune.losses import kd_loss, selective_ce  # noqa: E402
from zsqfast.finetune.trainer import DEFAULTS, step_losses  # noqa: E402
from zsqfast.models import build  # noqa: E402

try:
    import pytorch_grad_cam
except ImportError:  # test-only dependency
    pytorch_grad_cam = None


def rfft_lowpass(x, d0):
    h, w = x.shape[-2:]
    fy = torch.fft.fftfreq(h, d=1.0 / h)[:, None]
    fx = torch.fft.rfftfreq(w, d=1.0 / w)[None, :]
    return torch.fft.irfft2(torch.fft.rfft2(x) * torch.exp(-(fy**2 + fx**2) / (2 * d0 * d0)), s=(h, w))


def lowpass_rows(quick: bool) -> list[dict]:
    rows = []
    shapes = [(256, 3, 32, 32), (32, 3, 224, 224)] if not quick else [(32, 3, 32, 32), (4, 3, 224, 224)]
    for shape in shapes:
        x = torch.randn(*shape)
        for d0 in (80.0, 20.0):
            t = {"official fft2": bench(lambda: zsqfast.gaussian_lowpass(x, d0, method="fft"), reps=5),
                 "rfft2": bench(lambda: rfft_lowpass(x, d0), reps=5)}
            taps = [len(zsqfast.ops.lowpass.band_taps(n, d0)) for n in shape[-2:]]
            chosen = zsqfast.ops.lowpass.auto_method(shape[-2], shape[-1], d0)
            t[f"zsqfast auto: {chosen} ({'x'.join(map(str, taps))} taps)"] = bench(
                lambda: zsqfast.gaussian_lowpass(x, d0), reps=5)
            t["zsqfast banded"] = bench(lambda: zsqfast.gaussian_lowpass(x, d0, method="banded"), reps=5)
            t["zsqfast circulant"] = bench(lambda: zsqfast.gaussian_lowpass(x, d0, method="circulant"), reps=5)
            for k, v in t.items():
                rows.append(dict(part=f"low-pass d0={d0:g}", case="x".join(map(str, shape)), impl=k,
                                 ms=round(v * 1e3, 2),
                                 ratio=f"{t['rfft2'] / v:.2f}x vs rfft2, {t['official fft2'] / v:.2f}x vs official"))
    return rows


def run(quick: bool) -> list[dict]:
    rows = lowpass_rows(quick)
    configs = [("cifar_resnet20", 256, 32), ("resnet18", 16, 224)]
    if quick:
        configs = [(n, max(2, b // 8), s) for n, b, s in configs]
    for name, batch, size in configs:
        torch.manual_seed(0)
        fp = build(name).eval()
        x = torch.randn(batch, 3, size, size)
        y = torch.randint(0, 10, (batch,))
        case = f"{name} batch {batch} {size}x{size}"
        with torch.no_grad():
            t_fwd = bench(lambda: fp(x), reps=5)
        cams = {"no-grad forward (floor)": t_fwd,
                "official full backward": bench(lambda: reference_gradcam(fp, x), reps=5)}
        if pytorch_grad_cam is not None:
            layer = default_layer(fp)
            pgc = pytorch_grad_cam.GradCAM(model=fp, target_layers=[layer])
            cams["pytorch-grad-cam (same layer)"] = bench(lambda: pgc(input_tensor=x, targets=None), reps=5)
        cams["zsqfast synq (head-only bwd)"] = bench(lambda: zsqfast.gradcam(fp, x), reps=5)
        cams["zsqfast standard (closed form)"] = bench(lambda: zsqfast.gradcam(fp, x, mode="standard"), reps=5)
        for k, v in cams.items():
            rows.append(dict(part="Grad-CAM", case=case, impl=k, ms=round(v * 1e3, 1),
                             ratio=f"{v / t_fwd:.2f}x forward, {cams['official full backward'] / v:.2f}x faster "
                                   "than official"))
        q = zsqfast.calibrate(zsqfast.quantize_model(fp, 4, 4), [x[: max(2, batch // 4)]], freeze=True)
        opt = torch.optim.SGD(q.parameters(), lr=1e-6, momentum=0.9, nesterov=True)
        opts = dict(DEFAULTS, lambda_ce=5.0, lambda_cam=200.0)

        def train_step(method):
            def step():
                xin = zsqfast.gaussian_lowpass(x, opts["d0"]) if method == "synq" else x
                loss = step_losses(method, fp, q, xin, y, opts)["loss"]
                opt.zero_grad()
                loss.backward()
                opt.step()
            return step

        def official_step():
            xin = torch.nan_to_num(zsqfast.gaussian_lowpass(x, opts["d0"], method="fft"))
            with torch.no_grad():
                t = fp(xin)
            s = q(xin)
            ce, _ = selective_ce(s, t, y, opts["tau"])
            cam_t = reference_gradcam(fp, xin)           # extra teacher forward + full backward
            cam_s = reference_gradcam(q, xin, differentiable=True)  # extra student forward + full backward
            loss = kd_loss(s, t) + opts["lambda_ce"] * ce + opts["lambda_cam"] * F.mse_loss(cam_t, cam_s)
            opt.zero_grad()
            loss.backward()
            opt.step()

        t_kd, t_synq = bench(train_step("kd"), reps=3), bench(train_step("synq"), reps=3)
        t_off = bench(official_step, reps=3)
        for k, v in (("KD step", t_kd), ("SynQ step (zsqfast)", t_synq), ("SynQ step (official style)", t_off)):
            rows.append(dict(part="train step", case=case, impl=k, ms=round(v * 1e3, 1),
                             ratio=f"{v / t_kd:.2f}x the KD step, {t_off / v:.2f}x faster than official style"))
    return rows


def main() -> None:
    legend = "" if pytorch_grad_cam is not None else "pytorch-grad-cam is not installed: its Grad-CAM row is left out"
    cli(__doc__, "bench_finetune", run,
        [("part", "15s"), ("case", "32s"), ("impl", "32s"), ("ms", "9.2f"), ("ratio", "s")], legend)


if __name__ == "__main__":
    main()
