"""Stage 5 of SZ (optional): a lossless pass (zstd) over the coded blocks section.

Off by default: after zero-run rANS it rarely wins more than a few percent (measured in
docs/sz.md), and it serialises decode. The decompressed size is declared up front and checked
against an honest bound before anything is allocated.
"""

from __future__ import annotations

import zstandard

from ...errors import FormatError

LOSSLESS_NONE = 0
LOSSLESS_ZSTD = 1


def zstd_compress(data: bytes, level: int = 3) -> bytes:
    return zstandard.ZstdCompressor(level=level).compress(data)


def zstd_decompress(data, size: int) -> bytes:
    """Decompress to exactly ``size`` bytes (the caller has bounded ``size``)."""
    # Not ZstdDecompressor().decompress(): it allocates the frame header's declared content size
    # (a forged header asked for 2^62 bytes: MemoryError, found by fuzzing) whatever max_output_size
    # says. A stream reader never produces more than we read.
    try:
        with zstandard.ZstdDecompressor().stream_reader(memoryview(data)) as reader:
            out = reader.read(size + 1)
    except zstandard.ZstdError as e:
        raise FormatError(f"sz: corrupt zstd section ({e})") from e
    if len(out) != size:
        raise FormatError(f"sz: zstd section decodes to {len(out)} bytes, header says {size}")
    return out
