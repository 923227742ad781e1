"""State-dict compressor ``sz``: float tensors with >= ``min_lossy`` elements go through the SZ codec;
everything else (biases, BatchNorm buffers, ints, ``num_batches_tracked``) goes lossless in its
exact dtype (FedSZ's code read every lossless tensor back as float32; we do not).

Spec keys: ``rel`` (REL bound, default 1e-2), ``abs`` (ABS bound; > 0 switches to ABS mode),
``min_lossy`` (default 1024), ``target=update|weights`` (compress the delta, or the weights as
FedSZ does; ``server_update`` returns the delta either way), ``ef=0|1`` (error feedback: the part
of the update the bound threw away is added to the client's next update).

Decoding follows a device: ``decompress(payload, ctx, device=None)`` returns every tensor on
``device`` (default CPU), the SZ streams decoded by that device's backend (CUDA: Triton), and
``server_update`` decodes on the global state's device.

Record data starts with one kind byte: 0 = raw bytes of the dtype, 1 = an SZ stream (codec.py).

Byte budget (``sz:ratio=R``, codecs/budget.py; exclusive with ``rel``/``abs``): per update, the
smallest REL bound (one for every lossy tensor, as ``rel``) whose whole payload fits dense / R.
The search runs on a grid of log2(rel) in steps of 1/``GRID`` between 2^``LOG2_MIN`` and 1, and
stops when it holds two neighbours, the smaller over budget and the larger fitting, so it takes at
least two encodes of the lossy tensors (each as costly as one plain ``sz`` compress; the range of
each tensor is found once per update, not per encode). Where it starts: at the grid point where
the previous update's size crossed the budget, moved by GRID times the change in spread (log2 of
mean |x| over max - min, see ``_spread``: at a REL bound the codes scale with it); the first time
(a fresh compressor: the first update of a run, a Flower node's first round, a one-off compress),
on a measured curve (``_PRIOR_LOG2B``/``_PRIOR_F``: log2(rel) at the answer against the spread and
the budget's bits per lossy value; 2-3 encodes on CNN updates where a start at FedSZ's 1e-2 took
5-8). From one size, or two within ``SLOPE_SPAN`` steps, it aims at the answer with the bytes per
step the previous searches saw near theirs (``_learn_slope``; the first time, along that curve from
the measured size, or for ``bound=abs`` ~one bit per value per halving of the bound, stepping one
grid point past the estimate),
else by secant through the two sizes nearest the budget (each secant aims between the line through
the sizes and the one through their logs: the size falls linearly at high rates, geometrically at
low ones), extrapolating until the budget is bracketed, then inside the bracket (bisection after
three probes in a row on one side). At most ``MAX_ENCODES`` encodes, the last one reserved for
rel = 1 when nothing has fitted yet. Below ~2.5x on CNN updates the codec switches blocks to
verbatim values and the size jumps; the search may then stop at its cap with a bound looser than
the smallest that fits (the payload still fits). It depends only on the update and the budget (same
update -> same bound: the start changes how many encodes it takes, not the answer, wherever the
size is non-increasing in the bound and the search converges), always terminates, and treats the
size as non-increasing in the bound (so a larger ratio gets a larger bound). If even rel = 1 does
not fit, compress raises ValueError naming ``ratio`` and the ratio rel = 1 reaches.
Encodes per update (metrics.jsonl ``chosen[].encodes``; counts, not times) in ``fedcompress run
--dataset mnist5k --clients 10 --rounds 3 --compressor sz:ratio=R --threads 1``: see docs/sz.md,
"Codec time in FedAvg" (the same 30 bounds as the previous search, which started at the previous
answer and took 3.1 at 16x, 3.8 at 64x).
``last_choice`` = ``{"rel": bound, "encodes": n, "ratio": r}``.

``bound=abs`` (with ``ratio`` only) searches one ABS bound for the whole update instead: eb =
2^(k / GRID) times the widest range among the lossy tensors (so the same grid, start and slope
rules apply, with that one width in place of each tensor's own), every lossy tensor encoded in ABS
mode at eb; ``last_choice`` then holds ``"abs": eb``, and ``sz:abs=<eb>`` gives the same bytes. At
equal bytes one ABS bound keeps less squared error than a REL bound per tensor (every value gets the
same error; docs/sz.md, "Byte budgets": 14-15 % less on a CNN update at 16x-256x).
"""

from __future__ import annotations

import bisect
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
    load_residual,
    local_sgd,
    register,
    residual_state,
    state_delta,
    state_device,
)
from ...errors import FormatError
from ..budget import RATIO_PARAM, budget_bytes, dense_payload_bytes, payload_overhead, spec_without
from .codec import decode_stream, encode_stream, value_range

KIND_RAW = 0
KIND_SZ = 1
_KIND_SZ = bytes([KIND_SZ])

# ratio=R search (see the module docstring)
GRID = 32  # grid points per factor 2 of the bound: neighbours differ by 2.2 % in eb
LOG2_MIN = -30  # rel = 2^-30 ~ 1e-9: below float32 resolution, values go verbatim
LOG2_START = math.log2(1e-2)  # FedSZ's setting: a good first guess for model updates
MAX_ENCODES = 10
SLOPE_SPAN = 3  # probes at least this many grid steps apart: their secant, else the learned slope
SLOPE_SPAN_MAX = 8  # the learned slope: from probes at most this far from the answer
# Where a REL search with no history starts: at the answer, log2(rel) - spread + b follows one curve
# of log2(b), b = the budget's bits per lossy value (payload bytes less framing and raw tensors, x 8,
# over the lossy values). Measured on mnist5k CNN updates (`fedcompress run`'s: 9 updates of rounds
# 1-3, budgets 4x-256x): within +-0.06 of these means at every budget, i.e. ~2 grid steps.
_PRIOR_LOG2B = (-4.552, -2.574, -1.256, -0.120, 0.943, 1.974, 2.989)
_PRIOR_F = (2.884, 2.363, 1.999, 1.639, 1.336, 1.203, 1.380)


def _prior_offset(b: float) -> float:
    """log2(rel) - spread at the answer for ``b`` bits per lossy value (the curve above, linear
    between its points, extended with its end segments' slopes)."""
    x, xs, fs = math.log2(b), _PRIOR_LOG2B, _PRIOR_F
    i = min(max(bisect.bisect_right(xs, x) - 1, 0), len(xs) - 2)
    f = fs[i] + (fs[i + 1] - fs[i]) * (x - xs[i]) / (xs[i + 1] - xs[i])
    return f - b


def _spread(inputs: StateDict, lossy: list[str], ranges: dict, width: float | None = None,
            mean_abs: dict | None = None) -> float | None:
    """log2(mean |x| / (max - min)) of the lossy tensors, averaged weighted by their sizes; None
    when a tensor has no finite range or non-finite values. ``width`` (``bound=abs``) replaces every
    tensor's max - min: the one width its bound is a fraction of. ``mean_abs``: each tensor's mean
    |x| where the caller has it (the native stats pass), else computed here.

    At a REL bound the codes are x / (2 rel (max - min)): an update whose values spread twice as wide
    relative to their range needs a bound twice as large for the same bytes, i.e. GRID grid steps.
    So the previous update's crossing moved by GRID times the change in spread is where this one's
    should be (the first probe of the search). Mean |x| rather than the RMS: FL updates are
    Laplace-like (most values near 0), and the RMS follows the few large values. One pass per
    tensor (``abs().mean()``), beside the encodes it saves.
    """
    total, acc = 0, 0.0
    for name in lossy:
        lo, hi, cnt = ranges[name]
        x = inputs[name]
        m = mean_abs[name] if mean_abs is not None else float(x.reshape(-1).abs().mean(dtype=torch.float32))
        w = width if width is not None else hi - lo
        if not cnt or not w > 0 or not math.isfinite(m) or m <= 0:
            return None
        acc += x.numel() * math.log2(m / w)
        total += x.numel()
    return acc / total if total else None


def _native(op: str, attr: str, tensors):
    """The C++ op's whole-payload form (``attr`` of its cpp implementation: encode_records /
    decode_records in cpp/sz.py) when C++ runs ``op`` on CPU and every tensor is a CPU tensor of a
    wire dtype; else None (the per-tensor path, e.g. FEDCOMPRESS_BACKEND=torch, which also says
    what is wrong with a tensor the wire format cannot carry)."""
    fn = getattr(_ops.get(op, "cpu", None, torch.float32), attr, None)
    ok = fn is not None and all(t.device.type == "cpu" and t.dtype in wire.DTYPE_CODES for t in tensors)
    return fn if ok else None


@register("sz")
class SZCompressor(Compressor):
    codec = wire.CODEC_SZ
    PARAMS = {
        "rel": Param(float, 1e-2, lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
        "abs": Param(float, 0.0, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0: use rel)"),
        "min_lossy": Param(int, 1024, lambda v: v >= 1, "an integer >= 1"),
        "target": choice("update", "weights"),
        "ef": Param(boolean, False, None, "0 or 1"),
        "ratio": RATIO_PARAM,
        "bound": choice("rel", "abs"),  # ratio=R: one REL bound per tensor, or one ABS bound for the update
    }

    def __init__(self, **kwargs) -> None:
        if kwargs.get("ratio") is not None and ("rel" in kwargs or "abs" in kwargs):
            raise ValueError("sz: give rel/abs or ratio, not both (ratio=R searches the rel bound per update)")
        if kwargs.get("bound", "rel") != "rel" and kwargs.get("ratio") is None:
            raise ValueError("sz: bound=abs chooses what ratio=R searches; for a fixed ABS bound give abs=<bound>")
        super().__init__(**kwargs)
        self._residual: dict[int, StateDict] = {}  # error feedback, per client
        self.last_choice: dict | None = None
        self._last_k: int | None = None  # ratio=R: the grid index the previous search chose
        self._slope: float | None = None  # ratio=R: bytes per grid step per lossy value near the answers
        self._last_c: float | None = None  # ratio=R: the grid index where the previous size crossed the budget
        self._last_spread: float | None = None  # ratio=R: _spread of the previous update

    @property
    def spec(self) -> str:
        if self.params["ratio"] is None:
            return spec_without(self, {"bound"})
        return spec_without(self, {"rel", "abs"} | ({"bound"} if self.params["bound"] == "rel" else set()))

    def _lossy(self, t: torch.Tensor) -> bool:
        return t.dtype in wire.FLOAT_DTYPES and t.numel() >= self.params["min_lossy"]

    def compress(self, update: StateDict, ctx: RoundContext) -> bytes:
        p = self.params
        self.last_choice = None
        ef = p["ef"] and p["target"] == "update"
        res = self._residual.get(ctx.client, {}) if ef else {}
        inputs: StateDict = {}
        for name, t in update.items():
            if t.requires_grad:  # (a torch call per tensor otherwise, in the codec's time)
                t = t.detach()
            if name in res and self._lossy(t):
                t = t + res[name].to(t.device, t.dtype)
            inputs[name] = t
        is_lossy = [self._lossy(t) for t in inputs.values()]
        lossy = [name for name, keep in zip(inputs, is_lossy, strict=True) if keep]
        if p["ratio"] is None:
            mode, eb = ("abs", p["abs"]) if p["abs"] > 0 else ("rel", p["rel"])
            encode_records = _native("sz_encode", "encode_records", inputs.values())
            if encode_records is not None:  # every record's data (kind byte included) in one call
                streams = dict(zip(inputs, encode_records(list(inputs.values()), is_lossy, eb, mode), strict=True))
            else:
                streams = {name: encode_stream(inputs[name], eb, mode, prefix=_KIND_SZ) for name in lossy}
        else:
            streams = self._search(inputs, lossy)
        records, new_res = [], {}
        for name, t in inputs.items():
            data = streams.get(name)  # the kind byte and the data, written as one (no copy here)
            if data is None:
                data = b"\x00" + bytes(wire.tensor_bytes(t))
            elif ef and data[0] == KIND_SZ:
                new_res[name] = t - decode_stream(memoryview(data)[1:], t.dtype, tuple(t.shape), device=t.device)
            records.append(wire.Record(name, t.dtype, tuple(t.shape), data))
        if ef:
            self._residual[ctx.client] = new_res
        payload = wire.pack(self.codec, records)
        if p["ratio"] is not None:
            self.last_choice["ratio"] = dense_payload_bytes(update) / len(payload)
        return payload

    def _search(self, inputs: StateDict, lossy: list[str]) -> dict[str, bytes]:
        """Streams (kind byte included) of the lossy tensors at the smallest grid bound (REL per
        tensor, or with ``bound=abs`` one ABS bound) whose payload fits the budget."""
        ratio = self.params["ratio"]
        limit = budget_bytes(inputs, ratio)
        # everything but the SZ records' data: framing, names, the raw records (kind byte + bytes)
        fixed = payload_overhead(inputs)
        fixed += sum(1 + t.numel() * t.element_size() for name, t in inputs.items() if name not in lossy)
        n_lossy = sum(inputs[name].numel() for name in lossy)
        # REL's range (once, not per encode) and the start's mean |x|: one native pass where C++ runs
        value_stats = _native("sz_encode", "value_stats", inputs.values())
        if value_stats is not None:
            stats = dict(zip(lossy, value_stats([inputs[name] for name in lossy]), strict=True))
            ranges, mean_abs = {k: v[0] for k, v in stats.items()}, {k: v[1] for k, v in stats.items()}
        else:
            ranges, mean_abs = {name: value_range(inputs[name]) for name in lossy}, None
        width = None  # bound=abs: the bound is 2^(k / GRID) times this (the widest finite range)
        if self.params["bound"] == "abs":
            widths = [hi - lo for lo, hi, cnt in ranges.values() if cnt and math.isfinite(hi - lo) and hi > lo]
            width = max(widths, default=1.0)
        mode, unit = ("rel", 1.0) if width is None else ("abs", width)  # grid index k -> bound 2^(k/GRID) * unit
        hi_k = 0  # grid index of rel = 1 (k = log2(rel) * GRID)
        lo_k = LOG2_MIN * GRID
        sizes: dict[int, int] = {}  # grid index -> payload bytes
        best: dict = {}  # "k", "streams": the smallest fitting grid index so far and its streams

        encode_records = _native("sz_encode", "encode_records", inputs.values())

        def size_at(k: int) -> int:
            eb = 2.0 ** (k / GRID) * unit  # (ABS mode reads no range: value_range only saves REL's pass)
            if encode_records is not None:  # the lossy tensors' streams in one native call
                data = encode_records([inputs[n] for n in lossy], [True] * len(lossy), eb, mode,
                                      [ranges[n] for n in lossy])
                streams = dict(zip(lossy, data, strict=True))
            else:
                streams = {name: encode_stream(inputs[name], eb, mode, prefix=_KIND_SZ, value_range=ranges[name])
                           for name in lossy}
            sizes[k] = fixed + sum(len(s) for s in streams.values())
            if sizes[k] <= limit and k < best.get("k", hi_k + 1):
                best.update(k=k, streams=streams)
            return sizes[k]

        def bracket() -> tuple[int | None, int | None]:
            over = [k for k, v in sizes.items() if v > limit]
            fit = [k for k, v in sizes.items() if v <= limit]
            return (max(over) if over else None), (min(fit) if fit else None)

        def secant(k0: int, k1: int) -> float:
            # The size falls ~linearly in k at high rates (a bit per value per halving) and ~
            # geometrically at low rates (codes mostly 0), so the crossing lies between the secant
            # through the sizes and the one through their logs: aim at the mean of the two.
            s0, s1 = sizes[k0], sizes[k1]
            if s0 == s1:
                return math.nan
            lin = k0 + (limit - s0) * (k1 - k0) / (s1 - s0)
            log = k0 + math.log(limit / s0) * (k1 - k0) / math.log(s1 / s0)
            return 0.5 * (lin + log)

        def crossing() -> tuple[float, bool]:
            """Where the size is predicted to cross the budget (a fractional grid index), and whether
            that came from the learned slope (precise near the answer, so probes aim at it)."""
            near = sorted(sizes, key=lambda j: abs(math.log(sizes[j] / limit)))[:2]
            if len(near) == 2 and (abs(near[0] - near[1]) >= SLOPE_SPAN or self._slope is None):
                return secant(near[0], near[1]), False
            if self._slope is None or not n_lossy:  # one point and no history
                b_probe = 8.0 * (sizes[near[0]] - fixed) / n_lossy if n_lossy else 0.0
                if width is None and b_limit > 0 and b_probe > 0:  # along the prior's curve
                    return near[0] + GRID * (_prior_offset(b_limit) - _prior_offset(b_probe)), True
                # else ~1 bit per value per halving of the bound
                return near[0] + (sizes[near[0]] - limit) * 8.0 / max(n_lossy, 1) * GRID, False
            # one point, or two too close for their secant to beat it: the previous updates' slope
            return near[0] + (sizes[near[0]] - limit) / (self._slope * n_lossy), True

        # First probe: where the previous update's size crossed the budget, moved by the change in
        # spread (see _spread); else the previous answer; else the prior's curve; else FedSZ's 1e-2
        # (module docstring).
        spread = _spread(inputs, lossy, ranges, width, mean_abs)
        b_limit = 8.0 * (limit - fixed) / n_lossy if n_lossy else 0.0  # the budget's bits per lossy value
        if self._last_c is not None and spread is not None and self._last_spread is not None:
            k0 = min(hi_k, max(lo_k, round(self._last_c + GRID * (spread - self._last_spread))))
        elif self._last_k is not None:
            k0 = self._last_k
        elif width is None and spread is not None and b_limit > 0:  # no history: the prior's curve
            k0 = min(hi_k, max(lo_k, round(GRID * (spread + _prior_offset(b_limit)))))
        else:
            k0 = round(LOG2_START * GRID)
        size_at(k0)
        same_side = 0
        last_side = None
        while len(sizes) < MAX_ENCODES:
            a, b = bracket()  # a: largest k over budget; b: smallest k that fits
            if b is not None and a is not None and b - a <= 1:
                break  # exact on the grid
            guess, precise = crossing()
            precise = precise and same_side < 2  # twice on one side: the slope is off, step past it
            if b is None and len(sizes) == MAX_ENCODES - 1 and hi_k not in sizes:
                k = hi_k  # last encode: try the loosest bound before giving up
            elif b is None:  # all over budget: go up
                if a >= hi_k:
                    break
                if not math.isfinite(guess):
                    guess = a + 2 * GRID  # flat sizes: a factor 4 looser
                if precise:  # the predicted answer
                    k = min(hi_k, max(a + 1, math.ceil(guess)))
                else:  # one step past the estimate to land on the fitting side, unless it is within
                    # a step of a (a warm start's usual case): then a + 1 closes the bracket at once
                    k = min(hi_k, max(a + 1, math.ceil(guess) + (1 if guess > a + 1 else 0)))
            elif a is None:  # all fit: go down
                if b <= lo_k:
                    break
                if not math.isfinite(guess):
                    guess = b - 2 * GRID
                if precise:  # the predicted answer, or one step tighter when that is b itself
                    k = max(lo_k, math.ceil(guess)) if math.ceil(guess) < b else b - 1
                else:
                    k = max(lo_k, min(b - 1, math.floor(guess) - (1 if guess < b - 1 else 0)))
            else:  # bracketed: the estimate kept inside the bracket; bisection after three probes
                # in a row on the same side
                if same_side >= 3 or not math.isfinite(guess):
                    guess = (a + b) / 2
                    same_side = 0
                k = min(b - 1, max(a + 1, round(guess)))
            fits = size_at(k) <= limit
            same_side = same_side + 1 if fits == last_side else 1
            last_side = fits
        a, b = bracket()
        if b is None:
            loosest = sizes.get(hi_k)
            raise ValueError(
                f"sz: ratio={ratio:g} cannot be met for this update: "
                + (f"even the loosest bound {mode}={unit:g} gives {loosest} bytes" if loosest is not None
                   else f"no bound tried in {MAX_ENCODES} encodes fits")
                + f" > budget {limit} (framing and lossless tensors take {fixed + len(lossy)}); "
                + (f"it reaches {dense_payload_bytes(inputs) / loosest:.4g}x" if loosest else "")
            )
        self.last_choice = {mode: 2.0 ** (b / GRID) * unit, "encodes": len(sizes)}
        self._last_k = b
        # the crossing, linear between the bracket's ends (in (a, b]; b itself when a is unknown)
        self._last_c = b if a is None else a + (sizes[a] - limit) / max(sizes[a] - sizes[b], 1)
        self._last_spread = spread
        self._learn_slope(sizes, b, n_lossy)
        return best["streams"]

    def _learn_slope(self, sizes: dict[int, int], b: int, n_lossy: int) -> None:
        """Bytes per grid step per lossy value near the answer ``b``, from the probe farthest from
        it within SLOPE_SPAN_MAX steps (one step's difference is noisy: +-5 % on CNN updates), averaged
        with the previous updates' (the next search's one-point guesses)."""
        far = [k for k in sizes if k != b and abs(k - b) <= SLOPE_SPAN_MAX]
        if not far or n_lossy == 0:
            return
        k = max(far, key=lambda j: abs(j - b))
        slope = (sizes[k] - sizes[b]) / (b - k) / n_lossy
        if slope > 0:
            self._slope = slope if self._slope is None else 0.5 * (self._slope + slope)

    # client state: ``ef``'s residual, and the ratio search's start (where the previous update's size
    # crossed the budget, its spread, its answer, the learned slope), each a float64 scalar
    _SEARCH_STATE = ("_last_k", "_slope", "_last_c", "_last_spread")

    def client_state(self, client: int) -> StateDict:
        out = residual_state(self._residual, client)
        for attr in self._SEARCH_STATE:
            if getattr(self, attr) is not None:
                out["search/" + attr[1:]] = torch.tensor(float(getattr(self, attr)), dtype=torch.float64)
        return out

    def load_client_state(self, client: int, state: StateDict) -> None:
        load_residual(self._residual, client, state)
        for attr in self._SEARCH_STATE:
            v = state.get("search/" + attr[1:])
            setattr(self, attr, None if v is None else (int(v) if attr == "_last_k" else float(v)))

    def decompress(self, payload: bytes, ctx: RoundContext, device=None) -> StateDict:
        """The tensors in ``payload``, each on ``device`` (default CPU), SZ streams decoded there."""
        dev = check_device(device)
        _, records = wire.unpack(payload, self.codec)
        decode_records = _native("sz_decode", "decode_records", ()) if dev.type == "cpu" else None
        decoded = decode_records(records) if decode_records is not None else [None] * len(records)
        out: StateDict = {}
        for r, t in zip(records, decoded, strict=True):
            if t is not None:  # the one call above decoded it
                out[r.name] = t
                continue
            if len(r.data) < 1:
                raise FormatError(f"record {r.name!r}: empty")
            kind, body = r.data[0], r.data[1:]
            if kind == KIND_RAW:
                out[r.name] = wire.tensor_from_bytes(body, r.dtype, r.shape, f"record {r.name!r}").to(dev)
            elif kind == KIND_SZ:
                out[r.name] = decode_stream(body, r.dtype, r.shape, device=dev)
            else:
                raise FormatError(f"record {r.name!r}: unknown kind {kind}")
        return out

    # -- federated round: target=weights sends the weights, the server still gets the delta ----
    def client_update(self, model: torch.nn.Module, global_state: StateDict, data, ctx: RoundContext) -> bytes:
        if self.params["target"] == "weights":
            return self.compress(local_sgd(model, global_state, data, ctx), ctx)
        return super().client_update(model, global_state, data, ctx)

    def server_update(self, payload: bytes, global_state: StateDict, ctx: RoundContext) -> StateDict:
        decoded = self.decompress(payload, ctx, device=state_device(global_state))
        if self.params["target"] == "weights":
            missing = set(global_state) - set(decoded)
            if missing:
                raise FormatError(f"payload lacks tensors {sorted(missing)[:5]}")
            return state_delta({k: decoded[k].to(global_state[k].device) for k in global_state}, global_state)
        return decoded
