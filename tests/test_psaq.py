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
            y = -(p + 1e-4) * np.log(p + 1e-4)
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


def test_psaq_vit_recipe_follows_the_official_generation():
    """Two stages, each with a warm-up + cosine schedule and its own jitter limit (one offset for both axes),
    Adam betas (0.5, 0.9), the images clipped to the pixel range after every step, one TV target per batch."""
    from zsqfast.synthesis import recipes
    from zsqfast.synthesis.engine import _Batch, _Objective

    model = tiny_vit()
    hp = recipes.resolve("psaq-vit", {}, (3, 224, 224), model)
    assert hp["jitter"] == (15, 30) and hp["betas"] == (0.5, 0.9) and hp["stages"] == 2 and hp["clip"]
    assert hp["kde_grid"] == "batch" and hp["mean"] == tuple(model.pretrained_cfg["mean"])
    hp32 = recipes.resolve("psaq-vit", {}, (3, 32, 32), model)
    assert hp32["jitter"] == (2, 4)
    assert [recipes.stage_of(i, 1000, 2)[:2] for i in (0, 499, 500, 999)] == [(0, 0), (0, 499), (1, 0), (1, 499)]
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    for _ in range(20):  # shared offset: the roll moves rows and columns by the same amount
        y = recipes.augment(x, dict(hp32, flip=False), g, stage=1)
        shifts = [(dx, dy) for dx in range(-4, 5) for dy in range(-4, 5)
                  if torch.equal(y, torch.roll(x, shifts=(dx, dy), dims=(2, 3)))]
        assert shifts and all(dx == dy for dx, dy in shifts)
    hp = recipes.resolve("psaq-vit", {"warmup": 2}, (3, 16, 16), model)
    obj = _Objective(model, hp, "fp32", "cpu")
    try:
        state = _Batch(obj, (3, 16, 16), 5, 0, 4, 0, False, torch.device("cpu"), iterations=10)
        target, lrs = state.tv_target, []
        lo, hi = recipes.clip_bounds(hp, 3, "cpu", torch.float32)
        for it in range(10):
            lrs.append(state.opt.param_groups[0]["lr"])
            state.step(it)
            assert bool(((state.x >= lo) & (state.x <= hi)).all())
        assert state.tv_target == target and 2500 <= target <= 3000
    finally:
        obj.close()
    lr = hp["lr"]
    assert lrs[0] == pytest.approx(lr / 2) and lrs[1] == pytest.approx(lr)  # warm-up of 2 iterations
    assert lrs[5] == pytest.approx(lr / 2) and lrs[6] == pytest.approx(lr)  # the second stage restarts it
    assert lrs[4] < lrs[2]


def test_runs_stored_before_new_hyperparameters_still_resume(tmp_path):
    """A stored HAST run whose index lacks the hyperparameters added later (their values then were
    recipes.LEGACY's) resumes; a stored value that differs is still refused."""
    import json

    from zsqfast.synthesis import recipes

    kw = dict(iterations=2, batch_size=2, progress=False, input_shape=(3, 8, 8))
    zsqfast.synthesize(tiny_bn_model(), 4, out=tmp_path, max_batches=1, **kw)
    index = json.loads((tmp_path / "index.json").read_text())
    for k in recipes.LEGACY:
        del index["meta"]["hyperparameters"][k]
    (tmp_path / "index.json").write_text(json.dumps(index))
    assert torch.equal(zsqfast.synthesize(tiny_bn_model(), 4, out=tmp_path, **kw).images,
                       zsqfast.synthesize(tiny_bn_model(), 4, **kw).images)
    with pytest.raises(ValueError, match="clip"):
        zsqfast.synthesize(tiny_bn_model(), 4, out=tmp_path, clip=True, mean=(0.5,), std=(0.5,), **kw)


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
