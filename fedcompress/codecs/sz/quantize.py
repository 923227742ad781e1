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


def inverse_step(eb: float) -> float:
    """The float32 multiplier 1/(2 eb) every backend uses (so all of them agree bit for bit)."""
    return float(np.float32(0.5 / eb))


def prequantize_ref(x: torch.Tensor, inv: float) -> torch.Tensor:
    """Reference: flat int32 codes of ``x`` (any float dtype, any device)."""
    y = x.reshape(-1).to(torch.float32) * torch.tensor(inv, dtype=torch.float32, device=x.device)
    ok = y.abs() < MAX_QUANT  # False for NaN
    q = torch.round(torch.where(ok, y, torch.zeros_like(y)))  # torch.round is half-to-even
    return torch.where(ok, q.to(torch.int32), torch.full_like(q, UNQUANTIZED, dtype=torch.int32))


def prequantize_cpp(x: torch.Tensor, inv: float) -> torch.Tensor:
    """C++ (OpenMP) backend: zero-copy on contiguous float32 CPU tensors."""
    from ..._ops import native

    xf = x.detach().reshape(-1).to(torch.float32).contiguous()
    return torch.from_numpy(native().prequantize(xf.numpy(), inv))
