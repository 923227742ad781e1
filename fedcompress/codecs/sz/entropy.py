"""Stages 3-4 of SZ: residuals -> tokens (radius + escapes, optional zero runs) -> rANS.

Tokens (u16):
    0 ESC_VAL   the value is an outlier, stored verbatim in the tensor's dtype
    1 ESC_WIDE  residual outside the radius; its int32 follows in the block's wide-code array
    2 RUN_A     zero-run digit 1 \
    3 RUN_B     zero-run digit 2  } bijective base 2, least significant first (bzip2's RUNA/RUNB)
    4 + zigzag(d)                   residual d with zigzag(d) <= MAX_ZIGZAG (the radius)
In "plain" mode every value is one token (d == 0 is token 4); in "run" mode a maximal run of r
zero residuals becomes the bijective base-2 digits of r. The encoder picks the mode per block
from an integer entropy estimate of both token streams.

Why zero runs: real updates have long runs of exact zeros (dead units), and at REL 1e-2 most
residuals are 0. A coder that models only symbol frequencies cannot go below H0, and Huffman not
below 1 bit per value; SZ3 recovers this with zstd after Huffman (857x vs H0 442x on a CNN update).
Run digits let the entropy coder go below H0 directly and cost nothing extra on noise-like blocks
(where plain mode is chosen).

Why rANS (not Huffman): it reaches the zeroth-order entropy to within ~0.1% (Huffman loses up to
~1 bit per symbol on skewed distributions), decodes with one table lookup + multiply per token,
and interleaves into independent lanes. Layout: W = 32 interleaved 32-bit states sharing one
stream of 16-bit words; state in [L, 2^16 L) with L = 2^15, so probabilities have pb <= 15 bits
and one renormalisation step per token suffices. Token i belongs to lane i % W. The encoder runs
backwards; the decoder reads words in token order and lanes in order 0..W-1 within a step.
At the end every lane is back at L (checked: a cheap integrity test).

Why 32 lanes: one decode step is a chain of gather -> multiply -> compare -> word load whose
latency does not depend on its width. With 8 lanes that latency, not the arithmetic, bounded the
C++ decoder; 32 lanes are two AVX-512 vectors in flight per step, so the chain is paid once per
32 tokens. The cost is 24 more final states per block, stored as varints (write_states): one
byte each for lanes a short block never uses.
"""

from __future__ import annotations

import math

import numpy as np

from ...errors import FormatError
from .predict import bit_length, unzigzag, zigzag

ESC_VAL = 0
ESC_WIDE = 1
RUN_A = 2
RUN_B = 3
TOKEN_BASE = 4
MAX_ZIGZAG = 65535 - TOKEN_BASE
N_TOKENS = 65536

MODE_PLAIN = 0
MODE_RUN = 1
RUN_CONSIDER = 8  # run mode is considered when d == 0 makes >= 1/8 of a block's tokens

LANES = 32
RANS_L = 1 << 15
MAX_PB = 15
MIN_PB = 12
MAX_SYMBOLS = 8192  # more distinct tokens than this in a block: the block is stored raw

# 256 * log2(1 + i/256), rounded: the fixed-point log behind the mode estimate (same table in C++)
_LOG_FRAC = np.array([int(round(256 * math.log2(1 + i / 256))) for i in range(256)], dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Tokens


def tokenize_ref(d: np.ndarray, outlier: np.ndarray, mode: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens u16, wide int32 residuals) for one block's residuals ``d`` (int64)."""
    z = zigzag(d)
    fits = z <= MAX_ZIGZAG
    tok = np.where(outlier, ESC_VAL, np.where(fits, z + TOKEN_BASE, ESC_WIDE)).astype(np.int64)
    wide = d[~outlier & ~fits].astype(np.int32)
    if mode == MODE_PLAIN:
        return tok.astype(np.uint16), wide
    zero = (d == 0) & ~outlier
    prev = np.concatenate(([False], zero[:-1]))
    start = zero & ~prev  # first position of each zero run
    # items: every non-zero position, and every run (at its start); in position order
    item = ~zero | start
    item_pos = np.flatnonzero(item)
    run_id = np.cumsum(start) - 1
    run_len = np.bincount(run_id[zero], minlength=max(1, int(start.sum()))).astype(np.int64)
    is_run = zero[item_pos]
    r = np.where(is_run, run_len[np.maximum(run_id[item_pos], 0)], 0)
    ntok = np.where(is_run, bit_length(r + 1) - 1, 1)
    off = np.cumsum(ntok) - ntok
    which = np.repeat(np.arange(item_pos.shape[0]), ntok)
    k = np.arange(which.shape[0]) - off[which]
    digit = ((r[which] + 1) >> k) & 1  # bijective base 2: the bits of r + 1 below its top bit
    out = np.where(is_run[which], RUN_A + digit, tok[item_pos][which])
    return out.astype(np.uint16), wide


def detokenize_ref(tokens: np.ndarray, wide: np.ndarray, n: int, mode: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of tokenize_ref: (residuals d int64 with 0 at outliers, outlier mask). FormatError if bad."""
    tok = tokens.astype(np.int64)
    isrun = (tok == RUN_A) | (tok == RUN_B)
    if mode == MODE_PLAIN:
        if isrun.any():
            raise FormatError("sz block: run token in a plain-mode block")
        if tok.shape[0] != n:
            raise FormatError("sz block: token count does not match the value count")
        item_tok, item_len = tok, None
    else:
        prev = np.concatenate(([False], isrun[:-1]))
        start = isrun & ~prev
        gid = np.cumsum(start) - 1
        first = np.flatnonzero(start)
        k = np.arange(tok.shape[0]) - (first[gid] if first.size else 0)
        if isrun.any() and k[isrun].max() > 31:
            raise FormatError("sz block: zero run longer than 2^32")
        contrib = np.where(isrun, (tok - 1) << np.where(isrun, k, 0), 0)
        run_len = np.zeros(first.size, np.int64)
        np.add.at(run_len, gid[isrun], contrib[isrun])
        keep = ~isrun | start
        item_tok = tok[keep]
        item_len = np.where(isrun[keep], run_len[np.maximum(gid[keep], 0)] if first.size else 0, 1)
        if int(item_len.sum()) != n:
            raise FormatError("sz block: run lengths do not add up to the value count")
    outlier_item = item_tok == ESC_VAL
    wide_item = item_tok == ESC_WIDE
    if int(wide_item.sum()) != wide.shape[0]:
        raise FormatError("sz block: wide-code count mismatch")
    val = unzigzag(np.maximum(item_tok - TOKEN_BASE, 0))
    val[wide_item] = wide.astype(np.int64)
    val[outlier_item] = 0
    is_zero_run = (item_tok == RUN_A) | (item_tok == RUN_B)
    val[is_zero_run] = 0
    if item_len is None:
        return val, outlier_item
    d = np.repeat(val, item_len)
    return d, np.repeat(outlier_item, item_len)


# ---------------------------------------------------------------------------------------------
# Model: histogram, size estimate, normalised frequencies


def histogram_ref(tokens: np.ndarray) -> np.ndarray:
    return np.bincount(tokens.astype(np.int64), minlength=N_TOKENS).astype(np.int64)


def fixed_log2(v: np.ndarray) -> np.ndarray:
    """256 * log2(v) for integers v >= 1, from the exponent and an 8-bit mantissa table."""
    v = v.astype(np.int64)
    e = bit_length(v) - 1
    frac = np.where(e >= 8, v >> np.maximum(e - 8, 0), v << np.maximum(8 - e, 0)) & 255
    return e * 256 + _LOG_FRAC[frac]


def estimate_cost(hist: np.ndarray) -> int:
    """Integer estimate of a token stream's coded size (1/256 bit): sum c*log2(N/c) + 16 bits/symbol."""
    c = hist[hist > 0]
    if c.size == 0:
        return 0
    n = int(c.sum())
    return int((c * (fixed_log2(np.array([n]))[0] - fixed_log2(c))).sum()) + 256 * 16 * int(c.size)


def _varint_len(v: np.ndarray) -> np.ndarray:
    return np.maximum(1, (bit_length(v.astype(np.int64)) + 6) // 7)


def max_pb(n_tokens: int, n_symbols: int) -> int:
    """Largest model precision for a block: 2^pb <= n_tokens / 2, but at least MIN_PB and enough
    slots for every symbol.

    The decoder fills a 2^pb-slot table per block (6 bytes a slot): a 15-bit table is 32K slot
    writes, a visible share of decoding a 73K-value block of a CNN update, while capping it at 14
    bits leaves the bench arrays' ratios unchanged to 4 digits.
    """
    return max(MIN_PB, (int(n_symbols) - 1).bit_length(), min(MAX_PB, int(n_tokens).bit_length() - 2))


def choose_pb(hist: np.ndarray) -> tuple[int, np.ndarray]:
    """Model precision (12..15 bits) and its frequencies: the smallest estimated block.

    Cost in 1/256 bit, integer-only so every backend picks the same: sum c * (256 pb - 256 log2 f)
    for the coded tokens plus 8 * 256 per byte of the frequency table. More precision models the
    counts better but costs table bytes; on a Gaussian block at REL 1e-3 (~470 tokens) the table is
    ~0.5% of the block, as much as the modelling loss, so neither end wins everywhere.
    """
    present = np.flatnonzero(hist)
    c = hist[present].astype(np.int64)
    best = None
    for pb in range(MIN_PB, max_pb(int(c.sum()), present.size) + 1):
        if present.size > (1 << pb):
            continue
        freq = normalize_ref(hist, pb)
        f = freq[present]
        cost = int((c * (256 * pb - fixed_log2(f))).sum()) + 8 * 256 * int(_varint_len(_table_heads(present, f)).sum())
        if best is None or cost < best[0]:
            best = (cost, pb, freq)
    return best[1], best[2]


def normalize_ref(hist: np.ndarray, pb: int) -> np.ndarray:
    """Counts -> frequencies summing to 2^pb, each present token >= 1 (deterministic, integer-only).

    f = max(1, round(c * M / N)) (half up, in integers); a shortfall is added and an excess taken one
    count at a time over the tokens in order of (count desc, token asc), cycling, never below 1.
    """
    m = 1 << pb
    present = np.flatnonzero(hist)
    c = hist[present].astype(np.int64)
    n = int(c.sum())
    f = np.maximum(1, (2 * c * m + n) // (2 * n))  # rounded
    order = np.lexsort((present, -c))  # count desc, then token asc
    diff = m - int(f.sum())
    while diff > 0:
        for i in order:
            if diff == 0:
                break
            f[i] += 1
            diff -= 1
    while diff < 0:
        for i in order:
            if diff == 0:
                break
            if f[i] > 1:
                f[i] -= 1
                diff += 1
    freq = np.zeros(N_TOKENS, np.int64)
    freq[present] = f
    return freq


# ---------------------------------------------------------------------------------------------
# Table serialisation: n_syms u16, then (token delta, freq - 1) LEB128 varints


def _varint(v: int, out: bytearray) -> None:
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


# Frequency table: u16 n_symbols, then per present token (ascending) one varint "head"
# zigzag(f - f_prev) << 1 | (gap != 0), followed by varint(gap - 1) when gap != 0, where
# gap = t - t_prev - 1 (t_prev = -1, f_prev = 0 before the first). Neighbouring tokens are
# residuals of the same size and sign-alternating (zigzag), so their frequencies are close and a
# dense table costs about 1 byte per symbol, where (gap, f - 1) pairs took 2-3 (tests/test_sz.py
# test_table_and_states_bytes_by_hand checks < 2 on a Gaussian block).


def _table_heads(present: np.ndarray, f: np.ndarray) -> np.ndarray:
    """The head value of every table entry (present tokens ascending, their frequencies)."""
    d = np.diff(f.astype(np.int64), prepend=0)
    gap = np.diff(present.astype(np.int64), prepend=-1) - 1
    return zigzag(d) * 2 + (gap != 0)


def write_table(freq: np.ndarray) -> bytes:
    present = np.flatnonzero(freq)
    out = bytearray(len(present).to_bytes(2, "little"))
    heads = _table_heads(present, freq[present])
    prev = -1
    for t, h in zip(present.tolist(), heads.tolist(), strict=True):
        _varint(h, out)
        if t - prev - 1:
            _varint(t - prev - 2, out)
        prev = t
    return bytes(out)


def _read_varint(buf, pos: int, max_bytes: int = 3, what: str = "frequency table") -> tuple[int, int]:
    v = 0
    for shift in range(0, 7 * max_bytes, 7):  # table fields are < 2^18: 3 bytes; states 5
        if pos >= len(buf):
            raise FormatError(f"sz block: truncated {what}")
        b = buf[pos]
        pos += 1
        v |= (b & 0x7F) << shift
        if not b & 0x80:
            return v, pos
    raise FormatError(f"sz block: varint too long in the {what}")


# Final rANS states: varint(x - L) per lane. A state carries log2(x) - 15 bits of the data, so
# the top bytes of a u32 are often waste; a lane that never coded a token (a constant block, a
# block shorter than W) costs 1 byte instead of 4.


def write_states(states: np.ndarray) -> bytes:
    out = bytearray()
    for x in states.tolist():
        _varint(int(x) - RANS_L, out)
    return bytes(out)


def read_states(buf, pos: int) -> tuple[np.ndarray, int]:
    """(states u32[W], new pos); FormatError if a state is outside [L, 2^16 L)."""
    st = np.empty(LANES, np.uint32)
    for k in range(LANES):
        v, pos = _read_varint(buf, pos, 5, "rANS states")
        if v >= (RANS_L << 16) - RANS_L:
            raise FormatError("sz block: rANS state out of range")
        st[k] = v + RANS_L
    return st, pos


def read_table(buf, pos: int, pb: int) -> tuple[np.ndarray, int]:
    """(freq[N_TOKENS], new pos); validates: tokens increasing and < 2^16, freqs >= 1, sum == 2^pb."""
    if pos + 2 > len(buf):
        raise FormatError("sz block: truncated frequency table")
    nsym = int.from_bytes(bytes(buf[pos : pos + 2]), "little")
    pos += 2
    if nsym == 0 or nsym > (1 << pb):
        raise FormatError(f"sz block: {nsym} symbols for a {pb}-bit model")
    freq = np.zeros(N_TOKENS, np.int64)
    t = -1
    f = 0
    total = 0
    for _ in range(nsym):
        h, pos = _read_varint(buf, pos)
        t += 1
        if h & 1:
            g, pos = _read_varint(buf, pos)
            t += g + 1
        f += int(unzigzag(np.int64(h >> 1)))
        if t >= N_TOKENS:
            raise FormatError("sz block: token out of range in the frequency table")
        if not 1 <= f <= (1 << pb) - total:
            raise FormatError("sz block: frequency out of range in the frequency table")
        freq[t] = f
        total += f
    if total != (1 << pb):
        raise FormatError("sz block: frequencies do not sum to the model total")
    return freq, pos


# ---------------------------------------------------------------------------------------------
# rANS, W interleaved lanes, one shared 16-bit word stream (vectorised over lanes with numpy)


def rans_encode_ref(tokens: np.ndarray, freq: np.ndarray, pb: int) -> tuple[np.ndarray, np.ndarray]:
    """(final states u32[W], words u16[]) for ``tokens`` under the model ``freq`` (sum 2^pb)."""
    n = tokens.shape[0]
    cum = np.concatenate(([0], np.cumsum(freq)[:-1])).astype(np.uint64)
    f64 = freq.astype(np.uint64)
    steps = -(-n // LANES)
    tok = np.zeros(steps * LANES, np.int64)
    tok[:n] = tokens
    tok = tok.reshape(steps, LANES)
    lane = np.arange(LANES)
    x = np.full(LANES, RANS_L, np.uint64)
    out = np.empty(n + LANES, np.uint16)  # at most one word per token
    cnt = 0
    for t in range(steps - 1, -1, -1):
        active = t * LANES + lane < n
        s = tok[t]
        f = f64[s]
        emit = active & (x >= (f << np.uint64(31 - pb)))
        k = int(emit.sum())
        if k:
            out[cnt : cnt + k] = (x[emit] & np.uint64(0xFFFF))[::-1]  # lanes W-1..0
            cnt += k
            x = np.where(emit, x >> np.uint64(16), x)
        fs = np.where(active, f, np.uint64(1))
        nx = ((x // fs) << np.uint64(pb)) + (x % fs) + cum[s]
        x = np.where(active, nx, x)
    return x.astype(np.uint32), out[:cnt][::-1].copy()


def rans_decode_ref(states: np.ndarray, words: np.ndarray, freq: np.ndarray, pb: int, n: int) -> np.ndarray:
    """Inverse of rans_encode_ref: ``n`` tokens. FormatError if the stream is inconsistent."""
    m = 1 << pb
    cum = np.concatenate(([0], np.cumsum(freq)[:-1])).astype(np.int64)
    slot_sym = np.repeat(np.arange(N_TOKENS), freq)  # slot -> token (validated sum == 2^pb)
    f_slot = freq[slot_sym].astype(np.uint64)
    bias_slot = (np.arange(m) - cum[slot_sym]).astype(np.uint64)
    x = states.astype(np.uint64)
    if (x < RANS_L).any() or (x >= (RANS_L << 16)).any():
        raise FormatError("sz block: rANS state out of range")
    w = words.astype(np.uint64)
    nw = w.shape[0]
    out = np.empty(n, np.uint16)
    ptr = 0
    lane = np.arange(LANES)
    mask = np.uint64(m - 1)
    for t in range(-(-n // LANES)):
        active = t * LANES + lane < n
        slot = (x & mask).astype(np.int64)
        a = int(active.sum())
        out[t * LANES : t * LANES + a] = slot_sym[slot][:a]
        nx = f_slot[slot] * (x >> np.uint64(pb)) + bias_slot[slot]
        x = np.where(active, nx, x)
        need = active & (x < RANS_L)
        k = int(need.sum())
        if k:
            if ptr + k > nw:
                raise FormatError("sz block: rANS stream truncated")
            x[need] = (x[need] << np.uint64(16)) | w[ptr : ptr + k]
            ptr += k
    if ptr != nw or (x != RANS_L).any():
        raise FormatError("sz block: rANS stream corrupt (final state or length mismatch)")
    return out
