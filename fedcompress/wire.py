"""Framing shared by every payload: magic, format version, codec id, records, CRC32.

Layout (little-endian)::

    magic  b"FCMP"          4
    version u16             2   (FORMAT_VERSION)
    codec   u16             2   (CODEC_* below)
    meta_len u32, meta      4 + meta_len      codec-level parameters (Writer/Reader encoded)
    n_records u32           4
    record * n_records:
        name_len u16, name (utf-8)
        dtype u8            (DTYPE_CODES)
        ndim u8, shape u64 * ndim
        data_len u64, data  (codec-specific bytes: raw for lossless records)
    crc32 u32               over everything before it

Every size is checked against the bytes that remain and against ``limits`` before anything is
allocated, so a hostile header can cost at most the payload's own length plus ``max_decoded_bytes``.
Nothing here uses pickle.
"""

from __future__ import annotations

import math
import os
import struct
import sys
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from . import _ops
from .errors import BackendUnavailable, FormatError


def _join_crc32_py(parts: list) -> bytes:
    body = b"".join(parts)
    return body + struct.pack("<I", zlib.crc32(body))


def _pick_crc32():
    """zlib.crc32, or the extension's PCLMULQDQ version of it (same values; bench/bench_wire.py);
    and pack's last step, b"".join(parts) + the u32 CRC of it, in one native call where it can."""
    try:
        native = _ops.native()
    except BackendUnavailable:  # pure-Python install: the extension is optional
        return zlib.crc32, _join_crc32_py
    return (native.crc32 if native.crc32_fast() else zlib.crc32), native.join_crc32


crc32, _join_crc32 = _pick_crc32()

MAGIC = b"FCMP"
FORMAT_VERSION = 1

# Codec ids: one per payload kind. Never renumber; append.
CODEC_NONE = 1
CODEC_FP16 = 2
CODEC_SZ = 3  # state-dict SZ compressor
CODEC_MASK = 4  # state-dict random mask compressor
CODEC_FEDSYNTH = 5
CODEC_SZ_TENSOR = 16  # fc.SZ().encode
CODEC_MASK_TENSOR = 17  # fc.RandomMask().encode
CODEC_NAMES = {
    CODEC_NONE: "none",
    CODEC_FP16: "fp16",
    CODEC_SZ: "sz",
    CODEC_MASK: "mask",
    CODEC_FEDSYNTH: "fedsynth",
    CODEC_SZ_TENSOR: "sz-tensor",
    CODEC_MASK_TENSOR: "mask-tensor",
}

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float64: 2,
    torch.float16: 3,
    torch.bfloat16: 4,
    torch.int64: 5,
    torch.int32: 6,
    torch.int16: 7,
    torch.int8: 8,
    torch.uint8: 9,
    torch.bool: 10,
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

MAX_NDIM = 16
U64_MASK = (1 << 64) - 1  # seeds travel as u64: the one home of this mask (api, codecs/mask, kernels/mask)
MAX_NAME_BYTES = 4096
MAX_RECORDS = 1 << 20

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("fedcompress's wire format assumes a little-endian host")


@dataclass
class Limits:
    """Decoder limits. ``max_decoded_bytes`` bounds what one payload may make us allocate."""

    max_decoded_bytes: int = int(os.environ.get("FEDCOMPRESS_MAX_DECODED_BYTES", 8 << 30))


limits = Limits()


def set_max_decoded_bytes(n: int) -> None:
    """Set the largest total tensor size (bytes) any decoder will allocate for one payload."""
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"max_decoded_bytes must be a positive int, got {n!r}")
    limits.max_decoded_bytes = n


def check_alloc(nbytes: int, what: str = "payload") -> None:
    """Raise FormatError if allocating ``nbytes`` would exceed the decoder limit."""
    if nbytes < 0 or nbytes > limits.max_decoded_bytes:
        raise FormatError(
            f"{what} would decode to {nbytes} bytes, over the limit of {limits.max_decoded_bytes} "
            "(fedcompress.wire.set_max_decoded_bytes or FEDCOMPRESS_MAX_DECODED_BYTES raise it)"
        )


def itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


# ---------------------------------------------------------------------------------------------
# Primitive writer / bounds-checked reader (also used by codecs for their own stage streams)


# one compiled Struct per field type: Writer and Reader run per field of every record (a frame
# of the CNN's 8 tensors is ~70 fields), where struct's format-string cache lookup showed up
_U8, _U16, _U32, _U64 = (struct.Struct(f) for f in ("<B", "<H", "<I", "<Q"))
_I64, _F32, _F64 = (struct.Struct(f) for f in ("<q", "<f", "<d"))


def name_field(s: str) -> bytes:
    """A name as the wire writes it: u16 length + utf-8 (ValueError past MAX_NAME_BYTES)."""
    b = s.encode("utf-8")
    if len(b) > MAX_NAME_BYTES:
        raise ValueError(f"name too long for the wire format ({len(b)} > {MAX_NAME_BYTES} bytes)")
    return _U16.pack(len(b)) + b


class Writer:
    """Appends little-endian fields to a list of byte chunks (joined once at the end)."""

    def __init__(self) -> None:
        self.parts: list[bytes | memoryview] = []
        self.size = 0

    def raw(self, b) -> None:
        b = memoryview(b).cast("B") if not isinstance(b, bytes) else b
        self.parts.append(b)
        self.size += len(b)

    def _pack(self, st: struct.Struct, v) -> None:
        self.parts.append(st.pack(v))
        self.size += st.size

    def u8(self, v: int) -> None:
        self._pack(_U8, v)

    def u16(self, v: int) -> None:
        self._pack(_U16, v)

    def u32(self, v: int) -> None:
        self._pack(_U32, v)

    def u64(self, v: int) -> None:
        self._pack(_U64, v)

    def i64(self, v: int) -> None:
        self._pack(_I64, v)

    def f32(self, v: float) -> None:
        self._pack(_F32, v)

    def f64(self, v: float) -> None:
        self._pack(_F64, v)

    def blob(self, b) -> None:
        """Length-prefixed (u64) bytes."""
        b = memoryview(b).cast("B")
        self.u64(len(b))
        self.raw(b)

    def str(self, s: str) -> None:
        self.raw(name_field(s))

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


class Reader:
    """Reads little-endian fields from a memoryview; every read is bounds-checked (FormatError)."""

    def __init__(self, buf, what: str = "payload") -> None:
        self.buf = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf.cast("B")
        self.pos = 0
        self.what = what

    @property
    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int) -> memoryview:
        if n < 0 or n > self.remaining:
            raise FormatError(f"truncated {self.what}: need {n} bytes at offset {self.pos}, have {self.remaining}")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def _unpack(self, st: struct.Struct):
        return st.unpack(self.take(st.size))[0]

    def u8(self) -> int:
        return self._unpack(_U8)

    def u16(self) -> int:
        return self._unpack(_U16)

    def u32(self) -> int:
        return self._unpack(_U32)

    def u64(self) -> int:
        return self._unpack(_U64)

    def i64(self) -> int:
        return self._unpack(_I64)

    def f32(self) -> float:
        return self._unpack(_F32)

    def f64(self) -> float:
        return self._unpack(_F64)

    def finite_f64(self, name: str) -> float:
        v = self.f64()
        if not math.isfinite(v):
            raise FormatError(f"{self.what}: {name} is not finite ({v})")
        return v

    def blob(self) -> memoryview:
        return self.take(self.u64())

    def str(self) -> str:
        n = self.u16()
        if n > MAX_NAME_BYTES:
            raise FormatError(f"{self.what}: name length {n} over {MAX_NAME_BYTES}")
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"{self.what}: name is not utf-8") from e

    def expect_end(self) -> None:
        if self.remaining:
            raise FormatError(f"{self.what}: {self.remaining} unexpected trailing bytes")


# ---------------------------------------------------------------------------------------------
# Records and the payload frame


@dataclass
class Record:
    """One tensor's entry: its name, the dtype and shape it decodes to, and codec-specific bytes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    data: bytes | memoryview

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


def pack(codec: int, records: list[Record], meta: bytes = b"") -> bytes:
    """Frame ``records`` (and codec-level ``meta``) into one checksummed payload."""
    parts = [MAGIC, struct.pack("<HHI", FORMAT_VERSION, codec, len(meta)), meta, _U32.pack(len(records))]
    for r in records:
        if r.dtype not in DTYPE_CODES:
            raise TypeError(f"dtype {r.dtype} is not supported by the wire format")
        if len(r.shape) > MAX_NDIM:
            raise ValueError(f"tensor {r.name!r} has {len(r.shape)} dims, more than {MAX_NDIM}")
        data = r.data if isinstance(r.data, bytes) else memoryview(r.data).cast("B")
        # name, dtype code, ndim, shape (u64 each), data (u64 length + bytes): the header fields as
        # one struct, so a record is three parts, not 6 + ndim
        parts.append(name_field(r.name))
        parts.append(struct.pack(f"<BB{len(r.shape)}QQ", DTYPE_CODES[r.dtype], len(r.shape), *r.shape, len(data)))
        parts.append(data)
    return _join_crc32(parts)


def peek_codec(blob) -> int:
    """The codec id of a payload (after checking magic and version; no checksum)."""
    buf = _as_view(blob)
    if len(buf) < 8 or bytes(buf[:4]) != MAGIC:
        raise FormatError("not a fedcompress payload (bad magic)")
    version, codec = struct.unpack("<HH", buf[4:8])
    if version != FORMAT_VERSION:
        raise FormatError(f"unsupported format version {version} (this build reads {FORMAT_VERSION})")
    return codec


def unpack(blob, expect_codec: int) -> tuple[memoryview, list[Record]]:
    """Check the frame and checksum; return (meta, records). Raises FormatError on anything wrong."""
    buf = _as_view(blob)
    if len(buf) < 4 + 2 + 2 + 4 + 4 + 4:
        raise FormatError(f"payload too short ({len(buf)} bytes)")
    codec = peek_codec(buf)
    if codec != expect_codec:
        got = CODEC_NAMES.get(codec, f"unknown codec {codec}")
        raise FormatError(f"payload is {got!r}, expected {CODEC_NAMES.get(expect_codec, expect_codec)!r}")
    (crc,) = struct.unpack("<I", buf[-4:])
    if crc32(buf[:-4]) != crc:
        raise FormatError("checksum mismatch: payload corrupted")
    r = Reader(buf[:-4])
    r.take(8)
    meta = r.take(r.u32())
    n = r.u32()
    if n > MAX_RECORDS or n > r.remaining // 12:  # a record takes at least 12 bytes
        raise FormatError(f"record count {n} impossible for a payload of {len(buf)} bytes")
    records = []
    names = set()
    total = 0
    for _ in range(n):
        name = r.str()
        if name in names:  # every codec's records are keyed by name: the one check, for all of them
            raise FormatError(f"payload names tensor {name!r} twice")
        names.add(name)
        code, ndim = r.take(2)
        if code not in CODE_DTYPES:
            raise FormatError(f"record {name!r}: unknown dtype code {code}")
        if ndim > MAX_NDIM:
            raise FormatError(f"record {name!r}: {ndim} dims, more than {MAX_NDIM}")
        shape = struct.unpack(f"<{ndim}Q", r.take(8 * ndim))
        rec = Record(name, CODE_DTYPES[code], shape, r.blob())
        if any(s > limits.max_decoded_bytes for s in shape):
            raise FormatError(f"record {name!r}: shape {shape} over the decode limit")
        total += rec.nbytes
        check_alloc(total, "payload")
        records.append(rec)
    r.expect_end()
    return meta, records


def _as_view(blob) -> memoryview:
    if isinstance(blob, torch.Tensor):
        raise FormatError("payload must be bytes-like, got a Tensor")
    try:
        return memoryview(blob).cast("B")
    except TypeError as e:
        raise FormatError(f"payload must be bytes-like, got {type(blob).__name__}") from e


# ---------------------------------------------------------------------------------------------
# Exact (lossless) tensor <-> bytes


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's elements as raw little-endian bytes (C order), without copying when possible."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def tensor_from_bytes(data, dtype: torch.dtype, shape: tuple[int, ...], what: str = "tensor") -> torch.Tensor:
    """Inverse of tensor_bytes; checks the length first (FormatError)."""
    numel = math.prod(shape)
    nbytes = numel * itemsize(dtype)
    if len(data) != nbytes:
        raise FormatError(f"{what}: {len(data)} data bytes for {dtype} {tuple(shape)} (expected {nbytes})")
    check_alloc(nbytes, what)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    # own the memory (the payload may be freed), from torch's allocator: numpy's buffers faulted
    # afresh on every call in a process that keeps what it decodes (bench/decode_faults.py: a
    # 100-client mask decode_mean 12,791 faults and 55 ms, then 0 and 33-42 ms; docs/mask.md)
    out = torch.empty(nbytes, dtype=torch.uint8)
    out.numpy()[:] = np.frombuffer(data, dtype=np.uint8)
    return out.view(dtype).reshape(shape)


def lossless_record(name: str, t: torch.Tensor) -> Record:
    return Record(name, t.dtype, tuple(t.shape), tensor_bytes(t))


def lossless_tensor(rec: Record) -> torch.Tensor:
    return tensor_from_bytes(rec.data, rec.dtype, rec.shape, f"record {rec.name!r}")
