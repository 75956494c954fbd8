"""Integer model files: the bit-dense codec (zsqfast.ops.lowbit_dense), exact save / load round trips at 2..8
bits with awkward K, depthwise and grouped convolutions, format-1 and format-2 files still loading, and clear
errors for truncated, corrupted (data, metadata or tensor headers) or wrong-version files."""
import json

import pytest
import torch
import torch.nn as nn

import zsqfast
from zsqfast.convert import FORMAT_VERSION
from zsqfast.integer_io import _crc32, saved_weight_bytes
from zsqfast.nn import IntConv2d, IntLinear
from zsqfast.ops.lowbit_dense import dense_nbytes, pack_dense, unpack_dense


@pytest.mark.parametrize("bits", range(2, 9))
def test_dense_codec_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (0, 1, 7, 8, 9, 27 * 5, 144 * 11 + 3):
        q = torch.randint(0, 1 << bits, (n,), generator=g)
        d = pack_dense(q, bits)
        assert d.dtype == torch.uint8 and d.numel() == dense_nbytes(n, bits) == -(-n * bits // 8)
        assert torch.equal(unpack_dense(d, bits, (n,)), q.to(torch.uint8))


def test_dense_codec_layout():
    """Byte order of the docstring: 4 bits low nibble first; 3 bits: 8 codes in 3 little-endian bytes."""
    assert pack_dense(torch.tensor([1, 2, 3, 15]), 4).tolist() == [0x21, 0xF3]
    assert pack_dense(torch.tensor([1, 2, 3]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    c = list(range(8))
    word = sum(v << (3 * j) for j, v in enumerate(c))
    assert pack_dense(torch.tensor(c), 3).tolist() == [word & 255, word >> 8 & 255, word >> 16]
    assert pack_dense(torch.tensor([5]), 3).tolist() == [5]  # one code: one byte, unused bits 0


def test_dense_codec_errors():
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_dense(torch.tensor([8]), 3)
    with pytest.raises(TypeError):
        pack_dense(torch.tensor([1.0]), 4)
    d = pack_dense(torch.tensor([1, 2, 3]), 4)
    with pytest.raises(ValueError, match="take 2 uint8 bytes"):
        unpack_dense(d[:1], 4, (3,))
    with pytest.raises(ValueError, match="padding bits"):
        unpack_dense(torch.tensor([0x21, 0xF3], dtype=torch.uint8), 4, (3,))


def awkward_model() -> nn.Module:
    """K = 27 (odd), 9 (depthwise), 27 (groups=2), 144 (padded to 256 in memory), 16 (linear); N * K odd for
    the first conv and the linear layer, so dense streams end mid-byte."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                      nn.Conv2d(5, 5, 3, padding=1, groups=5), nn.BatchNorm2d(5), nn.ReLU(),
                      nn.Conv2d(5, 16, (3, 3), stride=2, padding=1, bias=False), nn.ReLU(),
                      nn.Conv2d(16, 16, 3, padding=1, groups=2), nn.ReLU(),  # K = 8 * 9 = 72 per group
                      nn.Conv2d(16, 11, 3, padding=1), nn.ReLU(),  # K = 144
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(11, 7))
    for bn in (m[1], m[4]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        m[8].weight.abs_().add_(0.05)  # a per-channel range without 0: zero points outside 0..255 (int32 kept)
    return m.eval()


def integer_model(bits: int, w_symmetric: bool = False):
    q = zsqfast.quantize_model(awkward_model(), bits, bits, w_symmetric=w_symmetric)
    g = torch.Generator().manual_seed(1)
    zsqfast.calibrate(q, [torch.randn(8, 3, 8, 8, generator=g)], warn=False)
    return zsqfast.convert_to_integer(q, torch.randn(1, 3, 8, 8, generator=g))


def assert_identical(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("bits", range(2, 9))
def test_round_trip_exact(bits, tmp_path):
    im = integer_model(bits, w_symmetric=bits == 5)
    layers = {n: m for n, m in im.named_modules() if isinstance(m, (IntConv2d, IntLinear))}
    assert len(layers) == 6 and any(m.a_bits is not None for m in layers.values())
    path = tmp_path / "m.safetensors"
    zsqfast.save_integer_model(im, path)
    back = zsqfast.load_integer_model(path, awkward_model)
    assert_identical(im, back, torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2)))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert not any(k.endswith((".packed", ".w_colsum")) for k in keys)
        for n, m in layers.items():  # exactly bits per weight, no K padding
            assert f.get_tensor(f"{n}.codes").numel() == dense_nbytes(m.packed.size(0) * m.K, bits)
        assert f.get_tensor("8.w_zero").dtype == (torch.uint8 if bits == 5 else torch.int32)
    codes = sum(dense_nbytes(m.packed.size(0) * m.K, bits) for m in layers.values())
    per_channel = sum(m.w_scale.numel() * 4 + m.w_zero.numel() * (1 if (bits == 5 or n != "8") else 4)
                      for n, m in layers.items())
    assert saved_weight_bytes(im) == codes + per_channel < zsqfast.integer_report(im)["weight_bytes"]
    zsqfast.save_integer_model(back, tmp_path / "again.safetensors")  # a loaded model saves the same bytes
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()


def test_format_1_file_still_loads(tmp_path):
    """The previous writer: the plain state_dict (kernel layout) with {"format": 1} and no checksum."""
    from safetensors.torch import save_file

    im = integer_model(4)
    path = tmp_path / "v1.safetensors"
    tensors = {k: v.detach().contiguous().clone() for k, v in im.state_dict().items()}
    save_file(tensors, str(path), metadata={"zsqfast_integer": json.dumps({"format": 1,
                                                                           "edits": im.zsqfast_integer["edits"]})})
    back = zsqfast.load_integer_model(path, awkward_model)
    assert_identical(im, back, torch.randn(2, 3, 8, 8))
    assert back.zsqfast_integer["format"] == FORMAT_VERSION


def saved(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["zsqfast_integer"])


def test_format_2_file_still_loads(tmp_path):
    """The previous writer: the checksum covers the tensor bytes only, IntConv2d configs have no
    channels_last (loaded with the default, channels_last outputs)."""
    from safetensors.torch import save_file

    im = integer_model(4)
    zsqfast.save_integer_model(im, tmp_path / "m.safetensors")
    tensors, meta = saved(tmp_path / "m.safetensors")
    edits = [dict(e, config={k: v for k, v in e["config"].items() if k != "channels_last"}) if "config" in e else e
             for e in meta["edits"]]
    path = tmp_path / "v2.safetensors"
    for crc, ok in ((_crc32(tensors), True), (_crc32(tensors) ^ 1, False)):
        save_file(tensors, str(path), metadata={"zsqfast_integer": json.dumps({"format": 2, "crc32": crc,
                                                                               "edits": edits})})
        if not ok:
            with pytest.raises(ValueError, match=r"corrupted integer model file \(format 2\): checksum mismatch"):
                zsqfast.load_integer_model(path, awkward_model)
            continue
        back = zsqfast.load_integer_model(path, awkward_model)
        assert_identical(im, back, torch.randn(2, 3, 8, 8))
        assert all(m.channels_last for m in back.modules() if isinstance(m, IntConv2d))
        assert back.zsqfast_integer["format"] == FORMAT_VERSION


def test_checksum_covers_metadata_and_tensor_headers(tmp_path):
    """A flipped a_bits / stride in the edits, or a renamed or reshaped tensor, with the data untouched, is
    refused (format 2 loaded the a_bits flip silently, with wrong outputs)."""
    from safetensors.torch import save_file

    im = integer_model(4)
    path, bad = tmp_path / "m.safetensors", tmp_path / "bad.safetensors"
    zsqfast.save_integer_model(im, path)
    tensors, meta = saved(path)
    i = next(i for i, e in enumerate(meta["edits"]) if e["op"] == "IntConv2d" and e["config"]["a_bits"] == 4)

    def changed(**cfg):
        edits = [dict(e) for e in meta["edits"]]
        edits[i] = dict(edits[i], config=dict(edits[i]["config"], **cfg))
        return dict(meta, edits=edits)

    k = sorted(tensors)[0]
    v = tensors[k]
    for t, m in ((tensors, changed(a_bits=3)), (tensors, changed(stride=[2, 2])),
                 ({("x" + kk if kk == k else kk): vv for kk, vv in tensors.items()}, meta),
                 (dict(tensors, **{k: v.reshape(1, *v.shape)}), meta)):
        save_file(t, str(bad), metadata={"zsqfast_integer": json.dumps(m)})
        with pytest.raises(ValueError, match=r"corrupted integer model file \(format 3\): checksum mismatch"):
            zsqfast.load_integer_model(bad, awkward_model)
    assert meta["format"] == FORMAT_VERSION == 3


def test_bad_files_give_clear_errors(tmp_path):
    from safetensors.torch import save_file

    im = integer_model(3)
    path = tmp_path / "m.safetensors"
    zsqfast.save_integer_model(im, path)
    data = path.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: len(data) - 100])  # truncated
    with pytest.raises(ValueError, match="truncated or corrupted"):
        zsqfast.load_integer_model(bad, awkward_model)
    flipped = bytearray(data)
    flipped[-50] ^= 0x10  # one bit of the tensor data
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum mismatch"):
        zsqfast.load_integer_model(bad, awkward_model)

    tensors, meta = saved(path)
    for version in (99, "2", None):
        save_file(tensors, str(bad), metadata={"zsqfast_integer": json.dumps(dict(meta, format=version))})
        with pytest.raises(ValueError, match=f"file format {version!r}; this zsqfast reads formats 1, 2, 3"):
            zsqfast.load_integer_model(bad, awkward_model)
    save_file(tensors, str(bad), metadata={"zsqfast_integer": "{not json"})
    with pytest.raises(ValueError, match="unreadable 'zsqfast_integer' metadata"):
        zsqfast.load_integer_model(bad, awkward_model)
    # a consistent checksum over wrong content: codes one byte short, then a codes tensor missing
    covered = {k: v for k, v in meta.items() if k != "crc32"}
    for edit in ({"0.codes": tensors["0.codes"][:-1]}, {"0.codes": None}):
        t = {k: v for k, v in dict(tensors, **edit).items() if v is not None}
        save_file(t, str(bad), metadata={"zsqfast_integer": json.dumps(dict(meta, crc32=_crc32(t, covered)))})
        with pytest.raises(ValueError, match="corrupted integer model file"):
            zsqfast.load_integer_model(bad, awkward_model)
