"""Mask payload framing (on top of fedcompress/wire.py), shared by the tensor codec and the compressor.

The payload is the wire frame with a 14-byte meta (``<QIBB``: seed or mask id u64, thr_m1 u32, flags u8
with bit 0 = unbiased, values dtype code u8) and one record per tensor holding its kept values in
index order (float32, or float16 with ``values="fp16"``): no bitmap, no indices; the decoder
regenerates the mask from the seed and checks that the kept count agrees with the number of values
sent. The unbiased flag travels in each payload, so a payload made with ``unbiased=False`` still
decodes raw, whatever the decoder's own setting.
"""

from __future__ import annotations

import math
import struct

import torch

from ... import wire
from ...errors import FormatError

VALUE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
_META = "<QIBB"  # seed / mask id u64, thr_m1 u32, flags u8 (bit 0: unbiased), values dtype code u8
META_LEN = 14


def pack_meta(seed: int, thr_m1: int, unbiased: bool, vdtype: torch.dtype) -> bytes:
    return struct.pack(_META, seed, thr_m1, int(unbiased), wire.DTYPE_CODES[vdtype])


def unpack_meta(meta) -> tuple[int, int, bool, torch.dtype]:
    if len(meta) != META_LEN:
        raise FormatError(f"mask header is {len(meta)} bytes, expected {META_LEN}")
    seed, thr_m1, flags, vcode = struct.unpack(_META, meta)
    if flags & ~1:
        raise FormatError(f"mask header: unknown flags {flags:#x}")
    vdtype = wire.CODE_DTYPES.get(vcode)
    if vdtype not in (torch.float32, torch.float16):
        raise FormatError(f"mask header: values dtype code {vcode} is not float32/float16")
    return seed, thr_m1, bool(flags & 1), vdtype


def check_count_plausible(k: int, n: int, thr_m1: int, name: str) -> None:
    """Reject a kept count more than 10 standard deviations (+16) from n * keep before regenerating.

    A genuine payload's count is Binomial(n, keep): off by 10 sigma with probability < 1e-22. A forged
    shape (say 2^24 elements for 5,000 values) is thus refused without spending O(n) regenerating its
    mask (fuzzing found such payloads costing > 1 s on the torch reference).
    """
    p = (thr_m1 + 1) / 2**32
    mean = n * p
    if abs(k - mean) > 10.0 * math.sqrt(n * p * (1.0 - p)) + 16:
        raise FormatError(f"record {name!r}: {k} kept values for {n} elements at keep={p:.6g} is implausible")


def values_from(rec: wire.Record, vdtype: torch.dtype, thr_m1: int) -> torch.Tensor:
    size = wire.itemsize(vdtype)
    if len(rec.data) % size:
        raise FormatError(
            f"record {rec.name!r}: {len(rec.data)} bytes is not a whole number of {vdtype} values"
        )
    k = len(rec.data) // size
    if k > rec.numel:
        raise FormatError(f"record {rec.name!r}: {k} kept values for {rec.numel} elements")
    check_count_plausible(k, rec.numel, thr_m1, rec.name)
    return wire.tensor_from_bytes(rec.data, vdtype, (k,), f"record {rec.name!r}").to(torch.float32)


def values_bytes(values: torch.Tensor, vdtype: torch.dtype) -> memoryview:
    return wire.tensor_bytes(values.to(vdtype))


def check_alloc_bits(n_clients: int, numel: int) -> None:
    # the decoders hold one mask bit per element and client besides the output
    wire.check_alloc(n_clients * ((numel + 63) // 64) * 8 + numel * 4, "mask decode")
