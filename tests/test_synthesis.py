"""synthesize(): it works on the real CIFAR ResNet-20, resumes exactly, stores atomically, rejects bad input."""
import json

import pytest
import torch
import torch.nn as nn

import zsqfast
from zsqfast.data import data_dir
from zsqfast.models import build

from ._shapes import tiny_bn_model


def test_cifar_resnet20_short_run_matches_statistics_and_labels():
    if not (data_dir() / "cifar10" / "resnet20_cifar10.pt").exists():
        pytest.skip(f"pretrained checkpoint not found under {data_dir()} (set ZSQFAST_DATA)")
    model = zsqfast.models.load_cifar_resnet(20)
    ds = zsqfast.synthesize(model, 32, batch_size=32, iterations=40, seed=0, progress=False)
    assert ds.images.shape == (32, 3, 32, 32) and ds.labels.shape == (32,)
    with zsqfast.BNSLoss(model) as bns, torch.no_grad():
        _, before = bns(torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(9)))
        _, after = bns(ds.images)
        acc = (model(ds.images).argmax(1) == ds.labels).float().mean().item()
    assert after < before / 5, (before, after)
    assert acc > 0.5  # chance is 0.1
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_resume_equals_uninterrupted(tmp_path):
    model = tiny_bn_model()
    kw = dict(batch_size=4, iterations=6, seed=3, progress=False, input_shape=(3, 8, 8))
    full = zsqfast.synthesize(model, 10, **kw)
    part = zsqfast.synthesize(model, 10, out=tmp_path, max_batches=1, **kw)  # "interrupted" after batch 0
    assert len(part) == 4
    index = json.loads((tmp_path / "index.json").read_text())
    assert sorted(index["batches"]) == ["0"] and index["meta"]["num_batches"] == 3
    resumed = zsqfast.synthesize(model, 10, out=tmp_path, **kw)
    assert torch.equal(resumed.images, full.images) and torch.equal(resumed.labels, full.labels)
    loaded = zsqfast.SyntheticDataset.load(tmp_path)
    assert torch.equal(loaded.images, full.images) and len(loaded.meta["final_losses"]) == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_rejects_a_different_run_in_the_same_directory(tmp_path):
    model = tiny_bn_model()
    kw = dict(batch_size=4, iterations=2, progress=False, input_shape=(3, 8, 8))
    zsqfast.synthesize(model, 4, out=tmp_path, seed=0, **kw)
    with pytest.raises(ValueError, match="seed"):
        zsqfast.synthesize(model, 4, out=tmp_path, seed=1, **kw)


def test_max_batches_zero_returns_what_is_stored(tmp_path):
    """max_batches=0 makes no batch: an empty set on a fresh directory (and without one), the stored batches
    otherwise; a negative count is refused."""
    model = tiny_bn_model()
    kw = dict(batch_size=4, iterations=2, seed=3, progress=False, input_shape=(3, 8, 8))
    for out in (tmp_path, None):
        empty = zsqfast.synthesize(model, 10, out=out, max_batches=0, **kw)
        assert empty.images.shape == (0, 3, 8, 8) and empty.labels.dtype == torch.int64 and len(empty) == 0
        assert empty.meta["batches"] == [] and empty.meta["final_losses"] == []
    one = zsqfast.synthesize(model, 10, out=tmp_path, max_batches=1, **kw)
    again = zsqfast.synthesize(model, 10, out=tmp_path, max_batches=0, **kw)
    assert torch.equal(again.images, one.images) and again.meta["computed"] == []
    with pytest.raises(ValueError, match="max_batches"):
        zsqfast.synthesize(model, 10, max_batches=-1, **kw)


def test_incomplete_set_cannot_be_loaded(tmp_path):
    zsqfast.synthesize(tiny_bn_model(), 8, out=tmp_path, batch_size=4, iterations=1, max_batches=1,
                       progress=False, input_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="incomplete"):
        zsqfast.SyntheticDataset.load(tmp_path)


def test_deepinversion_method_runs():
    ds = zsqfast.synthesize(tiny_bn_model(), 4, method="deepinversion", batch_size=4, iterations=3,
                            progress=False, input_shape=(3, 8, 8))
    assert torch.isfinite(ds.images).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        zsqfast.synthesize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(144, 3)), 4, iterations=1,
                           progress=False, input_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="method"):
        zsqfast.synthesize(build("cifar_resnet20"), 4, method="gan")
    with pytest.raises(ValueError, match="unknown synthesis options"):
        zsqfast.synthesize(build("cifar_resnet20"), 4, learning_rate=1.0)


class _WithUnusedBranch(nn.Module):
    """A BN CNN holding a BatchNorm2d branch its forward never calls (like inception_v3's AuxLogits in eval)."""

    def __init__(self):
        super().__init__()
        self.body = tiny_bn_model()
        self.aux = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))

    def forward(self, x):
        return self.body(x)


def test_a_batchnorm_the_forward_never_runs_is_left_out():
    """The loss is that of the layers that run: the same images as the model without the unused branch."""
    with_aux = _WithUnusedBranch().eval()
    kw = dict(iterations=3, batch_size=3, progress=False, input_shape=(3, 8, 8))
    ds = zsqfast.synthesize(with_aux, 3, **kw)
    plain = zsqfast.synthesize(tiny_bn_model(), 3, **kw)
    assert torch.equal(ds.images, plain.images) and torch.equal(ds.labels, plain.labels)
    bns = zsqfast.BNSLoss(with_aux)
    with pytest.raises(RuntimeError, match="call bns"):  # no forward yet
        bns.loss()
    bns(torch.randn(2, 3, 8, 8))
    assert bns.layers == [with_aux.body[1], with_aux.body[4]]
    bns.remove()


def test_fp64_model_synthesizes_in_fp64():
    model = tiny_bn_model().double()
    ds = zsqfast.synthesize(model, 3, iterations=2, batch_size=3, progress=False, input_shape=(3, 8, 8))
    assert ds.images.dtype == torch.float64 and torch.isfinite(ds.images).all()
    with pytest.raises(ValueError, match="num_classes=7 but the model has 4 outputs"):
        zsqfast.synthesize(tiny_bn_model(), 3, num_classes=7, iterations=1, progress=False, input_shape=(3, 8, 8))


def test_unguessable_input_size_and_syncbatchnorm_say_what_to_do():
    gray = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).eval()
    with pytest.raises(ValueError, match="pass input_shape"):
        zsqfast.synthesize(gray, 2, iterations=1, progress=False)
    assert len(zsqfast.synthesize(gray, 2, iterations=1, progress=False, input_shape=(1, 12, 12))) == 2
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(tiny_bn_model())
    for method in ("auto", "hast"):
        with pytest.raises(ValueError, match="SyncBatchNorm"):
            zsqfast.synthesize(sync, 2, method=method, iterations=1, progress=False, input_shape=(3, 8, 8))


def test_crop_aspect_is_in_pixels_on_non_square_images():
    from zsqfast.synthesis.recipes import crop_sides

    for height, width in ((32, 32), (24, 32), (40, 28)):
        w, h = crop_sides(4000, height, width, torch.Generator().manual_seed(0))
        aspect = (w * width) / (h * height)
        whole = (w == 1) & (h == 1)  # no draw fitted: the whole image
        assert bool(((aspect[~whole] >= 0.75 - 1e-5) & (aspect[~whole] <= 4 / 3 + 1e-5)).all())
        area = (w * h)[~whole]
        assert bool(((area >= 0.4 - 1e-5) & (area <= 1 + 1e-5)).all()) and bool((~whole).float().mean() > 0.5)


def test_progress_bar_shows_batch_iteration_and_loss(capsys):
    pytest.importorskip("tqdm")
    zsqfast.synthesize(tiny_bn_model(), 4, batch_size=4, iterations=3, input_shape=(3, 8, 8), progress=True)
    err = capsys.readouterr().err
    assert "synthesis" in err and "3/3" in err and "batch=0" in err and "loss=" in err


def test_interrupted_write_leaves_no_partial_shard_and_resumes(tmp_path, monkeypatch):
    model = tiny_bn_model()
    kw = dict(batch_size=4, iterations=2, seed=5, progress=False, input_shape=(3, 8, 8))
    full = zsqfast.synthesize(model, 8, **kw)
    real_save, calls = torch.save, []

    def dying_save(obj, f, *a, **k):  # the second shard write dies half-way through
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        zsqfast.synthesize(model, 8, out=tmp_path, **kw)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "shard_00000.pt"]  # no temp, no half shard
    assert sorted(json.loads((tmp_path / "index.json").read_text())["batches"]) == ["0"]
    resumed = zsqfast.synthesize(model, 8, out=tmp_path, **kw)
    assert resumed.meta["computed"] == [1] and torch.equal(resumed.images, full.images)


def test_bf16_and_layout_options_stay_close_to_fp32():
    model = tiny_bn_model()
    kw = dict(batch_size=8, iterations=4, seed=0, progress=False, input_shape=(3, 8, 8))
    ref = zsqfast.synthesize(model, 8, channels_last=False, **kw)
    cl = zsqfast.synthesize(model, 8, **kw)
    bf = zsqfast.synthesize(model, 8, precision="bf16", **kw)
    # Adam at lr 0.5 turns rounding-level gradient differences into visible steps: compare on average
    assert (cl.images - ref.images).abs().mean() < 1e-2 and (bf.images - ref.images).abs().mean() < 0.1
    assert not torch.equal(bf.images, ref.images)
    assert cl.meta["final_losses"][0] == pytest.approx(ref.meta["final_losses"][0], rel=1e-3)
    assert bf.meta["final_losses"][0] == pytest.approx(ref.meta["final_losses"][0], rel=5e-2)
    assert bf.images.dtype == torch.float32 and bf.images.is_contiguous()
    assert all(p.is_contiguous() for p in model.parameters())  # the model's layout is restored
    with pytest.raises(ValueError, match="precision"):
        zsqfast.synthesize(model, 8, precision="fp16", **kw)


def test_imagenet_size_recipe_augments_and_is_deterministic():
    from zsqfast.synthesis import recipes

    hp = recipes.resolve("hast", {}, (3, 224, 224), tiny_bn_model())
    assert (hp["aug_p"], hp["crop_scale"], hp["hard_beta"], hp["hard_gamma"]) == (0.5, (0.4, 1.0), 0.1, 0.5)
    assert recipes.resolve("hast", {}, (3, 32, 32), tiny_bn_model())["aug_p"] == 0.0
    x = torch.randn(6, 3, 20, 20, requires_grad=True)
    a = recipes.random_resized_crop_flip(x, torch.Generator().manual_seed(1))
    b = recipes.random_resized_crop_flip(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.allclose(a, x)
    a.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # geometry: on ramp images (channel 0 = column index, 1 = row index) every output is again a ramp whose
    # slopes are the crop's side fractions (+-w for a flip, h), with area w*h in [0.4, 1] or the whole image
    n, size = 200, 24
    ramp = torch.stack(torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)),
                                      indexing="xy")).expand(n, -1, -1, -1)
    out = recipes.random_resized_crop_flip(ramp, torch.Generator().manual_seed(3))
    sx = (out[:, 0, :, 1:] - out[:, 0, :, :-1])[:, :, 1:-1]  # edge pixels may sample half a pixel outside
    sy = (out[:, 1, 1:, :] - out[:, 1, :-1, :])[:, 1:-1]
    assert torch.allclose(sx, sx[:, :1, :1].expand_as(sx), atol=1e-4)  # linear: one slope per image
    assert torch.allclose(sy, sy[:, :1, :1].expand_as(sy), atol=1e-4)
    w, h = sx[:, 0, 0].abs(), sy[:, 0, 0]
    area = w * h
    assert ((area >= 0.4 - 1e-4) & (area <= 1 + 1e-4)).all() and (w <= 1 + 1e-5).all() and (h <= 1 + 1e-5).all()
    flips = (sx[:, 0, 0] < 0).float().mean()
    assert 0.35 < flips < 0.65
    whole = recipes.random_resized_crop_flip(ramp[:8], torch.Generator(), (1.0, 1.0))  # no fit: whole image
    for f in whole:
        assert torch.allclose(f, ramp[0], atol=1e-4) or torch.allclose(f, ramp[0].flip(-1), atol=1e-4) or \
            torch.allclose(f[1], ramp[0, 1], atol=1e-4) and torch.allclose(f[0], ramp[0, 0].flip(-1), atol=1e-4)


def test_deepinversion_cosine_schedule_and_constant_option():
    import math

    from zsqfast.synthesis import recipes
    from zsqfast.synthesis.engine import _Batch, _Objective

    model = tiny_bn_model()
    hp = recipes.resolve("deepinversion", {"warmup": 3}, (3, 8, 8), model)
    obj = _Objective(model, hp, "fp32", "cpu")
    try:
        state = _Batch(obj, (3, 8, 8), 4, 0, 2, 0, False, "cpu", iterations=10)
        lrs = []
        for it in range(10):
            lrs.append(state.opt.param_groups[0]["lr"])
            state.step(it)
    finally:
        obj.close()
    want = [0.2 * (e + 1) / 3 if e < 3 else 0.2 * 0.5 * (1 + math.cos(math.pi * (e - 3) / 7)) for e in range(10)]
    assert lrs == pytest.approx(want)
    ds = zsqfast.synthesize(model, 2, batch_size=2, iterations=2, scheduler=None, progress=False, input_shape=(3, 8, 8))
    assert ds.meta["hyperparameters"]["scheduler"] is None
    with pytest.raises(ValueError, match="scheduler"):
        zsqfast.synthesize(model, 2, iterations=1, scheduler="step", progress=False, input_shape=(3, 8, 8))


def test_interrupted_inside_a_batch_resumes_exactly(tmp_path, monkeypatch):
    # a checkpoint after every iteration; the run dies in the middle of batch 1; the resumed run continues
    # that batch from its checkpoint (not from scratch) and gives exactly the uninterrupted images
    from zsqfast.synthesis import engine

    model = tiny_bn_model()
    kw = dict(batch_size=4, iterations=6, seed=7, progress=False, input_shape=(3, 8, 8))
    full = zsqfast.synthesize(model, 8, **kw)
    monkeypatch.setattr(engine, "CHECKPOINT_SECONDS", 0.0)
    real_step, calls, die = engine._Batch.step, [], [True]

    def dying_step(self, it=0):
        calls.append((self.b, it))
        if self.b == 1 and it == 4 and die:  # dies once
            die.clear()
            raise KeyboardInterrupt
        return real_step(self, it)

    monkeypatch.setattr(engine._Batch, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        zsqfast.synthesize(model, 8, out=tmp_path, **kw)
    assert (tmp_path / "partial_00001.pt").exists() and not (tmp_path / "partial_00000.pt").exists()
    calls.clear()
    resumed = zsqfast.synthesize(model, 8, out=tmp_path, **kw)
    assert calls == [(1, 4), (1, 5)]                       # only the missing iterations of batch 1
    assert torch.equal(resumed.images, full.images) and torch.equal(resumed.labels, full.labels)
    assert not list(tmp_path.glob("partial_*")) and not list(tmp_path.glob("*.tmp"))


def test_progress_bar_of_a_resumed_batch_starts_at_its_checkpoint(tmp_path, monkeypatch):
    """A run resumed inside a batch: the bar is created with tqdm's initial= at the iterations the checkpoint
    holds, so they count towards the position but not as iterations done now (it/s, ETA); without tqdm the
    resumed run still works."""
    pytest.importorskip("tqdm")
    import shutil
    import sys

    from zsqfast.synthesis import engine

    model = tiny_bn_model()
    kw = dict(batch_size=4, iterations=6, seed=7, input_shape=(3, 8, 8))
    full = zsqfast.synthesize(model, 8, progress=False, **kw)
    monkeypatch.setattr(engine, "CHECKPOINT_SECONDS", 0.0)
    real_step = engine._Batch.step

    def dying_step(self, it=0):
        if self.b == 1 and it == 4:
            raise KeyboardInterrupt
        return real_step(self, it)

    with monkeypatch.context() as m:
        m.setattr(engine._Batch, "step", dying_step)
        with pytest.raises(KeyboardInterrupt):
            zsqfast.synthesize(model, 8, out=tmp_path / "a", progress=False, **kw)
    assert (tmp_path / "a" / "partial_00001.pt").exists()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    real_progress, bars, updates = engine._progress, [], []

    def recording_progress(*a, **k):
        bar = real_progress(*a, **k)
        real_update = bar.update
        bar.update = lambda n=1: (updates.append(n), real_update(n))[1]
        bars.append(bar)
        return bar

    with monkeypatch.context() as m:
        m.setattr(engine, "_progress", recording_progress)
        resumed = zsqfast.synthesize(model, 8, out=tmp_path / "a", progress=True, **kw)
    (bar,) = bars  # batch 1 only: 6 iterations, 4 of them from the checkpoint
    assert (bar.total, bar.initial, bar.n) == (6, 4, 6)
    assert updates == [1, 1]  # only the two iterations run by this call
    assert torch.equal(resumed.images, full.images)
    with monkeypatch.context() as m:  # no tqdm: no bar, same images
        m.setitem(sys.modules, "tqdm.auto", None)
        assert engine._progress(6, True, initial=4) is None
        resumed = zsqfast.synthesize(model, 8, out=tmp_path / "b", progress=True, **kw)
    assert torch.equal(resumed.images, full.images)
