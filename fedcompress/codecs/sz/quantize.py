"""Stage 1 of SZ: pre-quantization to integers, ``q = round(x / 2eb)``.

Quantizing first (as cuSZ does) makes prediction on the integer codes lossless, so errors never
propagate along the predictor. Every backend computes exactly the same thing, in float32:

    inv = float32(0.5 / eb);  y = float32(x) * inv;  q = round_half_even(y) if |y| < 2^22 else UNQUANTIZED

Below 2^22 float32 represents every half-integer, so the rounding is exact and identical on every
backend. ``UNQUANTIZED`` values (non-finite, or too large) are stored verbatim by the codec.
"""

from __future__ import annotations

import numpy as np
import torch

UNQUANTIZED = -(2**31)  # INT32_MIN
MAX_QUANT = 2.0**22


def prequantize_ref(x: torch.Tensor, inv: float) -> torch.Tensor:
    """Reference: flat int32 codes of ``x`` (any float dtype, any device)."""
    y = x.reshape(-1).to(torch.float32) * torch.tensor(inv, dtype=torch.float32, device=x.device)
    ok = y.abs() < MAX_QUANT  # False for NaN
    q = torch.round(torch.where(ok, y, torch.zeros_like(y)))  # torch.round is half-to-even
    return torch.where(ok, q.to(torch.int32), torch.full_like(q, UNQUANTIZED, dtype=torch.int32))


def inverse_of_step(step: float) -> float:
    """float32(1 / step): the multiplier every backend uses for ``q = round(x * inv)``."""
    with np.errstate(over="ignore"):
        inv = np.float32(1.0 / step)
    return float(inv) if np.isfinite(inv) else 0.0  # step too small for float32: everything goes verbatim


def reconstruct_ref(q: torch.Tensor, step: float, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize: ``dtype(float64(q) * step)``, going through float32 for float16/bfloat16.

    The path is part of the format (C++ does the same roundings), so encoders on every backend
    see exactly the value the decoder will produce and can re-check the bound on it.
    """
    r = q.to(torch.float64) * step
    if dtype in (torch.float16, torch.bfloat16):
        r = r.to(torch.float32)
    return r.to(dtype)


def quantize_ref(x: torch.Tensor, step: float, bound: float, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1 with its guarantee: given codes ``q`` of flat ``x``, return (q, outlier mask).

    A value is an outlier (stored verbatim, bit-exact) when it is NaN/Inf, subnormal in its own
    dtype, unquantizable, or when its reconstruction in its own dtype misses the bound:
    ``|x - x_hat| > bound`` computed in float64. So the bound holds per value, whatever the rounding.
    """
    x = x.reshape(-1)
    xd = x.to(torch.float64)
    xh = reconstruct_ref(q, step, x.dtype).to(torch.float64)
    tiny = torch.finfo(x.dtype).tiny
    sub = (xd != 0) & (xd.abs() < tiny)
    ok = torch.isfinite(xd) & ~sub & (q != UNQUANTIZED) & ((xd - xh).abs() <= bound)
    return q, ~ok
