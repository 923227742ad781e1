"""FedSynth (Hu et al. 2022, Algorithm 1): the client uploads a small learned synthetic dataset.

Client (Algorithm 1, lines 5-9): start from the global weights w; initialise m batches of b
synthetic inputs (``init=real``: a random sample of the client's own data; ``init=noise``: N(0, 1))
and their labels (the sampled labels, or classes round-robin for noise). Then ``outer_steps``
times: w_syn = ClientUpdate(D_syn; w) (m SGD steps, lr ``inner_lr``, soft-label loss), and
D_syn -= lr * grad_{D_syn} L(w_syn) by Adam with step sizes ``lr_x`` (inputs) and ``lr_y``
(labels). L (``objective=``): ``loss``, the paper's CE on the real data (eq. 5-6; ``real_batch=k``:
a fresh random k of them per step); ``match`` (default), ||w_syn - w_sgd||^2 / ||w_sgd - w||^2
with w_sgd the client's own local SGD weights (which the guard computes anyway), so a step needs
no pass over the real data; ``both``, their sum. Gradients come from
``fedcompress.synth.hypergradient``.

Labels (``labels=``):
- ``fixed`` (default): one-hot, sent as class indices.
- ``trainable``: y_i = s_i * softmax(v_i) with learned logits v_i (and, with ``label_scale=true``,
  a learned weight s_i = 2 sigmoid(t_i) in (0, 2); else s_i = 1). Entries can never go negative:
  the paper's unconstrained reals did, and soft cross-entropy with a negative entry is unbounded
  below (issue 14: a client with 8 images of one class sent an update 2.4e5x its SGD update).
- ``raw``: the paper's unconstrained real labels, only on request.

Shape (``ratio=R``): the payload, every byte as the driver counts it, is <= dense / R, where dense
is the driver's dense upload of the model (``fedavg.driver.dense_payload_bytes``). ``shape_for_budget``
picks m about the client's local SGD step count S = epochs * ceil(n / batch_size) (at least
``MIN_BATCH`` inputs per batch), b as large as the budget allows, and inner_lr = S * lr / m so that
m synthetic steps travel as far as local SGD would (issue 14: m * inner_lr against S * lr is what
decides the accuracy; 2 x 23 moved a third of the SGD distance and never caught up), but at most
``MAX_INNER_LR`` * lr: at high ratios m is small and one long step on a few images diverges (the
distance is then given up, not the stability). Explicit ``batches``/``batch``/``inner_lr`` win over
the rule.

Inner step per update (``lr_search=K``, default 4): unless ``inner_lr`` is given, the client
replays its initial real-sample set at the rule's (or default) inner_lr and at its first K halvings
and keeps the step whose replay lands nearest its own SGD weights; the outer loop and the payload
use that step. The step a replay can take without blowing up shrinks as training goes on (the model
sharpens to the client's SGD step): on mnist5k-10 after 10 rounds, the rule's 0.1 replayed the
real-sample set into an update 24x the SGD one at cosine -0.03, 0.0125 into 0.44x at cosine 0.30
(docs/fedsynth.md, "Inner step per update"). K + 1 unrolls per update, no hypergradient.

Guard (``guard=G``): the client also runs its own local SGD (cheap next to the outer loop) and
sends the norm of that update; among its candidate sets (lowest outer objective first, then the
initial real-sample set) it sends the first whose replayed update norm is <= G times it, halving inner_lr
as a last resort. The server replays and refuses (FormatError) an update above G times the
declared norm. ``guard=0`` turns both off. It is a guard against blow-ups, not against a hostile
client (which can declare any norm).

Error feedback (``ef=a``, a in [0, 1], default 0 = off; objective match or both): the client keeps,
per client id, e = a * (t - s * (w_syn - w)), where t is the update it aimed at and s the
``server_scale``, and aims its next update at t = (w_sgd - w) + e: the match term, the inner step
search and the guard's declared norm all use t. Client-side only; the payload does not change.

Payload (``fedcompress.wire``, codec CODEC_FEDSYNTH), format 2: meta = format u8, labels mode u8
(0 fixed, 1 softmax, 2 softmax with scale, 3 raw), C u32, step-size count u16 (1: one step size
shared by all batches, the only count this version writes or replays), the step sizes f64, the
client's SGD update norm f32 (0 = none); record ``x`` [m, b, *input] in fp16 or fp32; record ``y``:
class indices [m, b] (uint8 or int16/int32 by C) for fixed labels, else [m, b, C] in the payload
dtype. Softmax labels must be >= 0 with rows summing to 1 (scaled: to at most 2), checked to the
payload dtype's rounding.

Server (line 12): decode, then replay ClientUpdate from the same global weights with the same code
(``fedcompress.synth.unroll``); the update is w_syn - w. On the same machine and backend the
replay equals the client's w_syn bit for bit. The server needs the model architecture: the
compressor remembers the model passed to ``client_update`` (the FedAvg driver shares one
compressor), or call ``set_model(model)`` on a server-only instance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import synth, wire
from ..api import (
    Compressor,
    Param,
    RoundContext,
    StateDict,
    all_finite,
    boolean,
    choice,
    client_tensors,
    load_residual,
    local_sgd,
    positive_float,
    positive_int,
    register,
    residual_state,
)
from ..errors import FormatError
from . import fedsynth_text  # text models: synthetic data in embedding space

_FORMAT = 2
_LABEL_MODES = ("fixed", "softmax", "softmax_scaled", "raw")
_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
_MAX_CLASSES = 1 << 20
MAX_LABEL_SCALE = 2.0  # s_i = 2 sigmoid(t_i): a synthetic sample weighs between 0 and twice a real one
MIN_BATCH = 5  # issue 14: 15 x 3 and 23 x 2 at the same lr overshot (updates 5-9x the real size)
# The ratio rule's inner step is at most this times the client's SGD lr: one step of S * lr / m on a
# few images throws the model off when m is small (64x: 3 x 7 at 0.67 sat at 10 %; 5-round proxy in
# docs/fedsynth.md, "The inner step at high ratios": 0.1 beat 0.2 and 0.3 at 64x, learned and not)
MAX_INNER_LR = 2.0
# Rows of softmax labels sum to 1 up to the payload dtype's rounding: each entry is off by at most
# half an ulp of its own size, so the row sum by at most eps/2 of the row sum (fp16: 2^-11); the
# float32 softmax adds a few float32 eps. The tolerances leave 4x (fp16) and 16x (fp32) room.
_ROW_TOL = {torch.float16: 2.0**-9, torch.float32: 2.0**-18}


# Keys whose default differs for text models: the text client (fedsynth_text.py) was measured with
# these (docs/fedsynth.md, "Text"); the image defaults in PARAMS come from the image proxy runs.
TEXT_DEFAULTS = {"outer_steps": 30, "lr_x": 0.03, "objective": "loss"}
# the text path implements only these values
_TEXT_ONLY_VALUE = {"objective": "loss", "server_scale": 1.0, "ef": 0.0, "res": 1}
MAX_RES = 8  # res=r: the synthetic images are sent at 1/r of the input's height and width


def upsample(x: torch.Tensor, r: int) -> torch.Tensor:
    """Each pixel of the last two dims repeated r x r (nearest): a res=r set as the model sees it."""
    return x if r == 1 else x.repeat_interleave(r, -1).repeat_interleave(r, -2)


def downsample(x: torch.Tensor, r: int, reduce: str = "mean") -> torch.Tensor:
    """The r x r blocks of the last two dims averaged (the real-sample init) or summed (``sum``: the
    adjoint of ``upsample``, which takes a gradient at the model's input to the sent pixels)."""
    if r == 1:
        return x
    *lead, h, w = x.shape
    blocks = x.reshape(*lead, h // r, r, w // r, r)
    return blocks.sum((-3, -1)) if reduce == "sum" else blocks.mean((-3, -1))


def _label_dtype(C: int) -> torch.dtype:
    return torch.uint8 if C <= 256 else (torch.int16 if C <= 32767 else torch.int32)


def _ratio_param() -> Param:
    return Param(float, None, lambda v: math.isfinite(v) and v > 1, "a finite number > 1 (dense bytes / sent bytes)")


def _guard_param() -> Param:
    return Param(float, 10.0, lambda v: v == 0 or (math.isfinite(v) and v >= 1), "0 (off) or a finite number >= 1")


# ---------------------------------------------------------------------------------------------
# Softmax label parameterisation


def softmax_labels(v: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
    """y = s * softmax(v) over the last axis; s = MAX_LABEL_SCALE * sigmoid(t) per row, or 1."""
    p = torch.softmax(v, dim=-1)
    if t is None:
        return p
    return (MAX_LABEL_SCALE * torch.sigmoid(t)).unsqueeze(-1) * p


def softmax_labels_grad(v: torch.Tensor, t: torch.Tensor | None, gy: torch.Tensor):
    """(dL/dv, dL/dt) from dL/dy for ``softmax_labels`` (dL/dt is None without a scale).

    dy_c/dv_k = s p_c (delta_ck - p_k), so dL/dv = s p * (gy - <p, gy>); with s = S sigmoid(t),
    ds/dt = s (1 - s / S) and dL/ds = <p, gy>.
    """
    p = torch.softmax(v, dim=-1)
    pg = (p * gy).sum(-1, keepdim=True)
    gv = p * (gy - pg)
    if t is None:
        return gv, None
    s = MAX_LABEL_SCALE * torch.sigmoid(t)
    return s.unsqueeze(-1) * gv, s * (1 - s / MAX_LABEL_SCALE) * pg.squeeze(-1)


# ---------------------------------------------------------------------------------------------
# Shape rule for a byte budget


@dataclass(frozen=True)
class Shape:
    batches: int
    batch: int
    inner_lr: float
    nbytes: int  # the payload's exact length


def payload_bytes(
    batches: int, batch: int, input_shape, classes: int, labels: str = "fixed", dtype: str = "fp16"
) -> int:
    """The exact length of a fedsynth payload of this shape (every byte the driver counts)."""
    comp = FedSynthCompressor(batches=batches, batch=batch, labels=labels, dtype=dtype)
    x = torch.zeros((batches, batch) + tuple(input_shape))
    y = torch.zeros(batches, batch, classes)
    y[..., 0] = 1
    return len(comp.compress({"x": x, "y": y, "classes": torch.tensor(classes)}, RoundContext()))


def shape_for_budget(
    budget: int,
    input_shape,
    classes: int,
    *,
    labels: str = "fixed",
    dtype: str = "fp16",
    local_steps: int | None = None,
    local_lr: float = 0.05,
    batches: int | None = None,
    batch: int | None = None,
    inner_lr: float | None = None,
    ratio: float | None = None,
    dense: int | None = None,
    size_of=None,
) -> Shape:
    """The synthetic set's shape whose payload fits in ``budget`` bytes (see the module docstring).

    local_steps: the client's SGD step count S = epochs * ceil(n / batch_size); None: as many
    batches of MIN_BATCH as fit. ``ratio``/``dense`` only word the error when nothing fits.
    size_of(m, b): the payload length of m x b inputs (default: the image payload of
    ``input_shape``, ``classes``, ``labels``, ``dtype``; the text path passes its own).
    """
    labels = "trainable" if labels in ("softmax", "softmax_scaled") else labels
    if size_of is None:
        def size_of(m, b):
            return payload_bytes(m, b, input_shape, classes, labels, dtype)
    one = size_of(1, 1)
    if budget < one:
        what = f"ratio={ratio:g}" if ratio is not None else f"a budget of {budget} bytes"
        best = f"; the smallest payload gives ratio {dense / one:.4g}, use ratio <= that" if dense else ""
        raise ValueError(
            f"fedsynth: {what} is unreachable: one synthetic input needs a payload of {one} bytes{best}"
        )
    per = size_of(1, 2) - one
    head = one - per
    k = (budget - head) // per  # synthetic inputs that fit (the framing is fixed-width)
    if batches is not None and batch is not None:
        m, b = batches, batch
        if m * b > k:
            raise ValueError(
                f"fedsynth: batches={m}, batch={b} ({m * b} inputs) exceed the budget of {budget} bytes "
                f"({k} inputs fit); drop one of them or lower ratio"
            )
    elif batches is not None:
        m = batches
        b = k // m
        if b < 1:
            raise ValueError(f"fedsynth: batches={m} do not fit the budget of {budget} bytes ({k} inputs fit)")
    elif batch is not None:
        b = batch
        m = k // b
        if m < 1:
            raise ValueError(f"fedsynth: batch={b} does not fit the budget of {budget} bytes ({k} inputs fit)")
    else:
        most = max(1, k // MIN_BATCH)
        target = most if local_steps is None else max(1, min(int(local_steps), most))
        # b = k // m leaves up to m - 1 inputs of the budget unused; up to 20 % fewer batches may
        # use it better (e.g. 79 inputs: 13 x 6 instead of 15 x 5), inner_lr keeps the distance
        m = max(range(max(1, (4 * target) // 5), target + 1), key=lambda mm: (mm * (k // mm), mm))
        b = k // m
    if inner_lr is None:
        inner_lr = 0.1
        if local_steps is not None:
            inner_lr = min(local_steps * local_lr / m, MAX_INNER_LR * local_lr)
    nbytes = size_of(m, b)
    if nbytes > budget:  # cannot happen with fixed-width framing; checked because the promise is exact
        raise AssertionError(f"fedsynth: shape rule overshot the budget ({nbytes} > {budget})")
    return Shape(m, b, float(inner_lr), nbytes)


def _finite(delta: StateDict) -> StateDict:
    """``delta``, or FormatError when the replay produced NaN or inf (the server must not apply it)."""
    if not all_finite(delta):
        raise FormatError("fedsynth: refused: the replayed update holds non-finite values")
    return delta


def _dense_bytes(state: StateDict) -> int:
    from ..fedavg.driver import dense_payload_bytes

    return int(dense_payload_bytes(state))


def _sq_dist(a: dict, b: dict, keys) -> float:
    """sum over ``keys`` of ||a[k] - b[k]||^2, in float64."""
    return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys)


def _norm(delta: dict) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in delta.values()))


# ---------------------------------------------------------------------------------------------


@register("fedsynth")
class FedSynthCompressor(Compressor):
    """Spec: ``fedsynth:ratio=R,batches=18,batch=5,labels=fixed|trainable|raw,label_scale=false,
    objective=match|loss|both,outer_steps=15,lr_x=0.1,lr_y=..,inner_lr=..,init=real|noise,
    dtype=fp16|fp32,real_batch=0,server_scale=1,guard=10,res=1``.

    Defaults are the best measured config at ~16x for the FedAvg CNN (issue 14: 18 x 5 fp16,
    inner_lr 0.1, fixed labels) and the cheapest outer loop that lost nothing in the 3-round proxy
    (match objective, 15 Adam steps at lr_x 0.1); ``ratio=R`` picks the shape per client instead.
    """

    codec = wire.CODEC_FEDSYNTH
    # 1: the ratio rule's inner step capped at MAX_INNER_LR * lr; 2: inner_lr searched per update
    # (lr_search) on the initial set
    REVISION = 2
    PARAMS = {
        "ratio": _ratio_param(),
        "batches": positive_int(18),
        "batch": positive_int(5),
        "labels": choice("fixed", "trainable", "raw"),
        "label_scale": Param(boolean, False, None, "true or false (only with labels=trainable)"),
        # outer_steps, lr_x, objective: the image defaults are the cheapest config of the 3-round
        # proxy (docs/fedsynth.md, "Client cost") within 0.5 pt of the old default (30 steps, lr_x
        # 0.03, loss) over 2 seeds; text models keep TEXT_DEFAULTS.
        # 0 = send the initial real-sample set unoptimised: the "real subset" control of the results
        "outer_steps": Param(int, 15, lambda v: v >= 0, "an integer >= 0 (0 = the real-sample init, unoptimised)"),
        "lr_x": positive_float(0.1),
        "lr_y": positive_float(0.03),
        "inner_lr": positive_float(0.1),
        # per update, the rule's (or default) inner_lr and up to this many halvings of it are
        # replayed on the initial real-sample set; the one landing nearest the client's SGD
        # weights is used (0 = off; an explicit inner_lr or init=noise is never searched)
        "lr_search": Param(int, 4, lambda v: 0 <= v <= 10, "an integer in [0, 10] (0 = off)"),
        "init": choice("real", "noise"),
        "dtype": choice("fp16", "fp32"),
        # > 0: a fresh random subset of this size for each outer step's real loss (0 = all of it)
        "real_batch": Param(int, 0, lambda v: v >= 0, "an integer >= 0 (0 = all of the client's data)"),
        # loss: CE on real data at w_m (the paper); match: ||w_m - w_sgd||^2 / ||w_sgd - w||^2 (the
        # client's own SGD weights: no real batch per outer step); both: their sum
        "objective": choice("match", "loss", "both"),
        "server_scale": positive_float(1.0),  # the server multiplies the replayed update by this
        # error feedback: the client keeps what the server's replay missed of its target update and
        # adds it to its next target (the match term's w_sgd); client-side only, payload unchanged
        # (ef=a: a in [0, 1] is the share of it carried over; 1 = full error feedback, 0 = off)
        "ef": Param(float, 0.0, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1] (needs objective=match or both)"),
        "guard": _guard_param(),
        # sent resolution: synthetic images of (H / res) x (W / res) pixels, upsampled (nearest) before
        # the model, so a budget holds res^2 times as many of them (both sides use the spec's res)
        "res": Param(int, 1, lambda v: 1 <= v <= MAX_RES, f"an integer in [1, {MAX_RES}] (image inputs [.., H, W])"),
        "topk": Param(int, 8, lambda v: v >= 0, "an integer >= 0 (text: label ids per position, 0 = all)"),
        "embedding": choice("freeze", "rows"),  # text: the embedding's update (fedsynth_text.py)
    }

    def __init__(self, model: nn.Module | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.given = frozenset(kwargs)  # keys the spec set explicitly (they win over the ratio rule)
        if self.params["label_scale"] and self.params["labels"] != "trainable":
            raise ValueError("label_scale=true needs labels=trainable")
        if self.params["outer_steps"] == 0 and self.params["init"] != "real":
            raise ValueError("outer_steps=0 sends the initial set unoptimised: it needs init=real")
        if self.params["ef"] and self.params["objective"] == "loss":
            raise ValueError("fedsynth: ef (error feedback) needs an update to aim at: objective match or both")
        self.model = model
        self._residual: dict[int, StateDict] = {}  # ef > 0: per client, ef * (target update - applied update)
        self.last_w_syn: StateDict | None = None  # the client's w_syn of its last update (tests)
        self.last_real_loss: float | None = None
        self.last_shape: Shape | None = None
        self.last_update_ratio: float | None = None  # |synthetic update| / |SGD update| sent
        self.last_fallback: str = ""  # "" | "candidate" | "init" | "lr" (which guard step was needed)
        self.last_choice: dict | None = None  # the shape and guard measure of the last update

    @property
    def spec(self) -> str:
        """A spec that rebuilds this compressor: with ``ratio``, the keys the rule chooses are
        written only when the spec gave them (a written key would override the rule)."""
        p = self.params
        rule = ("batches", "batch", "inner_lr")
        keep = [
            (k, v)
            for k, v in p.items()
            if v is not None
            and not (p["ratio"] is not None and k in rule and k not in self.given)
            and not (k in TEXT_DEFAULTS and k not in self.given)  # the model picks these defaults
        ]
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in keep)

    @property
    def _mode(self) -> str:
        p = self.params
        if p["labels"] == "trainable":
            return "softmax_scaled" if p["label_scale"] else "softmax"
        return p["labels"]

    def _check_text(self) -> None:
        p = self.params
        bad = [f"{k}={p[k]}" for k, ok in _TEXT_ONLY_VALUE.items() if k in self.given and p[k] != ok]
        if bad:
            raise ValueError(f"{', '.join(bad)} is not supported for text models (image models only)")

    def set_model(self, model: nn.Module) -> None:
        """The architecture the server replays ClientUpdate with."""
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model

    # -- the synthetic set <-> bytes ------------------------------------------------------------
    def compress(self, update: StateDict, ctx: RoundContext) -> bytes:
        """Pack a synthetic set ``{"x": [m, b, *in], "y": [m, b, C] labels or [m, b] classes}``
        (optional: ``"inner_lr"``, ``"ref_norm"``, ``"classes"``). Not a model update: FedSynth
        learns its payload from data, through ``client_update``."""
        if fedsynth_text.is_text_model(self.model):
            return fedsynth_text.compress(self, update, ctx)
        if not isinstance(update, dict) or "x" not in update or "y" not in update:
            raise ValueError(
                "fedsynth.compress takes a synthetic set {'x': [m, b, *input], 'y': labels}, not a model "
                "update: FedSynth learns what it sends from the client's data. Call "
                "client_update(model, global_state, (x, y), ctx) on the client and "
                "server_update(payload, global_state, ctx) (after set_model(model)) on the server."
            )
        p = self.params
        x, y = update["x"], update["y"]
        dt = _DTYPES[p["dtype"]]
        mode = self._mode
        if mode == "fixed":
            if y.dim() == 3:
                C = y.shape[2]
                y = y.argmax(-1)
            else:
                C = int(update.get("classes", torch.tensor(int(y.max()) + 1 if y.numel() else 1)))
            y_rec = wire.lossless_record("y", y.to(_label_dtype(C)))
        else:
            C = y.shape[2]
            y_rec = wire.Record("y", dt, tuple(y.shape), wire.tensor_bytes(y.to(dt)))
        xs = x.to(dt)
        if not torch.isfinite(xs).all() and torch.isfinite(x).all():  # overflow of the cast; the
            # server would refuse it, so say so here (non-finite input is passed on: tests build
            # hostile payloads this way)
            raise ValueError(
                f"fedsynth: synthetic inputs are not finite in {p['dtype']} (|x| up to {float(x.abs().max()):.3g})"
            )
        x_rec = wire.Record("x", dt, tuple(x.shape), wire.tensor_bytes(xs))
        lr = float(update.get("inner_lr", p["inner_lr"]))
        meta = wire.Writer()
        meta.u8(_FORMAT)
        meta.u8(_LABEL_MODES.index(mode))
        meta.u32(C)
        meta.u16(1)  # one step size shared by every batch
        meta.f64(lr)
        meta.f32(float(update.get("ref_norm", 0.0)))
        return wire.pack(self.codec, [x_rec, y_rec], meta.getvalue())

    def _expected_shape(self) -> tuple[int | None, int | None]:
        """(m, b) a payload must have; None where the ratio rule chose it per client."""
        p, g = self.params, self.given
        if p["ratio"] is None:
            return p["batches"], p["batch"]
        return (p["batches"] if "batches" in g else None), (p["batch"] if "batch" in g else None)

    def decompress(self, payload: bytes, ctx: RoundContext | None = None) -> StateDict:
        """The synthetic set (not a model update; ``server_update`` gives the delta):
        ``{"x": float32 [m, b, *in], "y": float32 labels [m, b, C], "inner_lr": float64 scalar,
        "ref_norm": float64 scalar}``; FormatError for anything malformed."""
        if fedsynth_text.is_text_model(self.model):
            return fedsynth_text.decompress(self, payload, ctx)
        meta, records = wire.unpack(payload, self.codec)
        r = wire.Reader(meta, "fedsynth meta")
        fmt = r.u8()
        if fmt != _FORMAT:
            raise FormatError(f"fedsynth: payload format {fmt}; this version reads format {_FORMAT}")
        mode = r.u8()
        if mode >= len(_LABEL_MODES) or _LABEL_MODES[mode] != self._mode:
            raise FormatError(f"fedsynth: label mode {mode} does not match this compressor's ({self._mode})")
        mode = _LABEL_MODES[mode]
        C = r.u32()
        if not 1 <= C <= _MAX_CLASSES:
            raise FormatError(f"fedsynth: {C} classes out of range [1, {_MAX_CLASSES}]")
        nsteps = r.u16()
        if nsteps != 1:
            raise FormatError(f"fedsynth: {nsteps} step sizes declared; this version replays exactly 1 (shared)")
        lr = r.finite_f64("inner step size")
        if not lr > 0:
            raise FormatError(f"fedsynth: inner step size {lr} must be > 0")
        ref = r.f32()
        if not (math.isfinite(ref) and ref >= 0):
            raise FormatError(f"fedsynth: SGD update norm {ref} must be finite and >= 0")
        r.expect_end()
        if [rec.name for rec in records] != ["x", "y"]:
            raise FormatError("fedsynth: payload must hold records x then y")
        xr, yr = records
        dt = _DTYPES[self.params["dtype"]]
        em, eb = self._expected_shape()
        if xr.dtype != dt or len(xr.shape) < 3 or min(xr.shape[:2]) < 1:
            raise FormatError(f"fedsynth: x is {xr.dtype} {xr.shape}; expected {dt} [m, b, ...]")
        m, b = xr.shape[:2]
        if (em is not None and m != em) or (eb is not None and b != eb):
            raise FormatError(f"fedsynth: x is [{m}, {b}, ...]; expected batches={em}, batch={eb}")
        if math.prod(xr.shape[2:]) > (1 << 26):
            raise FormatError(f"fedsynth: input shape {xr.shape[2:]} implausibly large")
        x = wire.tensor_from_bytes(xr.data, xr.dtype, xr.shape, "fedsynth x").to(torch.float32)
        if not torch.isfinite(x).all():
            raise FormatError("fedsynth: synthetic inputs contain non-finite values")
        if mode == "fixed":
            if yr.dtype != _label_dtype(C) or yr.shape != (m, b):
                raise FormatError(f"fedsynth: y is {yr.dtype} {yr.shape}; expected {_label_dtype(C)} [{m}, {b}]")
            cls = wire.lossless_tensor(yr).to(torch.int64)
            if cls.numel() and (int(cls.min()) < 0 or int(cls.max()) >= C):
                raise FormatError(f"fedsynth: class labels out of range [0, {C})")
            wire.check_alloc(m * b * C * 4, "fedsynth labels")
            y = F.one_hot(cls, C).to(torch.float32)
        else:
            if yr.dtype != dt or yr.shape != (m, b, C):
                raise FormatError(f"fedsynth: y is {yr.dtype} {yr.shape}; expected {dt} [{m}, {b}, {C}]")
            y = wire.tensor_from_bytes(yr.data, yr.dtype, yr.shape, "fedsynth y").to(torch.float32)
            if not torch.isfinite(y).all():
                raise FormatError("fedsynth: labels contain non-finite values")
            if mode != "raw":
                _check_softmax_labels(y, mode, dt)
        return {
            "x": x,
            "y": y,
            "inner_lr": torch.tensor(lr, dtype=torch.float64),
            "ref_norm": torch.tensor(ref, dtype=torch.float64),
        }

    # -- federated round ----------------------------------------------------------------------
    def replay(self, payload: bytes, global_state: StateDict, ctx: RoundContext | None = None) -> StateDict:
        """Server side of Algorithm 1, line 12: w_syn = ClientUpdate(D_syn; w) for the decoded set."""
        if fedsynth_text.is_text_model(self.model):
            return fedsynth_text.replay(self, payload, global_state, ctx)
        return self._replay(self.decompress(payload, ctx), global_state)

    def _replay(self, d: dict, global_state: StateDict) -> StateDict:
        if self.model is None:
            raise ValueError(
                "fedsynth needs the model architecture to replay: call set_model(model) first "
                "(decompress(payload) alone gives the synthetic set, not the update)"
            )
        params = _params(self.model, global_state)
        dev = next(iter(params.values())).device
        try:
            x = upsample(d["x"].to(dev), self.params["res"])
            return synth.unroll(self.model, params, x, d["y"].to(dev), float(d["inner_lr"]))
        except ValueError as e:  # shapes that do not fit the model
            raise FormatError(f"fedsynth: payload does not fit the model: {e}") from e

    def server_update(self, payload: bytes, global_state: StateDict, ctx: RoundContext) -> StateDict:
        if fedsynth_text.is_text_model(self.model):
            self._check_text()
            return _finite(fedsynth_text.server_update(self, payload, global_state, ctx))
        d = self.decompress(payload, ctx)
        w_syn = self._replay(d, global_state)
        if self.params["ratio"] is not None:
            budget = _dense_bytes(global_state) / self.params["ratio"]
            if len(payload) > budget:
                raise FormatError(f"fedsynth: payload of {len(payload)} bytes exceeds the ratio budget ({budget:.0f})")
        # never apply a non-finite replay, whatever the guard says (guard=0 included)
        delta = _finite({k: (w_syn[k] - v) if k in w_syn else torch.zeros_like(v) for k, v in global_state.items()})
        g, ref = self.params["guard"], float(d["ref_norm"])
        if g and ref > 0:
            norm = _norm({k: delta[k] for k in w_syn})
            if not norm <= g * ref:
                raise FormatError(
                    f"fedsynth: refused: the synthetic update's norm {norm:.4g} is {norm / ref:.3g}x the "
                    f"client's SGD update norm {ref:.4g} (guard={g:g})"
                )
        sc = self.params["server_scale"]
        if sc != 1.0:  # after the guard: it bounds the replay, which the client checked the same way
            delta = {k: v * sc if v.is_floating_point() else v for k, v in delta.items()}
        return delta

    def shape_for(self, global_state: StateDict, input_shape, classes: int, n: int, ctx: RoundContext) -> Shape:
        """This client's shape: the spec's, or the ratio rule's (see ``shape_for_budget``)."""
        p, g = self.params, self.given
        if p["ratio"] is None:
            m, b = p["batches"], p["batch"]
            nbytes = payload_bytes(m, b, input_shape, classes, p["labels"], p["dtype"])
            return Shape(m, b, p["inner_lr"], nbytes)
        dense = _dense_bytes(global_state)
        steps = ctx.epochs * math.ceil(n / ctx.batch_size)
        return shape_for_budget(
            int(dense // p["ratio"]),
            input_shape,
            classes,
            labels=p["labels"],
            dtype=p["dtype"],
            local_steps=steps,
            local_lr=ctx.lr,
            batches=p["batches"] if "batches" in g else None,
            batch=p["batch"] if "batch" in g else None,
            inner_lr=p["inner_lr"] if "inner_lr" in g else None,
            ratio=p["ratio"],
            dense=dense,
        )

    def client_state(self, client: int) -> StateDict:
        """``ef``'s residual for ``client`` (Compressor.client_state)."""
        return residual_state(self._residual, client)

    def load_client_state(self, client: int, state: StateDict) -> None:
        load_residual(self._residual, client, state)

    def client_update(self, model: nn.Module, global_state: StateDict, data, ctx: RoundContext) -> bytes:
        data = client_tensors(data)  # an (x, y) pair, a TensorDataset or a DataLoader: all of it at once
        if not all_finite(global_state):  # a diverged run: every loss, norm and guard would be NaN
            raise ValueError("fedsynth: the global model holds non-finite values (NaN or inf); nothing to learn from")
        if fedsynth_text.is_text_model(model):
            self._check_text()
            image = self.params
            # the text client reads comp.params: give it its own defaults for the keys the spec left out
            self.params = {**image, **{k: v for k, v in TEXT_DEFAULTS.items() if k not in self.given}}
            try:
                return fedsynth_text.client_update(self, model, global_state, data, ctx)
            finally:
                self.params = image
        self.model = model
        p = self.params
        real_x, real_y = data
        n = real_x.shape[0]
        obj = p["objective"]
        if n < 1:
            raise ValueError("fedsynth: the client has no data")
        names = [k for k, _ in model.named_parameters()]
        # the client's own SGD update: what the synthetic one must not dwarf (computed with guard=0
        # too: last_choice reports the ratio, which is how the guard's threshold was chosen)
        local = local_sgd(model, global_state, (real_x, real_y), ctx)
        res = self._residual.get(ctx.client) if p["ef"] else None
        if res is not None:  # error feedback: aim at the SGD update plus what earlier replays missed
            local = {k: local[k].float() + res[k] if k in res else local[k] for k in local}
        ref_norm = _norm({k: local[k].float() - global_state[k].float() for k in names})
        model.load_state_dict(global_state)
        params = _params(model, global_state)
        dev = real_x.device
        real_x = real_x.to(torch.float32)
        with torch.no_grad():
            C = int(torch.func.functional_call(model, params, (real_x[:1],)).shape[-1])
        r = p["res"]
        in_shape = tuple(real_x.shape[1:])
        if r > 1 and (len(in_shape) < 2 or in_shape[-1] % r or in_shape[-2] % r):
            raise ValueError(f"fedsynth: res={r} needs image inputs [.., H, W] with H and W divisible by it, "
                             f"got input shape {in_shape}")
        sent = in_shape[:-2] + (in_shape[-2] // r, in_shape[-1] // r) if r > 1 else in_shape
        shape = self.shape_for(global_state, sent, C, n, ctx)
        self.last_shape = shape
        m, b, lr = shape.batches, shape.batch, shape.inner_lr
        x, y0 = self._init(downsample(real_x, r), real_y, C, m, b, ctx)
        rb = p["real_batch"] if 0 < p["real_batch"] < n else 0
        g_real = ctx.generator(salt=53)  # a fresh real subset per outer step (real_batch)
        target, tw = None, 1.0
        if obj != "loss":
            target = {k: local[k].to(device=dev, dtype=torch.float32) for k in names}
            tw = 1.0 / max(ref_norm, 1e-12) ** 2  # the match term is 1 when w_m = w (no update)
        # the per-step losses are of one objective unless a step's real loss is on a subset
        # (real_batch): then the final set is measured on all the data and tried first. With the
        # match term alone every step measures the same thing, so the set sent is the nearest one,
        # the real-sample init included (on small sets the Adam steps can end farther than it)
        comparable = obj == "match" or not rb
        mode = self._mode
        x.requires_grad_(True)
        groups = [{"params": [x], "lr": p["lr_x"]}]
        v = t = None
        if mode in ("softmax", "softmax_scaled"):
            # logits with p(true class) = 0.99: one-hot cannot be reached with finite logits
            v = (y0 * math.log(0.99 * max(1, C - 1) / 0.01)).requires_grad_(True)
            groups.append({"params": [v], "lr": p["lr_y"]})
            if mode == "softmax_scaled":
                t = torch.zeros(m, b, device=dev, requires_grad=True)
                groups.append({"params": [t], "lr": p["lr_y"]})
        elif mode == "raw":
            y0.requires_grad_(True)
            groups.append({"params": [y0], "lr": p["lr_y"]})

        def labels_now():
            if v is not None:
                return softmax_labels(v.detach(), None if t is None else t.detach())
            return y0.detach()

        # (with init=noise the initial set's replay says nothing about the step: no search)
        if p["lr_search"] and "inner_lr" not in self.given and p["init"] == "real":
            lr = self._search_inner_lr(model, params, upsample(x.detach(), r), labels_now(), lr, local, names)

        opt = torch.optim.Adam(groups)
        cands: list[tuple[float, int, torch.Tensor, torch.Tensor]] = []  # (loss, step, x, y)
        final_loss = math.inf
        init_set = (x.detach().clone(), labels_now().clone())
        for step in range(p["outer_steps"] + 1):
            y = labels_now()
            if step == p["outer_steps"]:  # the final set: its loss only
                loss = self._loss_of(model, params, upsample(x.detach(), r), y, lr, real_x, real_y, obj, target, tw)
                if math.isfinite(loss) and torch.isfinite(x).all():
                    cands.append((loss if comparable else -math.inf, step, x.detach().clone(), y.clone()))
                    final_loss = loss
                break
            rx, ry = real_x, real_y
            if obj == "match":
                rx = ry = None
            elif rb:
                pick = torch.randperm(n, generator=g_real)[:rb].to(dev)
                rx, ry = real_x[pick], real_y[pick]
            loss, gx, gy = synth.hypergradient(
                model, params, upsample(x.detach(), r), y, lr, rx, ry, target=target, target_weight=tw
            )
            gx = downsample(gx, r, "sum")
            loss = float(loss)
            if not (math.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gy).all()):
                break  # diverged (lr_x / lr_y too large): keep the sets so far
            cands.append((loss, step, x.detach().clone(), y.clone()))
            cands = sorted(cands, key=lambda c: (c[0], c[1]))[:4]  # a few in reserve for the guard
            x.grad = gx
            if v is not None:
                v.grad, tg = softmax_labels_grad(v.detach(), None if t is None else t.detach(), gy)
                if t is not None:
                    t.grad = tg
            elif mode == "raw":
                y0.grad = gy
            opt.step()
        cands.sort(key=lambda c: (c[0], c[1]))
        self.last_real_loss = (cands[0][0] if cands else math.inf) if comparable else final_loss
        # the first candidate within the guard; then the initial (real-sample) set; then smaller lr
        tries = [(c[2], c[3], lr, "" if i == 0 else "candidate") for i, c in enumerate(cands)]
        tries.append((init_set[0], init_set[1], lr, "init"))
        while True:
            for cx, cy, clr, how in tries:
                send = {
                    "x": cx,
                    "y": cy,
                    "inner_lr": torch.tensor(clr, dtype=torch.float64),
                    "ref_norm": torch.tensor(ref_norm, dtype=torch.float64),
                    "classes": torch.tensor(C),
                }
                payload = self.compress(send, ctx)
                d = self.decompress(payload, ctx)
                # the client's own w_syn: from the bytes it sends, with the server's code (exact replay)
                w_syn = self._replay(d, global_state)
                norm = _norm({k: w_syn[k] - params[k] for k in names})
                ratio = norm / ref_norm if ref_norm > 0 else math.nan
                if not p["guard"] or ref_norm == 0 or norm <= p["guard"] * float(d["ref_norm"]):
                    self.last_w_syn, self.last_update_ratio, self.last_fallback = w_syn, ratio, how
                    if p["ef"]:  # what the server will apply: server_scale * (w_syn - w)
                        sc, a = p["server_scale"], p["ef"]
                        self._residual[ctx.client] = {
                            k: a * ((local[k].float() - params[k]) - sc * (w_syn[k] - params[k])) for k in names
                        }
                    # the driver writes it to metrics.jsonl (per client): the shape, and the guard's
                    # measure (always: it is how the guard's threshold was chosen, docs/fedsynth.md)
                    self.last_choice = {
                        "batches": shape.batches,
                        "batch": shape.batch,
                        "inner_lr": clr,
                        "bytes": len(payload),
                        "update_ratio": round(ratio, 4) if math.isfinite(ratio) else None,
                        "guard_fallback": how,
                    }
                    return payload
            if lr < 1e-12:
                raise RuntimeError("fedsynth: no synthetic set meets the guard even at inner_lr 1e-12")
            lr /= 2  # the initial set still overshoots: shorter steps (update ~ linear in lr)
            tries = [(init_set[0], init_set[1], lr, "lr")]

    def _search_inner_lr(self, model, params, x, y, lr, local, names) -> float:
        """``lr`` or one of its first ``lr_search`` halvings: the one whose replay of the initial
        set (x, y) ends nearest the client's own SGD weights ``local`` (ties: the larger step).

        Why: the step a replay can take without blowing up shrinks as training goes on (the model
        sharpens to the client's SGD step). On mnist5k-10 after 10 FedAvg rounds, replaying the
        real-sample set at the ratio rule's 0.1 gave an update 24x the SGD update, pointing
        nowhere (cosine -0.03), while 0.0125 gave 0.44x at cosine 0.30; at round 1, 0.05 was
        nearest. One fixed step cannot serve both (docs/fedsynth.md, "Inner step per update")."""
        best, best_d = lr, math.inf
        for k in range(self.params["lr_search"] + 1):
            cand = lr / 2**k
            w = synth.unroll(model, params, x, y, cand)
            d = _sq_dist(w, local, names)
            if d < best_d:  # strictly nearer: a tie keeps the larger step
                best, best_d = cand, d
        return best

    def _init(self, real_x, real_y, C, m, b, ctx):
        g = ctx.generator(salt=51)
        n, k = real_x.shape[0], m * b
        dev = real_x.device
        if self.params["init"] == "real":
            idx = torch.randperm(n, generator=g)[:k] if k <= n else torch.randint(0, n, (k,), generator=g)
            idx = idx.to(dev)
            x = real_x[idx].clone()
            cls = real_y[idx]
        else:
            x = torch.randn((k,) + tuple(real_x.shape[1:]), generator=g).to(dev)
            cls = (torch.arange(k) % C).to(dev)
        y = F.one_hot(cls.to(torch.int64), C).to(torch.float32)
        return x.reshape((m, b) + tuple(real_x.shape[1:])).contiguous(), y.reshape(m, b, C).contiguous()

    def _loss_of(self, model, params, x, y, lr, real_x, real_y, obj, target, tw) -> float:
        """The outer objective of the set (x, y) on all the client's data, as the outer steps
        measure it: CE on the real data at w_m, tw * ||w_m - target||^2, or their sum."""
        w = synth.unroll(model, params, x, y, lr)
        loss = 0.0
        if obj != "match":
            loss += synth.real_loss(model, w, real_x, real_y)
        if obj != "loss":
            loss += tw * _sq_dist(w, target, target)
        return loss if math.isfinite(loss) else math.inf


def _check_softmax_labels(y: torch.Tensor, mode: str, dt: torch.dtype) -> None:
    if bool((y < 0).any()):
        raise FormatError(f"fedsynth: {mode} labels have negative entries")
    rows = y.double().sum(-1)
    tol = _ROW_TOL[dt]
    if mode == "softmax":
        if not bool(((rows - 1).abs() <= tol).all()):
            raise FormatError(
                f"fedsynth: softmax label rows must sum to 1 (found {float(rows.min()):.6g}..{float(rows.max()):.6g})"
            )
    elif not bool((rows <= MAX_LABEL_SCALE * (1 + tol)).all()):
        raise FormatError(f"fedsynth: scaled softmax label rows must sum to at most {MAX_LABEL_SCALE:g}")


def _params(model: nn.Module, state: StateDict) -> StateDict:
    names = [k for k, _ in model.named_parameters()]
    missing = [k for k in names if k not in state]
    if missing:
        raise ValueError(f"global_state lacks the model parameters {missing}")
    return {k: state[k].detach().to(torch.float32) for k in names}
