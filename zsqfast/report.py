"""The pictures and the Markdown report of ``zsqfast demo`` (PNG files written by :mod:`zsqfast.png`).

Pictures (each function writes one PNG and returns its caption, which names the colours and axis ranges):

* :func:`samples_figure`   synthetic images before (top row) and after (bottom row) SynQ's low-pass filter
* :func:`spectrum_figure`  radial amplitude spectra (:func:`zsqfast.amplitude_spectrum`), log scale
* :func:`gradcam_figure`   real images, then the Grad-CAM maps (:func:`zsqfast.gradcam`) of the FP32 model and of
                           the quantized model laid over them
* :func:`curves_figure`    fine-tuning loss and held-out accuracy per epoch (finetune's JSON log)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ._fileio import atomic_write_bytes
from .png import PALETTE, Chart, grid, heat_rgb, to_uint8, write_png


def to_display(x: torch.Tensor, mean, std) -> list[np.ndarray]:
    """Normalised float (N, C, H, W) -> N uint8 (H, W, 3) images (channels de-normalised, gray -> RGB)."""
    c = x.shape[1]
    m = torch.tensor(list(mean)[:c], dtype=torch.float32).view(1, c, 1, 1)
    s = torch.tensor(list(std)[:c], dtype=torch.float32).view(1, c, 1, 1)
    px = (x.detach().float().cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    if c == 1:
        px = np.repeat(px, 3, axis=3)
    return [to_uint8(p, 0.0, 1.0) for p in px]


def _scale(h: int) -> int:
    return max(1, 64 // h)


def samples_figure(path, before: torch.Tensor, after: torch.Tensor, mean, std, d0: float) -> str:
    n = min(8, len(before))
    tiles = to_display(before[:n], mean, std) + to_display(after[:n], mean, std)
    write_png(path, grid(tiles, n, _scale(before.shape[-2])))
    return (f"Synthetic images (zero-shot, from the model's BatchNorm statistics): top row as synthesized, bottom "
            f"row after SynQ's Gaussian low-pass filter (d0 = {d0:g}), what the SynQ student trains on.")


def spectrum_figure(path, series: dict) -> str:
    """``series``: name -> (radius (R,), mean amplitude (R,)) tensors; drawn in PALETTE order."""
    ys = np.concatenate([a.numpy()[1:] for _, a in series.values()])  # radius 0 (DC) is off the scale
    r_max = max(float(r[-1]) for r, _ in series.values())
    chart = Chart((1, r_max), (float(ys.min()), float(ys.max())), log_y=True)
    names = []
    for (name, (r, a)), color in zip(series.items(), PALETTE):
        chart.line(r.numpy()[1:], a.numpy()[1:], color)
        names.append(f"{color}: {name}")
    write_png(path, chart.img)
    return (f"Radial amplitude spectrum (mean |FFT| per integer radius; x: radius 1..{r_max:g} bins, y: log scale "
            f"{ys.min():.3g}..{ys.max():.3g}). " + "; ".join(names) + ". At SynQ's default d0 = 80 the filter "
            "barely touches small images (gain >= 0.96 at 32x32), so its curve lies on the unfiltered one.")


def gradcam_figure(path, images: torch.Tensor, cam_fp: torch.Tensor, cam_q: torch.Tensor, mean, std,
                   q_name: str) -> str:
    n = min(8, len(images))
    pics = to_display(images[:n], mean, std)
    rows = list(pics)
    for cams in (cam_fp, cam_q):
        for p, c in zip(pics, cams[:n].detach().cpu().numpy()):
            rows.append((0.45 * p + 0.55 * heat_rgb(c)).astype(np.uint8))
    write_png(path, grid(rows, n, _scale(images.shape[-2])))
    return (f"Grad-CAM (SynQ mode, last conv layer, each model's own prediction) on real held-out images: top row "
            f"the images, middle row the FP32 model, bottom row {q_name}; red = high, blue = low.")


def curves_figure(path, histories: dict) -> str:
    """``histories``: method name -> finetune's per-epoch dicts (``loss``, optional ``accuracy``)."""
    panels, parts = [], []
    for key, label, log_y in (("loss", "training loss", True), ("accuracy", "held-out top-1 %", False)):
        vals = [r[key] for h in histories.values() for r in h if key in r]
        if not vals:
            continue
        epochs = max(len(h) for h in histories.values())
        log_y = log_y and min(vals) > 0  # a log axis needs positive values: else linear (and said so below)
        chart = Chart((1, max(epochs, 2)), (min(vals), max(vals)), log_y=log_y)
        for (name, h), color in zip(histories.items(), PALETTE):
            pts = [(r["epoch"], r[key]) for r in h if key in r]
            if pts:
                chart.line(*zip(*pts), color)
        panels.append(chart.img)
        parts.append(f"{label} ({'log scale ' if log_y else ''}{min(vals):.4g}..{max(vals):.4g})")
    if not panels:
        raise ValueError("no fine-tuning history to draw")
    gap = np.full((panels[0].shape[0], 8, 3), 255, np.uint8)
    write_png(path, np.concatenate([p for pair in zip(panels, [gap] * len(panels)) for p in pair][:-1], axis=1))
    colors = "; ".join(f"{c}: {n}" for n, c in zip(histories, PALETTE))
    return f"Fine-tuning per epoch (x: epoch 1..{max(len(h) for h in histories.values())}): " + \
        ", ".join(f"{'left' if i == 0 else 'right'}: {p}" for i, p in enumerate(parts)) + f". {colors}."


def write_markdown(path, title: str, lines: list[str], figures: list[tuple[str, str]]) -> Path:
    """``lines`` of Markdown, then each ``(png file name, caption)`` as an embedded picture."""
    path = Path(path)
    body = [f"# {title}", ""] + lines + [""]
    for name, caption in figures:
        body += [f"![{Path(name).stem}]({name})", "", f"*{caption}*", ""]
    text = "\n".join(body).encode()
    atomic_write_bytes(path, lambda f: f.write(text))
    return path
