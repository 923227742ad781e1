"""A payload that names a tensor twice is a FormatError, for every codec: wire.unpack checks it once
for all of them (the state-dict codecs each had their own copy of the check)."""

import pytest
import torch

from fedcompress import wire
from fedcompress.api import RoundContext, get_compressor
from fedcompress.errors import FormatError


def _rename_second_as_first(blob: bytes, codec: int) -> bytes:
    meta, recs = wire.unpack(blob, codec)
    assert len(recs) >= 2
    a, b = recs[0], recs[1]
    recs[1] = wire.Record(a.name, b.dtype, b.shape, bytes(b.data))
    return wire.pack(codec, recs, bytes(meta))  # a valid frame and checksum: only the names are wrong


def test_wire_unpack_rejects_a_repeated_name():
    recs = [wire.lossless_record("w", torch.arange(4.0)), wire.lossless_record("w", torch.arange(3.0))]
    with pytest.raises(FormatError, match="'w' twice"):
        wire.unpack(wire.pack(wire.CODEC_NONE, recs), wire.CODEC_NONE)
    ok = [wire.lossless_record("w", torch.arange(4.0)), wire.lossless_record("v", torch.arange(3.0))]
    assert [r.name for r in wire.unpack(wire.pack(wire.CODEC_NONE, ok), wire.CODEC_NONE)[1]] == ["w", "v"]


@pytest.mark.parametrize("spec", ["none", "sz:rel=1e-2", "mask:keep=0.5"])
def test_state_dict_codecs_reject_a_repeated_name(spec):
    comp = get_compressor(spec)
    ctx = RoundContext(round=1, client=2, seed=3)
    g = torch.Generator().manual_seed(0)
    update = {"a": torch.randn(2000, generator=g), "b": torch.randn(2000, generator=g)}
    blob = comp.compress(update, ctx)
    assert set(comp.decompress(blob, ctx)) == {"a", "b"}
    with pytest.raises(FormatError, match="twice"):
        comp.decompress(_rename_second_as_first(blob, wire.peek_codec(blob)), ctx)
