"""C++ adapters of the SZ codec: numpy views of CPU tensors in, ``fedcompress._C`` (csrc/sz.cpp) out.

Named as kernels/sz.py is for Triton: ``encode_section_cpp`` / ``decode_section_cpp`` implement the
ops ``sz_encode`` / ``sz_decode`` whose reference and specification are in
fedcompress/codecs/sz/codec.py; ``fedcompress._ops`` declares them (CPU tensors, every float dtype).
``finite_range_cpp`` is the C++ half of ``codec.finite_range`` (the REL bound's min/max), and
``encode_stream_cpp`` the whole of ``codec.encode_stream`` without a lossless stage in one native call.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import _ops, wire
from ..errors import FormatError


def _native_view(xf: torch.Tensor) -> tuple[np.ndarray, int]:
    """A numpy view of a contiguous flat CPU float tensor and its wire dtype code (16-bit as int16:
    numpy has no bfloat16, and the kernel reads the bits)."""
    if xf.dtype in (torch.bfloat16, torch.float16):
        return xf.view(torch.int16).numpy(), wire.DTYPE_CODES[xf.dtype]
    return xf.numpy(), wire.DTYPE_CODES[xf.dtype]


def finite_range_cpp(x: torch.Tensor) -> tuple[float, float] | None:
    """(min, max) of the finite values of a non-empty CPU float tensor as float64, or None when there
    are none (one pass in C++; the torch path masks and copies)."""
    arr, code = _native_view(x.reshape(-1).contiguous())
    lo, hi, cnt = _ops.native().sz_finite_range(arr.view(np.uint8), code, x.numel())
    return (lo, hi) if cnt else None


def encode_section_cpp(x: torch.Tensor, step: float, bound: float, block_size: int, prefix: bytes = b"") -> bytes:
    """``prefix`` + the blocks section, written once into one bytes object (the op ``sz_encode``;
    codec.encode_stream itself takes ``encode_stream_cpp`` below, which writes the header too)."""
    xf = x.detach().reshape(-1).contiguous()
    arr, code = _native_view(xf)
    return _ops.native().sz_encode(arr.view(np.uint8), code, xf.numel(), step, bound, block_size, prefix)


def encode_stream_cpp(x: torch.Tensor, error_bound: float, mode: str, block_size: int | None = None,
                      prefix: bytes = b"", value_range: tuple[float, float, int] | None = None) -> bytes:
    """``prefix`` + the stream ``codec.encode_stream`` writes (no lossless stage) for a non-empty CPU
    tensor: the REL range (unless ``value_range`` = (lo, hi, count of finite values) gives it), step
    and bound, block size (None: the codec's choice), header and section in one native call, the
    same bytes. The Python path made three native calls per tensor with a numpy sample between them
    (codec.is_sparse); docs/sz.md ("Codec time in FedAvg") has the time this saves."""
    xf = x.detach().reshape(-1).contiguous()
    arr, code = _native_view(xf)
    lo, hi, cnt = value_range if value_range is not None else (0.0, 0.0, -1)
    return _ops.native().sz_encode_stream(arr.view(np.uint8), code, xf.numel(), error_bound, mode == "rel",
                                          block_size or 0, prefix, lo, hi, cnt)


# codec.encode_stream takes this path when the cpp op encodes and there is no lossless stage
encode_section_cpp.encode_stream = encode_stream_cpp


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def decode_section_cpp(section, dtype: torch.dtype, n: int, block_size: int, step: float,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """The C++ decoder writes into a CPU tensor; ``_ops`` dispatches it for CPU only, so ``device``
    is CPU here (kept in the signature every sz_decode implementation shares)."""
    out = torch.empty(n, dtype=dtype)
    if n:
        dst = out.view(_INT_VIEW[dtype.itemsize])
        try:
            _ops.native().sz_decode(np.frombuffer(section, np.uint8), dst.numpy().view(np.uint8),
                                    wire.DTYPE_CODES[dtype], n, block_size, step)
        except ValueError as e:
            raise FormatError(str(e)) from None
    return out.to(device)


# the section may be a read-only view into the payload: np.frombuffer reads it in place
decode_section_cpp.takes_view = True
