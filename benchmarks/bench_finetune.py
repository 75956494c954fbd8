"""SynQ fine-tuning pieces: low-pass filter, per-batch Grad-CAM, and one training step (issue 5).

Rows:
  low-pass  official fft2 path vs an rfft2 filter (the best plain-PyTorch way) vs zsqfast (auto: banded
            separable circular convolution when the kernel is narrow, else the own separable FFT kernel
            "sepfft"; the dense circulant products and banded rows shown for comparison), each timed in its
            steady state (10 back-to-back calls before each timed one) and, at d0 = 80, also cold (10 ms
            after the previous call, the OpenMP pool asleep: what a training step that filters once sees),
            at d0 = 80 (SynQ's default) and d0 = 20 (paper grid), 256x3x32x32 and 32x3x224x224;
  Grad-CAM  a plain no-grad forward of the same batch (the floor) vs the official procedure (full backward
            through the whole network) vs pytorch-grad-cam (when installed) vs zsqfast SynQ mode
            (head-only backward) and standard mode (the GAP -> linear closed form: no backward); zsqfast runs
            its forward on a channels-last copy of the batch on the CPU, so the floor and pytorch-grad-cam are
            also shown on a channels-last batch, and zsqfast with an NCHW forward;
  step      one KD step vs one SynQ step (filter + selective CE + CAM) with zsqfast vs an official-style
            SynQ step (fft2 filter, separate CAM forwards with full backwards per model).
  CAM loss  forward + backward (dL/dA) of the CAM-alignment loss alone from A, alpha and the teacher map:
            the plain autograd composite (official style) vs the op's PyTorch reference node vs its C++ kernel,
            A 256x64x8x8 -> 32x32 (ResNet-20 batch 256) and 16x512x7x7 -> 224x224 (resnet18 batch 16).
Models: CIFAR ResNet-20 at batch 256 (32x32) and timm resnet18 at batch 16 (224x224), random weights.

How the Grad-CAM and step rows are timed: the entries of a part are called round-robin (one call of each per
round, 2 warm-up calls each, median of 5 rounds), so drift on a shared machine hits them alike; and for every
row glibc's malloc is told to keep freed memory (``_timing.keep_freed_memory``; ``ZSQFAST_BENCH_MALLOC=default``
turns that off). Both matter for the ratios: with glibc's defaults every activation of more than 128 KiB-32 MiB
is handed back to the kernel when freed and page-faulted in again on the next call (~57k minor faults, ~230 MB,
per ResNet-20 batch-256 forward here, 30-50 % of its time), and how many depends on the order of the
allocations; with the floor timed alone first, before the other rows, that made a plain no-grad forward look
SLOWER than Grad-CAM (119 vs 88 ms) although Grad-CAM runs the same forward plus a head-only backward. It is not
faster: measured with the allocator fixed (1 thread, CPU time), synq Grad-CAM is 1.0-1.05x the no-grad forward,
and a SynQ step 1.00-1.08x a KD step. The floor row is the same model, eval mode, under ``torch.no_grad()``, on
the same batch, warmed up like every other row.

Run: python benchmarks/bench_finetune.py [--threads 2] [--quick]
"""
from __future__ import annotations

import functools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zsqfast  # noqa: E402
from _timing import bench, bench_interleaved, cli, keep_freed_memory  # noqa: E402
from zsqfast.finetune.gradcam import default_layer, reference_gradcam  # noqa: E402
from zsqfast.finetune.losses import kd_loss, selective_ce  # noqa: E402
from zsqfast.finetune.trainer import DEFAULTS, activation_ste, step_losses  # noqa: E402
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
            taps = [len(zsqfast.ops.lowpass.band_taps(n, d0)) for n in shape[-2:]]
            chosen = zsqfast.ops.lowpass.auto_method(shape[-2], shape[-1], d0)
            fns = {"official fft2": lambda: zsqfast.gaussian_lowpass(x, d0, method="fft"),
                   "rfft2": lambda: rfft_lowpass(x, d0),
                   f"zsqfast auto: {chosen} ({'x'.join(map(str, taps))} taps)": lambda: zsqfast.gaussian_lowpass(x, d0)}
            for method in ("banded", "sepfft", "circulant"):
                fns[f"zsqfast {method}"] = functools.partial(zsqfast.gaussian_lowpass, x, d0, method=method)
            t = bench_interleaved(fns, reps=9, back_to_back=10)  # round-robin, each row in its steady state
            if d0 == 80.0:  # the same calls cold, 10 ms after the last one (the OpenMP pool asleep)
                cold = bench_interleaved({k: fns[k] for k in ("official fft2", "rfft2", "zsqfast sepfft")}, reps=9,
                                         pause=0.01)
                t.update({f"{k} (cold)": v for k, v in cold.items()})
            for k, v in t.items():
                sfx = " (cold)" if k.endswith(" (cold)") else ""  # cold rows against the cold anchors
                rows.append(dict(part=f"low-pass d0={d0:g}", case="x".join(map(str, shape)), impl=k,
                                 ms=round(v * 1e3, 2),
                                 ratio=f"{t['rfft2' + sfx] / v:.2f}x vs rfft2{sfx}, "
                                       f"{t['official fft2' + sfx] / v:.2f}x vs official{sfx}"))
    return rows


CONFIGS = [("cifar_resnet20", 256, 32), ("resnet18", 16, 224)]


def run(quick: bool) -> list[dict]:
    rows = lowpass_rows(quick)
    for name, batch, size in CONFIGS:
        rows += model_rows(name, max(2, batch // 8) if quick else batch, size)
    return rows + cam_loss_rows(quick)


def cam_loss_rows(quick: bool) -> list[dict]:
    """CAM-alignment loss forward + backward: autograd composite vs reference node vs C++ kernel."""
    from zsqfast.finetune.cam_loss import cam_mse
    from zsqfast.finetune.gradcam import finish_map

    rows = []
    for b, k, h, size in [(256, 64, 8, 32), (16, 512, 7, 224)]:
        b = max(2, b // 8) if quick else b
        a = torch.randn(b, k, h, h, requires_grad=True)
        alpha, t = torch.rand(b, k), torch.rand(b, size, size)

        def composite():
            m = finish_map((alpha[:, :, None, None] * a).sum(1, keepdim=True), (size, size), "synq")
            return torch.autograd.grad(F.mse_loss(m, t), a)

        def node(backend):
            def fn():
                with zsqfast.use_backend(backend):
                    return torch.autograd.grad(cam_mse(a, alpha, t), a)
            return fn

        t_ = bench_interleaved({"autograd composite (official)": composite, "reference node": node("reference"),
                                "zsqfast C++ kernel": node("cpp")}, reps=7)
        for impl, v in t_.items():
            rows.append(dict(part="CAM loss f+b", case=f"A {b}x{k}x{h}x{h} -> {size}x{size}", impl=impl,
                             ms=round(v * 1e3, 2),
                             ratio=f"{t_['reference node'] / v:.2f}x vs reference node, "
                                   f"{t_['autograd composite (official)'] / v:.2f}x vs composite"))
    return rows


def model_rows(name: str, batch: int, size: int) -> list[dict]:
    """The Grad-CAM and train-step rows of one model and batch (random weights)."""
    rows = []
    torch.manual_seed(0)
    fp = build(name).eval()
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    case = f"{name} batch {batch} {size}x{size}"

    def floor():  # the same model (eval), the same batch, no graph: what any Grad-CAM must at least cost
        with torch.no_grad():
            return fp(x)

    x_cl = x.contiguous(memory_format=torch.channels_last)

    def floor_cl():  # the same forward on a channels-last batch (what zsqfast.gradcam runs on the CPU)
        with torch.no_grad():
            return fp(x_cl)

    fns = {"no-grad forward (floor)": floor,
           "no-grad forward, channels-last x": floor_cl,
           "official full backward": lambda: reference_gradcam(fp, x)}
    pgc_key = "pytorch-grad-cam (same layer)"
    if pytorch_grad_cam is not None:
        pgc = pytorch_grad_cam.GradCAM(model=fp, target_layers=[default_layer(fp)])
        fns[pgc_key] = lambda: pgc(input_tensor=x, targets=None)
        fns["pytorch-grad-cam, channels-last x"] = lambda: pgc(input_tensor=x_cl, targets=None)
    fns["zsqfast synq (head-only bwd)"] = lambda: zsqfast.gradcam(fp, x)
    fns["zsqfast synq, NCHW forward"] = lambda: zsqfast.gradcam(fp, x, channels_last=False)
    fns["zsqfast standard (closed form)"] = lambda: zsqfast.gradcam(fp, x, mode="standard")
    cams = bench_interleaved(fns, reps=5)
    t_fwd = cams["no-grad forward (floor)"]
    for k, v in cams.items():
        vs_pgc = f", {cams[pgc_key] / v:.2f}x faster than pytorch-grad-cam" if pgc_key in cams else ""
        rows.append(dict(part="Grad-CAM", case=case, impl=k, ms=round(v * 1e3, 1),
                         ratio=f"{v / t_fwd:.2f}x forward, {cams['official full backward'] / v:.2f}x faster "
                               f"than official{vs_pgc}"))
    q = zsqfast.calibrate(zsqfast.quantize_model(fp, 4, 4), [x[: max(2, batch // 4)]], freeze=True)
    opt = torch.optim.SGD(q.parameters(), lr=1e-6, momentum=0.9, nesterov=True)
    opts = dict(DEFAULTS, lambda_ce=5.0, lambda_cam=200.0)

    def train_step(method):
        def step():
            xin = zsqfast.gaussian_lowpass(x, opts["d0"]) if method == "synq" else x
            with activation_ste(q, opts["act_ste"]):  # as finetune() trains (clipped STE by default)
                loss = step_losses(method, fp, q, xin, y, opts)["loss"]
                opt.zero_grad()
                loss.backward()
            opt.step()
        return step

    @activation_ste(q, "identity")  # the official codes' STE
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

    steps = bench_interleaved({"kd": train_step("kd"), "synq": train_step("synq"), "official": official_step},
                              reps=5)
    t_kd, t_synq, t_off = steps["kd"], steps["synq"], steps["official"]
    for k, v in (("KD step", t_kd), ("SynQ step (zsqfast)", t_synq), ("SynQ step (official style)", t_off)):
        rows.append(dict(part="train step", case=case, impl=k, ms=round(v * 1e3, 1),
                         ratio=f"{v / t_kd:.2f}x the KD step, {t_off / v:.2f}x faster than official style"))
    return rows


def main() -> None:
    print(keep_freed_memory())
    legend = "" if pytorch_grad_cam is not None else "pytorch-grad-cam is not installed: its Grad-CAM row is left out"
    cli(__doc__, "bench_finetune", run,
        [("part", "15s"), ("case", "32s"), ("impl", "32s"), ("ms", "9.2f"), ("ratio", "s")], legend)


if __name__ == "__main__":
    main()
