"""Baselines: ``none`` (dense, exact dtypes) and ``fp16`` (floats cast to float16).

Both take ``ratio=R`` only to refuse a budget they cannot meet (codecs/budget.py): ``none`` is the
dense reference (1x), so every valid ratio (> 1) is refused at construction; ``fp16`` reaches just
under 2x (headers and non-float tensors do not shrink), so ratio >= 2 is refused at construction
and a smaller one is checked against every payload, with a ValueError naming what it reached.
"""

from __future__ import annotations

import torch

from .. import wire
from ..api import Compressor, RoundContext, StateDict, register
from .budget import RATIO_PARAM, RATIO_VALID, budget_bytes, check_reachable, dense_payload_bytes, spec_without


@register("none")
class NoneCompressor(Compressor):
    """Sends every tensor as raw bytes in its own dtype: the dense reference for byte counts."""

    codec = wire.CODEC_NONE
    PARAMS = {"ratio": RATIO_PARAM}

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        r = self.params["ratio"]
        if r is not None:
            raise ValueError(
                f"none: ratio={r:g} cannot be met; none sends the dense update (ratio 1x). "
                f"Use a lossy compressor (mask, sz, fedsynth) for ratio = {RATIO_VALID}"
            )
        self.last_choice = None

    @property
    def spec(self) -> str:
        return spec_without(self, set())

    def compress(self, update: StateDict, ctx: RoundContext) -> bytes:
        return wire.pack(self.codec, [wire.lossless_record(k, v) for k, v in update.items()])

    def decompress(self, payload: bytes, ctx: RoundContext) -> StateDict:
        _, records = wire.unpack(payload, self.codec)
        return _records_to_state(records)


@register("fp16")
class FP16Compressor(Compressor):
    """float32/float64/bfloat16 tensors travel as float16 (lossy); everything else exact."""

    codec = wire.CODEC_FP16
    PARAMS = {"ratio": RATIO_PARAM}

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        r = self.params["ratio"]
        if r is not None and r >= 2.0:
            raise ValueError(
                f"fp16: ratio={r:g} cannot be met; fp16 halves float tensors and reaches under 2x "
                "(headers and non-float tensors stay the same size); use ratio < 2 or a lossy compressor"
            )
        self.last_choice = None

    @property
    def spec(self) -> str:
        return spec_without(self, set())

    def compress(self, update: StateDict, ctx: RoundContext) -> bytes:
        records = []
        for k, v in update.items():
            sent = v.to(torch.float16) if v.is_floating_point() else v
            records.append(wire.Record(k, v.dtype, tuple(v.shape), wire.tensor_bytes(sent)))
        payload = wire.pack(self.codec, records)
        r = self.params["ratio"]
        if r is not None and len(payload) > budget_bytes(update, r):
            check_reachable("fp16", r, dense_payload_bytes(update) / len(payload))
        return payload

    def decompress(self, payload: bytes, ctx: RoundContext) -> StateDict:
        _, records = wire.unpack(payload, self.codec)
        out = {}
        for r in records:
            if r.dtype.is_floating_point:
                out[r.name] = wire.tensor_from_bytes(r.data, torch.float16, r.shape, r.name).to(r.dtype)
            else:
                out[r.name] = wire.lossless_tensor(r)
        return out


def _records_to_state(records: list[wire.Record]) -> StateDict:
    return {r.name: wire.lossless_tensor(r) for r in records}
