"""Random-mask kernels in Triton. Reference: fedcompress/codecs/mask/spec.py (mask_encode_ref, mask_decode_ref).

The keep decision is ``word <= thr_m1`` where element i draws word i % 4 of ``tl.randint4x(seed, i // 4)``
(Philox4x32-10, key (seed lo, seed hi), counter (i//4 lo, i//4 hi, 0, 0)): the convention of the
reference and csrc/philox.h, so the same bits come out of every backend. One Philox call per four
elements; tl.interleave puts the four words back in element order.

Work is cut into units of BLOCK elements of one tensor ("segment"); unit tables are built on the host
with a few torch ops. Encode: count kernel (kept per unit) -> exclusive cumsum -> compact kernel
(cumsum within the block gives each kept value its slot). Decode: count kernel over (unit, client)
-> checks and offsets on the host -> one scatter kernel per unit that loops over every client, so the
output block is written once.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from fedcompress.codecs.mask.spec import count_message
from fedcompress.errors import FormatError
from fedcompress.wire import U64_MASK

from . import BLOCK


@triton.jit
def _keep_block(seed, start, n_valid, thr_m1, BLOCK: tl.constexpr):
    """Kept flags of elements start .. start + BLOCK - 1 (False past n_valid), and the local lane ids."""
    # start is a multiple of BLOCK (a multiple of 4): counters start/4 .. start/4 + BLOCK/4 - 1
    ctr = start // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
    w0, w1, w2, w3 = tl.randint4x(seed, ctr)
    word = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))  # w0[j] w1[j] w2[j] w3[j] ...
    lane = tl.arange(0, BLOCK)
    keep = (word.to(tl.uint32, bitcast=True).to(tl.int64) <= thr_m1) & (lane < n_valid)
    return keep, lane


@triton.jit
def _count_kernel(
    seeds_ptr, useg_ptr, ustart_ptr, ulen_ptr, counts_ptr, thr_m1, n_units, n_segs, BLOCK: tl.constexpr
):
    u = tl.program_id(0)
    c = tl.program_id(1)
    seg = tl.load(useg_ptr + u)
    seed = tl.load(seeds_ptr + c * n_segs + seg)
    keep, _ = _keep_block(seed, tl.load(ustart_ptr + u), tl.load(ulen_ptr + u), thr_m1, BLOCK)
    tl.store(counts_ptr + c * n_units + u, tl.sum(keep.to(tl.int32), axis=0).to(tl.int64))


@triton.jit
def _compact_kernel(
    x_ptr, out_ptr, seeds_ptr, useg_ptr, ustart_ptr, ulen_ptr, uin_ptr, uout_ptr, thr_m1, BLOCK: tl.constexpr
):
    u = tl.program_id(0)
    seed = tl.load(seeds_ptr + tl.load(useg_ptr + u))
    keep, lane = _keep_block(seed, tl.load(ustart_ptr + u), tl.load(ulen_ptr + u), thr_m1, BLOCK)
    x = tl.load(x_ptr + tl.load(uin_ptr + u) + lane, mask=keep, other=0.0)
    slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + tl.load(uout_ptr + u) + slot.to(tl.int64), x, mask=keep)


@triton.jit
def _scatter_kernel(
    vals_ptr,
    out_ptr,
    seeds_ptr,
    weights_ptr,
    useg_ptr,
    ustart_ptr,
    ulen_ptr,
    uout_ptr,
    voff_ptr,
    thr_m1,
    n_units,
    n_segs,
    n_clients,
    ACCUMULATE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    u = tl.program_id(0)
    seg = tl.load(useg_ptr + u)
    start = tl.load(ustart_ptr + u)
    n = tl.load(ulen_ptr + u)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(n_clients):
        seed = tl.load(seeds_ptr + c * n_segs + seg)
        keep, lane = _keep_block(seed, start, n, thr_m1, BLOCK)
        slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
        v = tl.load(vals_ptr + tl.load(voff_ptr + c * n_units + u) + slot.to(tl.int64), mask=keep, other=0.0)
        contrib = tl.where(keep, v * tl.load(weights_ptr + c), 0.0)
        if ACCUMULATE:
            acc = acc + contrib
        else:
            acc = contrib
    lane = tl.arange(0, BLOCK)
    tl.store(out_ptr + tl.load(uout_ptr + u) + lane, acc, mask=lane < n)


def _units(lens: list[int], device) -> tuple[torch.Tensor, ...]:
    """(segment, start within segment, length, start in the flat concatenation) of every unit."""
    per = [(n + BLOCK - 1) // BLOCK for n in lens]
    seg = np.repeat(np.arange(len(lens), dtype=np.int64), per)
    first = np.repeat(np.cumsum([0] + per[:-1]), per) if per else np.zeros(0, dtype=np.int64)
    start = (np.arange(len(seg), dtype=np.int64) - first) * BLOCK
    length = np.minimum(np.asarray(lens, dtype=np.int64)[seg] - start, BLOCK) if len(seg) else start
    flat = np.concatenate([[0], np.cumsum(lens)])[:-1].astype(np.int64)[seg] + start if len(seg) else start
    return tuple(
        torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)
        for a in (seg, start, length, flat)
    )


def _seed_tensor(seeds, device) -> torch.Tensor:
    # int64 bit patterns of the 64-bit seeds (tl.randint casts to uint64)
    s = np.asarray([int(v) & U64_MASK for v in seeds], dtype=np.uint64).view(np.int64)
    return torch.from_numpy(s.copy()).to(device)


def mask_encode_triton(xs, seeds, thr_m1: int):
    device = xs[0].device if xs else torch.device("cpu")
    lens = [x.numel() for x in xs]
    x = torch.cat([v.reshape(-1).to(torch.float32) for v in xs]) if xs else torch.empty(0, device=device)
    useg, ustart, ulen, uflat = _units(lens, device)
    U = useg.numel()
    sd = _seed_tensor(seeds, device)
    counts = torch.zeros(U, dtype=torch.int64, device=device)
    if U:
        _count_kernel[(U, 1)](sd, useg, ustart, ulen, counts, thr_m1, U, len(lens), BLOCK=BLOCK)
    uout = torch.cumsum(counts, 0) - counts
    total = int(counts.sum())
    out = torch.empty(total, dtype=torch.float32, device=device)
    if U and total:
        _compact_kernel[(U,)](x, out, sd, useg, ustart, ulen, uflat, uout, thr_m1, BLOCK=BLOCK)
    seg_counts = torch.zeros(len(lens), dtype=torch.int64, device=device).index_add_(0, useg, counts)
    return out, seg_counts.tolist()


def mask_decode_triton(vals, expected, seeds, lens, weights, thr_m1: int, accumulate: bool):
    device = vals[0].device if vals else torch.device("cpu")
    C, S = len(vals), len(lens)
    useg, ustart, ulen, uflat = _units(list(lens), device)
    U = useg.numel()
    sd = _seed_tensor([s for row in seeds for s in row], device)
    counts = torch.zeros(C * U, dtype=torch.int64, device=device)
    if U and C:
        _count_kernel[(U, C)](sd, useg, ustart, ulen, counts, thr_m1, U, S, BLOCK=BLOCK)
    counts = counts.reshape(C, U)
    per_seg = torch.zeros(C, S, dtype=torch.int64, device=device).index_add_(1, useg, counts)
    exp = torch.as_tensor(np.asarray(expected, dtype=np.int64).reshape(C, S), device=device)
    bad = (per_seg != exp).nonzero()  # one sync, not one per (client, tensor)
    if bad.numel():
        c, s = (int(v) for v in bad[0])
        raise FormatError(count_message(c, s, int(exp[c, s]), int(per_seg[c, s])))
    sent = torch.tensor([v.numel() for v in vals], dtype=torch.int64, device=device)
    if C and not torch.equal(per_seg.sum(1), sent):
        c = int((per_seg.sum(1) != sent).nonzero()[0])
        raise FormatError(
            f"client {c}: {vals[c].numel()} values sent but the masks keep {int(per_seg[c].sum())}"
        )
    base = torch.tensor([0] + [v.numel() for v in vals], dtype=torch.int64).cumsum(0)[:-1].to(device)
    voff = (torch.cumsum(counts, 1) - counts + base[:, None]).reshape(-1).contiguous()
    flat_vals = torch.cat([v.reshape(-1).to(torch.float32) for v in vals]) if vals else torch.empty(0)
    if flat_vals.numel() == 0:
        flat_vals = torch.zeros(1, dtype=torch.float32, device=device)  # a valid pointer; never read
    out = torch.zeros(int(sum(lens)), dtype=torch.float32, device=device)
    w = torch.tensor(weights, dtype=torch.float32, device=device)
    if U and C:
        _scatter_kernel[(U,)](
            flat_vals,
            out,
            sd,
            w,
            useg,
            ustart,
            ulen,
            uflat,
            voff,
            thr_m1,
            U,
            S,
            C,
            ACCUMULATE=bool(accumulate),
            BLOCK=BLOCK,
            # the spec sums float32(v * w) products: a fused multiply-add (Triton's default on GPUs)
            # would round once instead of twice and change the last bit against C++ and the reference
            enable_fp_fusion=False,
        )
    return out
