"""fc-cpp against pysz's default, both on one thread, on bench_sz's arrays: the ceiling of bench_sz's
busy cells (with every core busy our pool runs on the caller alone, and pysz is single-threaded).

    python bench/sz_one_thread.py            # ~1 min; medians of 41 fc calls and 15 pysz calls

Prints one row per array and REL: times in ms and pysz time / fc time for encode and decode.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_sz import ARRAYS, EBS, array, codec  # noqa: E402


def median_ms(fn, n: int) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def main() -> None:
    torch.set_num_threads(1)
    import fedcompress as fc

    fc.set_num_threads(1)
    print("| array | REL | fc encode ms | pysz encode ms | encode x | fc decode ms | pysz decode ms | decode x |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in ARRAYS:
        x = array(name)
        for rel in EBS:
            fenc, fdec = codec("fc-cpp", x, rel)
            penc, pdec = codec("pysz-default", x, rel)
            fb, pb = fenc(), penc()
            fe, fd = median_ms(fenc, 41), median_ms(lambda d=fdec, b=fb: d(b), 41)
            pe, pd = median_ms(penc, 15), median_ms(lambda d=pdec, b=pb: d(b), 15)
            print(f"| {name} | {rel:g} | {fe:.3f} | {pe:.3f} | {pe / fe:.1f}x | {fd:.3f} | {pd:.3f} | {pd / fd:.1f}x |")


if __name__ == "__main__":
    main()
