"""Wire format: exact round trips of every dtype and shape, and FormatError for anything wrong."""

import struct
import zlib

import pytest
import torch

import fedcompress as fc
from fedcompress import wire

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool]
SHAPES = [(), (0,), (1,), (7,), (3, 0, 2), (5, 4), (2, 3, 4, 5)]


def _sample(dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**62)), min(info.max, 2**62), shape, generator=g, dtype=torch.int64).to(dtype)


def _bit_equal(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_lossless_round_trip_every_dtype_and_shape(dtype, shape):
    t = _sample(dtype, shape)
    blob = wire.pack(wire.CODEC_NONE, [wire.lossless_record("t", t)])
    _, recs = wire.unpack(blob, wire.CODEC_NONE)
    out = wire.lossless_tensor(recs[0])
    assert out.dtype == dtype and out.shape == t.shape
    assert _bit_equal(out, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.bool], ids=str)
def test_decoded_tensors_own_their_memory(dtype):
    """A decoder's tensors stay valid and unchanged when the caller reuses the payload's buffer
    (wire.tensor_from_bytes copies; a view into the payload would change with it)."""
    t = _sample(dtype, (5, 4))
    blob = bytearray(wire.pack(wire.CODEC_NONE, [wire.lossless_record("t", t)]))
    _, recs = wire.unpack(blob, wire.CODEC_NONE)
    out = wire.lossless_tensor(recs[0])
    del recs
    blob[:] = bytes(len(blob))  # the caller reuses its receive buffer
    assert _bit_equal(out, t)
    assert out.reshape(-1).view(torch.uint8).data_ptr() % 64 == 0  # torch's own, aligned allocation


def test_special_floats_bit_exact():
    t = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, 3.4e38])
    t[0] = torch.tensor([0x7FC01234], dtype=torch.int32).view(torch.float32)  # NaN with a payload
    out = wire.lossless_tensor(wire.unpack(wire.pack(1, [wire.lossless_record("x", t)]), 1)[1][0])
    assert torch.equal(out.view(torch.int32), t.view(torch.int32))


def test_non_contiguous_input():
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    t = base[:, ::3].t()  # non-contiguous
    assert not t.is_contiguous()
    out = wire.lossless_tensor(wire.unpack(wire.pack(1, [wire.lossless_record("x", t)]), 1)[1][0])
    assert torch.equal(out, t.contiguous())


def test_meta_and_names_survive():
    recs = [wire.lossless_record("layer.0.weight", torch.ones(2)), wire.lossless_record("ünï", torch.zeros(1))]
    meta, out = wire.unpack(wire.pack(wire.CODEC_NONE, recs, meta=b"\x01\x02"), wire.CODEC_NONE)
    assert bytes(meta) == b"\x01\x02" and [r.name for r in out] == ["layer.0.weight", "ünï"]


def _payload():
    return wire.pack(wire.CODEC_NONE, [wire.lossless_record("w", torch.arange(10.0)),
                                       wire.lossless_record("n", torch.tensor(3))])


def _recrc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_every_truncation_raises_format_error():
    blob = _payload()
    for n in range(len(blob)):
        with pytest.raises(fc.FormatError):
            wire.unpack(blob[:n], wire.CODEC_NONE)


def test_every_bit_flip_is_detected():
    blob = bytearray(_payload())
    for i in range(len(blob)):
        for bit in (0, 7):
            bad = bytearray(blob)
            bad[i] ^= 1 << bit
            with pytest.raises(fc.FormatError):
                wire.unpack(bytes(bad), wire.CODEC_NONE)


def test_appended_bytes_and_wrong_codec():
    blob = _payload()
    with pytest.raises(fc.FormatError):
        wire.unpack(blob + b"\x00", wire.CODEC_NONE)
    with pytest.raises(fc.FormatError, match="expected"):
        wire.unpack(blob, wire.CODEC_FP16)
    with pytest.raises(fc.FormatError, match="magic"):
        wire.unpack(b"XXXX" + blob[4:], wire.CODEC_NONE)
    with pytest.raises(fc.FormatError):
        wire.unpack("not bytes", wire.CODEC_NONE)


def test_huge_shape_with_valid_checksum_is_refused_before_allocation():
    # A hostile sender can always fix the CRC: shape 2^40 x float64 with 8 data bytes must not allocate.
    w = wire.Writer()
    w.raw(wire.MAGIC)
    w.u16(wire.FORMAT_VERSION)
    w.u16(wire.CODEC_NONE)
    w.u32(0)
    w.u32(1)
    w.str("x")
    w.u8(wire.DTYPE_CODES[torch.float64])
    w.u8(1)
    w.u64(1 << 40)
    w.blob(b"\x00" * 8)
    with pytest.raises(fc.FormatError, match="limit"):
        wire.unpack(_recrc(w.getvalue()), wire.CODEC_NONE)


def test_header_counts_checked_against_length():
    w = wire.Writer()
    w.raw(wire.MAGIC)
    w.u16(wire.FORMAT_VERSION)
    w.u16(wire.CODEC_NONE)
    w.u32(0)
    w.u32(0xFFFFFFFF)  # records claimed: far more than the bytes could hold
    with pytest.raises(fc.FormatError, match="record count"):
        wire.unpack(_recrc(w.getvalue()), wire.CODEC_NONE)
    # data shorter than dtype x shape implies
    rec = wire.Record("x", torch.float32, (4,), b"\x00" * 12)
    _, recs = wire.unpack(wire.pack(wire.CODEC_NONE, [rec]), wire.CODEC_NONE)
    with pytest.raises(fc.FormatError, match="expected 16"):
        wire.lossless_tensor(recs[0])


def test_limit_is_configurable():
    blob = wire.pack(wire.CODEC_NONE, [wire.lossless_record("w", torch.zeros(1000))])
    old = wire.limits.max_decoded_bytes
    try:
        wire.set_max_decoded_bytes(3999)
        with pytest.raises(fc.FormatError, match="limit"):
            wire.unpack(blob, wire.CODEC_NONE)
        wire.set_max_decoded_bytes(4000)
        wire.unpack(blob, wire.CODEC_NONE)
        with pytest.raises(ValueError):
            wire.set_max_decoded_bytes(0)
    finally:
        wire.limits.max_decoded_bytes = old


def test_format_error_is_value_error():
    assert issubclass(fc.FormatError, ValueError)


def test_no_pickle_anywhere_in_the_package():
    import pathlib

    root = pathlib.Path(fc.__file__).parent
    for p in root.rglob("*.py"):
        src = p.read_text()
        assert "import pickle" not in src and "torch.load(" not in src, p


def test_crc32_matches_zlib_at_every_length_and_offset():
    # the checksum may run the extension's carry-less-multiply CRC; zlib.crc32 is the reference
    import os
    import zlib

    if wire.crc32 is zlib.crc32:
        pytest.skip("the extension's CRC-32 is not built or the CPU has no PCLMULQDQ: wire uses zlib itself")
    data = os.urandom(5000)
    for n in list(range(0, 300)) + [1023, 1024, 4096, 4999]:
        for off in (0, 1, 13):
            chunk = memoryview(data)[off : off + n]
            for value in (0, 0xFFFFFFFF, 0x1234ABCD):
                assert wire.crc32(chunk, value) == zlib.crc32(chunk, value), (n, off, value)


@pytest.mark.parametrize("join", ["native", "python"])
def test_pack_join_and_checksum_match_zlib(join):
    # pack's last step: the parts joined, then zlib.crc32 of all of them as u32 LE (the reference)
    import os

    if join == "native":
        try:
            fn = fc._ops.native().join_crc32
        except fc.BackendUnavailable as e:
            pytest.skip(str(e))
    else:
        fn = wire._join_crc32_py
    # the CRC-32 check value of b"123456789" (the standard's, not zlib's own computation)
    assert fn([b"1234", memoryview(b"56789")]) == b"123456789" + (0xCBF43926).to_bytes(4, "little")
    data = os.urandom(3000)
    for sizes in ([], [0], [5], [0, 64, 0, 1], [100, 2000, 3, 63, 64, 65], [2999]):
        parts, at = [], 0
        for i, k in enumerate(sizes):
            chunk = data[at : at + k]
            parts.append((bytes, bytearray, memoryview)[i % 3](chunk))
            at += k
        body = b"".join(bytes(p) for p in parts)
        out = fn(parts)
        assert isinstance(out, bytes) and out == body + struct.pack("<I", zlib.crc32(body)), sizes
