"""Dependency-free PNG output (zlib + struct) and the few raster drawings the demo report needs.

Images are numpy uint8 arrays (H, W) grayscale or (H, W, 3) RGB. :func:`write_png` writes 8-bit, non-interlaced
PNGs with filter type 0 on every row (PNG spec, ISO/IEC 15948): signature, IHDR, one IDAT, IEND, CRC-32 per
chunk. Charts are drawn into arrays by :class:`Chart` (axes box, grid, polylines); captions carry the text.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from ._fileio import atomic_write_bytes

SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: line colours of the charts, in order (named in the report's captions)
PALETTE = {"blue": (31, 119, 180), "orange": (255, 127, 14), "green": (44, 160, 44), "red": (214, 39, 40),
           "purple": (148, 103, 189)}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(img: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W) or (H, W, 3) array."""
    a = np.ascontiguousarray(img)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3) or 0 in a.shape[:2]:
        raise ValueError(f"encode_png expects uint8 (H, W) or (H, W, 3), got {a.dtype} {a.shape}")
    h, w = a.shape[:2]
    color = 2 if a.ndim == 3 else 0
    raw = np.concatenate([np.zeros((h, 1), np.uint8), a.reshape(h, -1)], axis=1).tobytes()  # filter 0 per row
    ihdr = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")


def write_png(path: str | Path, img: np.ndarray) -> Path:
    """``img`` encoded as PNG into ``path`` (atomically: an interrupted write leaves no truncated file)."""
    path = Path(path)
    data = encode_png(img)
    atomic_write_bytes(path, lambda f: f.write(data))
    return path


def to_uint8(x: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Linear map of ``[lo, hi]`` (default: x's min / max) to 0..255, clipped."""
    lo = float(np.min(x)) if lo is None else lo
    hi = float(np.max(x)) if hi is None else hi
    return np.clip((x - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def grid(tiles: list[np.ndarray], cols: int, scale: int = 1, pad: int = 2, bg: int = 255) -> np.ndarray:
    """Tile uint8 (h, w, 3) images (all one size) into rows of ``cols``, each upscaled ``scale`` x (nearest)."""
    tiles = [np.kron(t, np.ones((scale, scale, 1), np.uint8)) for t in tiles]
    h, w = tiles[0].shape[:2]
    rows = (len(tiles) + cols - 1) // cols
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), bg, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = t
    return out


def heat_rgb(m: np.ndarray) -> np.ndarray:
    """A [0, 1] map (h, w) -> uint8 (h, w, 3) on a blue -> green -> yellow -> red ramp."""
    stops = np.array([[0, 0, 128], [0, 160, 255], [60, 200, 60], [255, 220, 0], [220, 20, 20]], np.float64)
    t = np.clip(m, 0, 1) * (len(stops) - 1)
    i = np.minimum(t.astype(int), len(stops) - 2)
    f = (t - i)[..., None]
    return (stops[i] * (1 - f) + stops[i + 1] * f + 0.5).astype(np.uint8)


class Chart:
    """A white canvas with a plot box; :meth:`line` draws a series in data coordinates (``log_y`` optional)."""

    def __init__(self, xlim, ylim, width: int = 420, height: int = 260, log_y: bool = False, margin: int = 16):
        self.img = np.full((height, width, 3), 255, np.uint8)
        self.log_y, self.m = log_y, margin
        self.xlim = (float(xlim[0]), float(xlim[1]) if xlim[1] > xlim[0] else float(xlim[0]) + 1)
        ylo, yhi = (np.log10(max(ylim[0], 1e-12)), np.log10(max(ylim[1], 1e-12))) if log_y else ylim
        self.ylim = (float(ylo), float(yhi) if yhi > ylo else float(ylo) + 1)
        h, w = height - 1, width - 1
        for k in range(1, 5):  # light grid: quarters
            self.img[margin + (h - 2 * margin) * k // 4, margin:w - margin + 1] = 225
            self.img[margin:h - margin + 1, margin + (w - 2 * margin) * k // 4] = 225
        self.img[[margin, h - margin], margin:w - margin + 1] = 0
        self.img[margin:h - margin + 1, [margin, w - margin]] = 0

    def _px(self, x: float, y: float) -> tuple[float, float]:
        h, w = self.img.shape[0] - 1 - 2 * self.m, self.img.shape[1] - 1 - 2 * self.m
        if self.log_y:
            y = np.log10(max(y, 1e-12))
        u = (x - self.xlim[0]) / (self.xlim[1] - self.xlim[0])
        v = (y - self.ylim[0]) / (self.ylim[1] - self.ylim[0])
        return self.m + u * w, self.m + (1 - v) * h

    def line(self, xs, ys, color: str, thickness: int = 2) -> "Chart":
        rgb = PALETTE[color]
        pts = [self._px(float(x), float(y)) for x, y in zip(xs, ys) if np.isfinite(y)]
        if len(pts) == 1:
            pts = pts * 2
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
            for t in np.linspace(0.0, 1.0, n + 1):
                cx, cy = int(round(x0 + (x1 - x0) * t)), int(round(y0 + (y1 - y0) * t))
                r = thickness // 2
                self.img[max(cy - r, 0):cy + r + 1, max(cx - r, 0):cx + r + 1] = rgb
        return self
