"""The ``mask`` state-dict compressor (``get_compressor("mask:keep=0.125")``): every float tensor of the
update masked in one kernel call, the others sent exactly.

Tensor ``k`` (dict order) is keyed by ``mix_seed(mask_id, k)`` with ``mask_id = ctx.subseed(MASK_SALT)``;
float tensors are masked, all in one kernel call; other tensors (``num_batches_tracked``...) travel
exactly. Decoding follows a device: ``decompress(payload, ctx, device=None)`` returns on ``device``
(default CPU) and ``server_update`` on the global state's device, dispatching there (CUDA: Triton).

Byte budget (``mask:ratio=R``, codecs/budget.py): keep is set from the update's layout so that the
whole payload (framing, names, lossless tensors, 14-byte meta, kept values) fits ``dense / R``
even when the kept count K ~ Binomial(N, keep) lands ``BUDGET_SIGMAS`` standard deviations above
its mean; in the rarer case it would not, the threshold is lowered for that update until it fits
(a lower threshold keeps a subset of the same coordinates, so the count only falls).
"""

from __future__ import annotations

import math

import torch

from ... import _ops, wire
from ...api import (
    Compressor,
    Param,
    RoundContext,
    StateDict,
    boolean,
    check_device,
    choice,
    mix_seed,
    register,
    state_device,
)
from ...errors import FormatError
from ..budget import RATIO_PARAM, budget_bytes, dense_payload_bytes, payload_overhead, spec_without
from .framing import META_LEN, VALUE_DTYPES, check_alloc_bits, pack_meta, unpack_meta, values_bytes, values_from
from .spec import client_weights, keep_threshold, unbiased_scale

MASK_SALT = 0x4D41534B  # "MASK": RoundContext.subseed salt for the state-dict mask id


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
        vsize = wire.itemsize(VALUE_DTYPES[self.params["values"]])
        fixed = payload_overhead(update, META_LEN) + sum(
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
        vdtype = VALUE_DTYPES[self.params["values"]]
        items = list(update.items())
        masked = [(i, k, v) for i, (k, v) in enumerate(items) if v.is_floating_point()]
        counts: list[int] = []
        values = None
        if masked:
            device = masked[0][2].device
            xs = [v.detach().reshape(-1).to(device) for _, _, v in masked]
            fn = _ops.get("mask_encode", device, self.backend)
            values, counts = fn(xs, [self.tensor_seed(mid, i) for i, _, _ in masked], thr_m1)
            data = values_bytes(values, vdtype)
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
        meta = pack_meta(mid, thr_m1, self.params["unbiased"], vdtype)
        return wire.pack(self.codec, records, meta)

    def _parse(self, payload, ctx: RoundContext | None):
        meta, records = wire.unpack(payload, self.codec)
        mid, thr_m1, unbiased, vdtype = unpack_meta(meta)
        if ctx is not None and mid != self.mask_id(ctx):
            raise FormatError(
                "mask payload was made for another (seed, round, client) than "
                f"{ctx.seed, ctx.round, ctx.client}"
            )
        return mid, thr_m1, unbiased, vdtype, records

    def decompress(self, payload: bytes, ctx: RoundContext, device=None) -> StateDict:
        """The update in ``payload``, every tensor on ``device`` (default CPU), decoded there."""
        dev = check_device(device)
        mid, thr_m1, unbiased, vdtype, records = self._parse(payload, ctx)
        scale = unbiased_scale(thr_m1) if unbiased else 1.0
        return self._decode([(mid, vdtype, records)], thr_m1, [scale], accumulate=False, device=dev)

    def server_update(self, payload: bytes, global_state: StateDict, ctx: RoundContext) -> StateDict:
        """The client's delta on the global state's device (a CUDA global state decodes on CUDA)."""
        return self.decompress(payload, ctx, device=state_device(global_state))

    def server_mean(self, payloads, ctxs=None, weights=None, device=None) -> StateDict:
        """Weighted mean of many clients' decoded updates in one fused pass (C++/Triton).

        ``ctxs`` (optional, one per payload) are checked against each payload's mask id; ``weights``
        default to equal. Float tensors: float32 accumulation per element in client order (see the
        module docstring), cast to the tensor's dtype. Other tensors: float64 weighted mean, rounded
        for integer dtypes (bool: >= 0.5). Every tensor comes back on ``device`` (default CPU).
        """
        dev = check_device(device)
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
        ws = client_weights(weights, len(parsed), unbiased_scale(thr_m1) if unbiased else 1.0)
        plain = client_weights(weights, len(parsed), 1.0)
        out = self._decode([(m, vd, recs) for m, _, _, vd, recs in parsed], thr_m1, ws, accumulate=True, device=dev)
        for s, (name, dtype, shape) in enumerate(layout):
            if dtype.is_floating_point:
                continue
            acc = torch.zeros(shape, dtype=torch.float64)
            for c, (_, _, _, _, recs) in enumerate(parsed):
                acc += wire.lossless_tensor(recs[s]).to(torch.float64) * plain[c]
            out[name] = ((acc >= 0.5) if dtype == torch.bool else torch.round(acc).to(dtype)).to(dev)
        return {name: out[name] for name, _, _ in layout}

    def _decode(self, clients, thr_m1: int, weights: list[float], accumulate: bool, device: torch.device) -> StateDict:
        """clients: [(mask_id, values dtype, records)] with one layout. Float tensors via one op call."""
        records0 = clients[0][2]
        float_idx = [s for s, r in enumerate(records0) if r.dtype.is_floating_point]
        lens = [records0[s].numel for s in float_idx]
        check_alloc_bits(len(clients), sum(lens))
        vals, expected, seeds = [], [], []
        for mid, vdtype, recs in clients:
            vs = [values_from(recs[s], vdtype, thr_m1) for s in float_idx]
            expected.append([v.numel() for v in vs])
            seeds.append([self.tensor_seed(mid, s) for s in float_idx])
            vals.append((torch.cat(vs) if vs else torch.empty(0, dtype=torch.float32)).to(device))
        out: StateDict = {}
        if float_idx:
            fn = _ops.get("mask_decode", device, self.backend)
            flat = fn(vals, expected, seeds, lens, weights, thr_m1, accumulate)
            pos = 0
            for s, n in zip(float_idx, lens, strict=False):
                r = records0[s]
                out[r.name] = flat[pos : pos + n].to(device, r.dtype).reshape(r.shape)
                pos += n
        if not accumulate:
            for r in records0:
                if not r.dtype.is_floating_point:
                    out[r.name] = wire.lossless_tensor(r).to(device)
        return {r.name: out[r.name] for r in records0 if r.name in out}
