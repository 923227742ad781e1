"""FedSynth for the next-word LSTM: synthetic data in the word-embedding space (paper §4.2).

``FedSynthCompressor`` hands a text model (``fedavg.models.NextWordLSTM``) to this module; the spec
is the same ``fedsynth:...`` (``batches`` m, ``batch`` b, ``labels``, ``outer_steps``, ``lr_x``,
``lr_y``, ``inner_lr``, ``init``, ``dtype``, ``real_batch``) plus two text keys:

- ``topk`` (labels=trainable): each synthetic position carries k learned label weights
  softmax(v) over k vocabulary ids (the real next word plus the model's k-1 likeliest others at w,
  chosen once at initialisation). Trainable soft labels over the whole vocabulary cost m*b*T*V
  values (10 x 5 x 10 x 10,000 = 5M values, 10 MB in fp16: more than the 2.2M-parameter model
  itself, so no compression at all); top-k costs m*b*T*k values plus as many ids. ``topk=0`` is
  the whole vocabulary (ids not sent), for completeness. ``labels=fixed`` sends one next-word id
  per position.
- ``embedding``: the synthetic sequences bypass the embedding layer, so the m replayed SGD steps
  never change it. ``freeze`` (default) leaves it as it is: the update has zeros there. ``rows``:
  the client also runs its local SGD on its real data and sends the embedding rows of the words it
  saw (the only rows local SGD changes), ids + rows in the payload dtype, inside the same payload;
  the server adds them to the replayed update. docs/fedsynth.md has the measured comparison.

``ratio=R`` (``embedding=freeze`` only): each client's m, b and inner_lr from the image shape
rule (``fedsynth.shape_for_budget``) on this payload's exact length; they travel in the payload,
and the server refuses one above dense / R.

Client: w = global weights; m*b synthetic sequences start as E[x] of sampled real sequences
(``init=real``; labels their next words, an ignored target replaced by the next input token) or
N(0, std(E)) with random words (``init=noise``); then ``outer_steps`` Adam steps on the hypergradient
(``fedcompress.synth.lstm.hypergradient_text``), keeping the set with the lowest real loss.

Payload (codec CODEC_FEDSYNTH, format byte ``FORMAT_TEXT`` = 16, distinct from the image formats):
meta = format u8, labels u8 (0 fixed, 1 trainable), V u32, T u32, d u32, k u32, embedding u8
(0 freeze, 1 rows), inner_lr f64; records ``x`` [m, b, T, d] (payload dtype); ``y`` [m, b, T, k]
ids (uint8/int16/int32 by V; absent for topk=0); ``v`` [m, b, T, k] label logits (trainable);
``rows`` int32 [r] strictly increasing ids and ``emb`` [r, d] (embedding=rows). Every size is
checked against the model (V, T, d), the spec (m, b, labels, k, embedding) and the decode limit
before anything is allocated; anything else is a FormatError.

Server: decode, replay ``unroll_text`` from the same global weights (exact: same code), update =
w_syn - w (+ the embedding rows).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import wire
from ..api import RoundContext, StateDict, local_sgd
from ..errors import FormatError
from ..synth import lstm as synth_lstm
from .budget import budget_bytes, dense_payload_bytes

FORMAT_TEXT = 16
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
_EMB_MODES = ("freeze", "rows")
DEFAULT_TOPK = 8
PAD = 0


def is_text_model(model) -> bool:
    return model is not None and synth_lstm.is_text_model(model)


def _label_dtype(V: int) -> torch.dtype:
    return torch.uint8 if V <= 256 else (torch.int16 if V <= 32767 else torch.int32)


def _opts(comp) -> dict:
    """The spec values the text path uses, checked for what it supports."""
    p = comp.params
    labels = p.get("labels", "fixed")
    if labels not in ("fixed", "trainable"):
        raise ValueError(f"labels={labels!r} is not supported for text models; valid: fixed, trainable")
    if p.get("label_scale"):
        raise ValueError("label_scale=true is not supported for text models")
    emb = p.get("embedding", "freeze")
    if emb not in _EMB_MODES:
        raise ValueError(f"embedding={emb!r}; valid: {', '.join(_EMB_MODES)}")
    if p.get("ratio") is not None and emb == "rows":
        raise ValueError("ratio= needs embedding=freeze: the embedding rows a client sends vary in number")
    topk = p.get("topk", DEFAULT_TOPK)
    return {
        "m": p.get("batches") or 10,
        "b": p.get("batch") or 5,
        "labels": labels,
        "topk": topk,
        "embedding": emb,
        "dtype": _DTYPES[p.get("dtype", "fp32")],
        "inner_lr": float(p["inner_lr"]),
        "ratio": p.get("ratio"),
    }


def _model_dims(model) -> tuple[int, int, int | None]:
    V, d = model.embedding.weight.shape
    return int(V), int(d), getattr(model, "seq_len", None)


def _k(o: dict, V: int) -> int:
    if o["labels"] == "fixed":
        return 1
    return V if o["topk"] == 0 else min(o["topk"], V)


# ---------------------------------------------------------------------------------------------
# The synthetic set <-> bytes


def compress(comp, update: StateDict, ctx: RoundContext | None = None) -> bytes:
    """Pack ``{"x": [m, b, T, d], "idx": int64 [m, b, T, k], "v": label logits [m, b, T, k]
    (trainable), "rows"/"emb" (embedding=rows)}``."""
    o = _opts(comp)
    V, d, _ = _model_dims(comp.model)
    dt = o["dtype"]
    x, idx = update["x"], update.get("idx")  # idx None: the whole vocabulary (topk=0)
    m, b, T, _ = x.shape
    k = V if idx is None else idx.shape[-1]
    recs = [wire.Record("x", dt, tuple(x.shape), wire.tensor_bytes(x.to(dt)))]
    if idx is not None:
        recs.append(wire.lossless_record("y", idx.to(_label_dtype(V))))
    if o["labels"] == "trainable":
        recs.append(wire.Record("v", dt, (m, b, T, k), wire.tensor_bytes(update["v"].to(dt))))
    if o["embedding"] == "rows":
        rows = update["rows"].to(torch.int32)
        recs.append(wire.lossless_record("rows", rows))
        recs.append(wire.Record("emb", dt, (int(rows.numel()), d), wire.tensor_bytes(update["emb"].to(dt))))
    meta = wire.Writer()
    meta.u8(FORMAT_TEXT)
    meta.u8(0 if o["labels"] == "fixed" else 1)
    meta.u32(V)
    meta.u32(T)
    meta.u32(d)
    meta.u32(k)
    meta.u8(_EMB_MODES.index(o["embedding"]))
    meta.f64(float(update.get("inner_lr", o["inner_lr"])))
    return wire.pack(wire.CODEC_FEDSYNTH, recs, meta.getvalue())


def decompress(comp, payload: bytes, ctx: RoundContext | None = None) -> StateDict:
    """``{"x": float32 [m, b, T, d], "idx": int64 [m, b, T, k] (None: all V), "val": float32 weights,
    "inner_lr", "rows"/"emb"}``; FormatError for anything that does not fit the spec or model."""
    o = _opts(comp)
    V, d, T_model = _model_dims(comp.model)
    meta, records = wire.unpack(payload, wire.CODEC_FEDSYNTH)
    r = wire.Reader(meta, "fedsynth text meta")
    if r.u8() != FORMAT_TEXT:
        raise FormatError("fedsynth: not a text payload (the model is a text model)")
    mode = r.u8()
    if mode > 1 or ("fixed", "trainable")[mode] != o["labels"]:
        raise FormatError(f"fedsynth text: label mode {mode} does not match labels={o['labels']}")
    pV, T, pd, k = r.u32(), r.u32(), r.u32(), r.u32()
    if pV != V:
        raise FormatError(f"fedsynth text: vocabulary {pV} does not fit the model's {V}")
    if pd != d:
        raise FormatError(f"fedsynth text: embedding width {pd} does not fit the model's {d}")
    if T_model is not None and T != T_model:
        raise FormatError(f"fedsynth text: sequence length {T} does not fit the model's {T_model}")
    if not 1 <= T <= 4096:
        raise FormatError(f"fedsynth text: sequence length {T} out of range [1, 4096]")
    if k != _k(o, V):
        raise FormatError(f"fedsynth text: {k} labels per position, the spec gives {_k(o, V)}")
    emb_mode = r.u8()
    if emb_mode >= len(_EMB_MODES) or _EMB_MODES[emb_mode] != o["embedding"]:
        raise FormatError(f"fedsynth text: embedding mode {emb_mode} does not match embedding={o['embedding']}")
    lr = r.finite_f64("inner_lr")
    if not lr > 0:
        raise FormatError(f"fedsynth text: inner_lr {lr} must be > 0")
    r.expect_end()
    m, b, dt = o["m"], o["b"], o["dtype"]
    names = ["x"]
    if o["ratio"] is not None and records and len(records[0].shape) == 4:  # each client's own shape
        m, b = records[0].shape[:2]
        if min(m, b) < 1:
            raise FormatError(f"fedsynth text: x is [{m}, {b}, ...]; expected at least one sequence")
    dense = o["labels"] == "trainable" and o["topk"] == 0
    if not dense:
        names.append("y")
    if o["labels"] == "trainable":
        names.append("v")
    if o["embedding"] == "rows":
        names += ["rows", "emb"]
    if [rec.name for rec in records] != names:
        raise FormatError(f"fedsynth text: payload must hold records {', '.join(names)}")
    rec = dict(zip(names, records, strict=True))
    if rec["x"].dtype != dt or rec["x"].shape != (m, b, T, d):
        raise FormatError(f"fedsynth text: x is {rec['x'].dtype} {rec['x'].shape}; expected {dt} [{m}, {b}, {T}, {d}]")
    x = wire.tensor_from_bytes(rec["x"].data, dt, rec["x"].shape, "fedsynth x").to(torch.float32)
    if not torch.isfinite(x).all():
        raise FormatError("fedsynth text: synthetic embeddings contain non-finite values")
    if dense:
        idx = None  # the whole vocabulary, in id order
    else:
        yr = rec["y"]
        if yr.dtype != _label_dtype(V) or yr.shape != (m, b, T, k):
            raise FormatError(
                f"fedsynth text: y is {yr.dtype} {yr.shape}; expected {_label_dtype(V)} [{m}, {b}, {T}, {k}]"
            )
        idx = wire.lossless_tensor(yr).to(torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= V):
            raise FormatError(f"fedsynth text: label ids out of range [0, {V})")
    if o["labels"] == "trainable":
        vr = rec["v"]
        if vr.dtype != dt or vr.shape != (m, b, T, k):
            raise FormatError(f"fedsynth text: v is {vr.dtype} {vr.shape}; expected {dt} [{m}, {b}, {T}, {k}]")
        logits = wire.tensor_from_bytes(vr.data, dt, vr.shape, "fedsynth v").to(torch.float32)
        if not torch.isfinite(logits).all():
            raise FormatError("fedsynth text: label logits contain non-finite values")
        val = torch.softmax(logits, -1)
    else:
        val = torch.ones(m, b, T, 1)
    out = {"x": x, "idx": idx, "val": val, "inner_lr": torch.tensor(lr, dtype=torch.float64)}
    if o["embedding"] == "rows":
        rr, er = rec["rows"], rec["emb"]
        if rr.dtype != torch.int32 or len(rr.shape) != 1 or rr.shape[0] > V:
            raise FormatError(f"fedsynth text: rows is {rr.dtype} {rr.shape}; expected int32 [r <= {V}]")
        rows = wire.lossless_tensor(rr).to(torch.int64)
        if rows.numel() and (int(rows[0]) < 0 or int(rows[-1]) >= V or not bool((rows[1:] > rows[:-1]).all())):
            raise FormatError(f"fedsynth text: embedding rows must be strictly increasing ids in [0, {V})")
        if er.dtype != dt or er.shape != (rows.numel(), d):
            raise FormatError(f"fedsynth text: emb is {er.dtype} {er.shape}; expected {dt} [{rows.numel()}, {d}]")
        emb = wire.tensor_from_bytes(er.data, dt, er.shape, "fedsynth emb").to(torch.float32)
        if not torch.isfinite(emb).all():
            raise FormatError("fedsynth text: embedding rows contain non-finite values")
        out["rows"], out["emb"] = rows, emb
    return out


# ---------------------------------------------------------------------------------------------
# Federated round


def _params(model, state: StateDict) -> StateDict:
    names = [k for k, _ in model.named_parameters()]
    missing = [k for k in names if k not in state]
    if missing:
        raise ValueError(f"global_state lacks the model parameters {missing}")
    return {k: state[k].detach().to(torch.float32) for k in names}


def replay(comp, payload: bytes, global_state: StateDict, ctx: RoundContext | None = None) -> StateDict:
    """w_syn (every parameter) from the payload: the m synthetic steps, then the embedding rows."""
    d = decompress(comp, payload, ctx)
    P = _params(comp.model, global_state)
    dev = next(iter(P.values())).device
    try:
        w = synth_lstm.unroll_text(
            comp.model, P, d["x"].to(dev), _to(d["idx"], dev), d["val"].to(dev), float(d["inner_lr"])
        )
    except ValueError as e:
        raise FormatError(f"fedsynth text: payload does not fit the model: {e}") from e
    if "rows" in d:
        E = w["embedding.weight"].clone()
        E.index_add_(0, d["rows"].to(dev), d["emb"].to(dev))
        w["embedding.weight"] = E
    return w


def _to(t, dev):
    return None if t is None else t.to(dev)


def server_update(comp, payload: bytes, global_state: StateDict, ctx: RoundContext) -> StateDict:
    ratio = comp.params.get("ratio")
    if ratio is not None:
        limit = budget_bytes(global_state, ratio)
        if len(payload) > limit:
            raise FormatError(f"fedsynth text: payload of {len(payload)} bytes exceeds the ratio budget ({limit})")
    w_syn = replay(comp, payload, global_state, ctx)
    return {k: (w_syn[k] - v) if k in w_syn else torch.zeros_like(v) for k, v in global_state.items()}


def client_update(comp, model, global_state: StateDict, data, ctx: RoundContext) -> bytes:
    comp.model = model
    o = _opts(comp)
    p = comp.params
    real_x, real_y = data
    if real_x.dtype != torch.int64 or real_x.dim() != 2 or real_x.shape[0] < 1:
        raise ValueError("fedsynth text: the client's data must be int64 token ids [n >= 1, T]")
    T = real_x.shape[1]
    if getattr(model, "seq_len", None) not in (None, T):
        raise ValueError(f"fedsynth text: data sequences have T={T}, the model expects {model.seq_len}")
    model.load_state_dict(global_state)
    P = _params(model, global_state)
    V, d, _ = _model_dims(model)
    all_x = real_x
    n = real_x.shape[0]
    if p.get("real_batch") and p["real_batch"] < n:
        pick = torch.randperm(n, generator=ctx.generator(salt=53))[: p["real_batch"]].to(real_x.device)
        real_x, real_y = real_x[pick], real_y[pick]
    m, b, k = o["m"], o["b"], _k(o, V)
    lr = o["inner_lr"]
    if o["ratio"] is not None:
        shape = _shape_for_ratio(comp, o, global_state, V, d, T, n, ctx)
        m, b, lr = shape.batches, shape.batch, shape.inner_lr
    e, idx, lab = _init(model, P, real_x, real_y, m, b, k, o, ctx, p.get("init", "real"))
    trainable = o["labels"] == "trainable"
    v = torch.zeros((m, b, T, k), dtype=torch.float32, device=e.device)
    if trainable:  # softmax puts most weight (e^2 / (e^2 + k - 1)) on the label
        v.scatter_(-1, lab if k == V else torch.zeros_like(lab), 2.0)
    e.requires_grad_(True)
    groups = [{"params": [e], "lr": p["lr_x"]}]
    if trainable:
        v.requires_grad_(True)
        groups.append({"params": [v], "lr": p["lr_y"]})
    opt = torch.optim.Adam(groups)
    best = (math.inf, None, None)
    for _ in range(p["outer_steps"]):
        val = torch.softmax(v.detach(), -1) if trainable else torch.ones_like(v)
        loss, ge, gval = synth_lstm.hypergradient_text(model, P, e.detach(), idx, val, lr, real_x, real_y)
        loss = float(loss)
        if not (math.isfinite(loss) and torch.isfinite(ge).all() and torch.isfinite(gval).all()):
            break  # diverged (lr_x / lr_y too large): keep the best set so far
        if loss < best[0]:
            best = (loss, e.detach().clone(), v.detach().clone())
        e.grad = ge
        if trainable:  # chain through softmax over the k labels of each position
            v.grad = val * (gval - (val * gval).sum(-1, keepdim=True))
        opt.step()
    cand = (e.detach(), v.detach())
    final = math.inf
    if torch.isfinite(cand[0]).all() and torch.isfinite(cand[1]).all():
        val = torch.softmax(cand[1], -1) if trainable else torch.ones_like(cand[1])
        w = synth_lstm.unroll_text(model, P, cand[0], idx, val, lr)
        final = synth_lstm.real_loss_text(model, w, real_x, real_y)
        if not math.isfinite(final):
            final = math.inf
    if best[1] is not None and not best[0] >= final:
        cand = (best[1], best[2])
    send = {"x": cand[0], "idx": idx, "v": cand[1], "inner_lr": lr}
    if o["embedding"] == "rows":
        send["rows"], send["emb"] = _embedding_rows(model, global_state, (all_x, data[1]), ctx)
    payload = compress(comp, send, ctx)
    if o["ratio"] is not None:  # the driver writes it to metrics.jsonl, per client
        comp.last_choice = {"batches": m, "batch": b, "inner_lr": lr, "bytes": len(payload)}
    comp.last_w_syn = replay(comp, payload, global_state, ctx)  # from the bytes sent: exact replay
    comp.last_real_loss = min(best[0], final)
    return payload


def _shape_for_ratio(comp, o, global_state, V, d, T, n, ctx):
    """The image path's shape rule (``fedsynth.shape_for_budget``) on text payloads: m about the
    client's SGD step count, b as large as dense / ratio allows, inner_lr so that m steps travel
    as far as local SGD (capped); explicit batches / batch / inner_lr win."""
    from .fedsynth import shape_for_budget

    k = _k(o, V)
    whole = o["labels"] == "trainable" and o["topk"] == 0  # no ids: the whole vocabulary

    def size_of(m, b):  # the exact length: a payload of zeros of that shape
        idx = None if whole else torch.zeros(m, b, T, k, dtype=torch.int64)
        return len(compress(comp, {"x": torch.zeros(m, b, T, d), "idx": idx, "v": torch.zeros(m, b, T, k)}))

    p, g = comp.params, comp.given
    return shape_for_budget(
        budget_bytes(global_state, p["ratio"]),
        None,
        None,
        local_steps=ctx.epochs * math.ceil(n / ctx.batch_size),
        local_lr=ctx.lr,
        batches=p["batches"] if "batches" in g else None,
        batch=p["batch"] if "batch" in g else None,
        inner_lr=p["inner_lr"] if "inner_lr" in g else None,
        ratio=p["ratio"],
        dense=dense_payload_bytes(global_state),
        size_of=size_of,
    )


def _init(model, P, real_x, real_y, m, b, k, o, ctx, init):
    g = ctx.generator(salt=51)
    n, count = real_x.shape[0], m * b
    E = P["embedding.weight"]
    V, d = E.shape
    T = real_x.shape[1]
    if init == "real":
        pick = torch.randperm(n, generator=g)[:count] if count <= n else torch.randint(0, n, (count,), generator=g)
        pick = pick.to(real_x.device)
        e = F.embedding(real_x[pick], E).clone()
        lab = real_y[pick].clone()
        # ignored targets (a BOS after an EOS, padding): the next input token is the true one;
        # at the last position, PAD (a label no metric counts)
        nxt = torch.cat([real_x[pick][:, 1:], torch.full_like(lab[:, :1], PAD)], 1)
        lab = torch.where(lab < 0, nxt, lab)
    else:
        e = torch.randn(count, T, d, generator=g).to(E.device) * float(E.std())
        lab = torch.randint(4, V, (count, T), generator=g).to(E.device)
    idx = lab.unsqueeze(-1)
    if k == V:  # the whole vocabulary in id order (not sent); the label is marked by its logit
        idx = None
    elif k > 1:  # the label, then the model's k-1 likeliest other words at w
        with torch.no_grad():
            z = torch.func.functional_call(model, P, (e,)).transpose(1, 2)  # [count, T, V]
            z.scatter_(-1, lab.unsqueeze(-1), -math.inf)
            others = z.topk(k - 1, dim=-1).indices
        idx = torch.cat([idx, others], -1)
    lab = lab.reshape(m, b, T, 1)
    idx = None if idx is None else idx.reshape(m, b, T, k).contiguous()
    return e.reshape(m, b, T, d).contiguous(), idx, lab


def _embedding_rows(model, global_state, data, ctx):
    """Rows of the embedding that local SGD on the real data changed, as (ids, deltas)."""
    local = local_sgd(model, global_state, data, ctx)
    delta = local["embedding.weight"] - global_state["embedding.weight"]
    rows = torch.unique(data[0]).sort().values
    model.load_state_dict(global_state)
    return rows.to(torch.int32), delta[rows].contiguous()
