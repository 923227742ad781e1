"""Random masking with seed-only masks: ``fc.RandomMask`` (one tensor) and the ``mask`` compressor.

The mask (the specification every backend follows bit for bit)::

    word(i, seed) = word i % 4 of Philox4x32-10 with key (seed & 0xFFFFFFFF, seed >> 32)
                    and counter (j & 0xFFFFFFFF, j >> 32, 0, 0), j = i // 4   (Triton's tl.randint4x)
    thr_m1        = max(floor(keep * 2^32), 1) - 1
    kept(i)       = word(i, seed) <= thr_m1                            (integers only: no float rounding)

``i`` is the element index in the flattened (C-order) tensor. One Philox call serves four
consecutive elements (4x less work than one call per element with tl.randint; the kernels are bound
by it). The payload is a small header and the kept values in index order (float32, or float16 with
``values="fp16"``): no bitmap, no indices; the decoder regenerates the mask from the 8-byte seed and
checks that the kept count agrees with the number of values sent. ``unbiased=True`` multiplies
decoded values by ``scale = float32(2^32 / (thr_m1 + 1))`` (1 / the exact keep probability).
``decode_mean`` of C payloads is, per element,
``sum over c in order of float32(v_c * w_c)`` accumulated in float32 from +0, with
``w_c = float32(scale * weight_c / sum(weights))`` (equal weights by default).

Backends (``fedcompress._ops``): ``mask_encode`` / ``mask_decode`` in torch (the reference below,
Philox on int64 tensors), C++ (csrc/mask.cpp, SIMD + OpenMP) and Triton (kernels/mask.py, tl.randint4x).

State dicts (``get_compressor("mask:keep=0.125")``): tensor ``k`` (dict order) is keyed by
``mix_seed(mask_id, k)`` with ``mask_id = ctx.subseed(MASK_SALT)``; float tensors are masked, all in
one kernel call; other tensors (``num_batches_tracked``...) travel exactly.

Unbiased by default: decoded values are scaled by 1/keep unless ``unbiased=false`` (the biased
mean shrinks every FedAvg step by keep). The flag travels in each payload (meta flags bit 0), so a
payload made with ``unbiased=False`` still decodes raw, whatever the decoder's own setting.

Byte budget (``mask:ratio=R``, codecs/budget.py): keep is set from the update's layout so that the
whole payload (framing, names, lossless tensors, 14-byte meta, kept values) fits ``dense / R``
even when the kept count K ~ Binomial(N, keep) lands ``BUDGET_SIGMAS`` standard deviations above
its mean; in the rarer case it would not, the threshold is lowered for that update until it fits
(a lower threshold keeps a subset of the same coordinates, so the count only falls).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import _ops, wire
from ..api import Compressor, Param, RoundContext, StateDict, boolean, choice, mix_seed, register
from ..errors import FormatError
from .budget import RATIO_PARAM, budget_bytes, dense_payload_bytes, payload_overhead, spec_without

MASK_SALT = 0x4D41534B  # "MASK": RoundContext.subseed salt for the state-dict mask id
_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1
_MUL0, _MUL1 = 0xD2511F53, 0xCD9E8D57
_BUMP0, _BUMP1 = 0x9E3779B9, 0xBB67AE85
_VALUE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
_META = "<QIBB"  # seed / mask id u64, thr_m1 u32, flags u8 (bit 0: unbiased), values dtype code u8
_META_LEN = 14


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
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not (0 <= int(seed) <= _M64):
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
                raise FormatError(_count_message(c, s, expected[c][s], k))
            seg = out[offs[s] : offs[s + 1]]
            if accumulate:
                seg[keep] = seg[keep] + v[pos : pos + k] * w
            else:
                seg[keep] = v[pos : pos + k] * w
            pos += k
        if pos != v.numel():
            raise FormatError(f"client {c}: {v.numel()} values sent but the masks keep {pos}")
    return out


def _count_message(c: int, s: int, sent: int, regenerated: int) -> str:
    return (
        f"client {c}, tensor {s}: payload holds {sent} kept values but the regenerated mask keeps "
        f"{regenerated} (wrong seed/keep, or altered bytes)"
    )


# ---------------------------------------------------------------------------------------------
# C++ backend (csrc/mask.cpp)


def _seeds_u64(seeds) -> np.ndarray:
    return np.asarray([int(s) & _M64 for s in seeds], dtype=np.uint64)


def _np_f32(x: torch.Tensor) -> np.ndarray:
    return x.detach().reshape(-1).to(torch.float32).contiguous().cpu().numpy()


def mask_encode_cpp(xs, seeds, thr_m1: int):
    """C++ encode: zero-copy on contiguous float32 CPU tensors; one call for every tensor."""
    values, counts = _ops.native().mask_encode([_np_f32(x) for x in xs], _seeds_u64(seeds), int(thr_m1))
    return torch.from_numpy(values), counts.tolist()


def mask_decode_cpp(vals, expected, seeds, lens, weights, thr_m1: int, accumulate: bool):
    C = len(vals)
    out = np.empty(int(sum(lens)), dtype=np.float32)
    exp = np.asarray(expected, dtype=np.int64).reshape(C * len(lens))
    sd = _seeds_u64([s for row in seeds for s in row])
    bad, got = _ops.native().mask_decode(
        [_np_f32(v) for v in vals],
        exp,
        sd,
        np.asarray(lens, dtype=np.int64),
        np.asarray(weights, dtype=np.float32),
        int(thr_m1),
        bool(accumulate),
        out,
    )
    if bad >= 0:
        S = max(len(lens), 1)
        raise FormatError(_count_message(bad // S, bad % S, int(exp[bad]) if exp.size else 0, got))
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------
# Payload parsing shared by the tensor codec and the compressor


def _pack_meta(seed: int, thr_m1: int, unbiased: bool, vdtype: torch.dtype) -> bytes:
    import struct

    return struct.pack(_META, seed, thr_m1, int(unbiased), wire.DTYPE_CODES[vdtype])


def _unpack_meta(meta) -> tuple[int, int, bool, torch.dtype]:
    import struct

    if len(meta) != _META_LEN:
        raise FormatError(f"mask header is {len(meta)} bytes, expected {_META_LEN}")
    seed, thr_m1, flags, vcode = struct.unpack(_META, meta)
    if flags & ~1:
        raise FormatError(f"mask header: unknown flags {flags:#x}")
    vdtype = wire.CODE_DTYPES.get(vcode)
    if vdtype not in (torch.float32, torch.float16):
        raise FormatError(f"mask header: values dtype code {vcode} is not float32/float16")
    return seed, thr_m1, bool(flags & 1), vdtype


def _check_count_plausible(k: int, n: int, thr_m1: int, name: str) -> None:
    """Reject a kept count more than 10 standard deviations (+16) from n * keep before regenerating.

    A genuine payload's count is Binomial(n, keep): off by 10 sigma with probability < 1e-22. A forged
    shape (say 2^24 elements for 5,000 values) is thus refused without spending O(n) regenerating its
    mask (fuzzing found such payloads costing > 1 s on the torch reference).
    """
    p = (thr_m1 + 1) / 2**32
    mean = n * p
    if abs(k - mean) > 10.0 * math.sqrt(n * p * (1.0 - p)) + 16:
        raise FormatError(f"record {name!r}: {k} kept values for {n} elements at keep={p:.6g} is implausible")


def _values_from(rec: wire.Record, vdtype: torch.dtype, thr_m1: int) -> torch.Tensor:
    size = wire.itemsize(vdtype)
    if len(rec.data) % size:
        raise FormatError(
            f"record {rec.name!r}: {len(rec.data)} bytes is not a whole number of {vdtype} values"
        )
    k = len(rec.data) // size
    if k > rec.numel:
        raise FormatError(f"record {rec.name!r}: {k} kept values for {rec.numel} elements")
    _check_count_plausible(k, rec.numel, thr_m1, rec.name)
    return wire.tensor_from_bytes(rec.data, vdtype, (k,), f"record {rec.name!r}").to(torch.float32)


def _values_bytes(values: torch.Tensor, vdtype: torch.dtype) -> memoryview:
    return wire.tensor_bytes(values.to(vdtype))


def _check_alloc_bits(n_clients: int, numel: int) -> None:
    # the decoders hold one mask bit per element and client besides the output
    wire.check_alloc(n_clients * ((numel + 63) // 64) * 8 + numel * 4, "mask decode")


# ---------------------------------------------------------------------------------------------
# Public tensor codec


class RandomMask:
    """Keep each coordinate with probability ``keep``; send only the kept values and 8 bytes of seed.

    ``encode(t, seed)`` -> bytes; ``decode(blob)`` -> tensor of t's dtype and shape, zeros where
    dropped (x 1/keep where ``unbiased``, the default); ``decode_mean(blobs, weights=None)`` -> weighted mean of
    many clients' payloads (same shape and keep, any seeds), regenerated and scattered in one pass.
    ``values="fp16"`` halves the payload (values rounded to float16). ``backend`` forces
    torch/cpp/triton (default: FEDCOMPRESS_BACKEND, else automatic). Payloads are self-describing:
    decode uses the keep/unbiased settings written by the encoder.
    """

    def __init__(
        self, keep: float = 0.1, unbiased: bool = True, values: str = "fp32", backend: str | None = None
    ):
        self.keep = check_keep(keep)
        if not isinstance(unbiased, (bool, np.bool_)):
            raise ValueError(f"unbiased={unbiased!r} must be True or False")
        self.unbiased = bool(unbiased)
        if values not in _VALUE_DTYPES:
            raise ValueError(f"values={values!r} must be one of {', '.join(_VALUE_DTYPES)}")
        self.values = values
        self.backend = _ops.requested_backend(backend)
        self.thr_m1 = keep_threshold(self.keep)

    def __repr__(self) -> str:
        return f"RandomMask(keep={self.keep}, unbiased={self.unbiased}, values={self.values!r})"

    def mask(self, numel: int, seed: int) -> torch.Tensor:
        """The boolean keep mask for a tensor of ``numel`` elements (reference implementation)."""
        return mask_keep_ref(int(numel), check_seed(seed), self.thr_m1)

    def encode(self, t: torch.Tensor, seed: int = 0) -> bytes:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError("RandomMask.encode takes a floating-point tensor")
        seed = check_seed(seed)
        vdtype = _VALUE_DTYPES[self.values]
        fn = _ops.get("mask_encode", t.device, self.backend)
        values, _ = fn([t.detach().reshape(-1)], [seed], self.thr_m1)
        rec = wire.Record("", t.dtype, tuple(t.shape), _values_bytes(values, vdtype))
        return wire.pack(wire.CODEC_MASK_TENSOR, [rec], _pack_meta(seed, self.thr_m1, self.unbiased, vdtype))

    def _parse(self, blob):
        meta, records = wire.unpack(blob, wire.CODEC_MASK_TENSOR)
        seed, thr_m1, unbiased, vdtype = _unpack_meta(meta)
        if len(records) != 1:
            raise FormatError(f"mask-tensor payload has {len(records)} records, expected 1")
        rec = records[0]
        if not rec.dtype.is_floating_point:
            raise FormatError(f"mask-tensor payload: dtype {rec.dtype} is not floating point")
        return seed, thr_m1, unbiased, vdtype, rec

    def decode(self, blob) -> torch.Tensor:
        seed, thr_m1, unbiased, vdtype, rec = self._parse(blob)
        values = _values_from(rec, vdtype, thr_m1)
        _check_alloc_bits(1, rec.numel)
        w = unbiased_scale(thr_m1) if unbiased else 1.0
        fn = _ops.get("mask_decode", "cpu", self.backend)
        flat = fn([values], [[values.numel()]], [[seed]], [rec.numel], [w], thr_m1, False)
        return flat.to(rec.dtype).reshape(rec.shape)

    def decode_mean(self, blobs, weights=None) -> torch.Tensor:
        blobs = list(blobs)
        if not blobs:
            raise ValueError("decode_mean needs at least one payload")
        parsed = [self._parse(b) for b in blobs]
        _, thr_m1, unbiased, _, rec0 = parsed[0]
        for _, t, u, _, r in parsed[1:]:
            if (t, u, r.dtype, r.shape) != (thr_m1, unbiased, rec0.dtype, rec0.shape):
                raise FormatError("decode_mean payloads differ in keep, unbiased, dtype or shape")
        ws = _client_weights(weights, len(blobs), unbiased_scale(thr_m1) if unbiased else 1.0)
        _check_alloc_bits(len(blobs), rec0.numel)
        vals = [_values_from(r, vd, thr_m1) for _, _, _, vd, r in parsed]
        fn = _ops.get("mask_decode", "cpu", self.backend)
        flat = fn(vals, [[v.numel()] for v in vals], [[p[0]] for p in parsed], [rec0.numel], ws, thr_m1, True)
        return flat.to(rec0.dtype).reshape(rec0.shape)


def _client_weights(weights, n: int, scale: float) -> list[float]:
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


# ---------------------------------------------------------------------------------------------
# State-dict compressor


# A budgeted keep leaves room for the kept count to land this many standard deviations above its
# mean: a one-sided normal tail of ~0.13 % of updates need a second encode at a lower threshold.
# The margin costs about BUDGET_SIGMAS / sqrt(kept values) of the values the budget would allow.
BUDGET_SIGMAS = 3.0


def budget_keep(n: int, max_values: int, sigmas: float) -> float:
    """The largest keep p with n * p + sigmas * sqrt(n * p * (1 - p)) <= max_values (1.0 if all fit).

    Bisection on p (60 halvings of [0, 1]: exact to double precision, deterministic)."""
    if max_values >= n:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if n * mid + sigmas * math.sqrt(n * mid * (1.0 - mid)) <= max_values:
            lo = mid
        else:
            hi = mid
    return lo


@register("mask")
class MaskCompressor(Compressor):
    """Random mask of every float tensor of the update (one kernel call for the whole state dict).

    Spec keys: ``keep`` in (0, 1], ``unbiased`` (scale by 1/keep on decode; default true),
    ``values`` fp32|fp16, ``ratio`` (> 1: keep is chosen so every payload fits dense / ratio;
    exclusive with ``keep``). After each ``compress``, ``last_choice`` is ``{"keep": p, "ratio": r}``
    (the keep probability used and the ratio reached) when ``ratio`` is set, else None.
    The server side can decode many clients at once with ``server_mean`` (one fused pass).
    """

    PARAMS = {
        "keep": Param(float, 0.1, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]"),
        "unbiased": Param(boolean, True, None, "true or false"),
        "values": choice("fp32", "fp16"),
        "ratio": RATIO_PARAM,
    }
    codec = wire.CODEC_MASK

    def __init__(self, **kwargs) -> None:
        if "keep" in kwargs and kwargs.get("ratio") is not None:
            raise ValueError("mask: give keep or ratio, not both (ratio=R chooses keep)")
        super().__init__(**kwargs)
        self.thr_m1 = keep_threshold(self.params["keep"])
        self.backend: str | None = None  # None: FEDCOMPRESS_BACKEND or automatic
        self.last_choice: dict | None = None
        self._budget_thr: dict[tuple, tuple[int, int]] = {}  # layout -> (thr_m1, max kept values)

    @property
    def spec(self) -> str:
        return spec_without(self, {"keep"} if self.params["ratio"] is not None else set())

    @staticmethod
    def mask_id(ctx: RoundContext) -> int:
        return ctx.subseed(MASK_SALT)

    @staticmethod
    def tensor_seed(mask_id: int, index: int) -> int:
        return mix_seed(mask_id, index)

    def _threshold_for(self, update: StateDict) -> tuple[int, int]:
        """(thr_m1, most kept values that fit) for ``update``'s layout under ``ratio``."""
        layout = tuple((k, v.dtype, tuple(v.shape)) for k, v in update.items())
        hit = self._budget_thr.get(layout)
        if hit is not None:
            return hit
        ratio = self.params["ratio"]
        vsize = wire.itemsize(_VALUE_DTYPES[self.params["values"]])
        fixed = payload_overhead(update, _META_LEN) + sum(
            v.numel() * v.element_size() for v in update.values() if not v.is_floating_point()
        )
        n = sum(v.numel() for v in update.values() if v.is_floating_point())
        room = budget_bytes(update, ratio) - fixed
        max_values = room // vsize
        if max_values < 1 and n > 0 or room < 0:
            reach = dense_payload_bytes(update) / (fixed + (vsize if n else 0))
            raise ValueError(
                f"mask: ratio={ratio:g} cannot be met for this update; the framing and lossless tensors "
                f"alone take {fixed} bytes, so mask reaches at most {reach:.4g}x here "
                "(ratio must be a finite number > 1 and below that)"
            )
        keep = budget_keep(n, max_values, BUDGET_SIGMAS)
        thr = max(math.floor(keep * 4294967296.0), 1) - 1 if keep > 0 else 0
        self._budget_thr[layout] = (thr, max_values)
        return thr, max_values

    def compress(self, update: StateDict, ctx: RoundContext) -> bytes:
        self.last_choice = None
        if self.params["ratio"] is None:
            return self._compress(update, ctx, self.thr_m1)
        thr, max_values = self._threshold_for(update)
        limit = budget_bytes(update, self.params["ratio"])
        while True:
            payload = self._compress(update, ctx, thr)
            if len(payload) <= limit or thr == 0:
                break
            # over budget (a count > BUDGET_SIGMAS above its mean): lower the threshold in proportion;
            # the kept set shrinks to a subset, so this ends (thr strictly falls to 0 at worst)
            kept = self._last_kept
            target = max_values * (1.0 - BUDGET_SIGMAS / math.sqrt(max(max_values, 1)))
            thr = max(0, min(thr - 1, math.floor((thr + 1) * target / max(kept, 1)) - 1))
        if len(payload) > limit:  # thr == 0 and still over: nothing left to drop
            raise ValueError(
                f"mask: ratio={self.params['ratio']:g} cannot be met for this update "
                f"({len(payload)} bytes > budget {limit})"
            )
        self.last_choice = {
            "keep": (thr + 1) / 4294967296.0,
            "ratio": dense_payload_bytes(update) / len(payload),
        }
        return payload

    def _compress(self, update: StateDict, ctx: RoundContext, thr_m1: int) -> bytes:
        mid = self.mask_id(ctx)
        vdtype = _VALUE_DTYPES[self.params["values"]]
        items = list(update.items())
        masked = [(i, k, v) for i, (k, v) in enumerate(items) if v.is_floating_point()]
        counts: list[int] = []
        values = None
        if masked:
            device = masked[0][2].device
            xs = [v.detach().reshape(-1).to(device) for _, _, v in masked]
            fn = _ops.get("mask_encode", device, self.backend)
            values, counts = fn(xs, [self.tensor_seed(mid, i) for i, _, _ in masked], thr_m1)
            data = _values_bytes(values, vdtype)
        self._last_kept = int(sum(counts))
        records, pos, j = [], 0, 0
        size = wire.itemsize(vdtype)
        for k, v in items:
            if v.is_floating_point():
                n = counts[j] * size
                records.append(wire.Record(k, v.dtype, tuple(v.shape), data[pos : pos + n]))
                pos += n
                j += 1
            else:
                records.append(wire.lossless_record(k, v))
        meta = _pack_meta(mid, thr_m1, self.params["unbiased"], vdtype)
        return wire.pack(self.codec, records, meta)

    def _parse(self, payload, ctx: RoundContext | None):
        meta, records = wire.unpack(payload, self.codec)
        mid, thr_m1, unbiased, vdtype = _unpack_meta(meta)
        if ctx is not None and mid != self.mask_id(ctx):
            raise FormatError(
                "mask payload was made for another (seed, round, client) than "
                f"{ctx.seed, ctx.round, ctx.client}"
            )
        if len({r.name for r in records}) != len(records):
            raise FormatError("payload names the same tensor twice")
        return mid, thr_m1, unbiased, vdtype, records

    def decompress(self, payload: bytes, ctx: RoundContext) -> StateDict:
        mid, thr_m1, unbiased, vdtype, records = self._parse(payload, ctx)
        scale = unbiased_scale(thr_m1) if unbiased else 1.0
        return self._decode([(mid, vdtype, records)], thr_m1, [scale], accumulate=False)

    def server_mean(self, payloads, ctxs=None, weights=None) -> StateDict:
        """Weighted mean of many clients' decoded updates in one fused pass (C++/Triton).

        ``ctxs`` (optional, one per payload) are checked against each payload's mask id; ``weights``
        default to equal. Float tensors: float32 accumulation per element in client order (see the
        module docstring), cast to the tensor's dtype. Other tensors: float64 weighted mean, rounded
        for integer dtypes (bool: >= 0.5).
        """
        payloads = list(payloads)
        if not payloads:
            raise ValueError("server_mean needs at least one payload")
        if ctxs is not None and len(ctxs) != len(payloads):
            raise ValueError(f"ctxs has {len(ctxs)} entries for {len(payloads)} payloads")
        parsed = [self._parse(p, None if ctxs is None else ctxs[i]) for i, p in enumerate(payloads)]
        _, thr_m1, unbiased, _, rec0 = parsed[0]
        layout = [(r.name, r.dtype, r.shape) for r in rec0]
        for _, t, u, _, recs in parsed[1:]:
            if (t, u) != (thr_m1, unbiased) or [(r.name, r.dtype, r.shape) for r in recs] != layout:
                raise FormatError("server_mean payloads differ in keep, unbiased or tensor layout")
        ws = _client_weights(weights, len(parsed), unbiased_scale(thr_m1) if unbiased else 1.0)
        plain = _client_weights(weights, len(parsed), 1.0)
        out = self._decode([(m, vd, recs) for m, _, _, vd, recs in parsed], thr_m1, ws, accumulate=True)
        for s, (name, dtype, shape) in enumerate(layout):
            if dtype.is_floating_point:
                continue
            acc = torch.zeros(shape, dtype=torch.float64)
            for c, (_, _, _, _, recs) in enumerate(parsed):
                acc += wire.lossless_tensor(recs[s]).to(torch.float64) * plain[c]
            out[name] = (acc >= 0.5) if dtype == torch.bool else torch.round(acc).to(dtype)
        return {name: out[name] for name, _, _ in layout}

    def _decode(self, clients, thr_m1: int, weights: list[float], accumulate: bool) -> StateDict:
        """clients: [(mask_id, values dtype, records)] with one layout. Float tensors via one op call."""
        records0 = clients[0][2]
        float_idx = [s for s, r in enumerate(records0) if r.dtype.is_floating_point]
        lens = [records0[s].numel for s in float_idx]
        _check_alloc_bits(len(clients), sum(lens))
        vals, expected, seeds = [], [], []
        for mid, vdtype, recs in clients:
            vs = [_values_from(recs[s], vdtype, thr_m1) for s in float_idx]
            expected.append([v.numel() for v in vs])
            seeds.append([self.tensor_seed(mid, s) for s in float_idx])
            vals.append(torch.cat(vs) if vs else torch.empty(0, dtype=torch.float32))
        out: StateDict = {}
        if float_idx:
            fn = _ops.get("mask_decode", "cpu", self.backend)
            flat = fn(vals, expected, seeds, lens, weights, thr_m1, accumulate)
            pos = 0
            for s, n in zip(float_idx, lens, strict=False):
                r = records0[s]
                out[r.name] = flat[pos : pos + n].to(r.dtype).reshape(r.shape)
                pos += n
        if not accumulate:
            for r in records0:
                if not r.dtype.is_floating_point:
                    out[r.name] = wire.lossless_tensor(r)
        return {r.name: out[r.name] for r in records0 if r.name in out}
