"""FedSynth's hypergradient for the next-word LSTM, in the word-embedding space (paper §4.2).

Model: ``fedavg.models.NextWordLSTM`` (embedding E -> stacked LSTM -> linear over the vocabulary).
Synthetic data live after the embedding: ``syn_e`` [m, b, T, d]. Labels are sparse soft labels,
one list of k (vocabulary id, weight) pairs per position: ``syn_idx`` int64 [m, b, T, k] and
``syn_val`` [m, b, T, k] (fixed next-word labels: k = 1, weight 1; dense soft labels over the
vocabulary: k = V, idx = arange(V)). The objective (FedSynth eq. 4):

    w_0 = body params (LSTM + output layer; E is untouched: synthetic inputs bypass it)
    w_{j+1} = w_j - lr * grad_w l(w_j; e_j, idx_j, val_j)
    l       = mean over the b*T positions p of  -sum_k val_pk * log_softmax(z_p)[idx_pk]
    L       = cross_entropy(f_{w_m}(E[real_x]), real_y, ignore_index=-100)  (mean over real tokens)
    returns (L, dL/d syn_e, dL/d syn_val)

Implementations, same results:

- ``hypergradient_text`` (the engine): a hand-written LSTM forward and backward (BPTT) with no
  autograd, and for the reverse pass the same two passes carrying a tangent (forward-over-reverse):
  at step j, with the cotangent lam_{j+1} on w_{j+1} as the tangent of w_j, the tangent of the
  inner gradient is H_j lam (Hessian-vector product), the tangent of the gradient w.r.t. the input
  e_j is the mixed term d<g, lam>/de_j, and the tangent of dl/dval is d<g, lam>/dval. One pass per
  step, no autograd graph; w_j of every step is kept (as the create_graph peers keep it).
- ``hypergradient_text_ref``: the plain create_graph unroll through the model itself
  (``torch.func.functional_call`` on nn.LSTM); the reference the tests compare against.
- ``unroll_text``: w_m (client and server both call it: exact replay).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

Tensor = torch.Tensor
IGNORE = -100


# ---------------------------------------------------------------------------------------------
# Model structure


def is_text_model(model) -> bool:
    """True for the next-word LSTM (an embedding, a batch-first nn.LSTM, a linear head)."""
    from ..fedavg.models import NextWordLSTM

    return isinstance(model, NextWordLSTM)


def body_names(model) -> list[str]:
    """The parameters the synthetic steps train: every parameter but the embedding."""
    return [k for k, _ in model.named_parameters() if not k.startswith("embedding.")]


def _layers(model) -> int:
    return int(model.lstm.num_layers)


def _check_model(model) -> None:
    if not is_text_model(model):
        raise ValueError(f"model must be a fedcompress NextWordLSTM, got {type(model).__name__}")
    lstm = model.lstm
    if not lstm.batch_first or lstm.bidirectional or lstm.proj_size or not lstm.bias or lstm.dropout:
        raise ValueError("model.lstm must be batch-first, unidirectional, with biases, no projection/dropout")


def check_args(model, params, syn_e, syn_idx, syn_val, inner_lr, real_x=None, real_y=None) -> dict[str, Tensor]:
    """ValueError naming the argument; returns the body parameters (plus the embedding) in order."""
    _check_model(model)
    if not isinstance(params, dict):
        raise ValueError("params must be a dict name -> Tensor (the model's parameters)")
    mp = dict(model.named_parameters())
    for k, p in mp.items():
        v = params.get(k)
        if not isinstance(v, Tensor) or v.shape != p.shape:
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"params[{k!r}] has shape {got}, the model's is {tuple(p.shape)}")
    V, d = model.embedding.weight.shape
    if not isinstance(syn_e, Tensor) or not syn_e.is_floating_point() or syn_e.dim() != 4 or syn_e.shape[3] != d:
        got = tuple(syn_e.shape) if isinstance(syn_e, Tensor) else type(syn_e).__name__
        raise ValueError(f"syn_e must be a floating tensor [m, b, T, d={d}] of embeddings, got {got}")
    m, b, T = syn_e.shape[:3]
    if m < 1 or b < 1 or T < 1:
        raise ValueError(f"syn_e must have m, b, T >= 1, got {tuple(syn_e.shape)}")
    if not isinstance(syn_idx, Tensor) or syn_idx.dtype != torch.int64 or syn_idx.dim() != 4:
        raise ValueError("syn_idx must be int64 [m, b, T, k] vocabulary ids")
    if syn_idx.shape[:3] != (m, b, T) or not 1 <= syn_idx.shape[3] <= V:
        raise ValueError(f"syn_idx must be [m={m}, b={b}, T={T}, k in 1..{V}], got {tuple(syn_idx.shape)}")
    if syn_idx.numel() and (int(syn_idx.min()) < 0 or int(syn_idx.max()) >= V):
        raise ValueError(f"syn_idx values must lie in [0, {V})")
    if not isinstance(syn_val, Tensor) or syn_val.shape != syn_idx.shape or syn_val.dtype != syn_e.dtype:
        raise ValueError(f"syn_val must be {syn_e.dtype} of syn_idx's shape {tuple(syn_idx.shape)}")
    try:
        lr = float(inner_lr)
    except (TypeError, ValueError):
        raise ValueError(f"inner_lr must be a finite number > 0, got {inner_lr!r}") from None
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"inner_lr must be a finite number > 0, got {inner_lr!r}")
    if real_x is not None:
        if not isinstance(real_x, Tensor) or real_x.dtype != torch.int64 or real_x.dim() != 2 or real_x.shape[0] < 1:
            raise ValueError("real_x must be int64 token ids [n >= 1, T]")
        if real_x.numel() and (int(real_x.min()) < 0 or int(real_x.max()) >= V):
            raise ValueError(f"real_x ids must lie in [0, {V})")
        if not isinstance(real_y, Tensor) or real_y.dtype != torch.int64 or real_y.shape != real_x.shape:
            raise ValueError(f"real_y must be int64 next-word ids of real_x's shape {tuple(real_x.shape)}")
        ok = (real_y == IGNORE) | ((real_y >= 0) & (real_y < V))
        if not bool(ok.all()):
            raise ValueError(f"real_y values must lie in [0, {V}) or be {IGNORE} (ignored)")
    return {k: params[k] for k in mp}


# ---------------------------------------------------------------------------------------------
# Hand-written LSTM forward / backward, optionally carrying a tangent (forward-over-reverse)
#
# Per layer: A = X Wi^T + (bi + bh); a_t = A_t + h_{t-1} Wh^T; gates (i, f, g, o) = (s, s, tanh, s)
# of the four slices; c_t = f c_{t-1} + i g; h_t = o tanh(c_t). A dotted name is the tangent.


class _Layer:
    __slots__ = ("X", "Xd", "act", "D", "C", "TC", "H", "actd", "Cd", "Hd")


def _lstm_layer_fwd(X, Wi, Wh, b, Xd=None, tan=None):
    """Forward of one layer; ``tan`` = (Wid, Whd, bd) makes it carry tangents."""
    B, T, din = X.shape
    h = Wh.shape[1]
    L = _Layer()
    L.X, L.Xd = X, Xd
    A = torch.addmm(b, X.reshape(-1, din), Wi.t()).view(B, T, 4 * h)
    L.act = act = torch.empty_like(A)
    L.D = D = torch.empty_like(A)  # d act / d a
    L.C = C = X.new_empty(B, T, h)
    L.TC = TC = X.new_empty(B, T, h)
    L.H = H = X.new_empty(B, T, h)
    if tan is not None:
        Wid, Whd, bd = tan
        Ad = torch.addmm(bd, X.reshape(-1, din), Wid.t()).view(B, T, 4 * h)
        if Xd is not None:
            Ad.view(-1, 4 * h).addmm_(Xd.reshape(-1, din), Wi.t())
        L.actd = actd = torch.empty_like(A)
        L.Cd = Cd = X.new_empty(B, T, h)
        L.Hd = Hd = X.new_empty(B, T, h)
    g = slice(2 * h, 3 * h)
    for t in range(T):
        a = A[:, t] if t == 0 else torch.addmm(A[:, t], H[:, t - 1], Wh.t())
        s = act[:, t]
        torch.sigmoid(a, out=s)
        torch.tanh(a[:, g], out=s[:, g])
        Dt = D[:, t]
        torch.mul(s, 1 - s, out=Dt)
        torch.mul(s[:, g], s[:, g], out=Dt[:, g]).neg_().add_(1)
        i, f, gg, o = s[:, :h], s[:, h : 2 * h], s[:, g], s[:, 3 * h :]
        c = i * gg if t == 0 else torch.addcmul(i * gg, f, C[:, t - 1])
        C[:, t] = c
        tc = torch.tanh(c)
        TC[:, t] = tc
        torch.mul(o, tc, out=H[:, t])
        if tan is not None:
            ad = Ad[:, t]
            if t > 0:
                ad = ad.addmm(Hd[:, t - 1], Wh.t()).addmm_(H[:, t - 1], Whd.t())
            sd = actd[:, t]
            torch.mul(Dt, ad, out=sd)
            idt, fdt, gdt, odt = sd[:, :h], sd[:, h : 2 * h], sd[:, g], sd[:, 3 * h :]
            cd = idt * gg + i * gdt
            if t > 0:
                cd += fdt * C[:, t - 1] + f * Cd[:, t - 1]
            Cd[:, t] = cd
            Hd[:, t] = odt * tc + o * (1 - tc * tc) * cd
    return L


def _lstm_layer_bwd(L, Wi, Wh, dH, dHd=None, tan=None):
    """BPTT of one layer given dL/dH (and its tangent). Returns (grads, grad tangents, dX, dXd)."""
    B, T, h = L.H.shape
    din = L.X.shape[2]
    dA = torch.empty_like(L.act)
    dAd = torch.empty_like(L.act) if tan is not None else None
    g = slice(2 * h, 3 * h)
    dh_next = dc_next = dhd_next = dcd_next = None
    for t in range(T - 1, -1, -1):
        s, D, tc = L.act[:, t], L.D[:, t], L.TC[:, t]
        i, f, gg, o = s[:, :h], s[:, h : 2 * h], s[:, g], s[:, 3 * h :]
        c_prev = L.C[:, t - 1] if t > 0 else None
        dh = dH[:, t] if dh_next is None else dH[:, t] + dh_next
        one_m = 1 - tc * tc
        dc = dh * o * one_m
        if dc_next is not None:
            dc += dc_next
        ds = torch.empty_like(s)  # dL / d act
        torch.mul(dc, gg, out=ds[:, :h])
        if c_prev is not None:
            torch.mul(dc, c_prev, out=ds[:, h : 2 * h])
        else:
            ds[:, h : 2 * h].zero_()
        torch.mul(dc, i, out=ds[:, g])
        torch.mul(dh, tc, out=ds[:, 3 * h :])
        da = dA[:, t]
        torch.mul(ds, D, out=da)
        if tan is not None:
            Whd = tan[1]
            sd, cd = L.actd[:, t], L.Cd[:, t]
            idt, fdt, gdt, odt = sd[:, :h], sd[:, h : 2 * h], sd[:, g], sd[:, 3 * h :]
            dhd = dHd[:, t] if dhd_next is None else dHd[:, t] + dhd_next
            tcd = one_m * cd
            dcd = dhd * o * one_m + dh * odt * one_m - 2 * dh * o * tc * tcd
            if dcd_next is not None:
                dcd += dcd_next
            dsd = torch.empty_like(s)
            torch.addcmul(dcd * gg, dc, gdt, out=dsd[:, :h])
            if c_prev is not None:
                torch.addcmul(dcd * c_prev, dc, L.Cd[:, t - 1], out=dsd[:, h : 2 * h])
            else:
                dsd[:, h : 2 * h].zero_()
            torch.addcmul(dcd * i, dc, idt, out=dsd[:, g])
            torch.addcmul(dhd * tc, dh, tcd, out=dsd[:, 3 * h :])
            # tangent of D: sigmoid s(1-s) -> sd(1-2s); tanh 1-g^2 -> -2 g gd
            Dd = sd * (1 - 2 * s)
            torch.mul(gg, gdt, out=Dd[:, g]).mul_(-2)
            dad = dAd[:, t]
            torch.mul(dsd, D, out=dad)
            dad.addcmul_(ds, Dd)
            dhd_next = dad @ Wh + da @ Whd
            dcd_next = dcd * f
            if c_prev is not None:
                dcd_next += dc * fdt
        dh_next = da @ Wh
        dc_next = dc * f
    dAf = dA.view(-1, 4 * h)
    Xf = L.X.reshape(-1, din)
    dWi = dAf.t() @ Xf
    db = dAf.sum(0)
    dWh = dA[:, 1:].reshape(-1, 4 * h).t() @ L.H[:, :-1].reshape(-1, h)
    dX = (dAf @ Wi).view(B, T, din)
    if tan is None:
        return (dWi, dWh, db), None, dX, None
    Wid = tan[0]
    dAdf = dAd.view(-1, 4 * h)
    dWid = dAdf.t() @ Xf
    dXd = dAdf @ Wi + dAf @ Wid
    if L.Xd is not None:
        dWid.addmm_(dAf.t(), L.Xd.reshape(-1, din))
    dWhd = dAd[:, 1:].reshape(-1, 4 * h).t() @ L.H[:, :-1].reshape(-1, h)
    dWhd.addmm_(dA[:, 1:].reshape(-1, 4 * h).t(), L.Hd[:, :-1].reshape(-1, h))
    return (dWi, dWh, db), (dWid, dWhd, dAdf.sum(0)), dX, dXd.view(B, T, din)


def _unpack(P, layers):
    lw = [
        (P[f"lstm.weight_ih_l{k}"], P[f"lstm.weight_hh_l{k}"], P[f"lstm.bias_ih_l{k}"] + P[f"lstm.bias_hh_l{k}"])
        for k in range(layers)
    ]
    return lw, P["fc.weight"], P["fc.bias"]


def _grad_dict(layers, lgrads, dWf, dbf) -> dict[str, Tensor]:
    out = {}
    for k, (dWi, dWh, db) in enumerate(lgrads):
        out[f"lstm.weight_ih_l{k}"] = dWi
        out[f"lstm.weight_hh_l{k}"] = dWh
        out[f"lstm.bias_ih_l{k}"] = db
        out[f"lstm.bias_hh_l{k}"] = db
    out["fc.weight"] = dWf
    out["fc.bias"] = dbf
    return out


def _body_pass(P, layers, e, dz_fn, lam=None):
    """Forward the body on embeddings ``e`` [B, T, d], take dL/dz from ``dz_fn(z, zd)`` (which also
    returns what the caller wants from the head), and backpropagate. With ``lam`` (a tangent of
    the body parameters) every quantity carries its tangent. Returns (grads, grad tangents, de,
    ded, head_out)."""
    lw, Wf, bf = _unpack(P, layers)
    tl = None
    if lam is not None:
        tl, Wfd, bfd = _unpack(lam, layers)
    Ls = []
    X, Xd = e, None
    for k in range(layers):
        L = _lstm_layer_fwd(X, *lw[k], Xd=Xd, tan=None if tl is None else tl[k])
        Ls.append(L)
        X = L.H
        Xd = L.Hd if tl is not None else None
    B, T, h = X.shape
    Hf = X.reshape(-1, h)
    z = torch.addmm(bf, Hf, Wf.t())
    zd = None
    if tl is not None:
        zd = torch.addmm(bfd, Xd.reshape(-1, h), Wf.t()).addmm_(Hf, Wfd.t())
    dz, dzd, head = dz_fn(z, zd)
    dWf = dz.t() @ Hf
    dbf = dz.sum(0)
    dH = (dz @ Wf).view(B, T, h)
    dHd = None
    tans = None
    if tl is not None:
        Hdf = Xd.reshape(-1, h)
        dWfd = dzd.t() @ Hf
        dWfd.addmm_(dz.t(), Hdf)
        dHd = (dzd @ Wf).addmm_(dz, Wfd).view(B, T, h)
        tans = [None] * layers
    grads = [None] * layers
    for k in range(layers - 1, -1, -1):
        Wi, Wh, _ = lw[k]
        grads[k], tk, dH, dHd = _lstm_layer_bwd(Ls[k], Wi, Wh, dH, dHd, None if tl is None else tl[k])
        if tl is not None:
            tans[k] = tk
    g = _grad_dict(layers, grads, dWf, dbf)
    gt = _grad_dict(layers, tans, dWfd, dzd.sum(0)) if tl is not None else None
    return g, gt, dH, dHd, head


def _soft_dz(idx, val):
    """dL/dz of the inner loss (sparse soft labels) and, with a tangent, dL/dz's tangent and the
    tangent of dL/dval."""
    k = idx.shape[-1]
    idx2, val2 = idx.reshape(-1, k), val.reshape(-1, k)
    N = idx2.shape[0]

    def fn(z, zd):
        S = torch.softmax(z, -1)
        tot = val2.sum(-1, keepdim=True)
        dz = (S * tot).scatter_add_(-1, idx2, -val2).div_(N)
        if zd is None:
            return dz, None, None
        Szd = (S * zd).sum(-1, keepdim=True)
        Sd = S * (zd - Szd)
        dzd = Sd.mul_(tot / N)
        dvald = -(zd.gather(-1, idx2) - Szd) / N  # tangent of dL/dval = -log_softmax(z)[idx] / N
        return dz, dzd, dvald

    return fn


def _inner_loss(z, idx, val):
    k = idx.shape[-1]
    ls = torch.log_softmax(z, -1)
    return -(val.reshape(-1, k) * ls.gather(-1, idx.reshape(-1, k))).sum() / idx.reshape(-1, k).shape[0]


def _sgd(P, g, lr):
    return {k: (v - lr * g[k]) if k in g else v for k, v in P.items()}


def _unroll(model, params, syn_e, syn_idx, syn_val, lr, keep):
    layers = _layers(model)
    P = dict(params)
    hist = []
    for j in range(syn_e.shape[0]):
        if keep:
            hist.append(P)
        g, _, _, _, _ = _body_pass(P, layers, syn_e[j], _soft_dz(syn_idx[j], syn_val[j]))
        P = _sgd(P, g, lr)
    return P, hist


def unroll_text(model, params, syn_e, syn_idx, syn_val, inner_lr) -> dict[str, Tensor]:
    """ClientUpdate on embedding-space data: every model parameter after the m SGD steps (the
    embedding unchanged). Client and server both call this: exact replay."""
    params = check_args(model, params, syn_e, syn_idx, syn_val, inner_lr)
    with torch.no_grad():
        P, _ = _unroll(model, params, syn_e.detach(), syn_idx, syn_val.detach(), float(inner_lr), False)
    return P


def _real_dz(y, count):
    yf = y.reshape(-1)
    keep = yf != IGNORE
    ysafe = torch.where(keep, yf, torch.zeros_like(yf))

    def fn(z, zd):
        ls = torch.log_softmax(z, -1)
        loss = -(ls.gather(-1, ysafe[:, None])[:, 0] * keep).sum()
        dz = ls.exp_()
        dz.scatter_add_(-1, ysafe[:, None], -torch.ones_like(dz[:, :1]))
        dz.mul_(keep[:, None].to(dz.dtype) / count)
        return dz, None, loss

    return fn


def real_loss_text(model, params, real_x, real_y, chunk: int = 256) -> float:
    """Mean cross-entropy over the real (non-ignored) tokens with weights ``params``."""
    bufs = {k: v for k, v in model.named_buffers()}
    count = max(1, int((real_y != IGNORE).sum()))
    total = 0.0
    with torch.no_grad():
        for i in range(0, real_x.shape[0], chunk):
            z = functional_call(model, {**params, **bufs}, (real_x[i : i + chunk],))
            total += float(F.cross_entropy(z, real_y[i : i + chunk], reduction="sum"))
    return total / count


def hypergradient_text(model, params, syn_e, syn_idx, syn_val, inner_lr, real_x, real_y, *, real_chunk: int = 64):
    """(L, dL/d syn_e, dL/d syn_val) by the hand-written forward-over-reverse pass (module docstring)."""
    params = check_args(model, params, syn_e, syn_idx, syn_val, inner_lr, real_x, real_y)
    if not isinstance(real_chunk, int) or real_chunk < 1:
        raise ValueError(f"real_chunk must be an integer >= 1, got {real_chunk!r}")
    lr = float(inner_lr)
    layers = _layers(model)
    with torch.no_grad():
        syn_e, syn_val = syn_e.detach(), syn_val.detach()
        P, hist = _unroll(model, params, syn_e, syn_idx, syn_val, lr, True)
        E = P["embedding.weight"]
        count = max(1, int((real_y != IGNORE).sum()))
        lam = None
        loss = syn_e.new_zeros(())
        for i in range(0, real_x.shape[0], real_chunk):
            e = F.embedding(real_x[i : i + real_chunk], E)
            g, _, _, _, part = _body_pass(P, layers, e, _real_dz(real_y[i : i + real_chunk], count))
            loss += part
            lam = g if lam is None else {k: lam[k] + g[k] for k in g}
        loss /= count
        ge = torch.empty_like(syn_e)
        gv = torch.empty_like(syn_val)
        for j in range(syn_e.shape[0] - 1, -1, -1):
            _, hl, _, ded, dvald = _body_pass(hist[j], layers, syn_e[j], _soft_dz(syn_idx[j], syn_val[j]), lam)
            hist[j] = None
            torch.mul(ded, -lr, out=ge[j])
            torch.mul(dvald.view_as(gv[j]), -lr, out=gv[j])
            lam = {k: lam[k] - lr * hl[k] for k in lam}
    return loss, ge, gv


def hypergradient_text_ref(model, params, syn_e, syn_idx, syn_val, inner_lr, real_x, real_y):
    """Reference: one create_graph unroll through the model (nn.LSTM), then backward."""
    params = check_args(model, params, syn_e, syn_idx, syn_val, inner_lr, real_x, real_y)
    lr = float(inner_lr)
    names = body_names(model)
    e = syn_e.detach().clone().requires_grad_(True)
    v = syn_val.detach().clone().requires_grad_(True)
    w = {k: params[k].detach().clone().requires_grad_(names.count(k) > 0) for k in params}
    for j in range(e.shape[0]):
        z = functional_call(model, w, (e[j],)).transpose(1, 2).reshape(-1, model.fc.out_features)
        lj = _inner_loss(z, syn_idx[j], v[j])
        g = torch.autograd.grad(lj, [w[k] for k in names], create_graph=True)
        w = {**w, **{k: w[k] - lr * gk for k, gk in zip(names, g, strict=True)}}
    loss = F.cross_entropy(functional_call(model, w, (real_x,)), real_y)
    ge, gv = torch.autograd.grad(loss, (e, v))
    return loss.detach(), ge, gv


def embedding_of(model: nn.Module) -> nn.Embedding:
    return model.embedding
