"""Page faults and time of the decoders in a fresh process, as a server runs them.

    python bench/decode_faults.py                      # ~15 s
    PYTHONPATH=/tmp/old python bench/decode_faults.py  # an older build (git worktree), for A/B

Encodes 100 clients x 1M float32 at keep 0.1 (as bench_mask.py's decode_mean group), then times
``decode_mean`` of all 100 and 10 ``decode`` calls whose outputs are kept (a server holding the
decoded updates): median of 9, with the minor page faults per call (getrusage). Buffers that numpy
allocated (the values copied out of each payload, the decode output) faulted on every call here
(12,791 faults per decode_mean), while the same sizes from torch's allocator did not; how many
fault depends on the process's heap history, so bench_mask.py's pytest process, which allocates
differently before it times, shows little of it. Then the same for SZ's decode of a 582K-value
update (REL 1e-2), alone and 10 kept (docs/mask.md, "Numpy buffers faulted on every call").
"""

import resource
import statistics
import time

import torch

import fedcompress as fc


def timed(fn, n: int = 9) -> tuple[float, int]:
    ts, faults = [], []
    for _ in range(n):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return statistics.median(ts) * 1e3, int(statistics.median(faults))


def report(name: str, fn) -> None:
    ms, faults = timed(fn)
    print(f"{name:28s} {ms:8.2f} ms  {faults:6d} minor faults per call")


def main() -> None:
    g = torch.Generator().manual_seed(1)
    rm = fc.RandomMask(0.1, backend="cpp")
    blobs = [rm.encode(torch.randn(1_000_000, generator=g), seed=1000 + c) for c in range(100)]
    for name, fn in (("decode_mean, 100 clients", lambda: rm.decode_mean(blobs)),
                     ("decode x 10, outputs kept", lambda: [rm.decode(b) for b in blobs[:10]])):
        report(name, fn)
    x = torch.randn(582_026, generator=g) * 1e-3 * (torch.rand(582_026, generator=g) < 0.5)
    sz = fc.SZ(1e-2, "rel", backend="cpp")
    streams = [sz.encode(x + 1e-4 * k) for k in range(10)]
    report("sz decode 0.58M, alone", lambda: sz.decode(streams[0]))
    report("sz decode x 10, kept", lambda: [sz.decode(b) for b in streams])


if __name__ == "__main__":
    main()
