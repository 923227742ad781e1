"""The payload checksum: the extension's CRC-32 (PCLMULQDQ folding) beside zlib.crc32, same bytes.

    python -m pytest bench/bench_wire.py --benchmark-only --benchmark-columns=min,median,max

Sizes: a 3 MB payload (a 3M-value tensor at ~4x) and 25 MB. Every payload is checksummed once to
pack and once to unpack, so this is on every encode and decode.
"""

import os
import zlib

import pytest

from fedcompress import wire

SIZES = {"3MB": 3_000_000, "25MB": 25_000_000}
_DATA = {k: os.urandom(n) for k, n in SIZES.items()}


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("provider", ["fedcompress", "zlib"])
def test_crc32(benchmark, provider, size):
    data = _DATA[size]
    if provider == "fedcompress" and wire.crc32 is zlib.crc32:
        pytest.skip("the extension's CRC-32 is not available here (no _C or no PCLMULQDQ)")
    fn = wire.crc32 if provider == "fedcompress" else zlib.crc32
    benchmark.group = f"crc32-{size}"
    got = benchmark.pedantic(fn, args=(data,), rounds=21, warmup_rounds=1)
    assert got == zlib.crc32(data)
    # schema 1 of fedcompress/benchtable.py (`fedcompress bench`): zlib is the yardstick
    benchmark.extra_info.update(schema=1, op="crc32", case=size, provider=provider, input_bytes=len(data),
                                peer=provider == "zlib")
