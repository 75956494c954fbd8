"""Vision transformers end to end: zsqfast.quantize and the ``zsqfast`` command line on a tiny DeiT and a tiny
Swin (timm, random weights, narrow and shallow; 224 x 224 inputs, and 32 x 32 where the size does not matter,
to stay fast): PSAQ-ViT synthesis picked automatically,
the linear-input quantizer placement, SynQ (low-pass filter on 224 images, Grad-CAM on the last block's token
grid), the integer export, resume after an interruption in each stage, and the BNS-without-BatchNorm error."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import zsqfast
from zsqfast import pipeline
from zsqfast.cli import main
from zsqfast.finetune import trainer

from ._threads import num_threads
from .test_pipeline import Interrupt, _check_resumed, _interrupt, _same

timm = pytest.importorskip("timm")

# narrow / shallow versions of the real architectures: at 224 the pretrained models' input (DeiT's 14 x 14
# token grid), at 32 the cheap variant for the tests where the size does not matter
NAMES = {"deit": "deit_tiny_patch16_224", "swin": "swin_tiny_patch4_window7_224"}
ARCH = {("deit", 224): dict(depth=1, embed_dim=16, num_heads=2),                              # 14 x 14 tokens
        ("deit", 32): dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2),    # 4 x 4
        ("swin", 224): dict(patch_size=16, window_size=7, depths=(1, 1), num_heads=(1, 2), embed_dim=16),
        ("swin", 32): dict(img_size=32, patch_size=4, window_size=4, depths=(1, 1), num_heads=(1, 2),
                           embed_dim=16)}                                                     # 8 x 8, 4 x 4
BUDGET = dict(num_images=8, synth_iterations=2, synth_batch_size=4, epochs=2, batch_size=4, seed=1, progress=False,
              finetune_options=dict(lr=1e-4, calib_batches=1))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are so small that OpenMP's second thread only costs time (x5-x10 when the 2 cores are
    shared with other jobs); the thread count is restored afterwards."""
    with num_threads(1):
        yield


def tiny(kind: str, size: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(NAMES[kind], pretrained=False, num_classes=4, **ARCH[kind, size]).eval()


def eval_images(size: int, n: int = 4):
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 4, (n,), generator=g)


def _run(kind, size, out, w_bits=4, a_bits=8, **kw):
    return zsqfast.quantize(tiny(kind, size), w_bits, a_bits, method="synq", out=out, eval_data=eval_images(size),
                            **dict(BUDGET, **kw))


@pytest.fixture(scope="module")
def deit_ref(tmp_path_factory):
    out = tmp_path_factory.mktemp("deit_ref")
    return out, _run("deit", 32, out, export=True)


@pytest.mark.parametrize("kind,size,bits", [("deit", 224, (4, 8)), ("deit", 32, (8, 8)), ("swin", 224, (4, 8)),
                                            ("swin", 32, (8, 8))])
def test_quantize_end_to_end(tmp_path, monkeypatch, kind, size, bits):
    filtered = []
    real_lowpass = trainer.gaussian_lowpass
    monkeypatch.setattr(trainer, "gaussian_lowpass", lambda x, d0: filtered.append((x.shape, d0)) or
                        real_lowpass(x, d0))
    out, res = tmp_path, _run(kind, size, tmp_path, *bits, export=True, num_images=4, epochs=1)  # 1 batch, 1 step
    fp = tiny(kind, size)
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["synth_method"] == "psaq-vit" and man["config"]["synth_batch_size"] == 4
    assert json.loads((out / "synthetic" / "index.json").read_text())["meta"]["method"] == "psaq-vit"
    assert list(man["stages"]) == list(pipeline.STAGES)
    # placement: every Linear quantized with a QuantAct on its input; the patch-embedding conv's weight
    # quantized (the image stays float); LayerNorm, GELU, softmax / attention matmuls left float
    n_linear = sum(type(m) is nn.Linear for m in fp.modules())
    rep = zsqfast.quantization_report(res.model)
    assert rep["QuantLinear"] == n_linear == rep["QuantAct"] and rep["QuantConv2d"] == 1
    assert rep["w_bits"] == {bits[0]: n_linear + 1} and rep["float_conv_linear"] == 0
    assert all(m.input_quant.bits == bits[1] for m in res.model.modules() if isinstance(m, zsqfast.nn.QuantLinear))
    kinds = lambda m: sorted({type(x).__name__ for x in m.modules() if isinstance(x, (nn.LayerNorm, nn.GELU))})
    assert kinds(res.model) == kinds(fp) == ["GELU", "LayerNorm"]
    # SynQ ran: the low-pass filter on every batch (224 images), a non-zero CAM loss from the token grid
    assert len(filtered) == 1 and all(tuple(s) == (4, 3, size, size) and d0 == 80.0 for s, d0 in filtered)
    assert len(res.history) == 1 and res.history[0]["cam"] > 0
    assert not _same(res.model.state_dict(), res.rtn_model.state_dict())
    for k in ("fp32_accuracy", "rtn_accuracy", "final_accuracy"):
        assert 0.0 <= res.metrics[k] <= 100.0
    # eval reloads the saved model; the integer export agrees with the fake-quant model and reloads
    x = eval_images(size)[0]
    q, _ = zsqfast.load_quantized(out / "model.pt", fp)
    assert torch.equal(q(x), res.model(x))
    im = zsqfast.load_integer_model(out / "integer_model.safetensors", lambda: tiny(kind, size))
    with torch.no_grad():
        y, want = im(x), res.model(x)
    assert torch.equal(y, res.integer_model(x))
    sqnr = 20 * torch.log10(want.norm() / (want - y).norm())
    assert sqnr > 40, f"integer vs fake-quant SQNR {float(sqnr):.1f} dB"


@pytest.mark.parametrize("stage", ["synthesize", "quantize", "finetune"])  # export reruns whenever asked
def test_resume_after_interruption(tmp_path, monkeypatch, deit_ref, stage):
    ref_out, ref = deit_ref
    with monkeypatch.context() as m:
        _interrupt(m, stage)
        with pytest.raises(Interrupt):
            _run("deit", 32, tmp_path, export=True)
    done = list(json.loads((tmp_path / "manifest.json").read_text())["stages"])
    assert done == list(pipeline.STAGES[:pipeline.STAGES.index(stage)])
    if stage == "synthesize":  # one of the two batches was written before the interruption
        assert len(json.loads((tmp_path / "synthetic" / "index.json").read_text())["batches"]) == 1
    with monkeypatch.context() as m:  # finished stages must not run again; fine-tuning resumes at epoch 1
        if "synthesize" in done:
            m.setattr(pipeline, "synthesize", lambda *a, **k: pytest.fail("synthesis ran again"))
        if stage == "finetune":
            real = pipeline.finetune
            m.setattr(pipeline, "finetune", lambda *a, **k: _check_resumed(real, tmp_path, *a, **k))
        res = _run("deit", 32, tmp_path, export=True)
    assert _same(res.model.state_dict(), ref.model.state_dict()) and res.history == ref.history
    assert torch.equal(zsqfast.SyntheticDataset.load(tmp_path / "synthetic").images,
                       zsqfast.SyntheticDataset.load(ref_out / "synthetic").images)


def test_bns_method_on_a_model_without_batchnorm(tmp_path):
    for method in ("hast", "deepinversion"):
        with pytest.raises(ValueError, match="no BatchNorm2d layer.*use 'psaq-vit'"):
            _run("swin", 32, tmp_path / method, synth_method=method)
        assert not (tmp_path / method).exists()  # refused before anything was written
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no BatchNorm2d layer and no timm attention"):
        zsqfast.quantize(cnn, 4, 8, progress=False)
    with pytest.raises(ValueError, match="needs a vision transformer"):
        zsqfast.synthesize(cnn, 2, method="psaq-vit", progress=False)


def test_cli_quantize_eval_export(tmp_path, capsys):
    name, kw = NAMES["deit"], ARCH["deit", 32]
    ckpt = tmp_path / "deit.pth"
    torch.save(tiny("deit").state_dict(), ckpt)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "eval.npz", images=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
             labels=rng.integers(0, 4, 6))
    model = ["--model", name, "--checkpoint", ckpt, "--num-classes", 4, "--model-kwargs", json.dumps(kw)]
    argv = ["quantize", *model, "--w-bits", 4, "--a-bits", 8, "--method", "synq", "--out", tmp_path / "run",
            "--num-images", 4, "--synth-iterations", 1, "--epochs", 1, "--batch-size", 4, "--calib-batches", 1,
            "--eval-data", tmp_path / "eval.npz", "--quiet"]
    assert main([str(a) for a in argv]) == 0
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["config"]["synth_method"] == "psaq-vit" and man["config"]["model_spec"]["model_kwargs"] == kw
    assert main([str(a) for a in argv]) == 0  # rerun: resumed, everything already done
    capsys.readouterr()
    assert main(["eval", "--quantized", str(tmp_path / "run"), "--eval-data", str(tmp_path / "eval.npz")]) == 0
    assert "W4A8 (synq): top-1" in capsys.readouterr().out
    assert main(["export", "--quantized", str(tmp_path / "run"), "--out", str(tmp_path / "int.safetensors")]) == 0
    im = zsqfast.load_integer_model(tmp_path / "int.safetensors", lambda: tiny("deit"))
    assert im(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    # a BNS method forced on the ViT: exit 2, the reason and what to do, nothing written
    bad = [str(a) for a in argv] + ["--out", str(tmp_path / "bad"), "--synth-method", "hast"]  # last --out wins
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "no BatchNorm2d layer" in err and "psaq-vit" in err and not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit) as e:  # --model-kwargs must be a JSON object
        main(["eval", "--model", name, "--model-kwargs", "{img_size: 32}", "--eval-data", "x.npz"])
    assert e.value.code == 2 and "not valid JSON" in capsys.readouterr().err


def test_export_names_a_layer_it_cannot_convert():
    # K = 40000 inputs at W8A8 could overflow the int32 accumulator (largest safe K 33025): the error names the
    # layer and the way out; skipping it converts the rest
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(40000, 8), nn.GELU(), nn.Linear(8, 2)).eval()
    x = torch.randn(4, 40000)
    for skip, ok in (((), False), (("0",), True)):
        q = zsqfast.quantize_model(fp, 8, 8, skip=skip)
        zsqfast.calibrate(q, [x], freeze=True)
        if ok:
            with pytest.warns(UserWarning, match="not quantized and stay float.*: 0"):  # the skipped layer, named
                im = zsqfast.convert_to_integer(q, x[:1])
            assert zsqfast.integer_report(im)["integer"] == 1
        else:
            with pytest.raises(ValueError, match=r"cannot convert layer '0' \(QuantLinear\).*skip=\['0'\]"):
                zsqfast.convert_to_integer(q, x[:1])
