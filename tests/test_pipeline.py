"""zsqfast.quantize(): stages, artifacts, determinism, resume after an interruption in each stage, bad input."""
import contextlib
import json
import os
import shutil

import pytest
import torch
import torch.nn as nn

import zsqfast
from zsqfast import pipeline

from ._tiny import tiny_images, tiny_model

BUDGET = dict(num_images=32, synth_iterations=4, synth_batch_size=16, epochs=3, batch_size=16, seed=3,
              progress=False, finetune_options=dict(lr=1e-3, calib_batches=1))


class Interrupt(Exception):
    pass


def _run(out, **kw):
    return zsqfast.quantize(tiny_model(), 4, 4, out=out, eval_data=tiny_images(16, seed=5), **dict(BUDGET, **kw))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, export stage included."""
    out = tmp_path_factory.mktemp("ref")
    return out, _run(out, export=True)


def test_artifacts_and_manifest(reference):
    out, res = reference
    for name in ("manifest.json", "synthetic/index.json", "rtn.pt", "model.pt", "integer_model.safetensors",
                 "finetune/checkpoint.pt", "finetune/log.jsonl"):
        assert (out / name).exists(), name
    man = json.loads((out / "manifest.json").read_text())
    assert list(man["stages"]) == ["synthesize", "quantize", "finetune", "export"]
    assert man["config"]["w_bits"] == 4 and man["config"]["method"] == "synq"
    assert len(res.history) == 3 and all("accuracy" in r for r in res.history)
    for k in ("fp32_accuracy", "rtn_accuracy", "final_accuracy"):
        assert 0.0 <= res.metrics[k] <= 100.0
    # the saved model reloads to the returned one and gives the same outputs
    q, config = zsqfast.load_quantized(out / "model.pt", tiny_model())
    assert _same(q.state_dict(), res.model.state_dict()) and config["a_bits"] == 4
    x = tiny_images(8, seed=9)[0]
    assert torch.equal(q(x), res.model(x))
    assert not _same(res.model.state_dict(), res.rtn_model.state_dict())  # fine-tuning changed the weights
    # the exported integer model reloads from its file and agrees with the fake-quant model
    im = zsqfast.load_integer_model(out / "integer_model.safetensors", tiny_model)
    assert torch.equal(im(x), res.integer_model(x))
    assert (im(x).argmax(1) == res.model(x).argmax(1)).float().mean() >= 0.75


def test_deterministic_in_memory(reference):
    _, ref = reference
    res = _run(None)
    assert _same(res.model.state_dict(), ref.model.state_dict())


def _interrupt(monkeypatch, stage: str):
    """Make ``stage`` fail part-way (after writing some of its work where it can)."""
    if stage == "synthesize":
        real = pipeline.synthesize

        def fn(*a, **k):
            real(*a, **dict(k, max_batches=1))  # one batch written, then the process "dies"
            raise Interrupt(stage)
        monkeypatch.setattr(pipeline, "synthesize", fn)
    elif stage == "quantize":
        monkeypatch.setattr(pipeline, "calibrate", lambda *a, **k: (_ for _ in ()).throw(Interrupt(stage)))
    elif stage == "finetune":
        real = pipeline.finetune

        def fn(*a, **k):
            real(*a, **dict(k, stop_after=1))  # one epoch checkpointed
            raise Interrupt(stage)
        monkeypatch.setattr(pipeline, "finetune", fn)
    else:
        monkeypatch.setattr(pipeline, "convert_to_integer", lambda *a, **k: (_ for _ in ()).throw(Interrupt(stage)))


@pytest.mark.parametrize("stage", pipeline.STAGES)
def test_resume_after_interruption(tmp_path, monkeypatch, reference, stage):
    ref_out, ref = reference
    with monkeypatch.context() as m:
        _interrupt(m, stage)
        with pytest.raises(Interrupt):
            _run(tmp_path, export=True)
    man = json.loads((tmp_path / "manifest.json").read_text())
    done = list(man["stages"])
    assert done == list(pipeline.STAGES[:pipeline.STAGES.index(stage)])
    # finished stages must not run again: make them fail if they are called
    with monkeypatch.context() as m:
        if "synthesize" in done:
            m.setattr(pipeline, "synthesize", lambda *a, **k: pytest.fail("synthesis ran again"))
        if "quantize" in done:
            m.setattr(pipeline, "calibrate", lambda *a, **k: pytest.fail("calibration ran again"))
        if "finetune" in done:
            m.setattr(pipeline, "finetune", lambda *a, **k: pytest.fail("fine-tuning ran again"))
        if stage == "finetune":  # resumed from the epoch-1 checkpoint, not from scratch
            real = pipeline.finetune
            m.setattr(pipeline, "finetune", lambda *a, **k: _check_resumed(real, tmp_path, *a, **k))
        res = _run(tmp_path, export=True)
    assert _same(res.model.state_dict(), ref.model.state_dict())
    assert res.history == ref.history
    assert list(json.loads((tmp_path / "manifest.json").read_text())["stages"]) == list(pipeline.STAGES)
    assert _same(torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"],
                 torch.load(ref_out / "model.pt", weights_only=True)["state_dict"])


def test_finished_run_recomputes_nothing(monkeypatch, reference):
    """Calling quantize() again on a finished ``out/`` loads every stage's artifact, export included."""
    ref_out, ref = reference
    for name in ("synthesize", "calibrate", "finetune", "convert_to_integer"):
        monkeypatch.setattr(pipeline, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} ran again"))
    res = _run(ref_out, export=True)
    assert _same(res.model.state_dict(), ref.model.state_dict())
    assert _same(res.rtn_model.state_dict(), ref.rtn_model.state_dict())
    assert res.metrics == ref.metrics and res.history == ref.history
    x = tiny_images(8, seed=9)[0]
    assert torch.equal(res.integer_model(x), ref.integer_model(x))


def _check_resumed(real, run_dir, *a, **k):
    state = torch.load(run_dir / "finetune" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    return real(*a, **k)


def test_shared_synthetic_set(tmp_path, reference):
    """``data=`` reuses a synthetic set (here the reference run's) and skips synthesis."""
    ref_out, ref = reference
    res = zsqfast.quantize(tiny_model(), 4, 4, method="kd", epochs=1, batch_size=16, data=ref_out / "synthetic",
                           out=tmp_path, progress=False, finetune_options=dict(lr=1e-3, calib_batches=1))
    assert not (tmp_path / "synthetic").exists() and (tmp_path / "model.pt").exists()
    assert _same(res.rtn_model.state_dict(), ref.rtn_model.state_dict())  # same data -> same calibration


def test_bad_inputs(tmp_path, monkeypatch, reference):
    m = tiny_model()
    with pytest.raises(ValueError, match="w_bits"):
        zsqfast.quantize(m, 9, 4)
    with pytest.raises(ValueError, match="a_bits"):
        zsqfast.quantize(m, 4, 4.0)
    with pytest.raises(ValueError, match="method"):
        zsqfast.quantize(m, 4, 4, method="adaround")
    with pytest.raises(ValueError, match="unknown fine-tuning options"):
        zsqfast.quantize(m, 4, 4, finetune_options={"learning_rate": 1})
    ref_out, _ = reference
    with pytest.raises(ValueError, match="different quantization run.*w_bits.*its synthetic set can be reused: "
                                         "pass data=.*synthetic"):
        zsqfast.quantize(m, 3, 3, out=ref_out, **{k: v for k, v in BUDGET.items()})
    with pytest.raises(ValueError, match="different quantization run.*num_images") as e:  # synthesis differs
        zsqfast.quantize(m, 4, 4, out=ref_out, **dict(BUDGET, num_images=48))
    assert "can be reused" not in str(e.value)
    with pytest.raises(ValueError, match="different quantization run.*act_ste: stored 'clipped', requested "
                                         "'identity'"):
        zsqfast.quantize(m, 4, 4, out=ref_out, **dict(BUDGET, finetune_options=dict(
            BUDGET["finetune_options"], act_ste="identity")))
    with pytest.raises(ValueError, match="does not fit"):
        other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 4))
        zsqfast.load_quantized(ref_out / "model.pt", other.eval())


@pytest.mark.parametrize("kw, match", [
    (dict(synth_batch_size=0), "synth_batch_size must be an integer >= 1"),
    (dict(epochs=1.5), "epochs must be an integer >= 0"),
    (dict(num_images=0), "num_images must be an integer >= 1"),
    (dict(finetune_options=dict(calib_batches=0)), "calib_batches must be an integer >= 1"),
    (dict(finetune_options=dict(lr=float("nan"))), "lr must be a finite number > 0"),
    (dict(finetune_options=dict(lr=0.0)), "lr must be a finite number > 0"),
    (dict(finetune_options=dict(weight_decay=-1e-4)), "weight_decay must be a finite number >= 0"),
    (dict(finetune_options=dict(calib_method="max")), "calib_method must be one of"),
])
def test_bad_arguments_fail_before_out_is_written(tmp_path, monkeypatch, kw, match):
    monkeypatch.setattr(pipeline, "synthesize", lambda *a, **k: pytest.fail("synthesis ran"))
    with pytest.raises(ValueError, match=match):
        zsqfast.quantize(tiny_model(), 4, 4, out=tmp_path / "run", **dict(BUDGET, **kw))
    assert not (tmp_path / "run").exists()


class _WithConv1d(nn.Module):
    """A BatchNorm CNN (so synthesis would accept it) holding a layer quantize_model refuses."""

    def __init__(self):
        super().__init__()
        self.body, self.extra = tiny_model(), nn.Conv1d(1, 1, 1)

    def forward(self, x):
        return self.body(x)


def test_unsupported_layer_fails_before_synthesis(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "synthesize", lambda *a, **k: pytest.fail("synthesis ran"))
    with pytest.raises(ValueError, match="cannot quantize these layers: extra .Conv1d"):
        zsqfast.quantize(_WithConv1d().eval(), 4, 4, out=tmp_path / "run", **BUDGET)
    assert not (tmp_path / "run").exists()


def test_unconvertible_layer_fails_before_synthesis_with_export(tmp_path, monkeypatch):
    """padding='same' with an even kernel quantizes but cannot become an IntConv2d: with export=True the run
    stops before out/ is written (without export it is a valid fake-quant run)."""
    monkeypatch.setattr(pipeline, "synthesize", lambda *a, **k: pytest.fail("synthesis ran"))
    m = tiny_model()
    m[3] = nn.Conv2d(8, 8, 2, padding="same")
    with pytest.raises(ValueError, match=r"cannot convert layer '3' \(QuantConv2d\): padding='same'"):
        zsqfast.quantize(m, 4, 4, out=tmp_path / "run", export=True, **BUDGET)
    assert not (tmp_path / "run").exists()


def _no_recompute(monkeypatch, *names):
    for name in names:
        monkeypatch.setattr(pipeline, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} ran again"))


def test_defaults_given_explicitly_are_the_same_run(monkeypatch, reference):
    """Options given at their default values (and first_last_bits = w_bits) resume the run stored without them."""
    ref_out, ref = reference
    _no_recompute(monkeypatch, "synthesize", "calibrate", "finetune", "convert_to_integer")
    opts = dict(BUDGET["finetune_options"], calib_method="mse", act_ste="clipped", momentum=0.9)
    res = zsqfast.quantize(tiny_model(), 4, 4, out=ref_out, eval_data=tiny_images(16, seed=5), export=True,
                           first_last_bits=4, **dict(BUDGET, finetune_options=opts))
    assert _same(res.model.state_dict(), ref.model.state_dict()) and res.metrics == ref.metrics


def test_accuracies_follow_the_eval_data_of_the_call(tmp_path, monkeypatch, reference):
    """A finished run called with other evaluation data (or none) measures again, it never reports the stored
    figures of other data; the stages themselves are not re-run."""
    from zsqfast.finetune.trainer import evaluate

    ref_out, ref = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    _no_recompute(monkeypatch, "synthesize", "calibrate", "finetune")
    other = tiny_images(24, seed=11)
    res = zsqfast.quantize(tiny_model(), 4, 4, out=out, eval_data=other, **BUDGET)
    assert res.metrics["fp32_accuracy"] == evaluate(tiny_model(), *other)
    assert res.metrics["rtn_accuracy"] == evaluate(ref.rtn_model, *other)
    assert res.metrics["final_accuracy"] == evaluate(ref.model, *other)
    res = zsqfast.quantize(tiny_model(), 4, 4, out=out, **BUDGET)
    assert not {"fp32_accuracy", "rtn_accuracy", "final_accuracy"} & set(res.metrics)
    res = _run(out)  # the reference's data again: its figures again
    assert {k: v for k, v in res.metrics.items() if k.endswith("accuracy")} == \
        {k: v for k, v in ref.metrics.items() if k.endswith("accuracy")}


def test_deleted_artifact_is_made_again(tmp_path, monkeypatch, reference):
    ref_out, ref = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    (out / "rtn.pt").unlink()
    _no_recompute(monkeypatch, "synthesize", "finetune")
    res = _run(out)
    assert (out / "rtn.pt").exists() and _same(res.rtn_model.state_dict(), ref.rtn_model.state_dict())
    assert _same(res.model.state_dict(), ref.model.state_dict())


def test_finetune_time_is_the_fine_tuning_and_reused_stages_are_named(tmp_path, monkeypatch):
    """``finetune_time_s`` times the fine-tuning, not the final evaluation and the save of model.pt (a fake clock
    that only those advance); a call on a finished ``out/`` names the stages it took from there."""
    import types

    clock = [0.0]

    def advancing(fn, seconds):
        def wrapped(*a, **k):
            clock[0] += seconds
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(pipeline, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(pipeline, "evaluate", advancing(pipeline.evaluate, 100.0))
    monkeypatch.setattr(pipeline, "save_model", advancing(pipeline.save_model, 1000.0))
    res = _run(tmp_path, epochs=1)
    assert res.metrics["finetune_time_s"] == 0.0 and res.reused == ()
    stored = json.loads((tmp_path / "manifest.json").read_text())["stages"]["finetune"]
    assert stored["time_s"] == 0.0 and "final_accuracy" in stored["metrics"]
    again = _run(tmp_path, epochs=1)
    assert again.reused == ("synthesize", "quantize", "finetune") and again.metrics == res.metrics
    assert _run(tmp_path, epochs=1, export=True).reused == ("synthesize", "quantize", "finetune")


def test_artifacts_have_ordinary_permissions(reference):
    ref_out, _ = reference
    mask = os.umask(0)
    os.umask(mask)
    for name in ("manifest.json", "rtn.pt", "model.pt", "integer_model.safetensors", "synthetic/index.json"):
        assert (ref_out / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


@pytest.mark.parametrize("name", ["resnet18", "torchvision:resnet18"])
def test_quantize_timm_and_torchvision_cnns(tmp_path, name):
    """The whole pipeline, export included, on timm's and torchvision's ResNet-18 (torchvision reuses one ReLU
    module per block: its shared QuantAct is calibrated on all call sites), at 32x32 to stay small."""
    from zsqfast.models import build

    torch.manual_seed(0)
    fp = build(name, num_classes=4).eval()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    shared = name.startswith("torchvision:")  # told, once, that its shared ReLUs share one range
    with pytest.warns(UserWarning, match="shares one range") if shared else contextlib.nullcontext():
        res = zsqfast.quantize(fp, 4, 4, method="synq", num_images=8, synth_iterations=2, synth_batch_size=8,
                               epochs=1, batch_size=8, out=tmp_path, export=True, progress=False,
                               synth_options=dict(input_shape=(3, 32, 32)), eval_data=(x, fp(x).argmax(1)),
                               finetune_options=dict(lr=1e-4, calib_batches=1))
    assert set(json.loads((tmp_path / "manifest.json").read_text())["stages"]) == set(pipeline.STAGES)
    assert 0.0 <= res.metrics["final_accuracy"] <= 100.0
    with torch.no_grad():
        agree = (res.integer_model(x).argmax(1) == res.model(x).argmax(1)).float().mean()
    assert agree >= 0.75  # the integer model computes the fake-quant model's function
