"""Random mask benchmarks: fedcompress backends beside naive torch masking, on the same inputs.

    python -m pytest bench/bench_mask.py --benchmark-only --benchmark-columns=min,median,max,rounds

Groups:
  encode-25M   25M float32, keep=0.1: fedcompress C++ (kernel op; full RandomMask.encode to bytes),
               naive torch ``x[torch.rand(n) < p]``, ``randperm`` + indices, and memcpy (x.clone()).
  decode_mean-100x1M   100 clients x 1M float32, keep=0.1: fedcompress C++ fused decode_mean (from
               bytes), per-client torch loops regenerating the mask with torch.rand (index_put_
               accumulate; masked_scatter_), and a per-client index_add_ loop with sent indices
               (the randperm + indices peers: no regeneration, but 8-byte indices in the payload).
``python bench/bench_mask.py`` prints single-thread CPU times of the same comparisons (see the end).
Triton rows appear only with a CUDA device (interpreter timings are not speed). GB/s of input floats
is in extra_info (``--benchmark-json``); docs/mask.md has the table.
"""

import pytest
import torch

import fedcompress as fc
from fedcompress import _ops
from fedcompress.benchtable import BENCH_SCHEMA
from fedcompress.codecs import mask as M

N_ENCODE = 25_000_000
N_CLIENT, CLIENTS = 1_000_000, 100
KEEP = 0.1
THR = M.keep_threshold(KEEP)


def _has(backend: str, device: str = "cpu") -> bool:
    return _ops.available("mask_encode", backend, device)[0] and not (backend == "triton" and device == "cpu")


def _run(benchmark, fn, nbytes, op, provider, peer=False, rounds=7):
    """Time ``fn`` and state what was measured in fedcompress.benchtable's extra_info schema."""
    benchmark.extra_info.update(schema=BENCH_SCHEMA, op=op, provider=provider, input_bytes=nbytes, peer=peer)
    return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="module")
def x25():
    return torch.randn(N_ENCODE, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------
# encode


@pytest.mark.benchmark(group="encode-25M")
def test_encode_fedcompress_cpp_op(benchmark, x25):
    if not _has("cpp"):
        pytest.skip("extension not built")
    fn = _ops.get("mask_encode", "cpu", "cpp")
    _run(benchmark, lambda: fn([x25], [1234], THR), x25.numel() * 4, "mask encode", "fc-cpp op")


@pytest.mark.benchmark(group="encode-25M")
def test_encode_fedcompress_cpp_bytes(benchmark, x25):
    if not _has("cpp"):
        pytest.skip("extension not built")
    rm = fc.RandomMask(KEEP, backend="cpp")
    blob = _run(benchmark, lambda: rm.encode(x25, seed=1234), x25.numel() * 4, "mask encode", "fc-cpp bytes")
    benchmark.extra_info["payload_bytes"] = len(blob)


@pytest.mark.benchmark(group="encode-25M")
def test_encode_fedcompress_triton_cuda(benchmark, x25):
    if not torch.cuda.is_available() or not _ops.available("mask_encode", "triton", "cuda")[0]:
        pytest.skip("no CUDA")
    xc = x25.cuda()
    fn = _ops.get("mask_encode", "cuda", "triton")

    def run():
        out = fn([xc], [1234], THR)
        torch.cuda.synchronize()
        return out

    _run(benchmark, run, x25.numel() * 4, "mask encode", "fc-triton cuda")


@pytest.mark.benchmark(group="encode-25M")
def test_encode_naive_torch_rand(benchmark, x25):
    g = torch.Generator().manual_seed(1234)
    _run(benchmark, lambda: x25[torch.rand(x25.numel(), generator=g) < KEEP], x25.numel() * 4,
         "mask encode", "naive torch rand", peer=True)


@pytest.mark.benchmark(group="encode-25M")
def test_encode_naive_torch_randperm_indices(benchmark, x25):
    g = torch.Generator().manual_seed(1234)
    k = int(KEEP * x25.numel())

    def run():
        idx = torch.randperm(x25.numel(), generator=g)[:k]
        return idx, x25[idx]

    _run(benchmark, run, x25.numel() * 4, "mask encode", "naive torch randperm", peer=True, rounds=3)


@pytest.mark.benchmark(group="encode-25M")
def test_encode_memcpy(benchmark, x25):
    _run(benchmark, lambda: x25.clone(), x25.numel() * 4, "mask encode", "memcpy", peer=True)


# ---------------------------------------------------------------------------------------------
# server side: decode_mean of 100 clients x 1M


@pytest.fixture(scope="module")
def clients():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(N_CLIENT, generator=g) for _ in range(CLIENTS)]
    seeds = [1000 + c for c in range(CLIENTS)]
    rm = fc.RandomMask(KEEP, backend="cpp" if _has("cpp") else "torch")
    blobs = [rm.encode(x, seed=s) for x, s in zip(xs, seeds, strict=False)]
    # what the naive torch client would send: values under its own torch.rand mask / randperm indices
    naive_vals, naive_idx = [], []
    for x, s in zip(xs, seeds, strict=False):
        gg = torch.Generator().manual_seed(s)
        naive_vals.append(x[torch.rand(N_CLIENT, generator=gg) < KEEP])
        idx = torch.randperm(N_CLIENT, generator=gg)[: int(KEEP * N_CLIENT)]
        naive_idx.append((idx, x[idx]))
    return blobs, seeds, naive_vals, naive_idx


@pytest.mark.benchmark(group="decode_mean-100x1M")
def test_decode_mean_fedcompress_cpp(benchmark, clients):
    if not _has("cpp"):
        pytest.skip("extension not built")
    rm = fc.RandomMask(KEEP, backend="cpp")
    _run(benchmark, lambda: rm.decode_mean(clients[0]), CLIENTS * N_CLIENT * 4, "mask decode_mean", "fc-cpp", rounds=5)


@pytest.mark.benchmark(group="decode_mean-100x1M")
def test_decode_mean_naive_torch_loop(benchmark, clients):
    _, seeds, naive_vals, _ = clients

    def run():
        acc = torch.zeros(N_CLIENT)
        for s, v in zip(seeds, naive_vals, strict=False):
            g = torch.Generator().manual_seed(s)
            m = torch.rand(N_CLIENT, generator=g) < KEEP
            acc.index_put_((m,), v, accumulate=True)  # ~10x faster here than the idiomatic acc[m] += v
        return acc / CLIENTS

    _run(benchmark, run, CLIENTS * N_CLIENT * 4, "mask decode_mean", "naive torch loop", peer=True, rounds=3)


@pytest.mark.benchmark(group="decode_mean-100x1M")
def test_decode_mean_naive_torch_loop_masked_scatter(benchmark, clients):
    _, seeds, naive_vals, _ = clients

    def run():
        acc = torch.zeros(N_CLIENT)
        for s, v in zip(seeds, naive_vals, strict=False):
            g = torch.Generator().manual_seed(s)
            m = torch.rand(N_CLIENT, generator=g) < KEEP
            acc += torch.zeros(N_CLIENT).masked_scatter_(m, v)  # the fastest torch form found
        return acc / CLIENTS

    _run(benchmark, run, CLIENTS * N_CLIENT * 4, "mask decode_mean", "naive torch masked_scatter", peer=True, rounds=3)


@pytest.mark.benchmark(group="decode_mean-100x1M")
def test_decode_mean_naive_torch_indices(benchmark, clients):
    _, _, _, naive_idx = clients

    def run():
        acc = torch.zeros(N_CLIENT)
        for idx, v in naive_idx:
            acc.index_add_(0, idx, v)
        return acc / CLIENTS

    _run(benchmark, run, CLIENTS * N_CLIENT * 4, "mask decode_mean", "naive torch indices", peer=True, rounds=3)


# ---------------------------------------------------------------------------------------------
# CPU time (not wall time), one thread: ``python bench/bench_mask.py`` prints it. On a shared machine
# wall-clock timings swing with other people's load; process CPU time of a single-threaded run does
# much less (it still shares caches and memory bandwidth).


def cpu_time_table() -> None:
    import time

    import numpy as np

    from fedcompress import _C

    torch.set_num_threads(1)
    _C.set_threads(1)

    def cpu(f, r=5):
        ts = []
        for _ in range(r):
            a = time.process_time()
            f()
            ts.append(time.process_time() - a)
        return float(np.median(ts))

    n = 25_000_000
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    thr = M.keep_threshold(0.1)
    g = torch.Generator().manual_seed(1)
    rows = {
        "fedcompress cpp mask_encode (op)": cpu(lambda: M.mask_encode_cpp([x], [1234], thr)),
        "fedcompress RandomMask.encode -> bytes": cpu(
            lambda: fc.RandomMask(0.1, backend="cpp").encode(x, 1234)
        ),
        "naive x[torch.rand(n) < p]": cpu(lambda: x[torch.rand(n, generator=g) < 0.1]),
        "memcpy x.clone()": cpu(lambda: x.clone()),
    }
    for k, v in rows.items():
        print(f"encode-25M 1 thread | {k:42s} | {v * 1e3:8.1f} ms CPU | {n * 4 / v / 1e9:5.2f} GB/s per core")
    N, C = 1_000_000, 100
    rm = fc.RandomMask(0.1, backend="cpp")
    gg = torch.Generator().manual_seed(1)
    xs = [torch.randn(N, generator=gg) for _ in range(C)]
    blobs = [rm.encode(v, seed=1000 + c) for c, v in enumerate(xs)]
    nv = []
    for c, v in enumerate(xs):
        g2 = torch.Generator().manual_seed(1000 + c)
        nv.append(v[torch.rand(N, generator=g2) < 0.1])

    def naive():
        acc = torch.zeros(N)
        for c, v in enumerate(nv):
            g2 = torch.Generator().manual_seed(1000 + c)
            m = torch.rand(N, generator=g2) < 0.1
            acc += torch.zeros(N).masked_scatter_(m, v)
        return acc / C

    rows = {
        "fedcompress RandomMask.decode_mean (bytes)": cpu(lambda: rm.decode_mean(blobs), 3),
        "torch loop: rand mask + masked_scatter_": cpu(naive, 3),
    }
    for k, v in rows.items():
        print(
            f"decode_mean-100x1M 1 thread | {k:42s} | {v * 1e3:8.1f} ms CPU "
            f"| {C * N * 4 / v / 1e9:5.2f} GB/s per core"
        )


if __name__ == "__main__":
    cpu_time_table()
