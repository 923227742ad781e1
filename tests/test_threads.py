"""The native ops' threads (csrc/pool.h, fedcompress.set_num_threads; issue 18).

Bytes and values never depend on the thread count; below an op's size threshold no helper is used,
above it helpers are; the load gate keeps helpers off a machine whose cores are all busy.
Thread counts are forced with the load gate off (``_C.pool_load_gate(False)``), as this machine is
shared and the gate would otherwise choose one thread whenever someone else is running.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import fedcompress as fc
from fedcompress import _ops

try:
    C = _ops.native()
except Exception as e:  # pragma: no cover
    pytest.skip(f"extension not built: {e}", allow_module_level=True)


@pytest.fixture
def forced():
    """set(n): exactly n threads for native ops whatever the load; restores the defaults after."""
    C.pool_load_gate(False)

    def set_(n):
        fc.set_num_threads(n)

    try:
        yield set_
    finally:
        fc.set_num_threads(None)
        C.pool_load_gate(True)


def _thr(keep: float) -> int:
    """The mask's keep threshold (docs/mask.md: kept iff the Philox word <= floor(keep * 2^32) - 1)."""
    return max(int(keep * 4294967296.0), 1) - 1


def _mask_encode(backend):
    return _ops.get("mask_encode", "cpu", backend)


def _jobs(fn):
    """How many pool jobs went to helpers while fn ran, and fn's result."""
    j = C.pool_jobs()
    out = fn()
    return C.pool_jobs() - j, out


def _update_like(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.5)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_sz_bytes_independent_of_threads(forced, dtype):
    x = _update_like(600_003, 1, dtype)  # 8 blocks, the last one shorter
    codec = fc.SZ(1e-2, "rel", backend="cpp")
    blobs, jobs = {}, {}
    for t in (1, 2, 4):
        forced(t)
        jobs[t], blobs[t] = _jobs(lambda: codec.encode(x))
    assert blobs[1] == blobs[2] == blobs[4]
    assert jobs[1] == 0 and jobs[2] >= 1 and jobs[4] >= 1  # the threaded path really ran
    ref = fc.SZ(1e-2, "rel", backend="torch").encode(x)  # the reference spec, single-threaded
    assert blobs[1] == ref
    outs = {}
    for t in (1, 2, 4):
        forced(t)
        outs[t] = codec.decode(blobs[1])
    assert torch.equal(outs[1].view(torch.uint8 if dtype != torch.float64 else torch.int64).to(torch.int64),
                       outs[2].view(torch.uint8 if dtype != torch.float64 else torch.int64).to(torch.int64))
    assert torch.equal(outs[1], outs[4]) or torch.isnan(outs[1]).any()


def test_mask_independent_of_threads(forced):
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, generator=g) for n in (1_000_003, 4097, 300_000)]
    thr = _thr(0.1)
    rm = fc.RandomMask(0.1, backend="cpp")
    res = {}
    for t in (1, 2, 4):
        forced(t)
        vals, counts = _mask_encode("cpp")(xs, [11, 12, 13], thr)
        blobs = [rm.encode(x, seed=50 + i) for i, x in enumerate(xs[:1] * 3)]
        res[t] = (vals.numpy().tobytes(), counts, blobs, rm.decode(blobs[0]), rm.decode_mean(blobs))
    ref_vals, ref_counts = _mask_encode("torch")(xs, [11, 12, 13], thr)
    assert res[1][0] == ref_vals.numpy().tobytes() and res[1][1] == ref_counts
    for t in (2, 4):
        assert res[t][0] == res[1][0] and res[t][1] == res[1][1] and res[t][2] == res[1][2]
        assert torch.equal(res[t][3], res[1][3]) and torch.equal(res[t][4], res[1][4])


def test_synth_kernels_independent_of_threads(forced):
    from fedcompress.cpp import synth as S
    from fedcompress.synth.ops import conv_pool_ref

    g = torch.Generator().manual_seed(4)
    xs = torch.randn(37, 32, 32, 1, generator=g)  # 37 images: 3 weight-gradient blocks, the last short
    w, b = torch.randn(32, 1, 5, 5, generator=g), torch.randn(32, generator=g)
    gout = torch.randn(37, 32, 14, 14, generator=g)
    x2 = torch.randn(5, 18, 18, 8, generator=g)
    res = {}
    old = torch.get_num_threads()
    try:
        for t in (1, 2, 4):
            forced(None)
            torch.set_num_threads(t)  # the FedSynth kernels take torch's count
            out, arg = S.conv_pool_cpp(xs, w, b, 2)
            dw, db, dx = S.conv_at_bwd_cpp(gout, xs, w, 2, arg, True)
            cols = S.im2col_cpp(x2, (5, 5), (1, 1), (1, 1))
            back = S.col2im_cpp(cols, (5, 8, 14, 14), (5, 5), (1, 1), (2, 2), (1, 1))
            res[t] = [out, arg, S.conv_at_cpp(xs, w, b, 2, arg), dw, dx, cols, back]
    finally:
        torch.set_num_threads(old)
    for t in (2, 4):
        for a, b_ in zip(res[1], res[t], strict=True):
            assert torch.equal(a, b_)
    # and against the torch reference (the kernels' own tests check tolerances; here: same shapes, close)
    ref_out, ref_arg = conv_pool_ref(xs, w, b, 2)
    assert torch.equal(res[2][1], ref_arg) and torch.allclose(res[2][0], ref_out, atol=1e-4)


def test_set_num_threads_caps_synth(forced):
    """fedcompress.set_num_threads(1) keeps the FedSynth kernels on one thread whatever torch says."""
    from fedcompress.cpp import synth as S

    xs = torch.randn(64, 32, 32, 1)
    w, b = torch.randn(32, 1, 5, 5), torch.randn(32)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        forced(1)
        assert _jobs(lambda: S.conv_pool_cpp(xs, w, b, 2))[0] == 0
        forced(None)
        assert _jobs(lambda: S.conv_pool_cpp(xs, w, b, 2))[0] == 1
    finally:
        torch.set_num_threads(old)


# ---- the size thresholds: one thread below, helpers from there ----------------------------------


def test_sz_threshold_both_sides(forced):
    forced(2)
    codec = fc.SZ(1e-2, "rel", block_size=4096, backend="cpp")  # many blocks on both sides
    below = _update_like((1 << 17) - 1)  # 2 x 2^16 values: sz.cpp kMinThreadValues
    at = _update_like(1 << 17)
    n_below, blob_below = _jobs(lambda: codec.encode(below))
    n_at, blob_at = _jobs(lambda: codec.encode(at))
    assert n_below == 0 and n_at == 1
    assert _jobs(lambda: codec.decode(blob_below))[0] == 0
    assert _jobs(lambda: codec.decode(blob_at))[0] == 1
    assert torch.equal(codec.decode(blob_at), fc.SZ(1e-2, "rel", block_size=4096, backend="torch").decode(blob_at))


def test_mask_threshold_both_sides(forced):
    forced(2)
    thr = _thr(0.25)
    below = torch.randn((1 << 18) - 1)  # 2 x 2^17 elements: mask.cpp for_units
    at = torch.randn(1 << 18)
    assert _jobs(lambda: _mask_encode("cpp")([below], [5], thr))[0] == 0
    n, (vals, counts) = _jobs(lambda: _mask_encode("cpp")([at], [5], thr))
    assert n == 2  # count pass and compaction pass
    rv, rc = _mask_encode("torch")([at], [5], thr)
    assert counts == rc and torch.equal(vals, rv)


def test_one_thread_never_dispatches(forced):
    forced(1)
    x = _update_like(1 << 20)
    assert _jobs(lambda: fc.SZ(1e-2, backend="cpp").encode(x))[0] == 0


# ---- the load gate ------------------------------------------------------------------------------


def _busy_module():
    path = Path(__file__).resolve().parents[1] / "bench" / "busy.py"
    spec = importlib.util.spec_from_file_location("fc_bench_busy", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_load_gate_keeps_helpers_off_busy_cores():
    ncpu = len(os.sched_getaffinity(0))
    if ncpu > 8:
        pytest.skip(f"{ncpu} CPUs: filling them with spinners is too costly for a unit test")
    fc.set_num_threads(2)
    x = _update_like(1 << 20)
    try:
        with _busy_module().busy(ncpu, max_seconds=30):
            assert C.pool_free_cpus() == 0
            n, blob = _jobs(lambda: fc.SZ(1e-2, backend="cpp").encode(x))
        assert n == 0  # one thread: every core had a runnable spinner on it
    finally:
        fc.set_num_threads(None)
    assert 0 <= C.pool_free_cpus() <= ncpu
    assert blob == fc.SZ(1e-2, backend="torch").encode(x)


def _helper_threads() -> list[int]:
    """Thread ids of the pool's helpers (named "fc-pool" by csrc/pool.h)."""
    out = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == "fc-pool":
                    out.append(int(tid))
        except OSError:  # a thread that just ended
            pass
    return out


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_helpers_are_kept_off_the_callers_cpu(forced):
    """csrc/pool.h, item 4: before a job the helpers are confined to every CPU but the caller's, so a
    woken helper cannot be queued behind the caller on its CPU (it was, in a VM after an idle gap)."""
    cpus = set(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("one CPU: no helpers")
    forced(2)
    x = _update_like(1 << 20)
    codec = fc.SZ(1e-2, "rel", backend="cpp")
    ref = codec.encode(x)  # starts the pool (it reads the process's CPUs while this thread has them all)
    try:
        for cpu in sorted(cpus)[:2]:
            os.sched_setaffinity(0, {cpu})  # this thread only: the caller now runs on `cpu`
            n, blob = _jobs(lambda: codec.encode(x))
            assert n >= 1 and blob == ref
            helpers = _helper_threads()
            assert helpers
            assert all(os.sched_getaffinity(t) == cpus - {cpu} for t in helpers)
    finally:
        os.sched_setaffinity(0, cpus)


# ---- errors, concurrency, arguments -------------------------------------------------------------


def test_threaded_decode_error_is_format_error(forced):
    forced(4)
    x = _update_like(600_000)
    blob = bytearray(fc.SZ(1e-2, backend="cpp").encode(x))
    blob[len(blob) // 2] ^= 0xFF  # a block body: caught by the CRC, or by that block's checks
    with pytest.raises(fc.FormatError):
        fc.SZ(1e-2, backend="cpp").decode(bytes(blob))
    # a corrupt block with a valid CRC: the block's own checks fail on whichever thread decodes it
    from fedcompress import wire

    codec = fc.SZ(1e-2, backend="cpp")
    good = codec.encode(x)
    _, recs = wire.unpack(good, wire.CODEC_SZ_TENSOR)
    data = bytearray(recs[0].data)
    data[-5] ^= 0x5A  # the last block's rANS words / final states
    bad = wire.pack(wire.CODEC_SZ_TENSOR, [wire.Record("", recs[0].dtype, recs[0].shape, bytes(data))])
    with pytest.raises(fc.FormatError):
        codec.decode(bad)


def test_concurrent_callers(forced):
    """Two Python threads encoding at once (the GIL is released): one gets the helpers, the other runs
    inline; both give the reference bytes."""
    forced(2)
    xs = [_update_like(400_000, s) for s in range(4)]
    want = [fc.SZ(1e-2, backend="torch").encode(x) for x in xs]
    got = [None] * 4

    def run(i):
        for _ in range(3):
            got[i] = fc.SZ(1e-2, backend="cpp").encode(xs[i])

    ts = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert got == want


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_set_num_threads_rejects(bad):
    with pytest.raises(ValueError, match="n must be"):
        fc.set_num_threads(bad)


def test_set_num_threads_roundtrip():
    try:
        fc.set_num_threads(3)
        assert fc.get_num_threads() == 3
        fc.set_num_threads(None)
        assert fc.get_num_threads() == torch.get_num_threads()
    finally:
        fc.set_num_threads(None)
    assert np.int64(C.thread_override()) == 0


def _encode_in_child(conn, x):
    # no torch compute here: torch's own OpenMP hangs in a child forked after it ran (not ours)
    conn.send(fc.SZ(1e-2, backend="cpp").encode(x))
    conn.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_after_threads_used(forced):
    """A child forked after the pool ran has no helper threads: it gets a fresh pool and still
    encodes on 2 threads (never waits for the parent's helpers, which do not exist in it)."""
    import multiprocessing as mp

    forced(2)
    x = _update_like(600_000)
    jobs, want = _jobs(lambda: fc.SZ(1e-2, backend="cpp").encode(x))
    assert jobs >= 1  # the parent's helpers exist now
    ctx = mp.get_context("fork")
    a, b = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_encode_in_child, args=(b, x))
    p.start()
    try:
        assert a.poll(60), "child did not answer within 60 s"
        assert a.recv() == want
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
