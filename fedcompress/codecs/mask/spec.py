"""The random mask's specification: parameters, the Philox4x32-10 torch reference and the decode rules.

The mask (the specification every backend follows bit for bit)::

    word(i, seed) = word i % 4 of Philox4x32-10 with key (seed & 0xFFFFFFFF, seed >> 32)
                    and counter (j & 0xFFFFFFFF, j >> 32, 0, 0), j = i // 4   (Triton's tl.randint4x)
    thr_m1        = max(floor(keep * 2^32), 1) - 1
    kept(i)       = word(i, seed) <= thr_m1                            (integers only: no float rounding)

``i`` is the element index in the flattened (C-order) tensor. One Philox call serves four
consecutive elements (4x less work than one call per element with tl.randint; the kernels are bound
by it). ``unbiased=True`` multiplies decoded values by ``scale = float32(2^32 / (thr_m1 + 1))``
(1 / the exact keep probability). ``decode_mean`` of C payloads is, per element,
``sum over c in order of float32(v_c * w_c)`` accumulated in float32 from +0, with
``w_c = float32(scale * weight_c / sum(weights))`` (equal weights by default).

The op pair every backend implements (``fedcompress._ops``): ``mask_encode`` / ``mask_decode``, here
in torch (the reference, Philox on int64 tensors, on any device), in C++ (csrc/mask.cpp, adapted by
fedcompress/cpp/mask.py) and in Triton (kernels/mask.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ...errors import FormatError
from ...wire import U64_MASK

_M32 = 0xFFFFFFFF
_MUL0, _MUL1 = 0xD2511F53, 0xCD9E8D57
_BUMP0, _BUMP1 = 0x9E3779B9, 0xBB67AE85


# ---------------------------------------------------------------------------------------------
# Parameters


def check_keep(keep) -> float:
    try:
        k = float(keep)
    except (TypeError, ValueError):
        raise ValueError(f"keep={keep!r} must be a number in (0, 1]") from None
    if not (0.0 < k <= 1.0):
        raise ValueError(f"keep={keep!r} out of range; expected a number in (0, 1]")
    return k


def keep_threshold(keep: float) -> int:
    """thr_m1: a coordinate is kept iff its Philox word <= thr_m1 (so keep=1 keeps everything)."""
    return max(math.floor(check_keep(keep) * 4294967296.0), 1) - 1


def unbiased_scale(thr_m1: int) -> float:
    """float32(1 / P(kept)) for a threshold: what ``unbiased=True`` multiplies decoded values by."""
    return float(np.float32(4294967296.0 / (thr_m1 + 1)))


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not (0 <= int(seed) <= U64_MASK):
        raise ValueError(f"seed={seed!r} must be an int in [0, 2^64)")
    return int(seed)


# ---------------------------------------------------------------------------------------------
# Torch reference: Philox4x32-10 on int64 tensors (32-bit words held in [0, 2^32))


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a * m for a in [0, 2^32), without int64 overflow (16-bit split of m)."""
    t_lo = a * (m & 0xFFFF)  # < 2^48
    t_hi = a * (m >> 16)  # < 2^48
    s = t_lo + ((t_hi & 0xFFFF) << 16)  # < 2^49
    return (t_hi >> 16) + (s >> 32), s & _M32


def philox4x32_ref(c0, c1, c2, c3, seed: int, rounds: int = 10):
    """Philox4x32-10 on int64 tensors of 32-bit words; key (seed low word, seed high word)."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(c0, _MUL0)
        hi1, lo1 = _mulhilo(c2, _MUL1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _BUMP0) & _M32, (k1 + _BUMP1) & _M32
    return c0, c1, c2, c3


def mask_words_ref(start: int, n: int, seed: int, device="cpu") -> torch.Tensor:
    """The 32-bit words (int64 in [0, 2^32)) drawn by element indices start .. start + n - 1:
    element i takes word i % 4 of the Philox call with counter i // 4."""
    if n <= 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    j0, j1 = start >> 2, (start + n - 1) >> 2
    ctr = torch.arange(j0, j1 + 1, dtype=torch.int64, device=device)
    zero = torch.zeros_like(ctr)
    words = torch.stack(philox4x32_ref(ctr & _M32, ctr >> 32, zero, zero, seed), dim=1).reshape(-1)
    first = start - 4 * j0
    return words[first : first + n]


def mask_keep_ref(n: int, seed: int, thr_m1: int, device="cpu", chunk: int = 1 << 20) -> torch.Tensor:
    """Boolean keep mask of an ``n``-element tensor (in chunks: the int64 temporaries are 8 bytes/elem)."""
    out = torch.empty(n, dtype=torch.bool, device=device)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        out[a:b] = mask_words_ref(a, b - a, seed, device) <= thr_m1
    return out


def mask_encode_ref(xs: list[torch.Tensor], seeds: list[int], thr_m1: int) -> tuple[torch.Tensor, list[int]]:
    """Reference encode: kept float32 values of every flat tensor in order, and the count per tensor."""
    vals, counts = [], []
    for x, seed in zip(xs, seeds, strict=False):
        keep = mask_keep_ref(x.numel(), seed, thr_m1, x.device)
        v = x.reshape(-1).to(torch.float32)[keep]
        vals.append(v)
        counts.append(v.numel())
    device = xs[0].device if xs else "cpu"
    values = torch.cat(vals) if vals else torch.empty(0, dtype=torch.float32, device=device)
    return values, counts


def mask_decode_ref(vals, expected, seeds, lens, weights, thr_m1: int, accumulate: bool) -> torch.Tensor:
    """Reference decode. ``vals[c]``: client c's kept float32 values (tensors in order); ``expected[c][s]``
    and ``seeds[c][s]``: its count and seed for tensor s; ``lens[s]``: element counts. Returns the flat
    float32 output (``accumulate``: weighted sum over clients; else one client's values * weights[0])."""
    device = vals[0].device if vals else "cpu"
    out = torch.zeros(sum(lens), dtype=torch.float32, device=device)
    offs = np.concatenate([[0], np.cumsum(lens)]).tolist()
    for c, v in enumerate(vals):
        w = torch.tensor(weights[c], dtype=torch.float32, device=device)
        pos = 0
        for s, n in enumerate(lens):
            keep = mask_keep_ref(n, seeds[c][s], thr_m1, device)
            k = int(keep.sum())
            if k != expected[c][s] or pos + k > v.numel():
                raise FormatError(count_message(c, s, expected[c][s], k))
            seg = out[offs[s] : offs[s + 1]]
            if accumulate:
                seg[keep] = seg[keep] + v[pos : pos + k] * w
            else:
                seg[keep] = v[pos : pos + k] * w
            pos += k
        if pos != v.numel():
            raise FormatError(f"client {c}: {v.numel()} values sent but the masks keep {pos}")
    return out


def count_message(c: int, s: int, sent: int, regenerated: int) -> str:
    return (
        f"client {c}, tensor {s}: payload holds {sent} kept values but the regenerated mask keeps "
        f"{regenerated} (wrong seed/keep, or altered bytes)"
    )


def client_weights(weights, n: int, scale: float) -> list[float]:
    """float32(scale * w_c / sum(w)) per client; equal weights when None."""
    if weights is None:
        weights = [1.0] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"weights has {len(w)} entries for {n} payloads")
    total = math.fsum(w)
    if not all(math.isfinite(x) and x >= 0 for x in w) or not total > 0 or not math.isfinite(total):
        raise ValueError("weights must be finite, >= 0, with a positive sum")
    return [float(np.float32(scale * x / total)) for x in w]
