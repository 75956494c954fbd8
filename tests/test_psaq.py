"""PSAQ-ViT: patch-similarity entropy against a naive re-computation of attn @ v, the psaq-vit method, ViT filter."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import zsqfast
from zsqfast.synthesis.patch_entropy import PatchEntropy, kde_entropy

from ._shapes import tiny_bn_model, tiny_vit


def _naive_entropies(model, x, bw=0.01, points=10):
    """(L, B): attn @ v recomputed from each block's input with explicit softmax(q k^T / sqrt(d)), then
    per image a loop-based cosine matrix, KDE and trapezoid entropy in float64 NumPy."""
    inputs = []
    hs = [blk.attn.register_forward_hook(lambda m, inp, out: inputs.append((m, inp[0].detach())))
          for blk in model.blocks]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    rows = []
    for attn, t in inputs:
        b, n, c = t.shape
        h, d = attn.num_heads, c // attn.num_heads
        with torch.no_grad():
            qkv = attn.qkv(t).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).double()
        q, k, v = qkv[0], qkv[1], qkv[2]
        av = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), -1) @ v        # (B, h, N, d)
        f = av.mean(1)[:, 1:].numpy()                                               # mean heads, drop cls
        row = []
        for i in range(b):
            sim = np.array([[fa @ fb / (np.linalg.norm(fa) * np.linalg.norm(fb)) for fb in f[i]] for fa in f[i]])
            vals = sim.ravel()
            grid = np.linspace(vals.min(), vals.max(), points)
            p = np.array([np.exp(-(t_ - vals) ** 2 / (2 * bw * bw)).mean() / (bw * math.sqrt(2 * math.pi))
                          for t_ in grid])
            y = -p * np.log(p + 1e-4)
            row.append(float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(grid))))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("fused", [True, False])
def test_patch_entropy_matches_naive(fused):
    model = tiny_vit(fused_attn=fused)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with PatchEntropy(model) as pe, torch.no_grad():
        _, ent = pe(x)
    want = _naive_entropies(model, x)
    assert ent.shape == (2, 3)
    assert torch.allclose(ent.double(), want, rtol=2e-4, atol=2e-4), (ent, want)
    assert not any(m._forward_pre_hooks for m in model.modules())  # removed on exit


def test_kde_entropy_of_a_spread_sample_exceeds_a_peaked_one():
    g = torch.Generator().manual_seed(0)
    spread = torch.rand(1, 400, generator=g) * 2 - 1
    peaked = torch.cat([torch.zeros(1, 390), torch.ones(1, 10)], 1) + 1e-3 * torch.randn(1, 400, generator=g)
    assert kde_entropy(spread) > kde_entropy(peaked)


def test_psaq_vit_synthesis_raises_entropy_and_resumes(tmp_path):
    model = tiny_vit()
    kw = dict(method="psaq-vit", batch_size=4, iterations=25, seed=2, progress=False, input_shape=(3, 16, 16),
              tv_weight=0.0)
    full = zsqfast.synthesize(model, 6, **kw)
    assert full.meta["hyperparameters"]["lr"] == 0.2 and full.images.shape == (6, 3, 16, 16)
    start = torch.randn((4, 3, 16, 16), generator=torch.Generator().manual_seed(2 * 1_000_003))
    with PatchEntropy(model) as pe, torch.no_grad():
        h0, h1 = pe(start)[1].sum(0).mean(), pe(full.images[:4])[1].sum(0).mean()
    assert h1 > h0, (h0, h1)
    zsqfast.synthesize(model, 6, out=tmp_path, max_batches=1, **kw)
    resumed = zsqfast.synthesize(model, 6, out=tmp_path, **kw)
    assert torch.equal(resumed.images, full.images)


def test_psaq_vit_needs_attention_and_bns_needs_batchnorm():
    with pytest.raises(ValueError, match="no timm attention"):
        zsqfast.synthesize(tiny_bn_model(), 2, method="psaq-vit", iterations=1, progress=False, input_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        zsqfast.synthesize(tiny_vit(), 2, method="hast", iterations=1, progress=False, input_shape=(3, 16, 16))


def test_filter_images_vit_keeps_low_energy_high_entropy():
    model = tiny_vit()
    x = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    r = zsqfast.filter_images(model, x, energy_keep=0.5, entropy_keep=0.5, batch_size=5)
    assert r.bn_sensitivity is None and r.patch_entropy.shape == (12,)
    with PatchEntropy(model) as pe, torch.no_grad():
        logits, h = pe(x)
    assert torch.allclose(r.patch_entropy, h.double().sum(0), atol=1e-4)  # fp32, batch 5 vs 12
    assert torch.allclose(r.energy, -torch.logsumexp(logits.double(), 1), atol=1e-5)
    low_e = set(torch.argsort(r.energy)[:6].tolist())
    high_h = set(torch.argsort(-r.patch_entropy)[:6].tolist())
    assert r.keep.tolist() == sorted(low_e & high_h)
    with pytest.raises(ValueError, match="no BatchNorm2d layer and no timm attention"):
        zsqfast.filter_images(nn.Sequential(nn.Flatten(), nn.Linear(768, 2)), x)


def test_swin_window_attention_and_learning_rate():
    import timm

    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=28, window_size=7,
                             depths=(1, 1), num_heads=(1, 2), embed_dim=8, num_classes=3).eval()
    x = torch.randn(2, 3, 28, 28)
    with PatchEntropy(swin) as pe, torch.no_grad():
        _, ent = pe(x)
        _, ent1 = pe(x[1:])
    assert ent.shape == (2, 2) and torch.isfinite(ent).all()
    assert torch.allclose(ent[:, 1], ent1[:, 0], atol=1e-5)  # an image's windows are its own (no mixing)
    ds = zsqfast.synthesize(swin, 2, method="psaq-vit", iterations=2, progress=False, input_shape=(3, 28, 28))
    assert ds.meta["hyperparameters"]["lr"] == 0.25  # PSAQ-ViT's Swin setting
