"""SZ codec: joins the stages (quantize -> predict -> tokens/entropy -> optional lossless).

This file is also the readable specification of the format; the C++ (csrc/sz.cpp) and Triton
(kernels/sz.py) backends produce and accept exactly these bytes.

Stream (one tensor; the ``data`` of a wire record), little-endian::

    u8  version (2)     u8 flags (bit0: blocks section is zstd-compressed)
    f64 step            quantization step (2 eb for the quantizer; finite, > 0)
    f64 bound           the promised |x - x_hat| bound (information; the encoder checked it)
    u32 block_size      u32 n_blocks (= ceil(numel / block_size))
    [u64 section_len    if zstd]
    section:            u64 block_len * n_blocks, then the blocks

Block (block_size values, the last one shorter)::

    u8 flags            bit0 lorenzo, bit1 zero-run tokens, bit2 raw (the values verbatim; nothing else)
    u8 pb               model precision (12..15 bits)
    u32 n_tokens        u32 n_wide        u32 n_outliers
    table               frequencies (entropy.write_table)
    varint state * 32   final rANS states - L (entropy.write_states)
    u32 n_words         u16 word * n_words
    i32 wide * n_wide   residuals outside the radius
    outliers            n_outliers values in the tensor's dtype, bit-exact

Decoding a value: residual -> code (predictor inverse) -> ``dtype(float64(q) * step)`` (through
float32 for 16-bit dtypes); outliers overwrite their positions in order.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

from ... import _ops, wire
from ...api import check_device
from ...errors import FormatError
from . import entropy as ent
from . import lossless
from .predict import PRED_LORENZO, choose_predictor, hold_outliers, lorenzo_inverse_ref, lorenzo_ref
from .quantize import inverse_of_step, prequantize_ref, quantize_ref, reconstruct_ref

VERSION = 2  # 2: 32 rANS lanes (1 had 8)
MAX_BLOCK = 1 << 24
BLK_LORENZO = 1
BLK_RUN = 2
BLK_RAW = 4
_HDR = struct.Struct("<BBddII")
MAX_EB = 1e300


def default_block_size(n: int) -> int:
    """Values per block when the caller does not choose: ~2^17 below 2^21 values, ~2^19 from there,
    in a multiple of 4 equal blocks.

    Small tensors (a CNN update, 0.58M values) get several blocks so threads share them and the
    block model adapts to the layers; large ones amortise the frequency tables. Equal blocks in a
    multiple of 4 keep 2 and 4 threads busy to the end: the update as 5 blocks of 2^17 left one of
    2 threads idle for a fifth of the time. Ratios with the default are in docs/sz.md
    (bench/bench_sz.py).
    """
    target = 1 << 17 if n < (1 << 21) else 1 << 19
    nb = -(-n // target)
    if nb <= 1:
        return max(n, 1)
    nb = -(-nb // 4) * 4
    return -(-n // nb)


SPARSE_SAMPLE = 4096  # values sampled (evenly strided) to tell a sparse tensor
SPARSE_NONZERO = 64  # at most 1 in 64 sampled codes nonzero: sparse
SPARSE_BLOCK = 1 << 21  # values per block of a sparse tensor


def is_sparse(x: torch.Tensor, step: float) -> bool:
    """Whether at most 1 in SPARSE_NONZERO of ~SPARSE_SAMPLE evenly strided values quantizes to a
    nonzero code (|float32(x) * inv| > 1/2, NaN and Inf counting as nonzero): an FL update at a bound
    where nearly everything rounds to zero. One function on a small sample, used by every backend's
    encoder, so they all choose the same block size (the decoder reads it from the header).
    """
    flat = x.reshape(-1)
    s = flat[:: max(1, flat.numel() // SPARSE_SAMPLE)].to(torch.float32).cpu().numpy()
    with np.errstate(over="ignore", invalid="ignore"):  # Inf and NaN are the answer there, not an error
        y = s * np.float32(inverse_of_step(step))
    return int(np.count_nonzero(~(np.abs(y) <= 0.5))) * SPARSE_NONZERO <= s.size


def choose_block_size(x: torch.Tensor, step: float) -> int:
    """The encoder's block size when the caller does not choose: default_block_size, or blocks of
    ~SPARSE_BLOCK values for a sparse tensor.

    On a sparse tensor a block's fixed costs (frequency table, 32 rANS final states, its length in
    the section table: ~60 bytes) are a visible share of a payload of a few KB, and its run-mode
    encode and decode are fast, so fewer blocks cost no time worth having. On the CNN update of
    bench/bench_sz.py at REL 0.1 (99.6% zero codes): 887x with its default 8 blocks, 1234x with one
    (`python bench/sz_sparse.py`). Dense tensors keep default_block_size, whose blocks threads share.
    """
    n = x.numel()
    bs = default_block_size(n)
    if bs >= n or not is_sparse(x, step):
        return bs
    nb = -(-n // SPARSE_BLOCK)
    return -(-n // nb)


# ---------------------------------------------------------------------------------------------
# Error bound -> (step, bound)


def finite_range(x: torch.Tensor) -> tuple[float, float] | None:
    """(min, max) of the finite values as float64, or None when there are none."""
    if x.device.type == "cpu" and x.numel() and _ops.available("sz_encode", "cpp")[0]:
        from ...cpp.sz import finite_range_cpp  # the C++ adapters import this package's siblings

        return finite_range_cpp(x)
    xd = x.reshape(-1)
    fin = torch.isfinite(xd)
    if not bool(fin.all()):
        xd = xd[fin]
    if xd.numel() == 0:
        return None
    lo, hi = torch.aminmax(xd)
    return float(lo.double()), float(hi.double())


def value_range(x: torch.Tensor) -> tuple[float, float, int]:
    """(min, max, 1) of the finite values, or (0.0, 0.0, 0) when there are none: what
    ``encode_stream(..., value_range=)`` takes, so a caller encoding one tensor at several REL
    bounds (the ``sz:ratio=R`` search) finds the range once."""
    r = finite_range(x)
    return (0.0, 0.0, 0) if r is None else (r[0], r[1], 1)


def quant_params(x: torch.Tensor, error_bound: float, mode: str,
                 value_range: tuple[float, float, int] | None = None) -> tuple[float, float]:
    """(step, bound): bound is what we promise; step = 2 * eb_q is what we quantize with.

    REL: bound = error_bound * (max - min) of the finite values (SZ's REL; ``value_range`` gives
    them when the caller has them). A constant tensor has bound 0 (it must come back exactly): we
    quantize with eb_q = |c| / 2, so q = +-1 and q * step == c exactly; any value that still misses
    goes verbatim.
    """
    if mode == "abs":
        bound = error_bound
    else:
        if value_range is None:
            r = finite_range(x)
        else:
            r = (value_range[0], value_range[1]) if value_range[2] else None
        bound = 0.0 if r is None else error_bound * (r[1] - r[0])
        if not math.isfinite(bound):
            bound = MAX_EB
        if bound == 0.0:
            c = 0.0 if r is None else max(abs(r[0]), abs(r[1]))
            # a subnormal constant halves to 0: quantize with any step, the values then go verbatim
            eb_q = c / 2 if c / 2 > 0 else 1.0
            return 2 * eb_q, 0.0
    eb_q = min(bound, MAX_EB)
    return 2 * eb_q, bound


# ---------------------------------------------------------------------------------------------
# Blocks section: torch/numpy reference


def _raw_bytes(x: torch.Tensor) -> bytes:
    return bytes(wire.tensor_bytes(x))


def quantize_all_ref(x: torch.Tensor, step: float, bound: float) -> tuple[np.ndarray, np.ndarray]:
    """Stage 1 over the whole flat tensor: (codes int64, outlier mask)."""
    q = prequantize_ref(x, inverse_of_step(step)).cpu()
    _, out = quantize_ref(x, step, bound, q)
    return q.numpy().astype(np.int64), out.numpy()


def plain_tokens_ref(q_eff: np.ndarray, outlier: np.ndarray, lorenzo: bool) -> tuple[np.ndarray, np.ndarray]:
    """One block's plain-mode tokens and their histogram (the Triton backend computes these on the device)."""
    d = lorenzo_ref(q_eff) if lorenzo else q_eff
    tok, _ = ent.tokenize_ref(d, outlier, ent.MODE_PLAIN)
    return tok, ent.histogram_ref(tok)


def encode_block_ref(x: torch.Tensor, q: np.ndarray, outlier: np.ndarray, step: float, bound: float,
                     tokens=None) -> bytes:
    """One block (flat ``x`` in its dtype, its codes ``q`` and outlier mask) -> block bytes.

    ``tokens(q_eff, outlier, lorenzo) -> (plain tokens, histogram)`` is pluggable (Triton).
    """
    n = x.numel()
    q_eff = hold_outliers(q, outlier)
    pred, d = choose_predictor(q_eff, outlier)
    tok_p, h_p = (tokens or plain_tokens_ref)(q_eff, outlier, pred == PRED_LORENZO)
    wide = d[tok_p == ent.ESC_WIDE].astype(np.int32)
    tok, hist, run = tok_p, h_p, False
    if h_p[ent.TOKEN_BASE] * ent.RUN_CONSIDER >= n:  # zero runs only pay when zeros are common
        tok_r, _ = ent.tokenize_ref(d, outlier, ent.MODE_RUN)
        h_r = ent.histogram_ref(tok_r)
        if ent.estimate_cost(h_r) < ent.estimate_cost(h_p):
            tok, hist, run = tok_r, h_r, True
    return _pack_block(x, pred, run, tok, hist, wide, outlier)


def _pack_block(x, pred, run, tok, hist, wide, outlier) -> bytes:
    raw = bytes([BLK_RAW]) + _raw_bytes(x)
    nsym = int((hist > 0).sum())
    if nsym > ent.MAX_SYMBOLS:
        return raw
    pb, freq = ent.choose_pb(hist)
    states, words = ent.rans_encode_ref(tok, freq, pb)
    flags = (BLK_LORENZO if pred == PRED_LORENZO else 0) | (BLK_RUN if run else 0)
    n_out = int(outlier.sum())
    parts = [
        struct.pack("<BBIII", flags, pb, tok.shape[0], wide.shape[0], n_out),
        ent.write_table(freq),
        ent.write_states(states),
        struct.pack("<I", words.shape[0]),
        words.astype("<u2").tobytes(),
        wide.astype("<i4").tobytes(),
        _raw_bytes(x[torch.from_numpy(outlier)]) if n_out else b"",
    ]
    blk = b"".join(parts)
    return raw if len(blk) >= len(raw) else blk


def decode_block_ref(buf, n: int, dtype: torch.dtype, step: float, reconstruct=None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Block bytes -> ``n`` values of ``dtype`` on ``device``. FormatError on anything inconsistent.

    The entropy stages are sequential and run on the host; the codes go to ``device`` once and are
    dequantized there (``reconstruct``: the reference, or Triton's kernel on CUDA), outliers too.
    """
    isz = wire.itemsize(dtype)
    r = wire.Reader(buf, "sz block")
    flags = r.u8()
    if flags & ~(BLK_LORENZO | BLK_RUN | BLK_RAW) or (flags & BLK_RAW and flags != BLK_RAW):
        raise FormatError(f"sz block: unknown flags {flags:#x}")
    if flags & BLK_RAW:
        out = wire.tensor_from_bytes(r.take(n * isz), dtype, (n,), "sz raw block")
        r.expect_end()
        return out.to(device)
    pb = r.u8()
    if not ent.MIN_PB <= pb <= ent.MAX_PB:
        raise FormatError(f"sz block: model precision {pb} outside [{ent.MIN_PB}, {ent.MAX_PB}]")
    n_tok, n_wide, n_out = r.u32(), r.u32(), r.u32()
    if n_tok > n or n_tok == 0 or n_wide > n or n_out > n or (not flags & BLK_RUN and n_tok != n):
        raise FormatError("sz block: counts impossible for the block size")
    buf = r.buf
    freq, r.pos = ent.read_table(buf, r.pos, pb)
    states, r.pos = ent.read_states(buf, r.pos)
    n_words = r.u32()
    words = np.frombuffer(r.take(2 * n_words), "<u2")
    wide = np.frombuffer(r.take(4 * n_wide), "<i4")
    outl = wire.tensor_from_bytes(r.take(n_out * isz), dtype, (n_out,), "sz outliers")
    r.expect_end()
    tok = ent.rans_decode_ref(states, words, freq, pb, n_tok)
    d, is_out = ent.detokenize_ref(tok, wide, n, ent.MODE_RUN if flags & BLK_RUN else ent.MODE_PLAIN)
    if int(is_out.sum()) != n_out:
        raise FormatError("sz block: outlier count mismatch")
    q = lorenzo_inverse_ref(d) if flags & BLK_LORENZO else d
    out = (reconstruct or reconstruct_ref)(torch.from_numpy(q.astype(np.int32)).to(device), step, dtype)
    if n_out:
        # through an integer view: index_put on bfloat16 goes via float and canonicalises NaN payloads
        # (0xFFFF came back as 0x7FC0 from 64 elements up; found by the property tests)
        iv = {2: torch.int16, 4: torch.int32, 8: torch.int64}[isz]
        out.view(iv)[torch.from_numpy(is_out).to(device)] = outl.view(iv).to(device)
    return out


def encode_section_ref(x: torch.Tensor, step: float, bound: float, block_size: int, quantize=None,
                       tokens=None) -> bytes:
    """Reference encoder of the blocks section. ``quantize``/``tokens`` are pluggable stages (Triton)."""
    x = x.detach().reshape(-1)
    if quantize is not None:
        q_all, out_all = quantize(x, step, bound)
    else:
        q_all, out_all = quantize_all_ref(x.cpu(), step, bound)
    x = x.cpu()
    blocks = [
        encode_block_ref(x[i : i + block_size], q_all[i : i + block_size], out_all[i : i + block_size], step, bound,
                         tokens)
        for i in range(0, x.numel(), block_size)
    ]
    return _join_blocks(blocks)


def _join_blocks(blocks: list[bytes]) -> bytes:
    return struct.pack(f"<{len(blocks)}Q", *map(len, blocks)) + b"".join(blocks)


def split_section(section, n: int, block_size: int, n_blocks: int) -> list[memoryview]:
    r = wire.Reader(section, "sz section")
    lens = [r.u64() for _ in range(n_blocks)]
    out = [r.take(k) for k in lens]
    r.expect_end()
    return out


def decode_section_ref(section, dtype: torch.dtype, n: int, block_size: int, step: float,
                       device: torch.device | str = "cpu", reconstruct=None) -> torch.Tensor:
    """Reference decoder of the blocks section: ``n`` values of ``dtype`` on ``device``.
    ``reconstruct`` is the pluggable dequantizer (Triton)."""
    n_blocks = -(-n // block_size)
    blocks = split_section(section, n, block_size, n_blocks)
    if not blocks:
        return torch.empty(0, dtype=dtype, device=device)
    parts = [decode_block_ref(b, min(block_size, n - i * block_size), dtype, step, reconstruct, device)
             for i, b in enumerate(blocks)]
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------
# Stream


def encode_stream(x: torch.Tensor, error_bound: float, mode: str, *, block_size: int | None = None,
                  lossless_mode: int = lossless.LOSSLESS_NONE, backend: str | None = None, prefix: bytes = b"",
                  value_range: tuple[float, float, int] | None = None) -> bytes:
    """``prefix`` + the stream of ``x`` (the module docstring's format). ``prefix`` (e.g. a record's
    kind byte) is written with the stream, not concatenated after it; ``value_range`` as
    ``value_range(x)`` returns it (REL only: the range is not computed again)."""
    x = x.detach()
    encode = _ops.get("sz_encode", x.device, backend, x.dtype) if x.numel() else None
    whole = getattr(encode, "encode_stream", None)
    if whole is not None and lossless_mode == lossless.LOSSLESS_NONE:
        # C++: range, step, block size, header and section in one call (cpp/sz.py), the same bytes
        return whole(x, error_bound, mode, block_size, prefix=prefix, value_range=value_range)
    step, bound = quant_params(x, error_bound, mode, value_range)
    block_size = block_size or choose_block_size(x, step)
    n_blocks = -(-x.numel() // block_size)
    hdr = prefix + _HDR.pack(VERSION, lossless_mode, step, bound, block_size, n_blocks)
    section = encode(x, step, bound, block_size) if x.numel() else b""
    if lossless_mode == lossless.LOSSLESS_ZSTD:
        return hdr + struct.pack("<Q", len(section)) + lossless.zstd_compress(section)
    return hdr + section


def decode_stream(data, dtype: torch.dtype, shape: tuple[int, ...], backend: str | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """One stream -> a tensor of ``dtype`` and ``shape`` on ``device`` (default CPU), decoded by the
    backend chosen for that device and dtype (CUDA: Triton dequantizes on the device)."""
    dev = check_device(device)
    if dtype not in wire.FLOAT_DTYPES:
        raise FormatError(f"sz stream for a non-float dtype {dtype}")
    n = math.prod(shape)
    isz = wire.itemsize(dtype)
    wire.check_alloc(n * isz, "sz tensor")
    r = wire.Reader(data, "sz stream")
    version, lmode, step, bound, block_size, n_blocks = _HDR.unpack(r.take(_HDR.size))
    if version != VERSION:
        raise FormatError(f"sz stream version {version}, this build reads {VERSION}")
    if lmode not in (lossless.LOSSLESS_NONE, lossless.LOSSLESS_ZSTD):
        raise FormatError(f"sz stream: unknown lossless stage {lmode}")
    if not (math.isfinite(step) and step > 0):
        raise FormatError(f"sz stream: quantization step {step} is not finite and positive")
    if not 1 <= block_size <= MAX_BLOCK or n_blocks != -(-n // block_size):
        raise FormatError("sz stream: block layout does not match the tensor size")
    if lmode == lossless.LOSSLESS_ZSTD:
        size = r.u64()
        if size > 8 * n_blocks + n * isz + n_blocks:  # encoded blocks are never larger than raw ones
            raise FormatError(f"sz stream: declared section size {size} impossible for {n} values")
        section = lossless.zstd_decompress(r.take(r.remaining), size)
    else:
        section = r.take(r.remaining)
    if n == 0:
        if len(section):
            raise FormatError("sz stream: data for an empty tensor")
        return torch.empty(shape, dtype=dtype, device=dev)
    decode = _ops.get("sz_decode", dev, backend, dtype)
    if not getattr(decode, "takes_view", False):  # C++ reads the payload in place; the others get bytes
        section = bytes(section)
    return decode(section, dtype, n, block_size, step, dev).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Public codec


class SZ:
    """Error-bounded lossy codec for float tensors (SZ-style; see the module docstring).

    ``SZ(error_bound=1e-2, mode="rel")``: every finite value comes back within ``eb`` where
    ``eb = error_bound`` (ABS) or ``error_bound * (max - min)`` of the finite values (REL);
    NaN, +-Inf and subnormals come back bit-exact. ``encode(t) -> bytes`` (CPU or CUDA ``t``, encoded
    where it lives), ``decode(b, device=None) -> Tensor`` (same dtype and shape, on ``device``, default
    CPU, and decoded by that device's backend). ``lossless="zstd"`` adds a zstd pass; ``backend`` forces one of
    torch / cpp / triton (default: automatic, see fedcompress._ops).
    """

    def __init__(self, error_bound: float = 1e-2, mode: str = "rel", *, lossless: str | None = None,
                 block_size: int | None = None, backend: str | None = None) -> None:
        if isinstance(error_bound, bool) or not isinstance(error_bound, (int, float)):
            raise ValueError(f"error_bound must be a finite number > 0, got {error_bound!r}")
        if not (math.isfinite(error_bound) and error_bound > 0):
            raise ValueError(f"error_bound must be a finite number > 0, got {error_bound!r}")
        if mode not in ("rel", "abs"):
            raise ValueError(f"mode must be one of 'rel', 'abs', got {mode!r}")
        if lossless not in (None, "none", "zstd"):
            raise ValueError(f"lossless must be one of None, 'zstd', got {lossless!r}")
        if block_size is not None and (not isinstance(block_size, int) or not 1 <= block_size <= MAX_BLOCK):
            raise ValueError(f"block_size must be an int in [1, {MAX_BLOCK}], got {block_size!r}")
        self.error_bound = float(error_bound)
        self.mode = mode
        self.lossless = lossless if lossless == "zstd" else None
        self.block_size = block_size
        self.backend = _ops.requested_backend(backend) if backend else None

    def __repr__(self) -> str:
        return f"SZ(error_bound={self.error_bound}, mode={self.mode!r})"

    def encode(self, t: torch.Tensor) -> bytes:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"SZ.encode takes a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in wire.FLOAT_DTYPES:
            raise TypeError(f"SZ.encode takes a float tensor (float32/64/16, bfloat16), got {t.dtype}")
        lm = lossless.LOSSLESS_ZSTD if self.lossless else lossless.LOSSLESS_NONE
        data = encode_stream(t, self.error_bound, self.mode, block_size=self.block_size, lossless_mode=lm,
                             backend=self.backend)
        return wire.pack(wire.CODEC_SZ_TENSOR, [wire.Record("", t.dtype, tuple(t.shape), data)])

    def decode(self, blob, device=None) -> torch.Tensor:
        dev = check_device(device)
        _, records = wire.unpack(blob, wire.CODEC_SZ_TENSOR)
        if len(records) != 1:
            raise FormatError(f"sz tensor payload has {len(records)} records, expected 1")
        rec = records[0]
        if rec.dtype in wire.FLOAT_DTYPES:  # C++ on CPU: header checks and decode in one native call
            one_call = getattr(_ops.get("sz_decode", dev, self.backend, rec.dtype), "decode_records", None)
            t = one_call([rec], kinds=False)[0] if one_call is not None else None
            if t is not None:
                return t
        return decode_stream(rec.data, rec.dtype, rec.shape, backend=self.backend, device=dev)
