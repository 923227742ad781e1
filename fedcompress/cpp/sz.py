"""C++ adapters of the SZ codec: numpy views of CPU tensors in, ``fedcompress._C`` (csrc/sz.cpp) out.

Named as kernels/sz.py is for Triton: ``encode_section_cpp`` / ``decode_section_cpp`` implement the
ops ``sz_encode`` / ``sz_decode`` whose reference and specification are in
fedcompress/codecs/sz/codec.py; ``fedcompress._ops`` declares them (CPU tensors, every float dtype).
``finite_range_cpp`` is the C++ half of ``codec.finite_range`` (the REL bound's min/max), and
``encode_stream_cpp`` the whole of ``codec.encode_stream`` without a lossless stage in one native call.
``encode_records_cpp`` / ``decode_records_cpp`` do a whole ``sz`` state-dict payload's records in one
native call each (codecs/sz/statedict.py takes them when the ops run in C++).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import _ops, wire
from ..errors import FormatError


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A C-contiguous numpy view of a CPU tensor (bfloat16 as int16: numpy has none, and the kernels
    read bits)."""
    if t.requires_grad:
        t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return (t.view(torch.int16) if t.dtype is torch.bfloat16 else t).numpy()


def _native_view(xf: torch.Tensor) -> tuple[np.ndarray, int]:
    """A numpy view of a CPU float tensor and its wire dtype code."""
    return _numpy(xf), wire.DTYPE_CODES[xf.dtype]


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

# the numpy dtype each wire dtype decodes into (bfloat16's bits as int16, as _numpy gives them)
_NP_DTYPES = {t: np.dtype(n) for t, n in ((torch.float32, np.float32), (torch.float64, np.float64),
              (torch.float16, np.float16), (torch.bfloat16, np.int16), (torch.int64, np.int64),
              (torch.int32, np.int32), (torch.int16, np.int16), (torch.int8, np.int8), (torch.uint8, np.uint8),
              (torch.bool, np.bool_))}  # fmt: skip


def encode_records_cpp(tensors: list[torch.Tensor], lossy: list[bool], error_bound: float, mode: str,
                       value_ranges: list[tuple[float, float, int]] | None = None) -> list[bytes]:
    """Each CPU tensor's record data as ``SZCompressor.compress`` writes it, in one native call: the
    kind byte 1 and ``encode_stream(t, error_bound, mode, value_range=value_ranges[i])`` where
    ``lossy``, else the kind byte 0 and its raw bytes. The same bytes as the per-tensor path; a
    Python round trip per tensor cost about a quarter of the codec's time right after local training
    (docs/sz.md)."""
    codes = [wire.DTYPE_CODES[t.dtype] if lo else 0 for t, lo in zip(tensors, lossy, strict=True)]
    return _ops.native().sz_encode_records([_numpy(t) for t in tensors], codes, error_bound, mode == "rel",
                                           value_ranges)


def value_stats_cpp(tensors: list[torch.Tensor]) -> list[tuple[tuple[float, float, int], float]]:
    """Per non-empty CPU float tensor, in one native call: its ``codec.value_range`` and its mean |x|
    (not finite when a value is not): the ``sz:ratio`` search's pass over the update, which took
    ~0.6 ms of Python and torch calls per CNN update right after training (docs/sz.md)."""
    stats = _ops.native().sz_value_stats([_numpy(t) for t in tensors], [wire.DTYPE_CODES[t.dtype] for t in tensors])
    return [((lo, hi, 1) if cnt else (0.0, 0.0, 0), mean_abs) for lo, hi, cnt, mean_abs in stats]


def decode_records_cpp(records: list[wire.Record], kinds: bool = True) -> list[torch.Tensor | None]:
    """The CPU tensors of an ``sz`` payload's records (as ``wire.unpack`` returns them) in one native
    call; None for a stream with a lossless stage (the per-record path decodes it). FormatError
    naming the record on any defect. ``kinds=False``: each record is a bare stream (``fc.SZ``)."""
    try:
        arrays = _ops.native().sz_decode_records(
            [r.data for r in records], [wire.DTYPE_CODES[r.dtype] for r in records],
            [_NP_DTYPES[r.dtype] for r in records], [r.shape for r in records], kinds)  # fmt: skip
    except ValueError as e:
        if len(e.args) == 2 and isinstance(e.args[0], int):
            what = f"record {records[e.args[0]].name!r}: " if kinds else ""
            raise FormatError(f"{what}{e.args[1]}") from None
        raise
    out = []
    for r, a in zip(records, arrays, strict=True):
        if a is not None:
            a = torch.from_numpy(a)
            if r.dtype is torch.bfloat16:
                a = a.view(torch.bfloat16)
        out.append(a)
    return out


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
decode_section_cpp.decode_records = decode_records_cpp
encode_section_cpp.encode_records = encode_records_cpp
encode_section_cpp.value_stats = value_stats_cpp
