"""bench_sz's update (0.58M values) decoded by ``fc.SZ`` against the bare native decode under it.

    python bench/sz_decode_parts.py          # ~10 s

Per REL bound (1e-2, 1e-3) and thread count (1, 2): the median of 300 calls (after 30 decodes) of
``fc.SZ.decode`` as bench_sz times it (``codec("fc-cpp", array("update"), rel)``), of
``_C.sz_decode`` on the same stream's section, and of ``wire.unpack`` (frame and CRC). The difference
between the first two is the Python around the kernel. docs/sz.md, "The update's decode cell".
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np

import fedcompress as fc
from fedcompress import wire

sys.path.insert(0, str(Path(__file__).parent))
from bench_sz import array, codec  # noqa: E402
from sz_one_thread import median_ms  # noqa: E402


def parts(rel: float, threads: int) -> str:
    enc, dec = codec("fc-cpp", array("update"), rel)
    blob = enc()
    (rec,) = wire.unpack(blob, wire.CODEC_SZ_TENSOR)[1]
    _, _, step, _, bs, _ = struct.unpack("<BBddII", bytes(rec.data[:26]))
    section = np.frombuffer(rec.data[26:], np.uint8)
    out = np.empty(rec.numel * 4, np.uint8)
    native = fc._ops.native()
    fc.set_num_threads(threads)
    for _ in range(30):  # warm-up
        dec(blob)
    full = median_ms(lambda: dec(blob), 300)
    bare = median_ms(lambda: native.sz_decode(section, out, 1, rec.numel, bs, step), 300)
    unpack = median_ms(lambda: wire.unpack(blob, wire.CODEC_SZ_TENSOR), 300)
    return (f"REL {rel:g}, {threads} thread(s): fc.SZ.decode {full:.3f} ms, _C.sz_decode {bare:.3f} ms, "
            f"wire.unpack {unpack:.3f} ms ({len(blob)} bytes)")


def main() -> None:
    for rel in (1e-2, 1e-3):
        for threads in (1, 2):
            print(parts(rel, threads))

if __name__ == "__main__":
    main()
