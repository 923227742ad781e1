"""Baselines: ``none`` (dense, exact dtypes) and ``fp16`` (floats cast to float16)."""

from __future__ import annotations

import torch

from .. import wire
from ..api import Compressor, RoundContext, StateDict, register
from ..errors import FormatError


@register("none")
class NoneCompressor(Compressor):
    """Sends every tensor as raw bytes in its own dtype: the dense reference for byte counts."""

    codec = wire.CODEC_NONE

    def compress(self, update: StateDict, ctx: RoundContext) -> bytes:
        return wire.pack(self.codec, [wire.lossless_record(k, v) for k, v in update.items()])

    def decompress(self, payload: bytes, ctx: RoundContext) -> StateDict:
        _, records = wire.unpack(payload, self.codec)
        return _records_to_state(records)


@register("fp16")
class FP16Compressor(Compressor):
    """float32/float64/bfloat16 tensors travel as float16 (lossy); everything else exact."""

    codec = wire.CODEC_FP16

    def compress(self, update: StateDict, ctx: RoundContext) -> bytes:
        records = []
        for k, v in update.items():
            sent = v.to(torch.float16) if v.is_floating_point() else v
            records.append(wire.Record(k, v.dtype, tuple(v.shape), wire.tensor_bytes(sent)))
        return wire.pack(self.codec, records)

    def decompress(self, payload: bytes, ctx: RoundContext) -> StateDict:
        _, records = wire.unpack(payload, self.codec)
        out = {}
        for r in records:
            if r.dtype.is_floating_point:
                out[r.name] = wire.tensor_from_bytes(r.data, torch.float16, r.shape, r.name).to(r.dtype)
            else:
                out[r.name] = wire.lossless_tensor(r)
        _check_unique(records)
        return out


def _check_unique(records: list[wire.Record]) -> None:
    if len({r.name for r in records}) != len(records):
        raise FormatError("payload names the same tensor twice")


def _records_to_state(records: list[wire.Record]) -> StateDict:
    _check_unique(records)
    return {r.name: wire.lossless_tensor(r) for r in records}
