"""FedSynth (Hu et al. 2022, Algorithm 1): the client uploads a small learned synthetic dataset.

Client (Algorithm 1, lines 5-9): start from the global weights w; initialise m batches of b
synthetic inputs (``init=real``: a random sample of the client's own data; ``init=noise``: N(0, 1))
and their labels (the sampled labels, or classes round-robin for noise; one-hot). Then
``outer_steps`` times: w_syn = ClientUpdate(D_syn; w) (m SGD steps, lr ``inner_lr``, soft-label
loss), and D_syn -= lr * grad_{D_syn} CE(real data; w_syn) (eq. 5-6), by Adam with step sizes
``lr_x`` (inputs) and ``lr_y`` (labels, only with ``labels=trainable``; unconstrained reals as in the
paper). The set with the lowest real loss seen is the one sent. Gradients come from
``fedcompress.synth.hypergradient``.

Payload (``fedcompress.wire``, codec CODEC_FEDSYNTH): meta = format u8, labels mode u8, C u32,
inner_lr f64; record ``x`` [m, b, *input] in fp32 or fp16; record ``y``: class indices [m, b] (uint8
or int16/int32 by C) for fixed labels, or soft labels [m, b, C] in the payload dtype. The ratio the
driver reports counts every one of these bytes.

Server (line 12): decode, then replay ClientUpdate from the same global weights with the same code
(``fedcompress.synth.unroll``); the update is w_syn - w. On the same machine and backend the
replay equals the client's w_syn bit for bit. The server needs the model architecture: the
compressor remembers the model passed to ``client_update`` (the FedAvg driver shares one
compressor), or call ``set_model(model)`` on a server-only instance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import synth, wire
from ..api import Compressor, Param, RoundContext, StateDict, choice, positive_float, positive_int, register
from ..errors import FormatError
from . import fedsynth_text  # text models: synthetic data in embedding space

_FORMAT = 1
_LABEL_MODES = ("fixed", "trainable")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
_MAX_CLASSES = 1 << 20


def _label_dtype(C: int) -> torch.dtype:
    return torch.uint8 if C <= 256 else (torch.int16 if C <= 32767 else torch.int32)


@register("fedsynth")
class FedSynthCompressor(Compressor):
    """Spec: ``fedsynth:batches=10,batch=5,labels=fixed|trainable,outer_steps=..,lr_x=..,lr_y=..,
    inner_lr=..,init=real|noise,dtype=fp32|fp16``."""

    codec = wire.CODEC_FEDSYNTH
    PARAMS = {
        "batches": positive_int(10),
        "batch": positive_int(5),
        "labels": choice(*_LABEL_MODES),
        "outer_steps": positive_int(30),
        "lr_x": positive_float(0.03),
        "lr_y": positive_float(0.03),
        "inner_lr": positive_float(0.05),
        "init": choice("real", "noise"),
        "dtype": choice("fp32", "fp16"),
        "real_batch": Param(int, 0, lambda v: v >= 0, "an integer >= 0 (0 = all of the client's data)"),
        "topk": Param(int, 8, lambda v: v >= 0, "an integer >= 0 (text: label ids per position, 0 = all)"),
        "embedding": choice("freeze", "rows"),  # text: the embedding's update (fedsynth_text.py)
    }

    def __init__(self, model: nn.Module | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.last_w_syn: StateDict | None = None  # the client's w_syn of its last update (tests)
        self.last_real_loss: float | None = None

    def set_model(self, model: nn.Module) -> None:
        """The architecture the server replays ClientUpdate with."""
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model

    # -- the synthetic set <-> bytes ------------------------------------------------------------
    def compress(self, update: StateDict, ctx: RoundContext) -> bytes:
        """Pack a synthetic set ``{"x": [m, b, *in], "y": [m, b, C] soft labels or [m, b] classes}``."""
        if fedsynth_text.is_text_model(self.model):
            return fedsynth_text.compress(self, update, ctx)
        p = self.params
        x, y = update["x"], update["y"]
        dt = _DTYPES[p["dtype"]]
        if p["labels"] == "fixed":
            if y.dim() == 3:
                C = y.shape[2]
                y = y.argmax(-1)
            else:
                C = int(update.get("classes", torch.tensor(int(y.max()) + 1 if y.numel() else 1)))
            y_rec = wire.lossless_record("y", y.to(_label_dtype(C)))
        else:
            C = y.shape[2]
            y_rec = wire.Record("y", dt, tuple(y.shape), wire.tensor_bytes(y.to(dt)))
        x_rec = wire.Record("x", dt, tuple(x.shape), wire.tensor_bytes(x.to(dt)))
        meta = wire.Writer()
        meta.u8(_FORMAT)
        meta.u8(_LABEL_MODES.index(p["labels"]))
        meta.u32(C)
        meta.f64(p["inner_lr"])
        return wire.pack(self.codec, [x_rec, y_rec], meta.getvalue())

    def decompress(self, payload: bytes, ctx: RoundContext) -> StateDict:
        """The synthetic set: ``{"x": float32 [m, b, *in], "y": float32 soft/one-hot [m, b, C],
        "inner_lr": float64 scalar}``; FormatError for anything malformed."""
        if fedsynth_text.is_text_model(self.model):
            return fedsynth_text.decompress(self, payload, ctx)
        meta, records = wire.unpack(payload, self.codec)
        r = wire.Reader(meta, "fedsynth meta")
        if r.u8() != _FORMAT:
            raise FormatError("fedsynth: unknown payload format")
        mode = r.u8()
        if mode >= len(_LABEL_MODES) or _LABEL_MODES[mode] != self.params["labels"]:
            raise FormatError(f"fedsynth: label mode {mode} does not match labels={self.params['labels']}")
        C = r.u32()
        if not 1 <= C <= _MAX_CLASSES:
            raise FormatError(f"fedsynth: {C} classes out of range [1, {_MAX_CLASSES}]")
        lr = r.finite_f64("inner_lr")
        if not lr > 0:
            raise FormatError(f"fedsynth: inner_lr {lr} must be > 0")
        r.expect_end()
        if [rec.name for rec in records] != ["x", "y"]:
            raise FormatError("fedsynth: payload must hold records x then y")
        xr, yr = records
        m, b = self.params["batches"], self.params["batch"]
        dt = _DTYPES[self.params["dtype"]]
        if xr.dtype != dt or len(xr.shape) < 3 or xr.shape[:2] != (m, b):
            raise FormatError(
                f"fedsynth: x is {xr.dtype} {xr.shape}; expected {dt} [{m}, {b}, ...] "
                f"(batches={m}, batch={b})"
            )
        if math.prod(xr.shape[2:]) > (1 << 26):
            raise FormatError(f"fedsynth: input shape {xr.shape[2:]} implausibly large")
        x = wire.tensor_from_bytes(xr.data, xr.dtype, xr.shape, "fedsynth x").to(torch.float32)
        if not torch.isfinite(x).all():
            raise FormatError("fedsynth: synthetic inputs contain non-finite values")
        if self.params["labels"] == "fixed":
            if yr.dtype != _label_dtype(C) or yr.shape != (m, b):
                raise FormatError(
                    f"fedsynth: y is {yr.dtype} {yr.shape}; expected {_label_dtype(C)} [{m}, {b}]"
                )
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
                raise FormatError("fedsynth: soft labels contain non-finite values")
        return {"x": x, "y": y, "inner_lr": torch.tensor(lr, dtype=torch.float64)}

    # -- federated round ----------------------------------------------------------------------
    def replay(self, payload: bytes, global_state: StateDict, ctx: RoundContext | None = None) -> StateDict:
        """Server side of Algorithm 1, line 12: w_syn = ClientUpdate(D_syn; w) for the decoded set."""
        if fedsynth_text.is_text_model(self.model):
            return fedsynth_text.replay(self, payload, global_state, ctx)
        if self.model is None:
            raise ValueError("fedsynth needs the model architecture to replay: call set_model(model) first")
        d = self.decompress(payload, ctx or RoundContext())
        params = _params(self.model, global_state)
        dev = next(iter(params.values())).device
        try:
            return synth.unroll(self.model, params, d["x"].to(dev), d["y"].to(dev), float(d["inner_lr"]))
        except ValueError as e:  # shapes that do not fit the model
            raise FormatError(f"fedsynth: payload does not fit the model: {e}") from e

    def server_update(self, payload: bytes, global_state: StateDict, ctx: RoundContext) -> StateDict:
        if fedsynth_text.is_text_model(self.model):
            return fedsynth_text.server_update(self, payload, global_state, ctx)
        w_syn = self.replay(payload, global_state, ctx)
        return {k: (w_syn[k] - v) if k in w_syn else torch.zeros_like(v) for k, v in global_state.items()}

    def client_update(self, model: nn.Module, global_state: StateDict, data, ctx: RoundContext) -> bytes:
        if fedsynth_text.is_text_model(model):
            return fedsynth_text.client_update(self, model, global_state, data, ctx)
        self.model = model
        p = self.params
        real_x, real_y = data
        model.load_state_dict(global_state)
        params = _params(model, global_state)
        dev = real_x.device
        real_x = real_x.to(torch.float32)
        n = real_x.shape[0]
        if n < 1:
            raise ValueError("fedsynth: the client has no data")
        if p["real_batch"] and p["real_batch"] < n:
            pick = torch.randperm(n, generator=ctx.generator(salt=53))[: p["real_batch"]].to(dev)
            real_x, real_y = real_x[pick], real_y[pick]
        with torch.no_grad():
            C = int(torch.func.functional_call(model, params, (real_x[:1],)).shape[-1])
        m, b = p["batches"], p["batch"]
        x, y = self._init(real_x, real_y, C, m, b, ctx)
        x.requires_grad_(True)
        groups = [{"params": [x], "lr": p["lr_x"]}]
        trainable = p["labels"] == "trainable"
        if trainable:
            y.requires_grad_(True)
            groups.append({"params": [y], "lr": p["lr_y"]})
        opt = torch.optim.Adam(groups)
        best = (math.inf, None, None)
        for _ in range(p["outer_steps"]):
            loss, gx, gy = synth.hypergradient(
                model, params, x.detach(), y.detach(), p["inner_lr"], real_x, real_y
            )
            loss = float(loss)
            if not (math.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gy).all()):
                break  # diverged (lr_x / lr_y too large): keep the best set so far
            if loss < best[0]:
                best = (loss, x.detach().clone(), y.detach().clone())
            x.grad = gx
            if trainable:
                y.grad = gy
            opt.step()
        send = {"x": x.detach(), "y": y.detach()}
        finite = bool(torch.isfinite(send["x"]).all() and torch.isfinite(send["y"]).all())
        final = self._loss_of(model, params, send, real_x, real_y) if finite else math.inf
        if not math.isfinite(final):
            final = math.inf
        if best[1] is not None and not best[0] >= final:
            send = {"x": best[1], "y": best[2]}
        send["classes"] = torch.tensor(C)
        payload = self.compress(send, ctx)
        # the client's own w_syn: from the bytes it sends, with the server's code (exact replay)
        self.last_w_syn = self.replay(payload, global_state, ctx)
        self.last_real_loss = min(best[0], final)
        return payload

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

    def _loss_of(self, model, params, send, real_x, real_y) -> float:
        w = synth.unroll(model, params, send["x"], send["y"], self.params["inner_lr"])
        return synth.real_loss(model, w, real_x, real_y)


def _params(model: nn.Module, state: StateDict) -> StateDict:
    names = [k for k, _ in model.named_parameters()]
    missing = [k for k in names if k not in state]
    if missing:
        raise ValueError(f"global_state lacks the model parameters {missing}")
    return {k: state[k].detach().to(torch.float32) for k in names}
