"""Stage 2 of SZ: predictors on the integer codes, chosen per block.

Prediction runs on the pre-quantized integers, so it is lossless and errors never propagate.
Outliers (stored verbatim) hold the previous code (``q_eff``), so they cost the predictor nothing
and the decoder, which does not know their codes, stays in step.

* ``none``:    d[i] = q_eff[i]
* ``lorenzo``: d[i] = q_eff[i] - q_eff[i-1]   (q_eff[-1] = 0 at each block start)

The choice is made per block from a cheap, integer (so backend-independent) size estimate:
the summed bit length of zigzag(d) (the length an Elias-style code would take) over the
non-outliers at every EST_STRIDE-th position; sampling keeps it at ~1/8 of a pass in C++.
Lorenzo wins on smooth data; on weights and updates (white-noise-like) ``none`` usually wins.
"""

from __future__ import annotations

import numpy as np

PRED_NONE = 0
PRED_LORENZO = 1
EST_STRIDE = 8


def hold_outliers(q: np.ndarray, outlier: np.ndarray) -> np.ndarray:
    """q_eff: ``q`` with each outlier replaced by the previous non-outlier's code (0 at the start)."""
    n = q.shape[0]
    idx = np.where(outlier, -1, np.arange(n, dtype=np.int64))
    last = np.maximum.accumulate(idx) if n else idx
    return np.where(last >= 0, q[np.maximum(last, 0)], 0).astype(np.int64)


def lorenzo_ref(q_eff: np.ndarray) -> np.ndarray:
    """1-D Lorenzo residuals of one block (int64)."""
    d = q_eff.astype(np.int64).copy()
    d[1:] -= q_eff[:-1]
    return d


def lorenzo_inverse_ref(d: np.ndarray) -> np.ndarray:
    """Inverse of lorenzo_ref: running sum, wrapping to int32 as the C++ decoder does."""
    return np.cumsum(d.astype(np.int64)).astype(np.int32).astype(np.int64) if d.size else d


def zigzag(d: np.ndarray) -> np.ndarray:
    """Signed -> unsigned interleaving: 0,-1,1,-2,2 -> 0,1,2,3,4 (int64 in, int64 out)."""
    d = d.astype(np.int64)
    return np.where(d < 0, -2 * d - 1, 2 * d)


def unzigzag(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.int64)
    return np.where(z & 1, -((z + 1) >> 1), z >> 1)


def bit_length(v: np.ndarray) -> np.ndarray:
    """Exact bit length of non-negative int64 values below 2^52 (frexp's exponent)."""
    return np.frexp(v.astype(np.float64))[1].astype(np.int64)


def estimate_bits(d: np.ndarray, outlier: np.ndarray) -> int:
    """Cheap size estimate: sum of bit_length(zigzag(d)) over non-outliers at every EST_STRIDE-th position."""
    sel = ~outlier[::EST_STRIDE]
    return int(bit_length(zigzag(d[::EST_STRIDE][sel])).sum())


def choose_predictor(q_eff: np.ndarray, outlier: np.ndarray) -> tuple[int, np.ndarray]:
    """(predictor id, residuals d) for one block; ties go to ``none``."""
    d_lor = lorenzo_ref(q_eff)
    if estimate_bits(d_lor, outlier) < estimate_bits(q_eff, outlier):
        return PRED_LORENZO, d_lor
    return PRED_NONE, q_eff.astype(np.int64)
