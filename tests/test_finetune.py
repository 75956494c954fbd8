"""finetune(): losses with the official semantics, KD and SynQ runs, exact resume."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zsqfast
from zsqfast.finetune import kd_loss, selective_ce


def _models():
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                       nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    q = zsqfast.quantize_model(fp, 4, 4)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(24, 3, 12, 12, generator=g)
    with torch.no_grad():
        labels = fp(images).argmax(1)
    return fp, q, images, labels


def test_selective_ce_strict_threshold_and_whole_batch_mean():
    t = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 3.0]])  # p_y: 0.881, 0.5, 0.047 for labels 0, 0, 0
    y = torch.tensor([0, 0, 0])
    s = torch.randn(3, 2, requires_grad=True)
    loss, sel = selective_ce(s, t, y, tau=0.5)
    assert sel.tolist() == [True, False, False]  # (1 - 0.5) < 0.5 is false: strict
    want = (F.cross_entropy(s[:1], y[:1], reduction="sum") + 2 * math.log(2)) / 3
    assert torch.allclose(loss, want)
    loss.backward()
    assert torch.equal(s.grad[1:], torch.zeros(2, 2))


def test_kd_loss_official_scaling():
    s, t = torch.randn(5, 10), torch.randn(5, 10)
    want = F.kl_div(F.log_softmax(s / 20, 1), F.softmax(t / 20, 1), reduction="batchmean") * 8000
    assert torch.allclose(kd_loss(s, t), want)


@pytest.mark.parametrize("method", ["kd", "synq"])
def test_two_epochs_lower_the_loss(method):
    fp, q, images, labels = _models()
    kw = dict(method=method, epochs=2, batch_size=8, lr=5e-3, progress=False, d0=4.0, lambda_cam=10.0)
    res = zsqfast.finetune(fp, q, (images, labels), eval_data=(images, labels), **kw)
    losses = [e["loss"] for e in res["epochs"]]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert losses[1] < losses[0]
    assert res["final_accuracy"] is not None


def test_resume_equals_uninterrupted(tmp_path):
    kw = dict(method="synq", epochs=3, batch_size=8, lr=1e-3, progress=False, d0=4.0, lambda_cam=5.0, seed=4)
    fp, q_full, images, labels = _models()
    zsqfast.finetune(fp, q_full, (images, labels), **kw)
    fp, q_a, images, labels = _models()
    zsqfast.finetune(fp, q_a, (images, labels), out=tmp_path, stop_after=1, **kw)  # "interrupted"
    fp, q_b, images, labels = _models()  # a fresh process would rebuild the model, then resume
    res = zsqfast.finetune(fp, q_b, (images, labels), out=tmp_path, **kw)
    assert [e["epoch"] for e in res["epochs"]] == [1, 2, 3]
    for (k, v1), v2 in zip(q_full.state_dict().items(), q_b.state_dict().values()):
        assert (torch.equal(v1, v2) if isinstance(v1, torch.Tensor) else v1 == v2), k
    assert (tmp_path / "log.jsonl").read_text().count("\n") == 3


def test_divergence_is_reported():
    fp, q, images, labels = _models()
    with pytest.raises(FloatingPointError, match="lower lr"):
        zsqfast.finetune(fp, q, (images, labels), method="kd", epochs=3, batch_size=8, lr=1e12, progress=False)


def test_bad_options():
    fp, q, images, labels = _models()
    with pytest.raises(ValueError, match="method"):
        zsqfast.finetune(fp, q, (images, labels), method="hast")
    with pytest.raises(ValueError, match="unknown"):
        zsqfast.finetune(fp, q, (images, labels), learning_rate=1.0)
