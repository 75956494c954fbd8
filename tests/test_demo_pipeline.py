"""``zsqfast demo`` end to end on its tiny budget (digits: no data needed): accuracy, report, valid PNGs."""
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from zsqfast.png import SIGNATURE, encode_png

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _decode_chunks(data: bytes):
    """Walk a PNG's chunks checking every CRC; returns (IHDR fields, decompressed IDAT bytes)."""
    assert data[:8] == SIGNATURE
    pos, ihdr, idat = 8, None, b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body) & 0xFFFFFFFF
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    assert kind == b"IEND"
    return ihdr, zlib.decompress(idat)


def test_encode_png_roundtrip():
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    (w, h, depth, color, *_), raw = _decode_chunks(encode_png(img))
    assert (w, h, depth, color) == (7, 5, 8, 2)
    rows = np.frombuffer(raw, np.uint8).reshape(5, 1 + 7 * 3)
    assert (rows[:, 0] == 0).all() and np.array_equal(rows[:, 1:].reshape(5, 7, 3), img)
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4), np.float32))


def test_demo_digits_end_to_end(tmp_path):
    """``zsqfast demo --quick`` through the console script, without the data directory (digits path)."""
    env = dict(os.environ, ZSQFAST_DATA=str(tmp_path / "no-data-here"))
    cmd = [sys.executable, "-m", "zsqfast.cli", "demo", "--quick", "--quiet", "--out", str(tmp_path / "demo")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DigitsCNN" in r.stdout
    rows = {ln[:28].strip(): float(ln.split()[-1]) for ln in r.stdout.splitlines()
            if ln.startswith(("FP32 ", "W4A4 "))}
    assert list(rows) == ["FP32", "W4A4 round-to-nearest", "W4A4 KD", "W4A4 SynQ"]
    assert rows["FP32"] > 80.0  # a trained model
    for name, a in rows.items():  # 10 classes: chance is 10 %
        assert a > 30.0, (name, a)
    assert "fake-quant fwd+bwd" in r.stdout and "low-pass filter" in r.stdout  # kernel speed ratios
    report = tmp_path / "demo" / "report.md"
    text = report.read_text()
    assert "| W4A4 SynQ |" in text
    from PIL import Image

    for name in ("samples.png", "spectrum.png", "gradcam.png", "curves.png"):
        path = report.parent / name
        assert f"]({name})" in text
        (w, h, *_), raw = _decode_chunks(path.read_bytes())
        assert w > 50 and h > 50 and len(raw) == h * (1 + 3 * w)
        with Image.open(path) as im:
            im.load()
            assert im.size == (w, h)
            assert len(np.unique(np.asarray(im).reshape(-1, 3), axis=0)) > 3  # a picture, not a blank canvas


def test_demo_rerun_reports_this_runs_times_and_marks_reused_stages(tmp_path, monkeypatch, capsys):
    """A second demo in the same folder resumes every stage in ~0 s: its wall times are this run's, and each
    reused stage says so (with the fine-tuning time of the earlier run, marked as such)."""
    import re

    import zsqfast.demo
    from zsqfast import demo_pipeline

    monkeypatch.setenv("ZSQFAST_DATA", str(tmp_path / "no-data-here"))
    monkeypatch.setitem(demo_pipeline.BUDGETS, "digits", {"quick": (64, 2, 1)})
    monkeypatch.setattr(zsqfast.demo, "train_digits", lambda *a, **k: zsqfast.demo.DigitsCNN().eval())
    monkeypatch.setattr(demo_pipeline, "_speed_lines", lambda shape: ["(kernel speed skipped)"])
    out = tmp_path / "demo"

    def run():
        demo_pipeline.run_pipeline_demo(quick=True, data=str(tmp_path / "no-data-here"), out=str(out),
                                        progress=False)
        (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.lower().startswith("wall time")]
        m = re.search(r"synthesis ([\d.]+) s(.*), KD ([\d.]+) s(.*), SynQ ([\d.]+) s(.*?),? total ([\d.]+) s", line)
        assert m, line
        t_synth, t_kd, t_sq, total = (float(m[i]) for i in (1, 3, 5, 7))
        assert t_synth + t_kd + t_sq <= total + 0.21, line  # this run's times add up (each rounded to 0.1 s)
        return line, (m[2], m[4], m[6])

    first, notes = run()
    assert not any("reused" in note for note in notes), first
    line, (synth, kd, sq) = run()
    assert synth == f" (reused from an earlier run in {out / 'synthetic'})", line
    for note, method in ((kd, "kd"), (sq, "synq")):
        assert re.fullmatch(rf" \(reused from an earlier run in {re.escape(str(out / method))}; its fine-tuning "
                            r"took [\d.]+ s then\)", note), line
    assert line.split(": ", 1)[1].split(", total")[0] in (out / "report.md").read_text()  # the report says the same
    assert all(note.startswith(" (fine-tuning ") for note in notes[1:]), first  # the first run's own figure
