"""SZ kernels in Triton: the parallel stages of ``sz_encode`` / ``sz_decode`` on the tensor's device.

References and the format: fedcompress/codecs/sz/quantize.py (quantize_ref, reconstruct_ref),
entropy.py (tokenize_ref) and codec.py (the rest). ``fedcompress._ops`` declares these for CUDA
tensors (CPU under TRITON_INTERPRET=1) of float32, float64 and float16 (``DTYPES``): bfloat16 runs on
the reference by that declaration (the interpreter truncates fp32 -> bf16 casts, so a bf16 check here
would not be the decoder's rounding), and nothing here falls back by itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import BLOCK

UNQUANTIZED = -(2**31)  # quantize.UNQUANTIZED; the kernels write it as the literal -2147483648


# ---------------------------------------------------------------------------------------------
# SZ codec stages on the device. The sequential parts (outlier hold, rANS) stay in the reference
# (fedcompress/codecs/sz/codec.py), fed with these kernels' outputs, so the bytes are identical.


@triton.jit
def _quantize_check_kernel(x_ptr, q_ptr, bad_ptr, n, inv, step, bound, tiny, KIND: tl.constexpr,
                           BLOCK: tl.constexpr):
    """Stage 1 with its guarantee: q = round(x * inv) and the outlier flag (quantize.quantize_ref).

    KIND: 0 float32, 1 float64, 2 float16 (the dtype reconstruction is checked in).
    """
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    y = x.to(tl.float32) * inv
    ok = tl.abs(y) < 4194304.0
    r = (tl.where(ok, y, 0.0) + 12582912.0) - 12582912.0
    q = r.to(tl.int32)
    rd = q.to(tl.float64) * step
    if KIND == 0:
        xh = rd.to(tl.float32).to(tl.float64)
    elif KIND == 1:
        xh = rd
    else:
        xh = rd.to(tl.float32).to(tl.float16).to(tl.float64)
    xd = x.to(tl.float64)
    ax = tl.abs(xd)
    good = ok & (ax <= 1.7976931348623157e308) & ((ax >= tiny) | (xd == 0.0)) & (tl.abs(xd - xh) <= bound)
    tl.store(q_ptr + offs, tl.where(ok, q, -2147483648), mask=m)
    tl.store(bad_ptr + offs, (~good).to(tl.int8), mask=m)


@triton.jit
def _plain_tokens_kernel(q_ptr, bad_ptr, tok_ptr, hist_ptr, n, LORENZO: tl.constexpr, BLOCK: tl.constexpr):
    """Residuals -> plain-mode tokens (entropy.tokenize_ref) and their histogram (atomics)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    q = tl.load(q_ptr + offs, mask=m, other=0).to(tl.int64)
    if LORENZO:
        prev = tl.load(q_ptr + offs - 1, mask=m & (offs > 0), other=0).to(tl.int64)
        d = q - prev
    else:
        d = q
    z = tl.where(d < 0, -2 * d - 1, 2 * d)
    tok = tl.where(z <= 65531, z + 4, 1)
    bad = tl.load(bad_ptr + offs, mask=m, other=0)
    tok = tl.where(bad != 0, 0, tok).to(tl.int32)
    tl.store(tok_ptr + offs, tok, mask=m)
    tl.atomic_add(hist_ptr + tok, 1, mask=m)


@triton.jit
def _reconstruct_kernel(q_ptr, out_ptr, n, step, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """Dequantize: dtype(float64(q) * step), through float32 for float16 (quantize.reconstruct_ref)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    rd = tl.load(q_ptr + offs, mask=m, other=0).to(tl.float64) * step
    if KIND == 0:
        v = rd.to(tl.float32)
    elif KIND == 1:
        v = rd
    else:
        v = rd.to(tl.float32).to(tl.float16)
    tl.store(out_ptr + offs, v, mask=m)


_KINDS = {torch.float32: 0, torch.float64: 1, torch.float16: 2}
DTYPES = tuple(_KINDS)  # what _ops declares for these kernels (tests/test_dispatch.py checks it)


def _kind(dtype: torch.dtype) -> int:
    k = _KINDS.get(dtype)
    if k is None:  # _ops dispatches only DTYPES here; a direct call with another is a caller's bug
        raise TypeError(f"the Triton SZ kernels serve {', '.join(map(str, DTYPES))}, not {dtype}")
    return k


def quantize_triton(x: torch.Tensor, step: float, bound: float):
    """(codes int64 numpy, outlier mask numpy) for flat ``x``, computed on ``x``'s device."""
    from fedcompress.codecs.sz.quantize import inverse_of_step

    kind = _kind(x.dtype)
    xf = x.detach().reshape(-1).contiguous()
    n = xf.numel()
    q = torch.empty(n, dtype=torch.int32, device=xf.device)
    bad = torch.empty(n, dtype=torch.int8, device=xf.device)
    if n:
        _quantize_check_kernel[(triton.cdiv(n, BLOCK),)](
            xf, q, bad, n, inverse_of_step(step), step, bound, torch.finfo(x.dtype).tiny, KIND=kind,
            BLOCK=BLOCK)
    return q.cpu().numpy().astype("int64"), bad.cpu().numpy().astype(bool)


def plain_tokens_triton(q_eff, outlier, lorenzo: bool, device: torch.device | str = "cpu"):
    """One block's plain-mode tokens and histogram (codec.plain_tokens_ref), computed on ``device``
    (the held codes come from the host: the outlier hold is sequential)."""
    import numpy as np

    q = torch.from_numpy(np.ascontiguousarray(q_eff, dtype=np.int32)).to(device)
    bad = torch.from_numpy(np.ascontiguousarray(outlier, dtype=np.int8)).to(device)
    n = q.numel()
    tok = torch.empty(n, dtype=torch.int32, device=q.device)
    hist = torch.zeros(65536, dtype=torch.int32, device=q.device)
    if n:
        _plain_tokens_kernel[(triton.cdiv(n, BLOCK),)](q, bad, tok, hist, n, LORENZO=bool(lorenzo), BLOCK=BLOCK)
    return tok.cpu().numpy().astype(np.uint16), hist.cpu().numpy().astype(np.int64)


def reconstruct_triton(q: torch.Tensor, step: float, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize codes ``q`` on their device (codec.decode_block_ref puts them on the output's)."""
    kind = _kind(dtype)
    q = q.contiguous()
    out = torch.empty(q.numel(), dtype=dtype, device=q.device)
    if q.numel():
        _reconstruct_kernel[(triton.cdiv(q.numel(), BLOCK),)](q, out, q.numel(), step, KIND=kind, BLOCK=BLOCK)
    return out


def encode_section_triton(x: torch.Tensor, step: float, bound: float, block_size: int) -> bytes:
    import functools

    from fedcompress.codecs.sz.codec import encode_section_ref

    tokens = functools.partial(plain_tokens_triton, device=x.device)
    return encode_section_ref(x, step, bound, block_size, quantize=quantize_triton, tokens=tokens)


def decode_section_triton(section, dtype: torch.dtype, n: int, block_size: int, step: float,
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` values on ``device``: entropy decoding on the host, dequantization by the kernel there."""
    from fedcompress.codecs.sz.codec import decode_section_ref

    return decode_section_ref(section, dtype, n, block_size, step, device, reconstruct=reconstruct_triton)
