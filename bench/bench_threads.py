"""Every native op at 1 thread and at the default thread count, quiet and under load (issue 18).

The promise: with default settings no native op is more than 1.3x slower than its own single-thread
time when the cores are busy, and it keeps its speed-up when they are not. Run (one command, quiet
and busy side by side; K = the machine's core count is the issue's setting on 2 cores):

    python -m pytest bench/bench_threads.py --benchmark-only --busy 2 --benchmark-json=/tmp/thr.json -q
    python bench/bench_threads.py /tmp/thr.json      # default / 1-thread time per op and load

Threads: "1" = fedcompress.set_num_threads(1) and torch.set_num_threads(1) (the FedSynth kernels take
torch's count); "default" = neither set (torch's default: all cores). Medians of 61 rounds of each,
in pairs (order drawn at random per pair) within one test, so both see the same background.
Idle gap: each op runs twice, back to back (``gap 0``) and with a 10 ms sleep before every timed
call (``gap 10``: how FL calls the codec, once per update after training or waiting; csrc/pool.h,
item 4: in a VM a helper woken after such a gap was queued on the caller's CPU).
Inputs: an FL-update-like float32 tensor (582K values, half zeros, REL 1e-2, the issue's case) and a
3.15M one (SZ); 4M values at keep 0.1 and 10 clients x 1M (mask); the FedAvg CNN's first layer on
64 images and an im2col/col2im of its second (the FedSynth C++ kernels, called directly).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections import defaultdict

import numpy as np
import pytest
import torch

import fedcompress as fc
from fedcompress import _ops

ROUNDS = 61
GAPS_MS = (0, 10)  # sleep before each timed call (the module docstring)


def _need_cpp():
    if not _ops.available("sz_encode", "cpp")[0]:
        pytest.skip("extension not built")


class _Threads:
    """Switch between 1 thread (fedcompress and torch) and the defaults, restoring torch's count."""

    def __init__(self):
        self.torch_default = torch.get_num_threads()

    def set(self, mode: str) -> None:
        fc.set_num_threads(1 if mode == "1" else None)
        torch.set_num_threads(1 if mode == "1" else self.torch_default)


def _update_like(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 1e-3 * (torch.rand(n, generator=g) < 0.5)


def _sz_cases():
    return {"sz-0.58M": _update_like(582_026), "sz-3.15M": _update_like(3_145_728, 1)}


def _ops_for():
    """name -> (callable, input bytes); built once per process."""
    from fedcompress.cpp import synth as S

    out = {}
    for name, x in _sz_cases().items():
        c = fc.SZ(1e-2, "rel", backend="cpp")
        blob = c.encode(x)
        out[f"{name} encode"] = (lambda c=c, x=x: c.encode(x), x.numel() * 4)
        out[f"{name} decode"] = (lambda c=c, b=blob: c.decode(b), x.numel() * 4)
    thr = max(int(0.1 * 4294967296.0), 1) - 1  # keep 0.1 (docs/mask.md: word <= floor(keep 2^32) - 1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4_000_000, generator=g)
    enc = _ops.get("mask_encode", "cpu", "cpp")
    out["mask-4M encode"] = (lambda: enc([x], [1234], thr), x.numel() * 4)
    rm = fc.RandomMask(0.1, backend="cpp")
    blob = rm.encode(x, seed=7)
    out["mask-4M decode"] = (lambda: rm.decode(blob), x.numel() * 4)
    blobs = [rm.encode(torch.randn(1_000_000, generator=g), seed=100 + c) for c in range(10)]
    out["mask-10x1M decode_mean"] = (lambda: rm.decode_mean(blobs), 10 * 1_000_000 * 4)
    # FedSynth: the C++ kernels themselves, on arguments prepared once as synth/ops.py prepares them
    # (its wrappers also run torch ops, e.g. a permute copy and a sum, which follow torch's own threads)
    C = _ops.native()
    xs = torch.randn(64, 32, 32, 1, generator=g)  # 28x28 zero-padded by 2, channels_last
    w = torch.randn(32, 1, 5, 5, generator=g)
    b = torch.randn(32, generator=g)
    _, arg = S.conv_pool_cpp(xs, w, b, 2)
    xn, wn, bn, argn = S._np(xs), S._ohwc(w), S._bias(b), S._arg_nhwc(arg)
    o = np.empty((64, 14, 14, 32), np.float32)
    a = np.empty((64, 14, 14, 32), np.uint8)
    goutn = np.random.default_rng(3).standard_normal((64, 14, 14, 32), dtype=np.float32)
    dw = np.empty((32, 5, 5, 1), np.float32)
    dx = np.empty_like(xn)
    out["synth conv_pool"] = (lambda: C.synth_conv_pool(xn, wn, bn, 2, o, a, torch.get_num_threads()), xn.nbytes)
    out["synth conv_at"] = (lambda: C.synth_conv_at(xn, wn, bn, 2, argn, o, torch.get_num_threads()), xn.nbytes)
    out["synth conv_at_bwd"] = (lambda: C.synth_conv_at_bwd(goutn, xn, wn, 2, argn, dw, dx, None, None,
                                                            torch.get_num_threads()), xn.nbytes)
    x2 = np.random.default_rng(4).standard_normal((64, 18, 18, 32), dtype=np.float32)  # conv2's padded input
    cols = np.empty((64 * 14 * 14, 5 * 5 * 32), np.float32)
    out["synth im2col"] = (lambda: C.synth_im2col(x2, 5, 5, (1, 1), (1, 1), cols, torch.get_num_threads()), x2.nbytes)
    dx2 = np.empty((64, 14, 14, 32), np.float32)
    out["synth col2im"] = (lambda: C.synth_col2im(cols, 5, 5, (1, 1), (2, 2), (1, 1), dx2, torch.get_num_threads()),
                           x2.nbytes)
    return out


_CACHE: dict = {}
OPS = ["sz-0.58M encode", "sz-0.58M decode", "sz-3.15M encode", "sz-3.15M decode", "mask-4M encode",
       "mask-4M decode", "mask-10x1M decode_mean", "synth conv_pool", "synth conv_at", "synth conv_at_bwd",
       "synth im2col", "synth col2im"]


@pytest.mark.parametrize("gap_ms", GAPS_MS)
@pytest.mark.parametrize("op", OPS)
def test_op(benchmark, op, gap_ms):
    """Rounds of 1 thread and default come in pairs, so a burst of someone else's load hits both alike;
    the medians of each go to extra_info. pytest-benchmark's own stats are the default's.

    The order inside a pair is drawn at random (seeded): on 2 cores shared with 2 spinners the
    scheduler preempts the bench process every ~4 ms time slice, and with a fixed A B order a call of
    a few ms locks onto that period, so one mode took the ~4 ms wait for 7-10 pairs in a row and the
    medians split by a factor 2 between modes doing identical single-thread work (2026-11-30: synth
    conv_at_bwd 3.7 vs 7.1 ms, both modes running on the caller alone)."""
    _need_cpp()
    if not _CACHE:
        _CACHE.update(_ops_for())
    fn, nbytes = _CACHE[op]
    th = _Threads()
    times = {"1": [], "default": []}
    try:
        for mode in ("1", "default"):  # warm-up: pool helpers started, scratch buffers allocated
            th.set(mode)
            fn(), fn()
        rng = np.random.default_rng(0)
        for _ in range(ROUNDS):
            for mode in ("1", "default")[:: rng.choice([1, -1])]:
                th.set(mode)
                if gap_ms:
                    time.sleep(gap_ms / 1e3)
                t0 = time.perf_counter()
                fn()
                times[mode].append(time.perf_counter() - t0)
    finally:
        th.set("default")
    # schema 1 of fedcompress/benchtable.py (`fedcompress bench`): the default-thread calls are the row
    benchmark.extra_info.update(schema=1, op=op, provider="fc-cpp (default threads)", input_bytes=nbytes,
                                times_s=times["default"], times_1_s=times["1"], nbytes=nbytes,
                                threads_default=fc.get_num_threads(), gap_ms=gap_ms,
                                t1=statistics.median(times["1"]), tdefault=statistics.median(times["default"]))
    benchmark.pedantic(fn, rounds=3, iterations=1)


def table(path: str) -> str:
    """default / 1-thread time per op and load (< 1: a speed-up; the promise: <= 1.3 busy): the
    median over the pairs of each pair's ratio, beside each mode's median time. Under busy2 the ratio
    of the two medians still split by 2x between runs (2026-11-30: conv_at_bwd 2.21 in one run, 0.57
    in the next, mask decode_mean 0.55 / 1.72): with ~half of the calls of a few ms taking a ~4 ms
    time-slice wait, either mode's median can land in the slow group. A pair's two calls sit side by
    side, so the wait cancels in the pair's ratio whichever call it hits; the pair median read
    1.00-1.08 on those same runs."""
    data = json.load(open(path))
    t: dict = defaultdict(dict)
    loads = []
    for bm in data["benchmarks"]:
        e = bm["extra_info"]
        load = e.get("load", "quiet") + (f" gap {e['gap_ms']} ms" if e.get("gap_ms") else "")
        if load not in loads:
            loads.append(load)
        t[e["op"]][(load, "1")] = e["t1"]
        t[e["op"]][(load, "default")] = e["tdefault"]
        t[e["op"]][(load, "ratio")] = float(np.median(np.divide(e["times_s"], e["times_1_s"])))
    head = "| op | " + " | ".join(f"{ld} 1 thr ms | {ld} default ms | {ld} default / 1 (pairs)" for ld in loads) + " |"
    out = [head, "|---|" + "---:|" * (3 * len(loads))]
    worst = defaultdict(list)
    for op, r in t.items():
        cells = []
        for ld in loads:
            a, b, ratio = (r.get((ld, m), np.nan) for m in ("1", "default", "ratio"))
            cells += [f"{a * 1e3:.2f}", f"{b * 1e3:.2f}", f"{ratio:.2f}"]
            worst[ld].append(ratio)
        out.append(f"| {op} | " + " | ".join(cells) + " |")
    for ld in loads:
        out.append(f"\n{ld}: default / 1 thread: max {max(worst[ld]):.2f}, median {statistics.median(worst[ld]):.2f}")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(sys.argv[1]))
