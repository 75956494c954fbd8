"""PSAQ-ViT's patch-similarity entropy of a vision transformer's attention outputs (timm ViT / DeiT / Swin).

For every attention block l, the block's attention output ``attn @ v`` (B, h, N, d) is averaged over the
heads, the class / prefix tokens are dropped, and the pairwise cosine similarities of the remaining patch
features form S_l (B, N', N'). Per image, the M = N'^2 similarity values v_j get a Gaussian kernel density
estimate (bandwidth ``bw`` = 0.01) evaluated at ``points`` = 10 equally spaced t_k in [lo, hi]:

    p(t_k) = 1 / (M bw sqrt(2 pi)) * sum_j exp(-(t_k - v_j)^2 / (2 bw^2)),
    H_l    = trapz_k(-(p(t_k) + 1e-4) log(p(t_k) + 1e-4), t_k)

with ``grid="batch"`` (synthesis, as PSAQ-ViT's generate_data.py) lo, hi the min / max of the whole batch's
similarities, and ``grid="image"`` (filtering: a score that does not depend on the other images) each image's own.

(PSAQ-ViT, zkkli/PSAQ-ViT; ../shared/reference/zsq-semantics.md). A high entropy means diverse patches (a
real-image-like response); PSAQ-ViT maximises ``sum_l H_l``. Swin's window attention has no class token:
each window's N_w x N_w similarities are taken, and an image's values are those of all its windows.

The grid end points are detached (they place the evaluation points, they are not optimised). Attention
outputs are read with a forward pre-hook on the block's output projection (``proj``), whose input is
``attn @ v`` transposed to (B, N, h*d) (after the optional ``norm``, an identity in DeiT / Swin).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.kde_density import kde_density


def _attention_modules(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, kind)`` for every timm attention block: kind "vit" (global, prefix tokens) or "window"."""
    found = []
    for m in model.modules():
        name = type(m).__name__
        if name == "WindowAttention" and hasattr(m, "proj"):
            found.append((m, "window"))
        elif name in ("Attention", "AttentionPoolLatent") and hasattr(m, "proj") and hasattr(m, "qkv"):
            found.append((m, "vit"))
    return found


GRIDS = ("image", "batch")


def check_grid(grid: str, name: str = "grid") -> None:
    """ValueError (naming the option ``name``) unless ``grid`` is one of :data:`GRIDS`."""
    if grid not in GRIDS:
        raise ValueError(f"{name} must be one of {GRIDS}, got {grid!r}")


def kde_entropy(values: torch.Tensor, bandwidth: float = 0.01, points: int = 10, grid: str = "image") -> torch.Tensor:
    """Entropy of a Gaussian KDE of each row of ``values`` (B, M) on ``points`` grid points over each row's
    (``grid="image"``) or the whole batch's (``"batch"``) value range (module docstring); float32 (B,)."""
    check_grid(grid)
    v = values.float()
    dims = (0, 1) if grid == "batch" else (1,)
    lo, hi = v.detach().amin(dims, keepdim=True), v.detach().amax(dims, keepdim=True)
    steps = torch.linspace(0.0, 1.0, points, device=v.device, dtype=v.dtype)
    t = (lo + (hi - lo) * steps).expand(v.shape[0], points)        # (B, K)
    # p(t_k) = mean_j N(t_k; v_j, bw) (zsqfast::kde_density: no (B, K, M) kernel matrix on the CPU)
    p = kde_density(v.contiguous(), t.contiguous(), float(bandwidth)) + 1e-4
    return torch.trapezoid(-p * torch.log(p), t, dim=1)


def patch_similarity(feat: torch.Tensor, heads: int, prefix: int) -> torch.Tensor:
    """Pairwise cosine similarities (B, N', N') of head-averaged patch features; feat is (B, N, h*d)."""
    b, n, c = feat.shape
    f = feat.reshape(b, n, heads, c // heads).mean(2)[:, prefix:]   # mean over heads, drop prefix tokens
    f = F.normalize(f.float(), dim=-1, eps=1e-8)
    return f @ f.transpose(1, 2)


class PatchEntropy:
    """``logits, entropies = pe(x)``: runs ``model`` and returns float32 (L, B), the patch-similarity entropy
    H_l of every image (columns) at every attention block (rows). Hooks stay until :meth:`remove` / ``with``."""

    def __init__(self, model: nn.Module, bandwidth: float = 0.01, points: int = 10, grid: str = "image"):
        check_grid(grid)
        self.model, self.bandwidth, self.points, self.grid = model, bandwidth, points, grid
        self.blocks = _attention_modules(model)
        if not self.blocks:
            raise ValueError(f"{type(model).__name__} has no timm attention block (Attention / WindowAttention): "
                             "patch-similarity entropy needs a vision transformer")
        self.prefix = int(getattr(model, "num_prefix_tokens", 1 if hasattr(model, "cls_token") else 0))
        self._feats: list[tuple[torch.Tensor, nn.Module, str]] = []
        self._handles = []
        for m, kind in self.blocks:
            target = m.norm if kind == "vit" and not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity) \
                else m.proj
            self._handles.append(target.register_forward_pre_hook(
                lambda _mod, inp, m=m, kind=kind: self._feats.append((inp[0], m, kind))))

    def entropies(self, batch: int) -> torch.Tensor:
        """(L, B) entropies of the last forward pass."""
        rows = []
        for feat, m, kind in self._feats:
            if kind == "vit":
                sim = patch_similarity(feat, m.num_heads, self.prefix)
                rows.append(kde_entropy(sim.reshape(batch, -1), self.bandwidth, self.points, self.grid))
            else:  # (B * windows, N_w, C): an image's values are those of all its windows
                sim = patch_similarity(feat, m.num_heads, 0)
                rows.append(kde_entropy(sim.reshape(batch, -1), self.bandwidth, self.points, self.grid))
        return torch.stack(rows)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._feats = []
        logits = self.model(x)
        with torch.autocast(x.device.type, enabled=False):  # similarities and KDE in fp32 even under autocast
            out = self.entropies(x.shape[0])
        self._feats = []
        return logits, out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "PatchEntropy":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
